# -*- test-case-name: tests.test_proxy -*-
"""
The HTTP side: a request class that streams uploads instead of buffering
them, a channel that starts a request as soon as its headers are in, and
the resource that admits, audits, forwards and relays each request.

The render follows klein's pattern: the work is a Deferred that a client
disconnect cancels, so an abandoned request stops its upstream request.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.iweb import IBodyProducer
from twisted.web.resource import Resource

from ssp import errors, forward, headers, token
from ssp.errors import Refusal
from ssp.interfaces import IAuditSink, IUpstream
from ssp.model import AuditRecord, Claims
from ssp.pipeline import Checks, Findings, Inbound, admit

log = Logger()

REASONS = {
    495: b"SSL Certificate Error",
    496: b"SSL Certificate Required",
    497: b"HTTP Request Sent to HTTPS Port",
}
CLIENT_CLOSED = 499


class ProxyRequest(server.Request):
    """
    A request whose body is handed to a L{forward.RequestBody} chunk by
    chunk instead of being collected in C{content}, and which may start
    before its body has arrived.
    """

    defaultContentType = None
    body: forward.RequestBody | None = None
    _started = False

    def gotLength(self, length: int | None) -> None:
        self.content = None
        if length != 0:
            transport = self.channel.transport
            self.body = forward.RequestBody(
                length, transport.pauseProducing, transport.resumeProducing
            )

    def handleContentChunk(self, data: bytes) -> None:
        if self.body is not None:
            self.body.feed(data)

    def start(self, command: bytes, path: bytes, version: bytes) -> None:
        """
        Begin processing once the headers are in; the body follows.
        """
        self._started = True
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.partition(b"?")[0]
        self.args = {}
        self.process()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._started:
            if self.body is not None:
                self.body.finish()
            return
        self.start(command, path, version)

    def connectionLost(self, reason: Failure) -> None:
        if self.body is not None and not self.body.complete:
            self.body.fail(reason)
        super().connectionLost(reason)

    def finish(self) -> None:
        if self.body is not None and not self.body.complete:
            # The rest of the body is unread: the connection cannot be reused.
            self.channel.persistent = False
            if not self.startedWriting:
                self.setHeader(b"Connection", b"close")
        super().finish()


class ProxyChannel(http.HTTPChannel):
    """
    Starts requests that carry a body as soon as their headers are in, so
    the body streams to the provider instead of being buffered.
    """

    def allHeadersReceived(self) -> None:
        super().allHeadersReceived()
        if self.length != 0 and self.requests:
            self.requests[-1].start(self._command, self._path, self._version)

    def connectionLost(self, reason: Failure) -> None:
        self.site.channels.discard(self)
        super().connectionLost(reason)

    @property
    def idle(self) -> bool:
        return not self.requests

    def allContentReceived(self) -> None:
        if not self.requests:
            # The response already went and the connection is closing.
            self.length = 0
            self._transferDecoder = None
            return
        super().allContentReceived()


class ProxySite(server.Site):
    """
    The site: our request and channel classes, no access log of its own
    (each exchange is logged once, with its audit fields, by L{Proxy}).
    """

    requestFactory = ProxyRequest
    protocol = ProxyChannel
    displayTracebacks = False

    def __init__(self, resource: Resource, reactor: Any, idle_timeout: float) -> None:
        super().__init__(resource, reactor=reactor, timeout=idle_timeout)
        self.channels: set[ProxyChannel] = set()

    def buildProtocol(self, addr: Any) -> ProxyChannel:
        channel = super().buildProtocol(addr)
        self.channels.add(channel)
        return channel

    def log(self, request: Any) -> None:
        pass


class ProxyResource(Resource):
    """
    Every path is a proxied request.
    """

    isLeaf = True

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self._proxy = proxy

    def render(self, request: ProxyRequest) -> int:
        work = Deferred.fromCoroutine(self._proxy.handle(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self._proxy.crashed, request)
        return server.NOT_DONE_YET


class Proxy:
    """
    Admits, audits, forwards and relays each request.

    @ivar checks: the pipeline's collaborators; the service swaps them on
        reload.
    """

    def __init__(self, checks: Checks, upstream: IUpstream, audit: IAuditSink,
                 clock: IReactorTime, idle_timeout: float, hsts: bytes,
                 observers: tuple[Any, ...] = ()) -> None:
        self.checks = checks
        self.upstream = upstream
        self.audit = audit
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.hsts = hsts
        self.observers = observers
        self.in_flight = 0

    async def handle(self, request: ProxyRequest) -> None:
        started = self.clock.seconds()
        request_id = uuid.uuid4().hex
        found = Findings()
        outcome = _Outcome()
        self.in_flight += 1
        try:
            connection = _tls_connection(request)
            inbound = Inbound(request.method, request.uri, request.requestHeaders, connection)
            await admit(inbound, self.checks, found)
            await self.audit.append(
                self._record("authorised", request_id, started, request, found, outcome)
            )
            await self._forward(request, found, outcome)
        except Refusal as refusal:
            outcome.refused(refusal)
            self._refuse(request, refusal, found)
        except CancelledError:
            outcome.abandoned()
        finally:
            self.in_flight -= 1
            outcome.total_latency = self.clock.seconds() - started
            await self._complete(
                self._record("completed", request_id, started, request, found, outcome)
            )

    async def _forward(self, request: ProxyRequest, found: Findings, outcome: _Outcome) -> None:
        url = found.target
        assert url is not None
        client = request.getClientAddress()
        element = headers.forwarded_element(
            getattr(client, "host", "unknown"), getattr(request.getHost(), "host", "unknown")
        )
        body: IBodyProducer | None = request.body
        if body is None and request.requestHeaders.hasHeader(b"content-length"):
            body = forward.RequestBody(0, lambda: None, lambda: None)
            body.finish()
        sent = self.clock.seconds()
        outcome.decision = "forwarded"
        response = await self.upstream.request(
            request.method, url.url, headers.upstream_headers(request.requestHeaders, url, element),
            body,
        )
        outcome.upstream_latency = self.clock.seconds() - sent
        outcome.status = response.code
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders.removeHeader(b"server")
        for name, values in headers.downstream_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        self._add_response_headers(request, found)
        done, stop = forward.relay(response, request, self.clock, self.idle_timeout,
                                   url.text)
        try:
            outcome.bytes_out = await done
        except CancelledError:
            stop()
            raise
        except Refusal as failure:
            outcome.status, outcome.token = failure.status, failure.token
            outcome.decision = "failed"
            request.channel.transport.abortConnection()
            return
        request.finish()

    def _add_response_headers(self, request: ProxyRequest, found: Findings) -> None:
        if not request.responseHeaders.hasHeader(b"strict-transport-security"):
            request.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [self.hsts])
        if found.rate is not None:
            for name, value in found.rate.headers():
                request.responseHeaders.setRawHeaders(name, [value])

    def _refuse(self, request: ProxyRequest, refusal: Refusal, found: Findings) -> None:
        if request.finished or request._disconnected:
            return
        if request.startedWriting:
            request.channel.transport.abortConnection()
            return
        xml = errors.wants_xml(request.getHeader(b"accept"), _query_format(request.uri))
        content_type, body = errors.operation_outcome(refusal, xml)
        request.setResponseCode(refusal.status, REASONS.get(refusal.status))
        response_headers = request.responseHeaders
        response_headers.removeHeader(b"server")
        response_headers.setRawHeaders(b"Content-Type", [content_type])
        response_headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        for name, value in refusal.headers:
            response_headers.setRawHeaders(name, [value])
        self._add_response_headers(request, found)
        request.write(body)
        request.finish()

    def _record(self, event: str, request_id: str, started: float, request: ProxyRequest,
                found: Findings, outcome: _Outcome) -> AuditRecord:
        spine, client = found.spine, found.client
        peer = request.getClientAddress()
        return AuditRecord(
            event=event,
            request_id=request_id,
            time=started,
            consumer_address=f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}",
            method=_text(request.method),
            target=found.target.text if found.target else _text(request.uri[1:]),
            trace_id=spine.trace_id if spine else _text(request.getHeader(b"ssp-traceid")),
            sender=spine.sender if spine else _text(request.getHeader(b"ssp-from")),
            receiver=spine.receiver if spine else _text(request.getHeader(b"ssp-to")),
            interaction=spine.interaction if spine else _text(request.getHeader(b"ssp-interactionid")),
            client_subject=client.subject if client else "",
            client_fingerprint=client.fingerprint if client else "",
            claims=found.claims or _claims_of_refused(request),
            decision=outcome.decision if event == "completed" else "authorised",
            token=outcome.token,
            status=outcome.status,
            bytes_in=request.body.received if request.body is not None else 0,
            bytes_out=outcome.bytes_out,
            upstream_latency=outcome.upstream_latency,
            total_latency=outcome.total_latency,
        )

    async def _complete(self, record: AuditRecord) -> None:
        for observer in self.observers:
            observer(record)
        try:
            await self.audit.append(record)
        except Refusal:
            log.critical("Audit record for {request_id} could not be written",
                         request_id=record.request_id)

    def crashed(self, failure: Failure, request: ProxyRequest) -> None:
        log.failure("Unhandled error proxying {uri!r}", failure, uri=request.uri)
        if not request.finished and not request._disconnected:
            request.channel.transport.abortConnection()


class _Outcome:
    """
    How an exchange ended, filled in as it goes.
    """

    def __init__(self) -> None:
        self.decision = "refused"
        self.token = ""
        self.status = 0
        self.bytes_out = 0
        self.upstream_latency: float | None = None
        self.total_latency: float | None = None

    def refused(self, refusal: Refusal) -> None:
        if self.decision == "forwarded":
            self.decision = "failed"
        self.status, self.token = refusal.status, refusal.token

    def abandoned(self) -> None:
        self.decision, self.status = "abandoned", CLIENT_CLOSED


def _claims_of_refused(request: ProxyRequest) -> Claims | None:
    """
    Best-effort claims for the audit record of a request refused before
    its token was validated.
    """
    authorization = request.getHeader(b"authorization")
    return token.extract(authorization) if authorization else None


def _tls_connection(request: ProxyRequest) -> Any:
    transport = request.channel.transport
    get_handle = getattr(transport, "getHandle", None)
    return get_handle() if get_handle is not None else None


def _query_format(uri: bytes) -> bytes | None:
    query = uri.partition(b"?")[2]
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"_format":
            return value.replace(b"%2B", b"+").replace(b"%2b", b"+")
    return None


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""
