"""
Hostile request framing against the real proxy over real TLS sockets:
request smuggling, malformed heads, oversized lines and blocks, HTTP/1.0
quirks and pipelining.  Every case is hand-crafted bytes sent by a raw TLS
client.  A refusal must be a clear status with an OperationOutcome, close
the connection, reach the provider not at all, be audited, and leave the
proxy serving the next consumer.

The catalogue tests compute the figures in C{docs/hostile-input.md}; to
rewrite them after adding cases run (without C{-j}):

    SSP_WRITE_FIGURES=1 python -m twisted.trial tests.test_hostile \\
        tests.test_slow_clients tests.test_provider_faults

The raw client and the figures helpers are imported by the other two
modules.
"""

from __future__ import annotations

import base64
import json
import os
import re
import socket
import ssl
import time
from typing import Any, Callable

import attrs
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from ssp import demo
from tests.support import ENDPOINT, METADATA, ROOT, Provider, Proxy, spine_headers, until

DOC = ROOT / "docs" / "hostile-input.md"
TARGET = f"/{ENDPOINT}/metadata".encode()
ECHO = f"/{ENDPOINT}/echo".encode()


@attrs.frozen
class RawResponse:
    status: int
    reason: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None

    def token(self) -> str:
        """
        The diagnostics of an OperationOutcome body, or C{""} for any other.
        """
        try:
            document = json.loads(self.body)
        except ValueError:
            return ""
        if not isinstance(document, dict) or document.get("resourceType") != "OperationOutcome":
            return ""
        return document["issue"][0]["diagnostics"]


@attrs.frozen
class Exchange:
    """
    What a raw client saw: complete responses, whether the proxy closed
    (or reset) the connection, and any bytes that did not parse.
    """

    responses: tuple[RawResponse, ...]
    closed: bool
    reset: bool
    leftover: bytes

    @property
    def statuses(self) -> tuple[int, ...]:
        return tuple(r.status for r in self.responses)


def parse_responses(data: bytes) -> tuple[list[RawResponse], bytes]:
    """
    Split a byte stream into complete HTTP/1.1 responses (interim 1xx
    skipped); returns the responses and the unparsed rest.
    """
    responses: list[RawResponse] = []
    while True:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            return responses, data
        lines = head.split(b"\r\n")
        _, code, reason = (lines[0].split(b" ", 2) + [b""])[:3]
        fields = tuple((k.strip().lower(), v.strip())
                       for k, _, v in (line.partition(b":") for line in lines[1:]))
        values = dict(fields)
        if code.startswith(b"1"):
            data = rest
            continue
        if b"content-length" in values:
            size = int(values[b"content-length"])
            if len(rest) < size:
                return responses, data
            body, data = rest[:size], rest[size:]
        elif values.get(b"transfer-encoding", b"").lower() == b"chunked":
            decoded = _dechunk(rest)
            if decoded is None:
                return responses, data
            body, data = decoded
        else:
            body, data = rest, b""
        responses.append(RawResponse(int(code), reason, fields, body))


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    body = b""
    while True:
        size_line, sep, rest = data.partition(b"\r\n")
        if not sep:
            return None
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            end = rest.find(b"\r\n\r\n") if not rest.startswith(b"\r\n") else -2
            if end == -1:
                return None
            return body, rest[end + 4:]
        if len(rest) < size + 2:
            return None
        body += rest[:size]
        data = rest[size + 2:]


def client_context(proxy: Proxy) -> ssl.SSLContext:
    return proxy.consumer().context


