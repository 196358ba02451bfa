# -*- test-case-name: tests.test_proxy,tests.test_provider_faults,tests.test_provider_leg -*-
"""
Forwarding: Twisted's HTTP/1.1 client over a keep-alive connection pool
speaking mutual TLS to providers, a body producer that streams the
consumer's upload as it arrives, and a relay that streams the provider's
response back with back-pressure both ways.

Requests go to C{HTTPConnectionPool} directly, as C{Agent.request} would
send them, rather than through treq's C{HTTPClient}: treq always adds a
gzip C{ContentDecoderAgent} (which rewrites C{Accept-Encoding} and
decodes bodies) and a C{CookieAgent} (which would carry one consumer's
provider cookies into another's requests).  A proxy must do neither.
"""

from __future__ import annotations

import functools
import re
import weakref
from typing import Any, Callable

import attrs
from twisted.internet import error as net_error
from twisted.internet.abstract import FileDescriptor
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import (
    IConsumer,
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import ParseError, Request
from twisted.web.client import (
    URI,
    HTTP11ClientProtocol,
    HTTPConnectionPool,
    ResponseDone,
    _HTTP11ClientFactory,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from ssp.config import UpstreamConfig
from ssp.errors import UpstreamFailed, UpstreamTimeout
from ssp.interfaces import IUpstream
from ssp.tls import BulkTLSEndpoint, UpstreamTLS
from ssp.wire import send_now

log = Logger()

_BUFFER_BEFORE_PAUSE = 64 * 1024

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] [1-5][0-9]{2}(?: [\t\x20-\x7e\x80-\xff]*)?")
_FIELD_LINE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[\t\x20-\x7e\x80-\xff]*")
_FRAMING = frozenset({b"content-length", b"transfer-encoding"})
# The same rules over several complete lines at once (each ends in LF or
# CRLF; neither rule's characters include CR or LF).
_FIELD_LINES = re.compile(rb"(?:%s\r?\n)*" % _FIELD_LINE.pattern)
_FIRST_LINES = re.compile(rb"%s\r?\n%s" % (_STATUS_LINE.pattern, _FIELD_LINES.pattern))
_BLANK_LINE = re.compile(rb"\n\r?\n")
_CONTROL_FIELD = re.compile(rb"^(content-length|transfer-encoding|connection):(.*)$",
                            re.MULTILINE | re.IGNORECASE)

# Responses whose connection closed without a clean TLS shutdown: a body
# delimited by the close is then truncated, not complete.
_CUT_SHORT: weakref.WeakSet[Any] = weakref.WeakSet()


@implementer(IAgentEndpointFactory)
@attrs.frozen
class ProviderEndpoints:
    """
    Endpoints to providers: TLS over TCP, with C{[upstream.resolve]}
    mapping C{host:port} to another C{address:port} (like curl
    C{--resolve}) while TLS still verifies the original host name.
    """

    reactor: Any
    tls: UpstreamTLS
    resolve: dict[str, str]
    connect_timeout: float

    def endpointForURI(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        address, port = host.strip("[]"), uri.port
        mapped = self.resolve.get(f"{host}:{port}")
        if mapped is not None:
            address, _, port_text = mapped.rpartition(":")
            address, port = address.strip("[]"), int(port_text)
        tcp = HostnameEndpoint(self.reactor, address, port, timeout=self.connect_timeout)
        return BulkTLSEndpoint(self.tls.creator_for(host.strip("[]")), tcp)


@attrs.frozen
class _Origin:
    """
    What every request to one C{https://host[:port]} shares: the pool's key
    for its connections, the endpoint that opens them, and the C{Host}
    value for a caller that sets none.
    """

    key: tuple[bytes, bytes, int]
    endpoint: IStreamClientEndpoint
    host: bytes


@implementer(IUpstream)
class Upstream:
    """
    The forwarding agent: one connection pool for every provider.

    It does what C{Agent.request} does for an C{https} URL without parsing
    the URL again on every request (the pipeline parsed and checked it):
    the origin's pool key and endpoint are built once per origin.  A
    reload builds a new L{Upstream}, so a changed C{[upstream.resolve]}
    or certificate never meets an old entry.
    """

    def __init__(self, reactor: Any, config: UpstreamConfig, tls: UpstreamTLS) -> None:
        self._clock: IReactorTime = reactor
        self._timeout = config.response_timeout
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = config.max_persistent_per_host
        self.pool.cachedConnectionTimeout = config.cached_connection_timeout  # type: ignore[assignment]
        self.pool.retryAutomatically = False
        # The pool builds its protocols through this (private) hook.
        self.pool._factory = functools.partial(  # type: ignore[assignment]
            _ProviderFactory, max_header_bytes=config.max_header_bytes)
        self._endpoints = ProviderEndpoints(reactor, tls, dict(config.resolve),
                                            config.connect_timeout)
        # Only SDS-registered origins get this far: a handful per proxy.
        self._origins: dict[bytes, _Origin] = {}

    def _origin(self, origin: bytes) -> _Origin:
        found = self._origins.get(origin)
        if found is None:
            uri = URI.fromBytes(origin)
            found = self._origins[origin] = _Origin(
                (uri.scheme, uri.host, uri.port), self._endpoints.endpointForURI(uri),
                origin.partition(b"://")[2])
        return found

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None
    ) -> Deferred[IResponse]:
        """
        Send the request; the Deferred fails with L{UpstreamTimeout} when
        the response headers do not arrive within C{response_timeout}
        (which covers connecting too), or L{UpstreamFailed}.  Cancelling
        it cancels the upstream request and fails it with
        L{CancelledError}.

        While the consumer is still sending a streamed body the provider
        cannot be blamed for not answering: the time-out then waits, the
        channel's C{idle_timeout} judges the consumer (408), and the
        provider gets the full C{response_timeout} from the body's end.

        @param url: an absolute C{https} URL with a path, as
            L{ssp.target.parse} admits.
        @raise ValueError: for any other URL, or a method that is not a token.
        """
        path_start = url.find(b"/", len(b"https://"))
        if not url.startswith(b"https://") or path_start < 0:
            raise ValueError(f"not an absolute https URL with a path: {url!r}")
        origin = self._origin(url[:path_start])
        if not headers.hasHeader(b"host"):
            headers = headers.copy()
            headers.addRawHeader(b"Host", origin.host)
        outgoing = Request(method, url[path_start:], headers, body, persistent=True)

        def send(connection: HTTP11ClientProtocol) -> Deferred[IResponse]:
            return connection.request(outgoing)

        d = self.pool.getConnection(origin.key, origin.endpoint).addCallback(send)
        expired = []
        timer: IDelayedCall

        def expire() -> None:
            nonlocal timer
            if isinstance(body, RequestBody) and body.awaiting_consumer:
                timer = self._clock.callLater(self._timeout, expire)
                return
            expired.append(True)
            d.cancel()

        def restart() -> None:
            if timer.active():
                timer.reset(self._timeout)

        timer = self._clock.callLater(self._timeout, expire)
        if isinstance(body, RequestBody):
            body.when_complete(restart)

        def classify(result: object) -> object:
            if timer.active():
                timer.cancel()
            if not isinstance(result, Failure):
                return result
            target = url.decode("ascii")
            if expired:
                return Failure(UpstreamTimeout(target))
            return _classify(result, target)

        return d.addBoth(classify)


class _ProviderProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client, strict about what a provider sends before
    its body (see L{_HeadGuard}): anything else fails the response (502).
    A connection on which bytes followed a complete response is closed
    rather than reused: they could otherwise be read as the next
    consumer's response.
    """

    _guard: _HeadGuard | None = None

    def __init__(self, quiescentCallback: Callable[[Any], None], max_header_bytes: int) -> None:
        super().__init__(quiescentCallback)
        self._max_header_bytes = max_header_bytes

    def request(self, request: Any) -> Deferred[Any]:
        if self.state != "QUIESCENT":
            # Twisted refuses it (RequestNotSent); the response being read
            # keeps its guard.
            return super().request(request)
        result = super().request(request)
        send_now(self.transport)
        if self._parser is not None:
            # Twisted's parser refuses a line longer than its own limit.
            self._parser.MAX_LENGTH = self._max_header_bytes
            self._guard = _HeadGuard(self._max_header_bytes)
        return result

    def dataReceived(self, data: bytes) -> None:
        guard = self._guard
        if guard is None:
            super().dataReceived(data)
            return
        try:
            interim, final = guard.receive(data)
        except ParseError:
            self._giveUp(Failure())
            return
        for head in interim:
            super().dataReceived(head)
        if final is not None and self._parser is not None:
            self._guard = None
            _expose_connection(self._parser, guard.connection)
            super().dataReceived(final)

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        if rest and self._currentRequest is not None:
            self._currentRequest.persistent = False
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING

    def _giveUp(self, reason: Failure) -> None:
        # A clean TLS close waits for the provider's close_notify while still
        # reading; a provider sending without end would be read for ever.
        self._guard = None
        super()._giveUp(reason)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._guard = None
        response = getattr(self._parser, "response", None)
        if response is not None and not isinstance(reason.value, net_error.ConnectionDone):
            _CUT_SHORT.add(response)
        super().connectionLost(reason)


class _ProviderFactory(_HTTP11ClientFactory):
    """
    What the connection pool builds provider protocols with.
    """

    def __init__(self, quiescentCallback: Callable[[Any], None], metadata: Any,
                 max_header_bytes: int) -> None:
        super().__init__(quiescentCallback, metadata)
        self._max_header_bytes = max_header_bytes

    def buildProtocol(self, addr: Any) -> _ProviderProtocol:
        return _ProviderProtocol(self._quiescentCallback, self._max_header_bytes)


class _HeadGuard:
    """
    Holds the heads of one response (any 1xx heads, then the final one)
    back from Twisted's parser until they are checked, which accepts any
    status code, any C{NAME/x.y} version, folded lines and an unbounded
    number of headers.  A head must be at most C{max_header_bytes} (1xx
    heads included), a well-formed status line (100-599) and header
    lines (no obs-fold, no control bytes), and not carry both
    C{Content-Length} and C{Transfer-Encoding}.

    Lines are checked as soon as they are complete, so a bad line is
    refused before the head ends, as a line-by-line check would; but a
    head that arrives in one read (nearly all) is checked by a few
    regular-expression scans, not by Python code per line.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        # A head arriving over several reads (appended to, not copied per
        # read: a provider trickling bytes must not cost quadratic time).
        self._pending = bytearray()
        # Bytes of the pending head whose (complete) lines are checked.
        self._checked = 0
        # Bytes of the earlier (1xx) heads of this response.
        self._received = 0
        self._framing: set[bytes] = set()
        self.connection: list[bytes] = []

    def receive(self, data: bytes) -> tuple[list[bytes], bytes | None]:
        """
        Take C{data} from the provider.

        @return: the checked 1xx heads now complete, and the final head with
            whatever followed it (the body), or L{None} while it is incomplete.
        @raise ParseError: for a head the proxy refuses.
        """
        buffer: bytes | bytearray = data
        if self._pending:
            self._pending += data
            buffer = self._pending
        interim: list[bytes] = []
        while True:
            end = self._end_of_head(buffer)
            if end < 0:
                self._pending = buffer if isinstance(buffer, bytearray) else bytearray(buffer)
                return interim, None
            self._pending = bytearray()
            if buffer[9:10] != b"1":
                return interim, bytes(buffer)
            interim.append(bytes(buffer[:end]))
            buffer = buffer[end:]
            self._received += end
            self._checked = 0
            self._framing.clear()
            self.connection = []

    def _end_of_head(self, buffer: bytes | bytearray) -> int:
        """
        Check the lines of C{buffer} not checked yet; return where the head
        ends, or -1 when it has not ended yet.
        """
        start = self._checked
        blank = _BLANK_LINE.search(buffer, max(start - 1, 0))
        if blank is None:
            end, complete = -1, buffer.rfind(b"\n", start) + 1
        else:
            end, complete = blank.end(), blank.start() + 1
        if self._received + (len(buffer) if end < 0 else end) > self._limit:
            raise ParseError("response head larger than upstream.max_header_bytes", b"")
        if complete > start:
            self._check_lines(buffer[start:complete], first=start == 0)
            self._checked = complete
        return end

    def _check_lines(self, lines: bytes | bytearray, first: bool) -> None:
        if not (_FIRST_LINES if first else _FIELD_LINES).fullmatch(lines):
            raise _malformed(lines, first)
        for name, value in _CONTROL_FIELD.findall(lines):
            name = name.lower()
            if name == b"connection":
                self.connection.append(value.strip())
            else:
                self._framing.add(name)
                if len(self._framing) == len(_FRAMING):
                    raise ParseError("Content-Length with Transfer-Encoding", b"")


def _malformed(lines: bytes | bytearray, first: bool) -> ParseError:
    """
    The error naming the first malformed line of C{lines}, which failed the
    check as a whole.
    """
    for index, line in enumerate(bytes(lines).split(b"\n")[:-1]):
        text = line[:-1] if line.endswith(b"\r") else line
        if first and index == 0:
            if not _STATUS_LINE.fullmatch(text):
                return ParseError("malformed status line", text[:200])
        elif not _FIELD_LINE.fullmatch(text):
            return ParseError("malformed header line", text[:200])
    return ParseError("malformed response head", bytes(lines[:200]))


def _expose_connection(parser: Any, values: list[bytes]) -> None:
    """
    Add the provider's C{Connection} field, which Twisted's parser keeps
    among its connection-control fields, to the response's headers before
    the parser reads the head, so that L{ssp.headers.downstream_headers}
    drops the fields it names as well as itself.
    """
    for value in values:
        parser.headers.addRawHeader(b"Connection", value)


def _classify(failure: Failure, target: str) -> Failure:
    reasons = [failure] + list(getattr(failure.value, "reasons", ()))
    if any(r.check(CancelledError) for r in reasons):
        return Failure(CancelledError())
    if any(r.check(net_error.TimeoutError) for r in reasons):
        return Failure(UpstreamTimeout(target))
    log.info("Upstream {target} failed: {reasons}", target=target,
             reasons=[r.getErrorMessage() for r in reasons])
    return Failure(UpstreamFailed(target))


@implementer(IBodyProducer, IPushProducer)
class RequestBody:
    """
    Streams the consumer's request body to the provider as it arrives.

    Until the agent starts producing, up to 64 KiB is buffered; beyond
    that, or whenever the provider's connection pushes back, reading from
    the consumer is paused.

    @ivar length: the consumer's C{Content-Length}, or L{UNKNOWN_LENGTH}
        (the upstream request is then chunked).
    """

    def __init__(self, length: int | None, pause: Callable[[], None],
                 resume: Callable[[], None]) -> None:
        self.length = UNKNOWN_LENGTH if length is None else length
        self.received = 0
        self.complete = False
        self._pause, self._resume = pause, resume
        self._buffer: list[bytes] = []
        self._consumer: IConsumer | None = None
        self._done: Deferred[None] | None = None
        self._paused = False
        self._stopped = False
        self._failure: Failure | None = None
        self._on_complete: list[Callable[[], None]] = []

    @property
    def awaiting_consumer(self) -> bool:
        """
        Whether the body is incomplete because the consumer has not sent
        the rest (rather than because the provider's side pushes back).
        """
        return not self.complete and not self._paused and self._failure is None

    @property
    def paused(self) -> bool:
        """
        Whether reading from the consumer is paused: the provider's side is
        not taking the body.
        """
        return self._paused

    def when_complete(self, callback: Callable[[], None]) -> None:
        """
        Call C{callback} once the whole body has arrived.
        """
        self._on_complete.append(callback)

    def feed(self, data: bytes) -> None:
        self.received += len(data)
        if self._stopped:
            return
        if self._consumer is not None:
            self._consumer.write(data)
            return
        self._buffer.append(data)
        if sum(map(len, self._buffer)) > _BUFFER_BEFORE_PAUSE:
            self._set_paused(True)

    def finish(self) -> None:
        self.complete = True
        callbacks, self._on_complete = self._on_complete, []
        for callback in callbacks:
            callback()
        if self._consumer is not None and self._done is not None:
            done, self._done = self._done, None
            done.callback(None)

    def fail(self, reason: Failure) -> None:
        """
        The consumer went away before the body was complete.
        """
        self._failure = reason
        if self._done is not None:
            done, self._done = self._done, None
            done.errback(reason)

    def startProducing(self, consumer: IConsumer) -> Deferred[None]:
        self._consumer = consumer
        for chunk in self._buffer:
            consumer.write(chunk)
        self._buffer = []
        self._set_paused(False)
        if self._failure is not None:
            return fail(self._failure)
        if self.complete:
            return succeed(None)
        self._done = Deferred()
        return self._done

    def pauseProducing(self) -> None:
        self._set_paused(True)

    def resumeProducing(self) -> None:
        self._set_paused(False)

    def stopProducing(self) -> None:
        self._stopped = True
        self._done = None
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused != self._paused:
            self._paused = paused
            (self._pause if paused else self._resume)()


class _Relay(Protocol):
    """
    Writes the provider's body to the consumer as it arrives, pausing the
    provider when the consumer's connection is full, and giving up when
    the provider stays silent for C{idle_timeout}.

    While a body larger than Twisted's 64 KiB socket buffer streams, the
    provider's socket is read C{READ_SIZE} at a time, and the consumer's
    holds up to C{SEND_BUFFER} before it pauses the provider and hands the
    kernel up to C{READ_SIZE} per send.  With Twisted's 64 KiB for all
    three, each read from the provider overfilled the consumer's buffer,
    so the provider was paused and resumed after every 64 KiB: these
    per-read costs were a fifth of the proxy's CPU on a streamed body
    (docs/performance.md; 256 KiB measured better than 128 KiB or 512 KiB).
    What one relay holds in memory is still bounded, by about 0.7 MiB
    instead of 130 KiB.
    """

    # Twisted's FileDescriptor.bufferSize, its read size and send buffer limit.
    TWISTED_BUFFER = 64 * 1024
    READ_SIZE = 256 * 1024
    # More than one read, so a consumer that keeps up never pauses the provider.
    SEND_BUFFER = READ_SIZE + 128 * 1024

    def __init__(self, response: IResponse, request: Any, clock: IReactorTime,
                 idle_timeout: float, target: str, done: Deferred[int]) -> None:
        self._response = response
        self._request = request
        self._target = target
        self._clock = clock
        self._idle_timeout = idle_timeout
        self._done = done
        self._idle: IDelayedCall | None = None
        self._ended = False
        self._registered = False
        self._timed_out = False
        self._widened: list[tuple[FileDescriptor, str, int]] = []
        self.sent = 0

    def connectionMade(self) -> None:
        length = self._response.length
        if length is UNKNOWN_LENGTH or length > self.TWISTED_BUFFER:
            # self.transport is Twisted's TransportProxyProducer.
            provider = _socket_under(getattr(self.transport, "_producer", None))
            consumer = _socket_under(self._request.transport)
            self._widen(provider, "bufferSize", self.READ_SIZE)
            self._widen(consumer, "bufferSize", self.SEND_BUFFER)
            self._widen(consumer, "SEND_LIMIT", self.READ_SIZE)

    def wait_for_more(self) -> None:
        """
        Make the provider's connection the consumer's producer and start the
        idle time-out, unless the whole body has already been relayed (a
        small body usually arrives with the head): both would otherwise be
        set up and torn down for nothing on most responses.
        """
        if not self._ended:
            self._request.registerProducer(self.transport, True)
            self._registered = True
            self._idle = self._clock.callLater(self._idle_timeout, self._idle_expired)

    def _widen(self, connection: FileDescriptor | None, name: str, size: int) -> None:
        """
        Raise C{connection}'s limit C{name} to C{size} until the body ends.
        """
        if connection is not None and getattr(connection, name) < size:
            self._widened.append((connection, name, getattr(connection, name)))
            setattr(connection, name, size)

    def dataReceived(self, data: bytes) -> None:
        self.sent += len(data)
        if self._idle is not None:
            self._idle.reset(self._idle_timeout)
        self._request.write(data)

    def _idle_expired(self) -> None:
        self._idle = None
        self._timed_out = True
        self.transport.stopProducing()

    def stop(self) -> None:
        """
        The consumer went away: close the provider's connection.
        """
        if not (self._ended or self._timed_out):
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._ended = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._registered and not self._request.gone:
            self._request.unregisterProducer()
        for connection, name, size in self._widened:
            setattr(connection, name, size)
        self._widened = []
        ended = reason.value
        if self._timed_out:
            self._done.errback(UpstreamTimeout(self._target))
        elif isinstance(ended, ResponseDone) or (
                isinstance(ended, PotentialDataLoss) and self._response not in _CUT_SHORT):
            self._done.callback(self.sent)
        else:
            log.info("Upstream {target} broke off: {reason}", target=self._target,
                     reason=reason.getErrorMessage())
            self._done.errback(UpstreamFailed(self._target))


def _socket_under(transport: Any) -> FileDescriptor | None:
    """
    The TCP connection under C{transport}: below TLS and any other
    protocol wrapper, or L{None} (a test's fake).
    """
    for _ in range(4):
        if isinstance(transport, FileDescriptor):
            return transport
        transport = getattr(transport, "transport", None)
    return None


def relay(response: IResponse, request: Any, clock: IReactorTime,
          idle_timeout: float, target: str) -> tuple[Deferred[int], _Relay]:
    """
    Stream C{response}'s body into C{request} (an L{ssp.interfaces.IExchange}, and an
    C{IConsumer} as Twisted's requests are), whose status and headers the
    caller has already set.

    @return: a Deferred firing with the body bytes relayed when the
        provider finishes (failing with L{UpstreamFailed} if it breaks off
        or L{UpstreamTimeout} if it goes idle: the caller must then abort
        the consumer's connection, the status line having gone), and the
        relay, whose C{sent} counts the bytes so far and whose C{stop}
        closes the provider's connection.
    """
    done: Deferred[int] = Deferred()
    protocol = _Relay(response, request, clock, idle_timeout, target, done)
    response.deliverBody(protocol)
    protocol.wait_for_more()
    return done, protocol
