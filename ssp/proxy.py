# -*- test-case-name: tests.test_proxy,tests.test_stream,tests.test_cors -*-
"""
The orchestration of each exchange: admit (the checks of
L{ssp.pipeline}), audit, forward, relay, audit again -- and the answer,
an OperationOutcome, when a check refuses.

The proxy sees a consumer's request only as an L{IExchange}: it never
reaches into the channel or the transport under it.  The render follows
klein's pattern: the work is a Deferred that a client disconnect cancels,
so an abandoned request stops its upstream request.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import server
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from twisted.web.resource import Resource

from ssp import cors, errors, forward, headers, token
from ssp.config import CorsConfig
from ssp.errors import Refusal, UpstreamFailed
from ssp.ids import new_request_id
from ssp.interfaces import IAuditSink, IExchange, IUpstream
from ssp.model import AuditRecord, Claims, audit_record
from ssp.pipeline import Checks, Findings, Inbound, admit

log = Logger()

REASONS = {
    408: b"Request Timeout",
    413: b"Content Too Large",
    414: b"URI Too Long",
    429: b"Too Many Requests",
    431: b"Request Header Fields Too Large",
    495: b"SSL Certificate Error",
    496: b"SSL Certificate Required",
    497: b"HTTP Request Sent to HTTPS Port",
}
CLIENT_CLOSED = 499


class ProxyResource(Resource):
    """
    Every path is a proxied request.
    """

    isLeaf = True

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def render(self, request: IExchange) -> int:
        work = request.work = Deferred.fromCoroutine(self.proxy.handle(request))
        request.notifyFinish().addErrback(lambda _: work.cancel())
        work.addErrback(self.proxy.crashed, request)
        return server.NOT_DONE_YET


class Proxy:
    """
    Admits, audits, forwards and relays each request.

    @ivar checks: the pipeline's collaborators; the service swaps them on
        reload.
    @ivar cors: the origins whose preflights are answered (SPEC §9.5).
    """

    def __init__(self, checks: Checks, upstream: IUpstream, audit: IAuditSink,
                 clock: IReactorTime, idle_timeout: float, hsts: bytes,
                 observers: tuple[Any, ...] = (), cors: CorsConfig = CorsConfig()) -> None:
        self.checks = checks
        self.cors = cors
        self.upstream = upstream
        self.audit = audit
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.hsts = hsts
        self.observers = observers
        self.in_flight = 0

    async def handle(self, request: IExchange) -> None:
        started = self.clock.seconds()
        request_id = new_request_id()
        found = Findings()
        outcome = _Outcome()
        self.in_flight += 1
        try:
            connection = request.tls_connection()
            if cors.is_preflight(request.method, request.requestHeaders):
                found.client = self.checks.identify(connection)
                self._answer_preflight(request, found, outcome)
                return
            inbound = Inbound(request.method, request.uri, request.requestHeaders, connection,
                              request.fields_checked)
            await admit(inbound, self.checks, found)
            await self.audit.append(
                self._record("authorised", request_id, started, request, found, outcome)
            )
            await self._forward(request, found, outcome)
        except Refusal as refusal:
            outcome.refused(refusal)
            if request.body is not None and not request.body.complete:
                # Decided now, not once the record is written: body bytes
                # still to come are never read, as a body or as a request.
                request.close_after_response()
            await self._settle(request_id, started, request, found, outcome)
            self._refuse(request, refusal, found)
        except CancelledError:
            if request.refusal is None:
                outcome.abandoned()
            else:
                outcome.refused(request.refusal)
                await self._settle(request_id, started, request, found, outcome)
                self._refuse(request, request.refusal, found)
        finally:
            if not outcome.recorded:
                # Nobody waits for this record: the exchange is over.
                self._settle(request_id, started, request, found, outcome).addErrback(
                    self.crashed, request)

    def _settle(self, request_id: str, started: float, request: IExchange,
                found: Findings, outcome: _Outcome) -> Deferred[None]:
        """
        Write the request's C{completed} record, once.  A refusal awaits
        it before answering: a refusal the consumer saw is on disk (within
        the sink's durability) even if the proxy is killed right after.  A
        consumer leaving meanwhile cancels only the wait: the record is
        written all the same.
        """
        outcome.recorded = True
        self.in_flight -= 1
        outcome.total_latency = self.clock.seconds() - started
        return self._complete(
            self._record("completed", request_id, started, request, found, outcome))

    async def _forward(self, request: IExchange, found: Findings, outcome: _Outcome) -> None:
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
        request.send_continue()
        try:
            response = await self.upstream.request(
                request.method, url.url,
                headers.upstream_headers(request.requestHeaders, url, element), body,
            )
        except (Refusal, CancelledError):
            raise
        except Exception as e:
            # A bug or an unforeseen failure below us: the consumer still
            # gets an answer and the audit says what happened.
            log.failure("Unexpected error forwarding to {target}", target=url.text)
            raise UpstreamFailed(url.text) from e
        outcome.upstream_latency = self.clock.seconds() - sent
        outcome.status = response.code
        request.setResponseCode(response.code, response.phrase)
        request.responseHeaders.removeHeader(b"server")
        for name, values in headers.downstream_headers(response.headers):
            request.responseHeaders.setRawHeaders(name, values)
        self._add_response_headers(request, found)
        if response.length is not UNKNOWN_LENGTH and response.code not in (204, 304):
            # Relay the provider's framing rather than re-chunking its body.
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % response.length])
        done, relaying = forward.relay(response, request, self.clock, self.idle_timeout,
                                       url.text)
        try:
            outcome.bytes_out = await done
        except CancelledError:
            outcome.bytes_out = relaying.sent
            relaying.stop()
            raise
        except Refusal as failure:
            outcome.bytes_out = relaying.sent
            outcome.status, outcome.token = failure.status, failure.token
            outcome.decision = "failed"
            request.abort()
            return
        request.finish()

    def _answer_preflight(self, request: IExchange, found: Findings,
                          outcome: _Outcome) -> None:
        """
        Answer a CORS preflight from a configured origin with 204; the
        browser is asking the proxy, so nothing is forwarded.

        @raise Forbidden: the origin or verb is not allowed.
        """
        for name, value in cors.preflight(self.cors, request.requestHeaders):
            request.responseHeaders.setRawHeaders(name, [value])
        outcome.decision, outcome.status = "answered", 204
        request.setResponseCode(204)
        request.responseHeaders.removeHeader(b"server")
        request.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [self.hsts])
        request.finish()

    def _add_response_headers(self, request: IExchange, found: Findings) -> None:
        if not request.responseHeaders.hasHeader(b"strict-transport-security"):
            request.responseHeaders.setRawHeaders(b"Strict-Transport-Security", [self.hsts])
        for name, value in cors.response_headers(self.cors, request.requestHeaders):
            if name == b"Vary":
                request.responseHeaders.addRawHeader(name, value)
            else:
                request.responseHeaders.setRawHeaders(name, [value])
        if found.rate is not None:
            for name, value in found.rate.headers():
                request.responseHeaders.setRawHeaders(name, [value])

    def _refuse(self, request: IExchange, refusal: Refusal, found: Findings) -> None:
        if request.finished or request.gone:
            return
        if request.startedWriting:
            request.abort()
            return
        xml = errors.wants_xml(request.getHeader(b"accept"), _query_format(request.uri))
        content_type, body = errors.operation_outcome(refusal, xml)
        request.setResponseCode(refusal.status, REASONS.get(refusal.status))
        if refusal.closes_connection:
            request.close_after_response()
        response_headers = request.responseHeaders
        if request.closes_after_response:
            response_headers.setRawHeaders(b"Connection", [b"close"])
        response_headers.removeHeader(b"server")
        response_headers.setRawHeaders(b"Content-Type", [content_type])
        response_headers.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        for name, value in refusal.headers:
            response_headers.setRawHeaders(name, [value])
        self._add_response_headers(request, found)
        request.write(body)
        request.finish()

    def refuse_early(self, request: IExchange, refusal: Refusal) -> None:
        """
        Audit, then answer, a request the channel refused before it could
        be admitted (its framing, size or timing); the connection then
        closes.  The certificate check still comes first: a consumer
        without a good certificate gets its 496/495, whatever else is wrong.
        """
        started = self.clock.seconds()
        found = Findings()
        try:
            found.client = self.checks.identify(request.tls_connection())
        except Refusal as unidentified:
            refusal = unidentified
        outcome = _Outcome()
        outcome.refused(refusal)
        outcome.total_latency = 0.0
        request.responseHeaders.setRawHeaders(b"Date", [headers.http_date(started)])
        recorded = self._complete(
            self._record("completed", new_request_id(), started, request, found, outcome))
        recorded.addErrback(lambda f: log.failure("Audit record of a refusal not written", f))
        recorded.addCallback(lambda _: self._refuse(request, refusal, found))

    def _record(self, event: str, request_id: str, started: float, request: IExchange,
                found: Findings, outcome: _Outcome) -> AuditRecord:
        spine, client = found.spine, found.client
        return audit_record(
            event,
            started,
            request.getClientAddress(),
            request_id,
            method=_text(request.method),
            target=found.target.text if found.target else _text(_unparsed_target(request.uri)),
            trace_id=spine.trace_id if spine else _sent_once(request, b"ssp-traceid"),
            sender=spine.sender if spine else _sent_once(request, b"ssp-from"),
            receiver=spine.receiver if spine else _sent_once(request, b"ssp-to"),
            interaction=spine.interaction if spine else _sent_once(request, b"ssp-interactionid"),
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

    def _complete(self, record: AuditRecord) -> Deferred[None]:
        """
        Hand a C{completed} record to the sink (a Deferred, not a
        coroutine: most are never awaited).
        """
        for observer in self.observers:
            observer(record)
        return self.audit.append(record).addErrback(_not_recorded, record)

    def crashed(self, failure: Failure, request: IExchange) -> None:
        log.failure("Unhandled error proxying {uri!r}", failure, uri=request.uri)
        if not request.finished and not request.gone:
            request.abort()


def _not_recorded(failure: Failure, record: AuditRecord) -> None:
    """
    A C{completed} record the sink refused is logged: the exchange is over,
    or is answered all the same.  A consumer leaving meanwhile cancels only
    the wait: the sink writes the record all the same.
    """
    if failure.check(Refusal):
        log.critical("Audit record for {request_id} could not be written",
                     request_id=record.request_id)
    elif not failure.check(CancelledError):
        failure.raiseException()


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
        self.recorded = False

    def refused(self, refusal: Refusal) -> None:
        if self.decision == "forwarded":
            self.decision = "failed"
        self.status, self.token = refusal.status, refusal.token

    def abandoned(self) -> None:
        self.decision, self.status = "abandoned", CLIENT_CLOSED


def _claims_of_refused(request: IExchange) -> Claims | None:
    """
    Best-effort claims for the audit record of a request refused before
    its token was validated; none when C{Authorization} was repeated.
    """
    authorization = headers.single(request.requestHeaders, b"authorization")
    return token.extract(authorization) if authorization else None


def _sent_once(request: IExchange, name: bytes) -> str:
    """
    A field for the audit record of a refused request: empty unless sent
    exactly once.
    """
    return _text(headers.single(request.requestHeaders, name))


def _unparsed_target(uri: bytes) -> bytes:
    """
    What the audit records as the target of a request refused before its
    target was parsed: the provider URL after the proxy's C{/}, or any
    other form (C{*}, C{host:port}, an absolute URL) as received.
    """
    return uri[1:] if uri.startswith(b"/") else uri


def _query_format(uri: bytes) -> bytes | None:
    query = uri.partition(b"?")[2]
    for pair in query.split(b"&"):
        name, _, value = pair.partition(b"=")
        if name == b"_format":
            return value.replace(b"%2B", b"+").replace(b"%2b", b"+")
    return None


def _text(value: bytes | None) -> str:
    return value.decode("utf-8", "replace") if value else ""
