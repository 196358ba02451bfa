# -*- test-case-name: tests.test_proxy,tests.test_provider_faults -*-
"""
Forwarding: a pooled C{Agent} speaking mutual TLS to providers, a body
producer that streams the consumer's upload as it arrives, and a relay
that streams the provider's response back with back-pressure both ways.

C{twisted.web.client.Agent} is used directly rather than through treq's
C{HTTPClient}: treq always adds a gzip C{ContentDecoderAgent} (which
rewrites C{Accept-Encoding} and decodes bodies) and a C{CookieAgent}
(which would carry one consumer's provider cookies into another's
requests).  A proxy must do neither.
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
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web._newclient import HEADER, STATUS, ParseError
from twisted.web.client import (
    Agent,
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
    # One per provider (only SDS-registered hosts get this far): building
    # one costs an IDNA encoding of the host name per request.
    _built: dict[tuple[bytes, int], Any] = attrs.field(factory=dict, init=False, eq=False,
                                                       repr=False)

    def endpointForURI(self, uri: Any) -> Any:
        key = (uri.host, uri.port)
        endpoint = self._built.get(key)
        if endpoint is None:
            endpoint = self._built[key] = self._endpoint(uri)
        return endpoint

    def _endpoint(self, uri: Any) -> Any:
        host = uri.host.decode("ascii")
        address, port = host.strip("[]"), uri.port
        mapped = self.resolve.get(f"{host}:{port}")
        if mapped is not None:
            address, _, port_text = mapped.rpartition(":")
            address, port = address.strip("[]"), int(port_text)
        tcp = HostnameEndpoint(self.reactor, address, port, timeout=self.connect_timeout)
        return BulkTLSEndpoint(self.tls.creator_for(host.strip("[]")), tcp)


@implementer(IUpstream)
class Upstream:
    """
    The forwarding agent: one connection pool for every provider.
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
        endpoints = ProviderEndpoints(reactor, tls, dict(config.resolve), config.connect_timeout)
        self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self.pool)

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
        """
        target = url.decode("ascii")
        d = self._agent.request(method, url, headers, body)
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
            if expired:
                return Failure(UpstreamTimeout(target))
            return _classify(result, target)

        return d.addBoth(classify)


class _ProviderProtocol(HTTP11ClientProtocol):
    """
    Twisted's HTTP/1.1 client, strict about what a provider sends before
    its body: at most C{max_header_bytes} of head, a well-formed status
    line (100-599) and header lines (no obs-fold, no control bytes), and
    not both C{Content-Length} and C{Transfer-Encoding}.  Anything else
    fails the response (502).  A connection on which bytes followed a
    complete response is closed rather than reused: they could otherwise
    be read as the next consumer's response.
    """

    _guarded: Any = None

    def __init__(self, quiescentCallback: Callable[[Any], None], max_header_bytes: int) -> None:
        super().__init__(quiescentCallback)
        self._max_header_bytes = max_header_bytes

    def request(self, request: Any) -> Deferred[Any]:
        result = super().request(request)
        send_now(self.transport)
        parser = self._parser
        if parser is not None and parser is not self._guarded:
            self._guarded = parser
            _guard_head(parser, self._max_header_bytes)
        return result

    def _finishResponse_WAITING(self, rest: bytes) -> None:
        if rest and self._currentRequest is not None:
            self._currentRequest.persistent = False
        super()._finishResponse_WAITING(rest)

    _finishResponse_TRANSMITTING = _finishResponse_WAITING

    def _giveUp(self, reason: Failure) -> None:
        # A clean TLS close waits for the provider's close_notify while still
        # reading; a provider sending without end would be read for ever.
        super()._giveUp(reason)
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        response = getattr(self._parser, "response", None)
        if response is not None and not reason.check(net_error.ConnectionDone):
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


def _guard_head(parser: Any, limit: int) -> None:
    """
    Check each line of a response head before Twisted's parser sees it
    (which accepts any status code, any C{NAME/x.y} version, folded lines
    and an unbounded number of headers).
    """
    parser.MAX_LENGTH = limit
    parse_line = parser.lineReceived
    received = 0
    framing: set[bytes] = set()

    def line_received(line: bytes) -> None:
        nonlocal received
        received += len(line) + 1
        if received > limit:
            raise ParseError("response head larger than upstream.max_header_bytes", b"")
        text = line[:-1] if line.endswith(b"\r") else line
        if parser.state == HEADER and not text:
            _expose_connection(parser)
        if parser.state == STATUS:
            framing.clear()
            if not _STATUS_LINE.fullmatch(text):
                raise ParseError("malformed status line", text[:200])
        elif text:
            if not _FIELD_LINE.fullmatch(text):
                raise ParseError("malformed header line", text[:200])
            name = text.partition(b":")[0].lower()
            if name in _FRAMING:
                framing.add(name)
                if len(framing) == len(_FRAMING):
                    raise ParseError("Content-Length with Transfer-Encoding", b"")
        parse_line(line)

    parser.lineReceived = line_received


def _expose_connection(parser: Any) -> None:
    """
    Copy the provider's C{Connection} field, which Twisted's parser keeps
    among its connection-control fields, into the response's headers at
    the end of the head, so that L{ssp.headers.downstream_headers} drops
    the fields it names as well as itself.
    """
    for value in parser.connHeaders.getRawHeaders(b"connection", ()):
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
        self._timed_out = False
        self._widened: list[tuple[FileDescriptor, str, int]] = []
        self.sent = 0

    def connectionMade(self) -> None:
        self._request.registerProducer(self.transport, True)
        length = self._response.length
        if length is UNKNOWN_LENGTH or length > self.TWISTED_BUFFER:
            # self.transport is Twisted's TransportProxyProducer.
            provider = _socket_under(getattr(self.transport, "_producer", None))
            consumer = _socket_under(getattr(getattr(self._request, "channel", None),
                                             "transport", None))
            self._widen(provider, "bufferSize", self.READ_SIZE)
            self._widen(consumer, "bufferSize", self.SEND_BUFFER)
            self._widen(consumer, "SEND_LIMIT", self.READ_SIZE)
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
        if self._idle is not None:
            self.transport.stopProducing()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if not self._request._disconnected:
            self._request.unregisterProducer()
        for connection, name, size in self._widened:
            setattr(connection, name, size)
        self._widened = []
        if self._timed_out:
            self._done.errback(UpstreamTimeout(self._target))
        elif reason.check(ResponseDone) or (
                reason.check(PotentialDataLoss) and self._response not in _CUT_SHORT):
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
    Stream C{response}'s body into C{request}, whose status and headers the
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
    return done, protocol
