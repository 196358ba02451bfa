# -*- test-case-name: tests.test_parsing -*-
"""
Request and response headers: validating the C{Ssp-*} headers and
deciding what crosses the proxy.

Everything is forwarded unchanged except hop-by-hop headers (RFC 9110
§7.6.1), C{Host} (the target's authority) and C{Content-Length} (re-stated
by the body producer); the proxy appends one RFC 7239 C{Forwarded}
element upstream and adds C{Strict-Transport-Security} downstream.

What the proxy validates must be exactly what the provider acts on, so
the fields it validates (and C{Host}, C{Content-Type}) may appear once,
and a C{Connection} option may not make any of them, or the framing
fields, hop-by-hop (L{field_refusal}, called by the channel per line).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence

from twisted.web.http import datetimeToString
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

# Fields whose grammar allows one value: a second line, or a list in one
# line, would let the proxy validate one value and a provider act on another.
SINGLETONS = {
    name.lower(): name.decode("ascii")
    for name in (b"Authorization", b"Ssp-TraceID", b"Ssp-From", b"Ssp-To",
                 b"Ssp-InteractionID", b"Host", b"Content-Type")
}
# Fields a Connection option must not make hop-by-hop (besides any Ssp-*):
# the proxy validated them, or framing and routing depend on them.
_PROTECTED = {b"authorization": "Authorization", b"host": "Host",
              b"content-length": "Content-Length", b"transfer-encoding": "Transfer-Encoding"}
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# RFC 9112 §3.2: Host = uri-host [ ":" port ] (RFC 3986), one value, so a
# comma (a list) is refused with the other sub-delims allowed.
_HOST_FIELD = re.compile(
    rb"(?P<host>\[[0-9A-Fa-f:.]+\]|(?:[A-Za-z0-9\-._~!$&'()*+;=]|%[0-9A-Fa-f]{2})*)"
    rb"(?::(?P<port>[0-9]{1,5}))?"
)
# The usual Host: a DNS name or IPv4 address and a port, a subset of
# _HOST_FIELD matched without its per-byte alternation.
_PLAIN_HOST_FIELD = re.compile(rb"[A-Za-z0-9.\-]*(?::(?P<port>[0-9]{1,5}))?")
# A comma outside a quoted-string (RFC 9110 §5.6.4) separates list members.
_UNQUOTED_COMMA = re.compile(rb'(?:[^",]|"(?:[^"\\]|\\.)*")*,')

# Applied with fullmatch: C{$} would also accept a trailing newline.
_UUID = re.compile(
    rb"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_ASID = re.compile(rb"[0-9]{1,20}")
# No comma: it would make one field a list of interactions.
_INTERACTION = re.compile(rb"urn:nhs:names:services:[\x21-\x2b\x2d-\x7e]{1,200}")

_RULES = (
    (b"Ssp-TraceID", _UUID, "must be a UUID"),
    (b"Ssp-From", _ASID, "must be an ASID (digits only)"),
    (b"Ssp-To", _ASID, "must be an ASID (digits only)"),
    (b"Ssp-InteractionID", _INTERACTION, "must be an interaction ID urn:nhs:names:services:..."),
)


def parse(headers: Headers, fields_checked: bool = False) -> SpineHeaders:
    """
    Validate the four C{Ssp-*} headers, and every field against
    L{field_refusal} unless C{fields_checked}.

    @param fields_checked: every field already passed L{field_refusal} as
        its line arrived (the strict channel refuses the request
        otherwise), so the same check on the same bytes is not run twice.
    @raise BadRequest: naming the first header that is missing, empty,
        repeated or malformed, or a field L{field_refusal} refuses.
    """
    if not fields_checked:
        seen: set[bytes] = set()
        for name, values in headers.getAllRawHeaders():
            for value in values:
                refusal = field_refusal(name.lower(), value.strip(b" \t"), seen)
                if refusal is not None:
                    raise refusal
    fields: list[str] = []
    for name, pattern, rule in _RULES:
        found = headers.getRawHeaders(name)
        label = name.decode("ascii")
        if not found or not found[0]:
            raise BadRequest(f"BAD_REQUEST: {label} header is missing")
        if not pattern.fullmatch(found[0]):
            raise BadRequest(f"BAD_REQUEST: {label} header {rule}")
        fields.append(found[0].decode("ascii"))
    return SpineHeaders(*fields)


def single(headers: Headers, name: bytes) -> bytes | None:
    """
    The value of a field sent exactly once, else L{None}: a repeated field
    has no one value to validate or audit.
    """
    values = headers.getRawHeaders(name)
    return values[0] if values is not None and len(values) == 1 else None


def connection_options(headers: Headers) -> set[bytes]:
    """
    The lower-cased options of every C{Connection} field (RFC 9110
    §7.6.1), empty list elements skipped.  The one reader of C{Connection}.
    """
    options = set()
    for value in headers.getRawHeaders(b"connection", ()):
        options.update(_options(value))
    return options


def _options(value: bytes) -> list[bytes]:
    """
    The options of one C{Connection} value, in order.
    """
    return [option for option in (o.strip(b" \t").lower() for o in value.split(b",")) if option]


def field_refusal(name: bytes, value: bytes, seen: set[bytes]) -> BadRequest | None:
    """
    Check one request field as its line arrives: a singleton field seen
    before (its lower-cased name is then in C{seen}, which this updates) or
    holding a list, a malformed C{Host}, a C{Connection} option naming a
    field the proxy relies on.

    @param name: the field name, lower-cased.
    @param value: the value, without surrounding whitespace.
    """
    label = SINGLETONS.get(name)
    if label is not None:
        if name in seen or _is_list(name, value):
            return BadRequest(f"BAD_REQUEST: {label} header is repeated")
        seen.add(name)
        if name == b"host" and not _valid_host(value):
            return BadRequest("BAD_REQUEST: Host header must be host[:port] "
                              "without user information, path or spaces")
    elif name == b"connection":
        return _connection_refusal(value)
    return None


def _is_list(name: bytes, value: bytes) -> bool:
    if name == b"content-type":
        # Parameter values may be quoted strings holding commas.
        return _UNQUOTED_COMMA.match(value) is not None
    return b"," in value


def _valid_host(value: bytes) -> bool:
    match = _PLAIN_HOST_FIELD.fullmatch(value) or _HOST_FIELD.fullmatch(value)
    if match is None:
        return False
    port = match["port"]
    if port is not None and not 0 < int(port) < 65536:
        return False
    if value.startswith(b"["):
        host = match["host"]
        try:
            ipaddress.IPv6Address(host[1:-1].decode("ascii"))
        except ValueError:
            return False
    return True


def _connection_refusal(value: bytes) -> BadRequest | None:
    for option in _options(value):
        if not _TOKEN.fullmatch(option):
            return BadRequest("BAD_REQUEST: Connection header must list header names")
        if option in _PROTECTED or option.startswith(b"ssp-"):
            name = SINGLETONS.get(option) or _PROTECTED.get(option) or option.decode("ascii")
            return BadRequest(f"BAD_REQUEST: Connection header must not name {name}")
    return None


def upstream_headers(incoming: Headers, target: Target, forwarded: bytes) -> Headers:
    """
    The headers to send to the provider: the consumer's, less hop-by-hop
    ones, with C{Host} set to the target's authority and C{forwarded}
    appended to any C{Forwarded} header.
    """
    dropped = _NOT_FORWARDED_UP | connection_options(incoming)
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
    The provider's response headers to relay: all but hop-by-hop ones,
    including those its C{Connection} field names.
    """
    dropped = HOP_BY_HOP | connection_options(incoming)
    return [(n, v) for n, v in incoming.getAllRawHeaders() if n.lower() not in dropped]


class _HTTPDate:
    """
    C{Date} values (RFC 9110 §5.6.7), formatted once per second rather than
    once per response: the value only changes each second, and formatting
    it cost more than any other response header (Twisted's site caches its
    log time the same way).
    """

    def __init__(self) -> None:
        # One attribute, so that a reader never pairs one second's text
        # with another second.
        self._cached = (-1, b"")

    def __call__(self, seconds: float) -> bytes:
        whole = int(seconds)
        second, text = self._cached
        if whole != second:
            text = datetimeToString(whole)
            self._cached = (whole, text)
        return text


http_date = _HTTPDate()
"""The C{Date} value for a time in seconds since the epoch."""
