# -*- test-case-name: tests.test_hostile,tests.test_slow_clients,tests.test_stream -*-
"""
The HTTP/1.1 server side: a channel that parses request heads strictly,
caps their size and time and starts a request as soon as its headers are
in; a request class that streams uploads instead of buffering them; and a
site that caps connections.

The channel is the framing boundary (C{docs/hostile-input.md}): anything
that could make the proxy and a provider disagree about where a request
ends -- conflicting lengths, folded or bare-CR/LF lines, control bytes --
and anything too big or too slow is refused before anything is forwarded.
It knows nothing of what is done with a request: the site's resource
handles the requests it lets through, and an L{EarlyRefusal} callback,
given to the site, answers (and audits) those it refuses before they
could start, after which the connection closes.
"""

from __future__ import annotations

import re
from typing import Any, Callable, cast

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.resource import IResource
from zope.interface import implementer

from ssp import forward, headers
from ssp.config import ListenConfig
from ssp.errors import (
    BadRequest,
    HeadersTooLarge,
    PayloadTooLarge,
    Refusal,
    RequestTimeout,
    URITooLong,
)
from ssp.interfaces import IExchange
from ssp.tls import host_of
from ssp.wire import send_now

log = Logger()

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) (HTTP/1\.[01])")
# Every byte but the controls a field value may not hold (all but HTAB);
# deleting these leaves the controls.  bytes.translate scans a kilobyte
# bearer token in a fifth of the time a regular-expression search takes.
_NOT_CONTROL = bytes(sorted(set(range(256)) - {*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f}))
_DIGITS = re.compile(rb"[0-9]+")
# More digits than this cannot be a length we accept (and Twisted's own
# int() of a 4301-digit Content-Length raises out of dataReceived).
_MAX_LENGTH_DIGITS = 18

# Where a connection is in its current exchange.
_HEAD, _BODY, _HANDLING = "head", "body", "handling"

EarlyRefusal = Callable[["ProxyRequest", Refusal], None]
"""
Answers a request the channel refused before it could start (its framing,
size or timing); the connection closes after that answer.
"""


