# -*- test-case-name: tests.test_cors -*-
"""
CORS for browser consumers (SPEC §9.5).

A preflight (C{OPTIONS} with C{Origin} and C{Access-Control-Request-Method})
is the browser asking the proxy, not the provider, so the proxy answers it
and never forwards it: 204 with the CORS headers for a configured origin,
403 otherwise.  It cannot carry the C{Ssp-*} headers or the bearer token,
so it is answered right after the client certificate check.  Any other
C{OPTIONS} request is proxied like every verb.  Responses to requests from
a configured origin carry C{Access-Control-Allow-Origin} so the browser
lets the page read them.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

from ssp.config import CorsConfig
from ssp.errors import Forbidden
from ssp.target import FORWARDED_METHODS

_ALLOWED_METHODS = b", ".join(sorted(FORWARDED_METHODS))
# What a FHIR page needs to read besides the CORS-safelisted headers.
_EXPOSED = (b"Content-Location, ETag, Last-Modified, Location, Retry-After, "
            b"X-Rate-Limit-Limit, X-Rate-Limit-Remaining, X-Rate-Limit-Reset")


def is_preflight(method: bytes, headers: Headers) -> bool:
    return (method == b"OPTIONS" and headers.hasHeader(b"origin")
            and headers.hasHeader(b"access-control-request-method"))


def preflight(config: CorsConfig, headers: Headers) -> list[tuple[bytes, bytes]]:
    """
    The headers of a 204 answer to a preflight.

    @raise Forbidden: the origin is not configured, or it asks for a verb
        the proxy does not forward (403 C{CORS_PREFLIGHT_REFUSED_<origin>}).
    """
    origin = _origin(headers)
    method = (headers.getRawHeaders(b"access-control-request-method") or [b""])[0]
    if origin is None or origin not in config.origins or method not in FORWARDED_METHODS:
        raise Forbidden(f"CORS_PREFLIGHT_REFUSED_{origin or 'unknown origin'}")
    answer = [
        (b"Access-Control-Allow-Origin", origin.encode("ascii")),
        (b"Access-Control-Allow-Methods", _ALLOWED_METHODS),
        (b"Access-Control-Max-Age", b"%d" % config.max_age),
        (b"Vary", b"Origin"),
    ]
    requested = headers.getRawHeaders(b"access-control-request-headers")
    if requested:
        answer.append((b"Access-Control-Allow-Headers", b", ".join(requested)))
    return answer


def response_headers(config: CorsConfig, headers: Headers) -> list[tuple[bytes, bytes]]:
    """
    The CORS headers for any other response to a request from C{Origin}:
    none unless the origin is configured.
    """
    origin = _origin(headers)
    if origin is None or origin not in config.origins:
        return []
    return [
        (b"Access-Control-Allow-Origin", origin.encode("ascii")),
        (b"Access-Control-Expose-Headers", _EXPOSED),
        (b"Vary", b"Origin"),
    ]


def _origin(headers: Headers) -> str | None:
    values = headers.getRawHeaders(b"origin")
    if not values or len(values) != 1:
        return None
    try:
        return values[0].decode("ascii")
    except UnicodeDecodeError:
        return None
