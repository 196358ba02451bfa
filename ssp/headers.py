# -*- test-case-name: tests.test_parsing -*-
"""
Request and response headers: validating the C{Ssp-*} headers and
deciding what crosses the proxy.

Everything is forwarded unchanged except hop-by-hop headers (RFC 9110
§7.6.1), C{Host} (the target's authority) and C{Content-Length} (re-stated
by the body producer); the proxy appends one RFC 7239 C{Forwarded}
element upstream and adds C{Strict-Transport-Security} downstream.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from twisted.web.http_headers import Headers

from ssp.errors import BadRequest
from ssp.model import SpineHeaders
from ssp.target import Target

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_NOT_FORWARDED_UP = HOP_BY_HOP | {b"host", b"content-length"}

# Applied with fullmatch: C{$} would also accept a trailing newline.
_UUID = re.compile(
    rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_ASID = re.compile(rb"[0-9]{1,20}")
_INTERACTION = re.compile(rb"urn:nhs:names:services:[\x21-\x7e]{1,200}")

_RULES = (
    (b"Ssp-TraceID", _UUID, "must be a UUID"),
    (b"Ssp-From", _ASID, "must be an ASID (digits only)"),
    (b"Ssp-To", _ASID, "must be an ASID (digits only)"),
    (b"Ssp-InteractionID", _INTERACTION, "must be an interaction ID urn:nhs:names:services:..."),
)


def parse(headers: Headers) -> SpineHeaders:
    """
    Validate the four C{Ssp-*} headers.

    @raise BadRequest: naming the first header that is missing, empty,
        repeated or malformed.
    """
    values = []
    for name, pattern, rule in _RULES:
        found = headers.getRawHeaders(name)
        label = name.decode("ascii")
        if not found or not found[0]:
            raise BadRequest(f"BAD_REQUEST: {label} header is missing")
        if len(found) > 1:
            raise BadRequest(f"BAD_REQUEST: {label} header is repeated")
        if not pattern.fullmatch(found[0]):
            raise BadRequest(f"BAD_REQUEST: {label} header {rule}")
        values.append(found[0].decode("ascii"))
    return SpineHeaders(*values)


def _connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", ()):
        tokens.update(t.strip().lower() for t in value.split(b","))
    return tokens


def upstream_headers(incoming: Headers, target: Target, forwarded: bytes) -> Headers:
    """
    The headers to send to the provider: the consumer's, less hop-by-hop
    ones, with C{Host} set to the target's authority and C{forwarded}
    appended to any C{Forwarded} header.
    """
    dropped = _NOT_FORWARDED_UP | _connection_tokens(incoming)
    outgoing = Headers()
    for name, values in incoming.getAllRawHeaders():
        if name.lower() not in dropped:
            outgoing.setRawHeaders(name, values)
    outgoing.setRawHeaders(b"Host", [target.authority])
    outgoing.setRawHeaders(b"Forwarded", [*incoming.getRawHeaders(b"forwarded", []), forwarded])
    return outgoing


def forwarded_element(client_host: str, proxy_host: str) -> bytes:
    """
    An RFC 7239 element C{for=...;proto=https;by=...}; IPv6 addresses are
    quoted and bracketed as §6 requires.
    """
    return b"for=%s;proto=https;by=%s" % (_node(client_host), _node(proxy_host))


def _node(host: str) -> bytes:
    if ":" in host:
        return b'"[%s]"' % host.encode("ascii")
    return host.encode("ascii")


def downstream_headers(incoming: Headers) -> list[tuple[bytes, Sequence[bytes]]]:
    """
    The provider's response headers to relay: all but hop-by-hop ones.
    """
    dropped = HOP_BY_HOP | _connection_tokens(incoming)
    return [(n, v) for n, v in incoming.getAllRawHeaders() if n.lower() not in dropped]