@implementer(IExchange)
class ProxyRequest(server.Request):
    """
    A request whose body is handed to a L{forward.RequestBody} chunk by
    chunk instead of being collected in C{content}, and which may start
    before its body has arrived.

    @ivar refusal: set when the channel refuses the request after it
        started (a malformed, oversized or stalled body).
    @ivar work: the Deferred handling the request, set by the site's
        resource and cancelled by L{refuse}.
    """

    defaultContentType = None
    channel: ProxyChannel
    body: forward.RequestBody | None = None
    refusal: Refusal | None = None
    work: Deferred[None] | None = None
    _started = False
    _max_body = 0
    expects_continue = False
    # ProxyChannel._header_refusal runs headers.field_refusal on every field.
    fields_checked = True

    def gotLength(self, length: int | None) -> None:
        self.content = None
        self._max_body = self.channel.limits.max_body_bytes
        if length != 0:
            transport = self.channel.transport
            self.body = forward.RequestBody(
                length, transport.pauseProducing, transport.resumeProducing
            )

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is None or self.refusal is not None:
            return
        if self._over_limit(len(data)):
            return
        self.body.feed(data)

    def chunk_announced(self, size: int) -> None:
        """
        A chunk of C{size} bytes follows: refuse it now if it would take the
        body over C{max_body_bytes}.
        """
        if self.body is not None and self.refusal is None:
            self._over_limit(size)

    def _over_limit(self, more: int) -> bool:
        assert self.body is not None
        if self._max_body and self.body.received + more > self._max_body:
            self.refuse(PayloadTooLarge(self._max_body))
            return True
        return False

    def describe(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Set what the request line said, for the response and the audit.
        """
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.partition(b"?")[0]

    def start(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Begin processing once the headers are in; the body follows.
        """
        self._started = True
        self.describe(command, path, version)
        self.args = {}
        self.process()

    def process(self) -> None:
        """
        Hand every request, whatever its target's form, to the proxy
        resource, so that it is checked, answered and audited like any
        other: Twisted's own L{server.Request.process} answers C{OPTIONS *}
        (and any other verb with C{*}) itself, with no client certificate
        checked, no HSTS and no audit record.
        """
        self.site = self.channel.site
        self.setHeader(b"Date", headers.http_date(self.site.reactor.seconds()))
        self.prepath, self.postpath = [], []
        self.render(self.site.resource)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._started:
            if self.body is not None:
                self.body.finish()
            return
        self.start(command, path, version)

    def refuse(self, refusal: Refusal) -> None:
        """
        Refuse a started request whose body turned out malformed, too large
        or too slow: the work is cancelled (and with it any upstream
        request), the consumer answered if nothing was sent yet, and the
        connection closed.
        """
        if self.finished or self._disconnected or self.refusal is not None:
            return
        self.refusal = refusal
        body = self.body
        self.channel.stop_reading()
        if self.work is not None:
            self.work.cancel()
        if body is not None and not body.complete:
            body.fail(Failure(refusal))

    @property
    def gone(self) -> bool:
        return self._disconnected

    @property
    def closes_after_response(self) -> bool:
        return not self.channel.persistent

    def abort(self) -> None:
        self.channel.transport.abortConnection()

    def close_after_response(self) -> None:
        self.channel.stop_reading()

    def send_continue(self) -> None:
        if not self.expects_continue:
            return
        self.expects_continue = False
        if self.body is not None and not self.body.complete and not self.startedWriting:
            self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def tls_connection(self) -> Any:
        get_handle = getattr(self.channel.transport, "getHandle", None)
        return get_handle() if get_handle is not None else None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.body is not None and not self.body.complete:
            self.body.fail(reason)
        super().connectionLost(reason)

    def finish(self) -> None:
        if self.body is not None and not self.body.complete:
            # The rest of the body is unread: the connection cannot be reused.
            self.channel.persistent = False
            if not self.startedWriting:
                self.setHeader(b"Connection", b"close")
            # Nothing will take the rest: stop holding the consumer's reads
            # (paused by the provider's back-pressure), so that its close,
            # and the TLS close_notify the shutdown awaits, are read.
            self.body.stopProducing()
        transport = self.channel.transport
        super().finish()
        send_now(transport)


class ProxyChannel(http.HTTPChannel):
    """
    A strict HTTP/1.1 server channel.

    Twisted's parser is lenient where a proxy must not be (obs-fold,
    C{Transfer-Encoding: identity}, control bytes, huge C{Content-Length}
    values) and answers what it does reject with a bare 400.  This channel
    checks every line of a request head first, against the C{[listen]}
    limits, refuses through the site's L{EarlyRefusal} (an audited
    OperationOutcome) and stops reading; it also times the head out after
    C{listen.header_timeout} (408) and a stalled body after
    C{listen.idle_timeout} (408).  Requests that carry a body start as soon
    as their headers are in, so the body streams to the provider instead of
    being buffered.

    @ivar limits: the C{[listen]} section, set by L{ProxySite}.
    @ivar address: the consumer's address the connection is counted under.
    """

    site: ProxySite
    requests: list[ProxyRequest]

    limits: ListenConfig
    address = ""
    _phase = _HEAD
    _closing = False
    _lost = False
    _deadline: IDelayedCall | None = None

    def connectionMade(self) -> None:
        limits = self.limits
        self.MAX_LENGTH = max(limits.max_request_line, limits.max_header_bytes)
        self.totalHeadersSize = limits.max_request_line + limits.max_header_bytes
        self.maxHeaders = limits.max_headers
        self.abortTimeout = limits.header_timeout  # type: ignore[assignment]  # seconds, any number
        self._new_head()
        super().connectionMade()
        self._deadline = self.callLater(limits.header_timeout, self._head_expired)

    def _new_head(self) -> None:
        self._phase = _HEAD
        self._awaiting_request_line = True
        self._head_started = False
        self._head_bytes = 0
        self._header_count = 0
        self._content_length: int | None = None
        self._chunked = False
        self._singletons: set[bytes] = set()

    @property
    def idle(self) -> bool:
        return not self.requests

    def stop_reading(self) -> None:
        """
        Ignore everything the consumer sends from now on and close after the
        current response; abort if the consumer does not read it within
        C{abortTimeout} seconds.
        """
        self._closing = True
        self.persistent = False
        self._cancel_deadline()
        # A response can finish after the connection was lost under it
        # (a write that found it reset): then there is nothing to abort.
        if self._abortingCall is None and not self._lost:
            self._abortingCall = self.callLater(self.abortTimeout, self.forceAbortClient)

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        super().dataReceived(data)
        # Re-entrant calls (a response finishing while lines are parsed)
        # only append to the line buffer; check it once, at the outside.
        if self._phase is _HEAD and not self._closing and not self._busyReceiving:
            self._check_partial_line(self._buffer)

    def _check_partial_line(self, pending: bytes) -> None:
        """
        Look at the unterminated line a head is waiting on: LineReceiver
        only splits on CRLF, so a CR or LF in it is bare, and a line that is
        already too long need not be waited for.
        """
        if pending or not self._awaiting_request_line:
            self._head_started = True
            if self._deadline is None:
                self._deadline = self.callLater(self.limits.header_timeout, self._head_expired)
        if b"\n" in pending or b"\r" in pending[:-1]:
            self._refuse_head(BadRequest("BAD_REQUEST: bare CR or LF in request head"), pending)
        elif self._awaiting_request_line and len(pending) > self.limits.max_request_line:
            self._refuse_head(URITooLong(self.limits.max_request_line), pending)
        elif (not self._awaiting_request_line
              and self._head_bytes + len(pending) > self.limits.max_header_bytes):
            self._refuse_head(self._too_large())

    def lineReceived(self, line: bytes) -> bool | None:
        if self._closing:
            return True
        refusal = self._line_refusal(line)
        if refusal is not None:
            self._refuse_head(refusal, line)
            return True
        super().lineReceived(line)
        return True if self._closing else None

    def _line_refusal(self, line: bytes) -> Refusal | None:
        if b"\r" in line or b"\n" in line:
            return BadRequest("BAD_REQUEST: bare CR or LF in request head")
        if self._awaiting_request_line:
            if not line:
                return None  # one empty line before a request is tolerated (RFC 9112 2.2)
            self._awaiting_request_line = False
            return self._request_line_refusal(line)
        self._head_bytes += len(line) + 2
        if self._head_bytes > self.limits.max_header_bytes:
            return self._too_large()
        if line[:1] in (b" ", b"\t"):
            return BadRequest("BAD_REQUEST: obsolete line folding in request head")
        return None

    def _request_line_refusal(self, line: bytes) -> Refusal | None:
        if len(line) > self.limits.max_request_line:
            return URITooLong(self.limits.max_request_line)
        if _REQUEST_LINE.fullmatch(line):
            return None
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[1] or not _TOKEN.fullmatch(parts[0]):
            return BadRequest("BAD_REQUEST: malformed request line")
        if parts[2] not in (b"HTTP/1.0", b"HTTP/1.1"):
            return BadRequest("BAD_REQUEST: HTTP version must be HTTP/1.0 or HTTP/1.1")
        return BadRequest("BAD_REQUEST: request target must be visible ASCII "
                          "(percent-encode anything else)")

    def _too_large(self) -> Refusal:
        return HeadersTooLarge(f"REQUEST_HEADERS_LARGER_THAN_{self.limits.max_header_bytes}_BYTES")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._awaiting_request_line:
            self._refuse_head(URITooLong(self.limits.max_request_line), line)
        else:
            self._refuse_head(self._too_large())

    def headerReceived(self, line: bytes) -> bool:
        refusal = self._header_refusal(line)
        if refusal is not None:
            self._refuse_head(refusal)
            return False
        accepted = super().headerReceived(line)
        if accepted and self._chunked and not isinstance(self._transferDecoder, _StrictChunked):
            request = self.requests[-1]
            self._transferDecoder = _StrictChunked(
                request.handleContentChunk, self._finishRequestBody, request.chunk_announced
            )
        return accepted

    def _header_refusal(self, line: bytes) -> Refusal | None:
        name, colon, value = line.partition(b":")
        if not colon:
            return BadRequest("BAD_REQUEST: malformed header line")
        if not _TOKEN.fullmatch(name):
            return BadRequest("BAD_REQUEST: invalid header name")
        value = value.strip(b" \t")
        if value.translate(None, _NOT_CONTROL):
            return BadRequest(f"BAD_REQUEST: control character in header {name.decode()}")
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            return HeadersTooLarge(f"MORE_THAN_{self.limits.max_headers}_REQUEST_HEADERS")
        lower = name.lower()
        if lower == b"content-length":
            return self._content_length_refusal(value)
        if lower == b"transfer-encoding":
            return self._transfer_encoding_refusal(value)
        repeated = lower in self._singletons
        refusal = headers.field_refusal(lower, value, self._singletons)
        if repeated and self.requests:
            # Keep every copy, so that the audit records none of them.
            self.requests[-1].requestHeaders.addRawHeader(name, value)
        return refusal

    def _content_length_refusal(self, value: bytes) -> Refusal | None:
        if self._content_length is not None:
            return BadRequest("BAD_REQUEST: Content-Length is repeated")
        if not _DIGITS.fullmatch(value):
            return BadRequest("BAD_REQUEST: Content-Length must be a decimal number")
        if self._chunked:
            return BadRequest("BAD_REQUEST: Content-Length with Transfer-Encoding")
        if len(value) > _MAX_LENGTH_DIGITS:
            return PayloadTooLarge(self.limits.max_body_bytes or 10**_MAX_LENGTH_DIGITS)
        self._content_length = int(value)
        return None

    def _transfer_encoding_refusal(self, value: bytes) -> Refusal | None:
        if self._version != b"HTTP/1.1":
            return BadRequest("BAD_REQUEST: Transfer-Encoding in an HTTP/1.0 request")
        if self._chunked:
            return BadRequest("BAD_REQUEST: Transfer-Encoding is repeated")
        if value.lower() != b"chunked":
            return BadRequest("BAD_REQUEST: Transfer-Encoding must be chunked")
        if self._content_length is not None:
            return BadRequest("BAD_REQUEST: Content-Length with Transfer-Encoding")
        self._chunked = True
        return None

    def allHeadersReceived(self) -> None:
        self._cancel_deadline()
        if self._version == b"HTTP/1.1" and b"host" not in self._singletons:
            self._refuse_head(BadRequest("BAD_REQUEST: Host header is missing"))
            return
        limit = self.limits.max_body_bytes
        if limit and self._content_length is not None and self._content_length > limit:
            self._refuse_head(PayloadTooLarge(limit))
            return
        super().allHeadersReceived()
        self._phase = _BODY
        if self.length != 0 and self.requests:
            self.requests[-1].start(self._command, self._path, self._version)

    def _send100Continue(self) -> None:
        """
        Twisted sends C{100 Continue} as soon as the head is in, before any
        check: note the expectation instead, for L{ProxyRequest.send_continue}.
        """
        self.requests[-1].expects_continue = True

    def checkPersistence(self, request: Any, version: bytes) -> bool:
        """
        As Twisted's, but reading C{Connection} as the comma-separated list
        it is (Twisted splits on spaces only, missing C{keep-alive,close}).
        """
        if version != b"HTTP/1.1":
            return False
        if b"close" in headers.connection_options(request.requestHeaders):
            request.responseHeaders.setRawHeaders(b"Connection", [b"close"])
            return False
        return True

    def allContentReceived(self) -> None:
        if self._closing or not self.requests:
            # The response already went and the connection is closing.
            self.length = 0
            self._transferDecoder = None
            return
        self._phase = _HANDLING
        super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        if self.persistent and not self._closing:
            self._new_head()
        else:
            self.stop_reading()
        super().requestDone(request)

    def _respondToBadRequestAndDisconnect(self) -> None:
        # Twisted's own rejections: a malformed chunked body once a request
        # has started, otherwise anything our checks did not name first.
        if self._phase is _BODY:
            if self.requests:
                self.requests[-1].refuse(BadRequest("BAD_REQUEST: malformed chunked body"))
        elif not self._closing:
            self._refuse_head(BadRequest("BAD_REQUEST: malformed request"))

    def _refuse_head(self, refusal: Refusal, partial: bytes = b"") -> None:
        """
        Refuse the request whose head is being read, with whatever is known
        of it, and close.
        """
        if self._closing:
            return
        if self.requests:
            request = self.requests[-1]
            request.describe(getattr(self, "_command", b""), getattr(self, "_path", b""),
                             getattr(self, "_version", b"HTTP/1.1"))
        else:
            request = cast(ProxyRequest, self.requestFactory(self))
            self.requests.append(request)
            request.describe(*_request_line_prefix(partial))
        self.stop_reading()
        self.site.refuse_early(request, refusal)

    def timeoutConnection(self) -> None:
        if self._closing:
            # stop_reading already arranged the abort; Twisted's would
            # replace (and so leak) that timer.
            return
        if self._phase is _BODY and self.requests:
            body = self.requests[-1].body
            if body is not None and body.paused:
                # Not read because the provider is not taking the body:
                # its response time-out judges it.
                self.setTimeout(self.timeOut)
                return
            self.requests[-1].refuse(RequestTimeout())
            return
        if self._phase is _HEAD and self._head_started:
            self._refuse_head(RequestTimeout(), self._buffer)
            return
        super().timeoutConnection()

    def _head_expired(self) -> None:
        self._deadline = None
        if self._closing or self._phase is not _HEAD:
            return
        if self._head_started:
            self._refuse_head(RequestTimeout(), self._buffer)
        else:
            # Connected but never sent a byte of a request: nothing to answer.
            self.stop_reading()
            self.loseConnection()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._cancel_deadline()
        self.site.channel_closed(self)
        super().connectionLost(reason)


class _StrictChunked(http._ChunkedTransferDecoder):
    """
    Twisted's chunked decoder, refusing a bare CR or LF in a chunk-size or
    trailer line at once instead of waiting for a CRLF that never comes,
    and announcing each chunk's size before its data arrives (so that a
    size over the body limit is refused at once, not after a time-out).
    """

    def __init__(self, data_callback: Callable[[bytes], None],
                 finish_callback: Callable[[bytes], None],
                 announce: Callable[[int], None]) -> None:
        super().__init__(data_callback, finish_callback)
        self._announce = announce

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        _check_chunk_line(self._buffer)
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        self._announce(self.length)
        return True

    def _dataReceived_TRAILER(self) -> bool:
        _check_chunk_line(self._buffer)
        return super()._dataReceived_TRAILER()


def _check_chunk_line(buffer: bytearray) -> None:
    end = buffer.find(b"\r\n")
    line = buffer[:end] if end >= 0 else buffer.rstrip(b"\r")
    if b"\r" in line or b"\n" in line:
        raise http._MalformedChunkedDataError("bare CR or LF in chunked framing")


def _request_line_prefix(partial: bytes) -> tuple[bytes, bytes, bytes]:
    """
    The method and (truncated) target of an unfinished request line, for
    the audit record of its refusal.
    """
    method, _, rest = partial.partition(b" ")
    target = rest.partition(b" ")[0][:512]
    if not _TOKEN.fullmatch(method[:32]):
        return b"", b"", b"HTTP/1.1"
    return method[:32], target, b"HTTP/1.1"


class ConnectionCaps:
    """
    C{listen.max_connections} and C{listen.max_connections_per_address},
    counted from the moment a connection is accepted, not from its first
    byte or its TLS handshake: a connection that stays silent, or
    handshakes slowly, holds its place like any other.

    Behind the PROXY protocol the consumer's address is known only once
    the header is read: such a connection is L{open}ed with no address
    (the total cap) and L{identify}d with it later (the per-address cap),
    so that connections the balancer has not yet introduced are not
    counted against the balancer's own address.

    @ivar open_connections: connections accepted and not yet closed.
    @ivar refused_connections: connections refused for being over a cap.
    """

    def __init__(self, limits: Callable[[], ListenConfig]) -> None:
        self._limits = limits
        self._per_address: dict[str, int] = {}
        self.open_connections = 0
        self.refused_connections = 0

    def open(self, address: str | None) -> bool:
        """
        Count a connection just accepted from C{address} (L{None}: not yet
        known); L{False}, and counted as refused, when over a cap: the
        caller aborts it and never calls L{close}.
        """
        if self.open_connections >= self._limits().max_connections:
            return self._refuse(address)
        if address is not None and not self._count(address):
            return False
        self.open_connections += 1
        return True

    def identify(self, address: str) -> bool:
        """
        Name the address of a connection L{open}ed without one; L{False},
        and counted as refused, when that address is over its cap: the
        caller aborts it and still calls L{close} with no address.
        """
        return self._count(address)

    def close(self, address: str | None) -> None:
        """
        An admitted connection closed, counted under C{address}.
        """
        self.open_connections -= 1
        if address is None:
            return
        left = self._per_address[address] - 1
        if left:
            self._per_address[address] = left
        else:
            del self._per_address[address]

    def _count(self, address: str) -> bool:
        held = self._per_address.get(address, 0)
        if held >= self._limits().max_connections_per_address:
            return self._refuse(address)
        self._per_address[address] = held + 1
        return True

    def _refuse(self, address: str | None) -> bool:
        self.refused_connections += 1
        log.debug("Connection from {address} refused: over the connection limits",
                  address=address or "(PROXY header not yet read)")
        return False


class ProxySite(server.Site):
    """
    The site: our request and channel classes, connection caps in total and
    per consumer address, and no access log of its own (each exchange is
    logged once, with its audit fields, by whatever handles it).

    @ivar refuse_early: answers the requests a channel refuses before they
        start (L{EarlyRefusal}).

    @ivar caps: the connection caps, which the listening factory applies
        from the moment it accepts a connection (L{ConnectionCaps}).
    @ivar channels: the HTTP channels, built at a connection's first
        byte.
    """

    requestFactory = ProxyRequest
    protocol = ProxyChannel  # type: ignore[assignment]
    displayTracebacks = False

    def __init__(self, resource: IResource, reactor: Any, limits: ListenConfig,
                 refuse_early: EarlyRefusal) -> None:
        super().__init__(resource, reactor=reactor, timeout=limits.idle_timeout)
        self.refuse_early = refuse_early
        self.limits = limits
        self.channels: set[ProxyChannel] = set()
        self.caps = ConnectionCaps(lambda: self.limits)

    def buildProtocol(self, addr: Any) -> ProxyChannel:  # type: ignore[override]
        """
        A channel for a connection from C{addr}, already counted by
        L{caps}.
        """
        channel = super().buildProtocol(addr)
        channel.limits = self.limits
        channel.address = host_of(addr)
        self.channels.add(channel)
        return channel

    def channel_closed(self, channel: ProxyChannel) -> None:
        self.channels.discard(channel)

    def log(self, request: Any) -> None:
        pass
