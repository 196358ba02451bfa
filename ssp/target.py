# -*- test-case-name: tests.test_parsing,tests.test_ssrf -*-
"""
The target: the provider URL embedded in the request path, and the verbs
the proxy forwards.

Parsing is strict and never normalises: the bytes forwarded are the bytes
received (after the one percent-decoding of a wholly encoded target), so
the later comparison with the endpoint SDS registers is exact and nothing
can reach a host or path the comparison did not see.
"""

from __future__ import annotations

import re
from urllib.parse import unquote_to_bytes

import attrs

from ssp.errors import BadRequest, MethodNotAllowed

FORWARDED_METHODS = frozenset({b"GET", b"POST", b"PUT", b"PATCH", b"DELETE", b"OPTIONS"})

_ENCODED_PREFIX = re.compile(rb"^https%3a%2f%2f", re.IGNORECASE)
_HOST = re.compile(rb"(?:[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9_-]*[A-Za-z0-9])?)*")
_IPV6 = re.compile(rb"\[[0-9A-Fa-f:.]+\]")
_PORT = re.compile(rb"[0-9]{1,5}")
_FORBIDDEN_BYTES = re.compile(rb"[\x00-\x20\x7f-\xff\\#]")
_BAD_PERCENT = re.compile(rb"%(?![0-9A-Fa-f]{2})")
# Bytes that percent-decoding must not produce inside a path segment: an
# encoded separator or control byte means different servers would see
# different paths.
_DECODED_FORBIDDEN = re.compile(rb"[\x00-\x1f\x7f/\\]")


@attrs.frozen
class Target:
    """
    A parsed provider URL.

    @ivar url: the absolute URL as forwarded, byte for byte.
    @ivar authority: C{host[:port]} exactly as written, for C{Host}.
    @ivar host: the host name (IPv6 literals keep their brackets).
    @ivar port: the TCP port, 443 unless written.
    """

    url: bytes
    authority: bytes
    host: str
    port: int

    @property
    def text(self) -> str:
        return self.url.decode("ascii")


def check_method(method: bytes) -> None:
    """
    @raise MethodNotAllowed: for verbs the proxy does not forward (405).
    """
    if method not in FORWARDED_METHODS:
        raise MethodNotAllowed()


def parse(uri: bytes) -> Target:
    """
    Extract the provider URL from a request-target such as
    C{/https://provider.example/B82617/STU3/1/gpconnect/fhir/metadata?x=1}
    or its wholly percent-encoded form.

    @raise BadRequest: for anything but an absolute C{https} URL with a
        plain host, no user information, no fragment, no control or
        non-ASCII bytes, and a path that cannot be read differently by the
        provider (see L{_check_path}).
    """
    if not uri.startswith(b"/"):
        raise _invalid("must be /https://<provider>/<path>")
    raw = uri[1:]
    if _ENCODED_PREFIX.match(raw):
        path, question, query = raw.partition(b"?")
        raw = unquote_to_bytes(path) + question + query
    if _FORBIDDEN_BYTES.search(raw):
        raise _invalid("contains a control, space, non-ASCII, backslash or fragment character")
    if not raw.startswith(b"https://"):
        raise _invalid("must be an absolute https:// URL")
    rest = raw[len(b"https://"):]
    end = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, remainder = rest[:end], rest[end:]
    if not remainder.startswith(b"/"):
        raise _invalid("must have a path")
    _check_path(remainder.partition(b"?")[0])
    host, port = _split_authority(authority)
    return Target(url=raw, authority=authority, host=host, port=port)


def _check_path(path: bytes) -> None:
    """
    Refuse a path a provider could resolve to somewhere other than what
    the endpoint comparison saw: a segment that is C{.} or C{..} (also
    percent-encoded, however many times, and also with C{;parameters}, as
    Tomcat reads C{..;}), an encoded C{/}, C{\\} or control byte,
    malformed percent-encoding, or percent-encoded bytes that are not UTF-8
    (overlong forms such as C{%c0%ae} for C{.}, surrogates, truncated
    sequences), at any depth of encoding: decoders that accept such bytes
    differ in what they make of them.
    """
    if b"%" not in path:
        # Nothing to decode: the raw checks of parse() already refused
        # control bytes and backslashes, and no segment holds a slash.
        if b"." in path and any(s.partition(b";")[0] in (b".", b"..")
                                for s in path.split(b"/")):
            raise _invalid("must not contain dot segments")
        return
    if _BAD_PERCENT.search(path):
        raise _invalid("has malformed percent-encoding")
    for segment in path.split(b"/"):
        decoded = _fully_decoded(segment)
        if _DECODED_FORBIDDEN.search(decoded):
            raise _invalid("must not contain an encoded slash, backslash or control character")
        if decoded.partition(b";")[0] in (b".", b".."):
            raise _invalid("must not contain dot segments")


def _fully_decoded(segment: bytes) -> bytes:
    """
    C{segment} percent-decoded until nothing changes (each round that
    changes it shortens it, so this ends), each round's result UTF-8.
    """
    while True:
        decoded = unquote_to_bytes(segment)
        if decoded == segment:
            return segment
        try:
            decoded.decode("utf-8")
        except UnicodeDecodeError:
            raise _invalid("path must be UTF-8 once percent-decoded") from None
        segment = decoded


def _split_authority(authority: bytes) -> tuple[str, int]:
    if b"@" in authority:
        raise _invalid("must not contain user information")
    if authority.startswith(b"["):
        host, _, port_text = authority.partition(b"]")
        host += b"]"
        if port_text and not port_text.startswith(b":"):
            raise _invalid("has a malformed host")
        port_text = port_text[1:]
        valid = bool(_IPV6.fullmatch(host))
    else:
        host, _, port_text = authority.partition(b":")
        valid = bool(_HOST.fullmatch(host))
    if not valid:
        raise _invalid("has a missing or malformed host")
    if not port_text and b":" in authority.rpartition(b"]")[2]:
        raise _invalid("has an empty port")
    port = 443
    if port_text:
        if not _PORT.fullmatch(port_text) or not 0 < int(port_text) < 65536:
            raise _invalid("has a malformed port")
        port = int(port_text)
    return host.decode("ascii"), port


def _invalid(reason: str) -> BadRequest:
    return BadRequest(f"BAD_REQUEST: target URL {reason}")