def raw_exchange(port: int, context: ssl.SSLContext, pieces: list[bytes], *,
                 responses: int | None = None, gap: float = 0.0, timeout: float = 5.0,
                 source: str = "127.0.0.1") -> Exchange:
    """
    Blocking: connect over TLS from C{source}, send C{pieces} (waiting
    C{gap} seconds between them, like a slow client, but stopping as soon
    as the proxy answers or closes), then read until the proxy closes,
    C{responses} complete responses have arrived, or C{timeout}.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                   source_address=(source, 0))
    tls = context.wrap_socket(raw, server_hostname="localhost")
    data, closed, reset = b"", False, False
    try:
        for i, piece in enumerate(pieces):
            if i and gap:
                answer = _receive_within(tls, gap, timeout)
                if answer is not None:
                    data, closed = answer, not answer
                    break
            tls.sendall(piece)
        deadline = time.monotonic() + timeout
        while not closed and time.monotonic() < deadline:
            if responses is not None and len(parse_responses(data)[0]) >= responses:
                break
            chunk = tls.recv(65536)
            if not chunk:
                closed = True
                break
            data += chunk
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        closed = reset = True
    except TimeoutError:
        pass
    finally:
        tls.close()
    parsed, rest = parse_responses(data)
    return Exchange(tuple(parsed), closed, reset, rest)


def _receive_within(tls: ssl.SSLSocket, wait: float, timeout: float) -> bytes | None:
    """
    Application data (or C{b""} at EOF) arriving within C{wait} seconds,
    else L{None}; TLS records such as session tickets do not count.
    """
    tls.settimeout(wait)
    try:
        return tls.recv(65536)
    except TimeoutError:
        return None
    finally:
        tls.settimeout(timeout)


def send(proxy: Proxy, pieces: list[bytes] | bytes, **kw: Any):
    if isinstance(pieces, bytes):
        pieces = [pieces]
    return deferToThread(raw_exchange, proxy.port, client_context(proxy), pieces, **kw)


def head(method: bytes = b"GET", target: bytes = TARGET, version: bytes = b"HTTP/1.1",
         lines: list[bytes] | None = None, host: bool = True, spine: bool = True,
         end: bytes = b"\r\n") -> bytes:
    """
    A request head with the demo consumer's valid C{Ssp-*} headers and
    token, plus C{lines}; C{end} is the line terminator.
    """
    out = [method + b" " + target + b" " + version]
    if host:
        out.append(b"Host: localhost")
    if spine:
        out += [f"{k}: {v}".encode() for k, v in spine_headers().items()]
    out += lines or []
    return end.join(out) + end + end


class FailureCounter:
    """
    Counts logged failures (unhandled errors, L{Proxy.crashed}) while the
    suite runs: the "crashes" figure.
    """

    def __init__(self, case: unittest.TestCase) -> None:
        self.count = 0
        globalLogPublisher.addObserver(self)
        case.addCleanup(globalLogPublisher.removeObserver, self)

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_failure") is not None or event.get("isError"):
            self.count += 1


async def wait_for(predicate: Callable[[], bool], timeout: float = 2.0) -> bool:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            return False
        await deferLater(reactor, 0.01)
    return True


def check_figures(case: unittest.TestCase, suite: str, figures: dict[str, int]) -> None:
    """
    Compare the suite's computed figures with its row in the figures
    table of C{docs/hostile-input.md}, or rewrite that row when
    C{SSP_WRITE_FIGURES=1}.
    """
    row = f"| {suite} | " + " | ".join(str(figures[k]) for k in FIGURE_COLUMNS) + " |"
    text = DOC.read_text()
    pattern = re.compile(rf"^\| {re.escape(suite)} \|.*$", re.MULTILINE)
    if os.environ.get("SSP_WRITE_FIGURES") == "1":
        DOC.write_text(pattern.sub(row, text))
        return
    found = pattern.search(text)
    case.assertIsNotNone(found, f"{DOC} has no figures row for {suite}")
    case.assertEqual(found.group(0), row,
                     f"{DOC} is stale: rerun with SSP_WRITE_FIGURES=1 (see its last section)")


FIGURE_COLUMNS = ("cases", "as_expected", "forwarded", "crashes", "audit_lost")


@attrs.frozen
class Case:
    """
    One hostile (or merely odd) input.

    @ivar statuses: the responses expected, in order, before the end.
    @ivar token: the start of the last response's diagnostics (refusals).
    @ivar forwarded: complete requests the provider must receive.
    @ivar closes: whether the proxy must close the connection.
    @ivar streamed: the head was admitted and forwarding began before the
        body proved bad: an C{authorised} record exists and the final one
        says C{failed}, yet the provider never receives a whole request.

    Of a forwarded case, the fields the provider received are compared
    with those of the first request sent (L{upstream_problems}).
    """

    name: str
    payload: Callable[[], bytes]
    statuses: tuple[int, ...]
    token: str = ""
    forwarded: int = 0
    closes: bool = True
    streamed: bool = False

    @property
    def refused(self) -> bool:
        return bool(self.token)


def _refused(name: str, payload: Callable[[], bytes], status: int, token: str) -> Case:
    return Case(name, payload, (status,), token)


def _admission_refused(name: str, payload: Callable[[], bytes], token: str) -> Case:
    """
    A request refused by the checks after its head was read whole: the
    connection stays open for the next request.
    """
    return Case(name, payload, (400,), token, closes=False)


def _bad_body(name: str, body: bytes, status: int, token: str) -> Case:
    return Case(name, lambda: _chunked(body), (status,), token, streamed=True)


def _chunked(body: bytes) -> bytes:
    return head(b"POST", ECHO, lines=[b"Transfer-Encoding: chunked"]) + body


def _with_token(edit: Callable[[dict[str, Any]], str] | None = None, padded: bool = False,
                lines: list[bytes] | None = None) -> bytes:
    """
    A request head whose token carries the demo claims as C{edit} writes
    them out (JSON text), its segments C{=}-padded if C{padded}.
    """
    claims = json.loads(_b64decode(demo.bearer_token(reactor.seconds()).split(".")[1]))
    text = edit(claims) if edit is not None else json.dumps(claims)
    header = b'{"alg":"none","typ":"JWT"}'
    segments = [base64.urlsafe_b64encode(part) for part in (header, text.encode())]
    if not padded:
        segments = [part.rstrip(b"=") for part in segments]
    token = b"Bearer " + b".".join(segments) + b"."
    spine = [f"{k}: {v}".encode() for k, v in spine_headers().items() if k != "Authorization"]
    return head(spine=False, lines=spine + [b"Authorization: " + token] + (lines or []))


def _b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _claims(**changes: Any) -> Callable[[dict[str, Any]], str]:
    return lambda claims: json.dumps({**claims, **changes})


def _repeated_sub(claims: dict[str, Any]) -> str:
    text = json.dumps(claims)
    return text.replace('"sub": "1"', '"sub": "1", "sub": "evil"', 1)


def _spine(**changes: str) -> bytes:
    """
    A request head with C{changes} to the demo C{Ssp-*} headers.
    """
    return head(spine=False, lines=[f"{k}: {v}".encode()
                                    for k, v in spine_headers(**changes).items()])


def _many_headers(count: int, size: int) -> bytes:
    return head(lines=[b"X-Pad-%d: %s" % (i, b"a" * size) for i in range(count)])


LIMITS = {"max_request_line": 2048, "max_header_bytes": 8192, "max_headers": 30,
          "max_body_bytes": 65536, "header_timeout": 5.0, "idle_timeout": 5.0}
BAD = "BAD_REQUEST: "

FRAMING_CASES = (
    # Content-Length and Transfer-Encoding: the classic smuggling pairs.
    _refused("CL then TE", lambda: head(b"POST", ECHO, lines=[
        b"Content-Length: 5", b"Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
        400, BAD + "Content-Length with Transfer-Encoding"),
    _refused("TE then CL", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding: chunked", b"Content-Length: 5"]) + b"0\r\n\r\n",
        400, BAD + "Content-Length with Transfer-Encoding"),
    _refused("CL repeated, same value", lambda: head(b"POST", ECHO, lines=[
        b"Content-Length: 5", b"Content-Length: 5"]) + b"hello",
        400, BAD + "Content-Length is repeated"),
    _refused("CL conflicting", lambda: head(b"POST", ECHO, lines=[
        b"Content-Length: 5", b"Content-Length: 6"]) + b"hello!",
        400, BAD + "Content-Length is repeated"),
    _refused("CL list", lambda: head(b"POST", ECHO, lines=[b"Content-Length: 5, 5"]) + b"hello",
             400, BAD + "Content-Length must be a decimal number"),
    _refused("CL signed", lambda: head(b"POST", ECHO, lines=[b"Content-Length: +5"]) + b"hello",
             400, BAD + "Content-Length must be a decimal number"),
    _refused("CL hex", lambda: head(b"POST", ECHO, lines=[b"Content-Length: 0x5"]) + b"hello",
             400, BAD + "Content-Length must be a decimal number"),
    _refused("CL empty", lambda: head(b"POST", ECHO, lines=[b"Content-Length:"]),
             400, BAD + "Content-Length must be a decimal number"),
    _refused("CL 5000 digits (crashes Twisted's parser)",
             lambda: head(b"POST", ECHO, lines=[b"Content-Length: " + b"9" * 5000]),
             413, "REQUEST_BODY_LARGER_THAN_65536_BYTES"),
    _refused("CL over max_body_bytes", lambda: head(b"POST", ECHO, lines=[
        b"Content-Length: 65537"]), 413, "REQUEST_BODY_LARGER_THAN_65536_BYTES"),
    _refused("TE identity", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding: identity"]) + b"hello",
        400, BAD + "Transfer-Encoding must be chunked"),
    _refused("TE gzip, chunked", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding: gzip, chunked"]) + b"0\r\n\r\n",
        400, BAD + "Transfer-Encoding must be chunked"),
    _refused("TE chunked, chunked", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding: chunked, chunked"]) + b"0\r\n\r\n",
        400, BAD + "Transfer-Encoding must be chunked"),
    _refused("TE repeated", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
        400, BAD + "Transfer-Encoding is repeated"),
    _refused("TE in HTTP/1.0", lambda: head(b"POST", ECHO, b"HTTP/1.0", lines=[
        b"Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
        400, BAD + "Transfer-Encoding in an HTTP/1.0 request"),
    _refused("TE with space before colon", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding : chunked"]) + b"0\r\n\r\n", 400, BAD + "invalid header name"),
    _refused("TE folded (obs-fold)", lambda: head(b"POST", ECHO, lines=[
        b"Transfer-Encoding:", b" chunked"]) + b"0\r\n\r\n",
        400, BAD + "obsolete line folding"),
    _refused("Ssp header folded", lambda: head(lines=[b"X-Note: a", b"\tcontinued"]),
             400, BAD + "obsolete line folding"),
    _refused("first header line indented", lambda: (
        b"GET " + TARGET + b" HTTP/1.1\r\n Host: localhost\r\n\r\n"),
        400, BAD + "obsolete line folding"),
    # Chunked bodies.
    _bad_body("chunk size not hex", b"zz\r\nhello\r\n0\r\n\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunk size 0x prefix", b"0x5\r\nhello\r\n0\r\n\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunk size negative", b"-5\r\nhello\r\n0\r\n\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunk data without CRLF", b"5\r\nhelloXX0\r\n\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunk lines with bare LF", b"5\nhello\n0\n\n", 400, BAD + "malformed chunked body"),
    _bad_body("bare CR in a trailer", b"5\r\nhello\r\n0\r\nX-T: 1\rX-U: 2\r\n\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunk extension too long", b"5;" + b"x" * 2000 + b"\r\nhello\r\n",
              400, BAD + "malformed chunked body"),
    _bad_body("chunked body over max_body_bytes", b"10001\r\n" + b"a" * 0x10001 + b"\r\n0\r\n\r\n",
              413, "REQUEST_BODY_LARGER_THAN_65536_BYTES"),
    # Line endings and control bytes.
    _refused("bare LF line endings throughout", lambda: head(end=b"\n"),
             400, BAD + "bare CR or LF"),
    _refused("bare LF inside the head", lambda: head(lines=[
        b"X-A: 1\nTransfer-Encoding: chunked"]), 400, BAD + "bare CR or LF"),
    _refused("bare CR inside the head", lambda: head(lines=[b"X-A: 1\rX-B: 2"]),
             400, BAD + "bare CR or LF"),
    _refused("bare CR ending the request line", lambda: head().replace(
        b" HTTP/1.1\r\n", b" HTTP/1.1\r\r\n", 1), 400, BAD + "bare CR or LF"),
    _refused("NUL in header value", lambda: head(lines=[b"X-A: a\x00b"]),
             400, BAD + "control character in header X-A"),
    _refused("ESC in header value", lambda: head(lines=[b"X-A: a\x1b[31mb"]),
             400, BAD + "control character in header X-A"),
    _refused("DEL in header value", lambda: head(lines=[b"X-A: a\x7fb"]),
             400, BAD + "control character in header X-A"),
    _refused("US after a kilobyte of header value", lambda: head(lines=[b"X-A: " + b"a" * 2048
                                                                   + b"\x1f"]),
             400, BAD + "control character in header X-A"),
    _refused("NUL in header name", lambda: head(lines=[b"X-\x00A: b"]),
             400, BAD + "invalid header name"),
    _refused("space in header name", lambda: head(lines=[b"X A: b"]),
             400, BAD + "invalid header name"),
    _refused("empty header name", lambda: head(lines=[b": b"]), 400, BAD + "invalid header name"),
    _refused("header line without colon", lambda: head(lines=[b"NoColonHere"]),
             400, BAD + "malformed header line"),
    # Request lines.
    _refused("request line over max_request_line", lambda: head(
        target=TARGET + b"?" + b"a" * 2100), 414, "REQUEST_LINE_LONGER_THAN_2048_BYTES"),
    _refused("unterminated request line over max_request_line",
             lambda: b"GET " + TARGET + b"?" + b"a" * 3000,
             414, "REQUEST_LINE_LONGER_THAN_2048_BYTES"),
    _refused("two spaces in request line", lambda: head().replace(b"GET ", b"GET  ", 1),
             400, BAD + "malformed request line"),
    _refused("tab in request line", lambda: head().replace(b"GET ", b"GET\t", 1),
             400, BAD + "malformed request line"),
    _refused("no HTTP version", lambda: b"GET " + TARGET + b"\r\n\r\n",
             400, BAD + "malformed request line"),
    _refused("HTTP/1.2", lambda: head(version=b"HTTP/1.2"), 400, BAD + "HTTP version"),
    _refused("HTTP/2.0 in a request line", lambda: head(version=b"HTTP/2.0"),
             400, BAD + "HTTP version"),
    _refused("method with a delimiter", lambda: head(method=b"GE(T"),
             400, BAD + "malformed request line"),
    _refused("raw UTF-8 in target", lambda: head(target=TARGET + "\u00e9".encode()),
             400, BAD + "request target must be visible ASCII"),
    _refused("DEL in target (passes Twisted)", lambda: head(target=TARGET + b"\x7f"),
             400, BAD + "request target must be visible ASCII"),
    _refused("two empty lines before the request", lambda: b"\r\n\r\n" + head(),
             400, BAD + "malformed request"),
    # Head size and count.
    _refused("header block over max_header_bytes", lambda: _many_headers(9, 1000),
             431, "REQUEST_HEADERS_LARGER_THAN_8192_BYTES"),
    _refused("unterminated header pushing the head over max_header_bytes",
             lambda: _many_headers(6, 1000)[:-2] + b"X-Big: " + b"a" * 2500,
             431, "REQUEST_HEADERS_LARGER_THAN_8192_BYTES"),
    _refused("unterminated header over max_header_bytes",
             lambda: head()[:-2] + b"X-Big: " + b"a" * 9000,
             431, "REQUEST_HEADERS_LARGER_THAN_8192_BYTES"),
    _refused("header count over max_headers", lambda: _many_headers(30, 1),
             431, "MORE_THAN_30_REQUEST_HEADERS"),
    # Host.
    _refused("HTTP/1.1 without Host", lambda: head(host=False),
             400, BAD + "Host header is missing"),
    _refused("Host repeated", lambda: head(lines=[b"Host: evil.test"]),
             400, BAD + "Host header is repeated"),
    # Bodies that must never be parsed as requests.
    _refused("refused POST whose body is a request", lambda: (
        head(b"POST", ECHO, lines=[b"Content-Length: %d" % len(head())],
             spine=False) + head()), 400, BAD + "Ssp-TraceID"),
    Case("pipelined good then CL+TE", lambda: head() + head(b"POST", ECHO, lines=[
        b"Content-Length: 4", b"Transfer-Encoding: chunked"]) + b"0\r\n\r\n",
        (200, 400), BAD + "Content-Length with Transfer-Encoding", forwarded=1),
    # Accepted quirks: forwarded correctly, nothing smuggled.
    Case("pipelined two GETs", lambda: head() + head(), (200, 200), forwarded=2, closes=False),
    Case("POST whose CL body is a request", lambda: (
        head(b"POST", ECHO, lines=[b"Content-Length: %d" % len(head(spine=False))])
        + head(spine=False)), (200,), forwarded=1, closes=False),
    Case("HTTP/1.0 POST without length, request after it", lambda: (
        head(b"POST", ECHO, b"HTTP/1.0") + head()), (200,), forwarded=1),
    Case("HTTP/1.0 without Host, keep-alive asked", lambda: head(
        version=b"HTTP/1.0", host=False, lines=[b"Connection: keep-alive"]), (200,), forwarded=1),
    Case("Connection: keep-alive,close", lambda: head(lines=[b"Connection: keep-alive,close"]),
         (200,), forwarded=1),
    Case("request line exactly max_request_line", lambda: head(
        target=TARGET + b"?" + b"a" * (2048 - len(b"GET  HTTP/1.1?") - len(TARGET))),
        (200,), forwarded=1, closes=False),
    Case("one empty line before the request", lambda: b"\r\n" + head(), (200,), forwarded=1,
         closes=False),
    # Singleton fields: what the proxy validates is what the provider gets.
    _refused("Authorization repeated", lambda: head(lines=[
        b"Authorization: Bearer " + demo.bearer_token(reactor.seconds()).encode()]),
        400, BAD + "Authorization header is repeated"),
    _refused("Authorization as a list", lambda: _spine(Authorization=(
        "Bearer " + demo.bearer_token(reactor.seconds()) + ", Bearer x.y.")),
        400, BAD + "Authorization header is repeated"),
    _refused("Ssp-TraceID repeated", lambda: head(lines=[
        b"Ssp-TraceID: 5f0b2a4e-1c1d-4f7e-9a55-0c1e2d3f4a5b"]),
        400, BAD + "Ssp-TraceID header is repeated"),
    _refused("Ssp-From repeated", lambda: head(lines=[b"Ssp-From: 200000000359"]),
             400, BAD + "Ssp-From header is repeated"),
    _refused("Ssp-To repeated", lambda: head(lines=[b"Ssp-To: 918999198738"]),
             400, BAD + "Ssp-To header is repeated"),
    _refused("Ssp-InteractionID repeated", lambda: head(lines=[
        b"Ssp-InteractionID: " + METADATA.encode()]),
        400, BAD + "Ssp-InteractionID header is repeated"),
    _refused("Ssp-InteractionID as a list", lambda: _spine(**{
        "Ssp-InteractionID": f"{METADATA},urn:nhs:names:services:gpconnect:fhir:rest:read:x-1"}),
        400, BAD + "Ssp-InteractionID header is repeated"),
    _refused("Content-Type repeated", lambda: head(lines=[
        b"Content-Type: application/fhir+json", b"Content-Type: text/plain"]),
        400, BAD + "Content-Type header is repeated"),
    _refused("Content-Type as a list", lambda: head(lines=[
        b"Content-Type: application/fhir+json, text/plain"]),
        400, BAD + "Content-Type header is repeated"),
    # Host (RFC 9112 §3.2, RFC 3986 authority).
    _refused("Host as a list", lambda: head(host=False, lines=[b"Host: localhost, evil.test"]),
             400, BAD + "Host header is repeated"),
    _refused("Host with user information", lambda: head(host=False, lines=[
        b"Host: user:pw@localhost"]), 400, BAD + "Host header must be host[:port]"),
    _refused("Host with a path", lambda: head(host=False, lines=[b"Host: localhost/admin"]),
             400, BAD + "Host header must be host[:port]"),
    _refused("Host with a space", lambda: head(host=False, lines=[b"Host: local host"]),
             400, BAD + "Host header must be host[:port]"),
    _refused("Host with a bad port", lambda: head(host=False, lines=[b"Host: localhost:99999"]),
             400, BAD + "Host header must be host[:port]"),
    _refused("Host with an empty port", lambda: head(host=False, lines=[b"Host: localhost:"]),
             400, BAD + "Host header must be host[:port]"),
    # Connection may not make a validated or framing field hop-by-hop.
    *(_refused(f"Connection names {named}", lambda options=options, framing=framing: (
        head(b"POST", ECHO, lines=[framing, b"Connection: " + options]) + b"0\r\n\r\n"),
        400, BAD + f"Connection header must not name {named}")
      for options, named, framing in (
          (b"Authorization", "Authorization", b"Content-Length: 5"),
          (b"keep-alive, ssp-from, Ssp-TraceID", "Ssp-From", b"Content-Length: 5"),
          (b"Host", "Host", b"Content-Length: 5"),
          (b"content-length", "Content-Length", b"Content-Length: 5"),
          (b"Transfer-Encoding", "Transfer-Encoding", b"Transfer-Encoding: chunked"))),
    _refused("Connection option not a token", lambda: head(lines=[b"Connection: close x"]),
             400, BAD + "Connection header must list header names"),
    # Paths whose percent-decoded bytes are not UTF-8.
    _admission_refused("overlong UTF-8 dots in the path", lambda: head(
        target=f"/{ENDPOINT}/%c0%ae%c0%ae/metadata".encode()), BAD + "target URL path must be UTF-8"),
    _admission_refused("double-encoded overlong UTF-8", lambda: head(
        target=f"/{ENDPOINT}/%25c0%25ae%25c0%25ae/metadata".encode()),
        BAD + "target URL path must be UTF-8"),
    _admission_refused("UTF-8 surrogate in the path", lambda: head(
        target=f"/{ENDPOINT}/%ed%a0%80".encode()), BAD + "target URL path must be UTF-8"),
    _admission_refused("truncated UTF-8 in the path", lambda: head(
        target=f"/{ENDPOINT}/caf%c3".encode()), BAD + "target URL path must be UTF-8"),
    # The token exactly per RFC 7515/7519 and SPEC §4.
    _admission_refused("JWT segments padded", lambda: _with_token(padded=True),
                       BAD + "JWT is malformed: base64url segments must not be padded"),
    _admission_refused("JWT claim repeated", lambda: _with_token(_repeated_sub),
                       BAD + "JWT claim 'sub' is repeated"),
    _admission_refused("JWT scope not the interaction's", lambda: _with_token(
        _claims(requested_scope="patient/*.write")),
        BAD + "JWT claim 'requested_scope' must be organization/*.read"),
    _admission_refused("JWT migration for a non-migration interaction", lambda: _with_token(
        _claims(reason_for_request="migration")),
        BAD + "JWT claim 'reason_for_request' must be directcare"),
    # A chunk size over the limit is refused at once, its data never awaited.
    _bad_body("chunk size over max_body_bytes", b"10001\r\nabc",
              413, "REQUEST_BODY_LARGER_THAN_65536_BYTES"),
    # Accepted: other Connection options stay hop-by-hop and are dropped.
    Case("Connection names a private header", lambda: head(lines=[
        b"Connection: keep-alive, X-Secret", b"X-Secret: s", b"X-Kept: k"]),
        (200,), forwarded=1, closes=False),
    Case("Content-Type with a quoted comma", lambda: head(b"POST", ECHO, lines=[
        b'Content-Type: multipart/related; boundary="a,b"', b"Content-Length: 2"]) + b"ok",
        (200,), forwarded=1, closes=False),
    Case("Host an IPv6 literal with a port", lambda: head(host=False, lines=[
        b"Host: [::1]:8443"]), (200,), forwarded=1, closes=False),
    Case("UTF-8 in the path, percent-encoded", lambda: head(
        target=f"/{ENDPOINT}/caf%c3%a9".encode()), (200,), forwarded=1, closes=False),
    Case("JWT with a conf/N scope suffix", lambda: _with_token(
        _claims(requested_scope="organization/*.read conf/N")), (200,), forwarded=1, closes=False),
    Case("chunked with trailers", lambda: _chunked(
        b"5\r\nhello\r\n0\r\nContent-Length: 99\r\nTransfer-Encoding: x\r\n\r\n"),
        (200,), forwarded=1, closes=False),
    # Review probes: name case, list syntax, token encodings, exact limits.
    _refused("authorization repeated in lower case", lambda: head(lines=[
        b"authorization: Bearer x.y."]), 400, BAD + "Authorization header is repeated"),
    _refused("SSP-FROM repeated in upper case", lambda: head(lines=[b"SSP-FROM: 200000000359"]),
             400, BAD + "Ssp-From header is repeated"),
    _refused("Connection option after a tab", lambda: head(lines=[
        b"Connection: keep-alive,\tSsp-From"]), 400, BAD + "Connection header must not name Ssp-From"),
    _refused("second Connection line names Ssp-To", lambda: head(lines=[
        b"Connection: keep-alive", b"Connection: ssp-to"]),
        400, BAD + "Connection header must not name Ssp-To"),
    _refused("HTTP/2 preface", lambda: b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
             400, BAD + "HTTP version"),
    _refused("head one byte over max_header_bytes", lambda: _head_of(8193),
             431, "REQUEST_HEADERS_LARGER_THAN_8192_BYTES"),
    _admission_refused("JWT payload with a BOM", lambda: _with_token(
        lambda claims: "\ufeff" + json.dumps(claims)), BAD + "JWT is malformed: payload is not JSON"),
    _admission_refused("JWT payload with trailing garbage", lambda: _with_token(
        lambda claims: json.dumps(claims) + "x"), BAD + "JWT is malformed: payload is not JSON"),
    _admission_refused("JWT nested member repeated", lambda: _with_token(
        lambda claims: json.dumps(claims).replace(
            '"resourceType": "Practitioner"',
            '"resourceType": "Practitioner", "resourceType": "Practitioner"', 1)),
        BAD + "JWT claim 'requesting_practitioner.resourceType' is repeated"),
    _admission_refused("JWT member repeated through an escape", lambda: _with_token(
        lambda claims: json.dumps(claims)[:-1] + ', "s\\u0075b": "evil"}'),
        BAD + "JWT claim 'sub' is repeated"),
    _admission_refused("JWT requested_scope not a string", lambda: _with_token(
        _claims(requested_scope=["organization/*.read"])),
        BAD + "JWT claim 'requested_scope' must be"),
    _admission_refused("wholly encoded target hiding dot segments", lambda: head(
        target=_encoded(ENDPOINT + "/%2e%2e/metadata")), BAD + "target URL must not contain dot"),
    Case("Connection with empty list elements", lambda: head(lines=[
        b"Connection: , , keep-alive , ,"]), (200,), forwarded=1, closes=False),
    Case("Upgrade: h2c (dropped with what Connection names)", lambda: head(lines=[
        b"Upgrade: h2c", b"Connection: Upgrade, HTTP2-Settings", b"HTTP2-Settings: AAMAAABk"]),
        (200,), forwarded=1, closes=False),
    Case("Content-Length: 0 on GET", lambda: head(lines=[b"Content-Length: 0"]),
         (200,), forwarded=1, closes=False),
    Case("chunk extensions", lambda: _chunked(b'5;a=b;c="d e"\r\nhello\r\n0;x\r\n\r\n'),
         (200,), forwarded=1, closes=False),
    Case("header count exactly max_headers", lambda: head(lines=[
        b"X-P%d: a" % i for i in range(LIMITS["max_headers"] - 6)]),
        (200,), forwarded=1, closes=False),
    Case("head exactly max_header_bytes", lambda: _head_of(8192), (200,), forwarded=1,
         closes=False),
    Case("wholly percent-encoded target", lambda: head(target=_encoded(ENDPOINT + "/metadata")),
         (200,), forwarded=1, closes=False),
)


def _head_of(size: int) -> bytes:
    """
    A valid head whose header section (after the request line, final
    CRLF included) is C{size} bytes.
    """
    short = head(lines=[b"X-Fill: "])
    section = len(short) - short.index(b"\r\n") - 2
    return head(lines=[b"X-Fill: " + b"a" * (size - section)])


def _encoded(url: str) -> bytes:
    """
    The request target C{/url} with the whole URL percent-encoded.
    """
    return b"/" + url.replace("%", "%25").replace(":", "%3A").replace("/", "%2F").encode()


async def run_catalogue(proxy: Proxy, provider: Provider, cases: tuple[Case, ...],
                        crashes: FailureCounter) -> tuple[dict[str, int], list[str]]:
    """
    Send each case on a fresh connection to one proxy, check it fully and
    prove the next consumer is served; count the figures.
    """
    problems: list[str] = []
    figures = dict.fromkeys(FIGURE_COLUMNS, 0)
    expected_seen = 0
    for case in cases:
        seen, records = len(provider.seen), len(proxy.audit.completed())
        authorised = _authorised(proxy)
        payload = case.payload()
        result = await send(proxy, payload, responses=None if case.closes
                            else len(case.statuses))
        expected_records = records + len(case.statuses)
        audited = await wait_for(
            lambda: len(proxy.audit.completed()) >= expected_records)  # noqa: B023
        forwarded = len(provider.seen) - seen
        expected_seen += case.forwarded
        wrong = _check_case(case, result, forwarded, proxy, records, authorised)
        if case.forwarded and forwarded:
            wrong += upstream_problems(payload, provider.seen[seen].headers)
        if not audited:
            figures["audit_lost"] += expected_records - len(proxy.audit.completed())
        if case.refused:
            figures["forwarded"] += max(0, forwarded - case.forwarded)
        good = await proxy.consumer().get("metadata")
        expected_seen += 1
        if good.status != 200:
            wrong.append(f"the next consumer got {good.status}")
        figures["cases"] += 1
        if wrong:
            problems.append(f"{case.name}: " + "; ".join(wrong))
        else:
            figures["as_expected"] += 1
    await until(proxy.quiet)
    if len(provider.seen) != expected_seen:
        problems.append(f"provider saw {len(provider.seen)} requests, expected {expected_seen}")
    figures["crashes"] = crashes.count
    return figures, problems


# Never forwarded upstream: hop-by-hop (RFC 9110 §7.6.1), replaced (Host),
# re-stated by the proxy's own framing (Content-Length, Transfer-Encoding).
_NOT_RELAYED = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                b"proxy-authorization", b"te", b"trailer", b"transfer-encoding", b"upgrade",
                b"host", b"content-length"}


def upstream_problems(payload: bytes, received: list[tuple[bytes, bytes]]) -> list[str]:
    """
    Compare what the provider received with the first request head in
    C{payload}: every end-to-end field with the values sent, in order, and
    nothing else but the target's C{Host} and one C{Forwarded} element
    appended; hop-by-hop fields and those C{Connection} names are dropped.
    """
    lines = payload.lstrip(b"\r\n").partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]
    sent = [(name.strip().lower(), value.strip(b" \t"))
            for name, _, value in (line.partition(b":") for line in lines)]
    hop = _NOT_RELAYED | {option.strip().lower() for name, value in sent
                          if name == b"connection" for option in value.split(b",")}
    expected = [(name, value) for name, value in sent if name not in hop]
    got = [(name.lower(), value) for name, value in received
           if name.lower() not in (b"content-length", b"transfer-encoding")]
    host = [value for name, value in got if name == b"host"]
    forwarded = [value for name, value in got if name == b"forwarded"]
    got = [(name, value) for name, value in got if name != b"host"]
    if forwarded and forwarded[-1].startswith(b"for=127.0.0.1;proto=https;by="):
        got.remove((b"forwarded", forwarded[-1]))
    else:
        return [f"provider received no Forwarded element: {forwarded}"]
    wrong = []
    if host != [ENDPOINT.split("/")[2].encode()]:
        wrong.append(f"provider received Host {host}")
    if sorted(got) != sorted(expected):
        wrong.append(f"provider received {sorted(set(got) ^ set(expected))} unlike sent")
    return wrong


def _authorised(proxy: Proxy) -> int:
    return len([r for r in proxy.audit.records if r.event == "authorised"])


def _check_case(case: Case, result: Exchange, forwarded: int, proxy: Proxy, records: int,
                authorised: int) -> list[str]:
    wrong = []
    if result.statuses != case.statuses:
        wrong.append(f"statuses {result.statuses} != {case.statuses}, "
                     f"rest {result.leftover[:80]!r}")
    if forwarded != case.forwarded:
        wrong.append(f"provider received {forwarded} requests, expected {case.forwarded}")
    if case.closes != result.closed:
        wrong.append("connection left open" if case.closes else "connection closed")
    # A pipelined refusal can be audited before the response ahead of it
    # (whose final record follows its last byte): compare by status.
    new = sorted(proxy.audit.completed()[records:], key=lambda r: r.status)
    if [r.status for r in new] != sorted(case.statuses):
        wrong.append(f"audited {[(r.status, r.token) for r in new]}")
    if case.refused and result.responses:
        last = result.responses[-1]
        record = next((r for r in new if r.status == last.status), None)
        if not last.token().startswith(case.token):
            wrong.append(f"token {last.token()!r}")
        if record is not None and record.token != last.token():
            wrong.append(f"audit token {record.token!r}")
        # A bad body chunk is "failed" if forwarding had begun (the
        # authorised record was durable first), else "refused": which one is
        # a race with the audit disk, as in production.
        decisions = {"failed", "refused"} if case.streamed else {"refused"}
        if record is not None and record.decision not in decisions:
            wrong.append(f"audit decision {record.decision!r}")
        if case.closes and last.header(b"connection") != b"close":
            wrong.append("no Connection: close")
        if last.header(b"strict-transport-security") is None:
            wrong.append("no Strict-Transport-Security")
        if last.header(b"content-type") != b"application/fhir+json":
            wrong.append(f"content type {last.header(b'content-type')!r}")
        if _authorised(proxy) - authorised != case.forwarded + case.streamed:
            wrong.append("authorised records do not match")
    return wrong


class FramingTests(unittest.TestCase):
    async def test_catalogue(self):
        crashes = FailureCounter(self)
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        figures, problems = await run_catalogue(proxy, provider, FRAMING_CASES, crashes)
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertEqual((figures["forwarded"], figures["crashes"], figures["audit_lost"]),
                         (0, 0, 0))
        check_figures(self, "framing", figures)

    async def test_refused_request_body_never_parsed_as_a_request(self):
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        smuggled = head(target=f"/{ENDPOINT}/smuggled".encode())
        payload = head(b"POST", ECHO, lines=[b"Content-Length: %d" % len(smuggled)],
                       spine=False) + smuggled
        result = await send(proxy, payload)
        self.assertEqual(result.statuses, (400,))
        self.assertTrue(result.closed)
        await until(proxy.quiet)
        self.assertEqual(provider.seen, [])
        self.assertEqual(len(proxy.audit.completed()), 1)

    async def test_second_pipelined_request_answered_after_first(self):
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        first = head(target=f"/{ENDPOINT}/echo?n=1".encode())
        second = head(target=f"/{ENDPOINT}/echo?n=2".encode())
        result = await send(proxy, first + second, responses=2)
        self.assertEqual(result.statuses, (200, 200))
        uris = [json.loads(r.body)["uri"] for r in result.responses]
        self.assertEqual([u.rsplit("=", 1)[1] for u in uris], ["1", "2"])
        self.assertEqual([s.uri.rsplit(b"=", 1)[1] for s in provider.seen], [b"1", b"2"])

    async def test_chunked_trailers_not_forwarded(self):
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        result = await send(proxy, _chunked(
            b"5\r\nhello\r\n0\r\nX-Trailer: sneaky\r\n\r\n"), responses=1)
        echoed = json.loads(result.responses[0].body)
        self.assertEqual(echoed["body_length"], 5)
        self.assertNotIn("x-trailer", [k.lower() for k, _ in echoed["headers"]])

    async def test_provider_connection_options_not_relayed(self):
        """
        A field the provider's C{Connection} names is hop-by-hop: dropped,
        with C{Connection} itself (RFC 9110 §7.6.1).
        """
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        result = await send(proxy, head(target=f"/{ENDPOINT}/odd".encode()), responses=1)
        response = result.responses[0]
        self.assertEqual((response.status, response.body), (299, b"odd body"))
        names = [name for name, _ in response.headers]
        self.assertNotIn(b"x-private", names)
        self.assertNotIn(b"connection", names)
        self.assertIn(b"x-odd", names)

    async def test_repeated_fields_audited_as_no_value(self):
        """
        When a singleton field is repeated, the audit records neither copy:
        no claims from either token, no trace ID.
        """
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        other = _with_token(_claims(sub="evil", requesting_practitioner={
            "resourceType": "Practitioner", "id": "evil", "identifier": []}))
        second = [line for line in other.split(b"\r\n") if line.startswith(b"Authorization")]
        await send(proxy, head(lines=second))
        await send(proxy, _spine().replace(b"\r\n\r\n", b"\r\nSsp-TraceID: "
                                            b"5f0b2a4e-1c1d-4f7e-9a55-0c1e2d3f4a5b\r\n\r\n"))
        self.assertTrue(await wait_for(lambda: len(proxy.audit.completed()) == 2))
        tokens = [(r.status, r.token) for r in proxy.audit.completed()]
        self.assertEqual(tokens, [(400, BAD + "Authorization header is repeated"),
                                  (400, BAD + "Ssp-TraceID header is repeated")])
        claims, trace = proxy.audit.completed()[0].claims, proxy.audit.completed()[1].trace_id
        self.assertEqual((claims, trace), (None, ""))
        self.assertEqual(provider.seen, [])

    async def test_xml_refusal_when_asked(self):
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        result = await send(proxy, head(lines=[b"Accept: application/fhir+xml", b"X-A: \x01"]))
        response = result.responses[0]
        self.assertEqual(response.status, 400)
        self.assertEqual(response.header(b"content-type"), b"application/fhir+xml")
        self.assertIn(b'<diagnostics value="BAD_REQUEST: control character in header X-A"/>',
                      response.body)

    async def test_refusal_audit_names_the_consumer(self):
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        await send(proxy, head(lines=[b"Content-Length: 1", b"Content-Length: 2"]))
        await until(proxy.settled)
        record = proxy.audit.completed()[0]
        self.assertEqual((record.method, record.target), ("GET", TARGET[1:].decode()))
        self.assertEqual(record.client_subject, "CN=gpc001.ssp-demo.test")
        self.assertTrue(record.consumer_address.startswith("127.0.0.1:"))
        self.assertEqual(record.sender, spine_headers()["Ssp-From"])



def interim_then_final(port: int, context: ssl.SSLContext, request_head: bytes,
                       body: bytes) -> tuple[list[int], RawResponse | None]:
    """
    Blocking: send a head carrying C{Expect: 100-continue} and, like a
    client that waits, send C{body} only once C{100 Continue} arrives; the
    status codes of every head received, in order, and the final response.
    """
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    tls = context.wrap_socket(raw, server_hostname="localhost")
    data, body_sent = b"", False
    try:
        tls.sendall(request_head)
        while not parse_responses(data)[0]:
            if not body_sent and data.startswith(b"HTTP/1.1 100 ") and b"\r\n\r\n" in data:
                tls.sendall(body)
                body_sent = True
            chunk = tls.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        tls.close()
    statuses = [int(line.split(b" ")[1]) for line in data.split(b"\r\n")
                if line.startswith(b"HTTP/1.1 ")]
    responses = parse_responses(data)[0]
    return statuses, responses[0] if responses else None


class ExpectContinueTests(unittest.TestCase):
    """
    C{100 Continue} is sent only once a request is admitted, just before
    it is forwarded; a refused request gets its final status alone.
    """

    async def exchange(self, cert: str | None, lines: list[bytes], spine: bool = True
                       ) -> tuple[Provider, Proxy, list[int], RawResponse | None]:
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen=LIMITS).start()
        request = head(b"POST", ECHO, spine=spine,
                       lines=[b"Expect: 100-continue", b"Content-Length: 5"] + lines)
        context = proxy.consumer(cert).context
        statuses, final = await deferToThread(interim_then_final, proxy.port, context,
                                              request, b"hello")
        return provider, proxy, statuses, final

    async def test_no_certificate(self):
        provider, proxy, statuses, final = await self.exchange(None, [])
        self.assertEqual(statuses, [496])
        self.assertEqual(final.token(), "CLIENT_CERTIFICATE_REQUIRED")
        self.assertEqual(provider.seen, [])

    async def test_refused_by_the_checks(self):
        provider, proxy, statuses, _ = await self.exchange("consumer-0", [], spine=False)
        self.assertEqual(statuses, [400])
        self.assertTrue(await wait_for(lambda: len(proxy.audit.completed()) == 1))
        self.assertEqual(proxy.audit.completed()[0].token, BAD + "Ssp-TraceID header is missing")
        self.assertEqual(provider.seen, [])

    async def test_admitted(self):
        provider, proxy, statuses, final = await self.exchange("consumer-0", [])
        self.assertEqual(statuses, [100, 200])
        self.assertEqual(json.loads(final.body)["body_length"], 5)
        self.assertEqual([seen.body_length for seen in provider.seen], [5])
