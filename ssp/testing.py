# -*- test-case-name: tests.test_contracts -*-
"""
In-memory fakes of the proxy's interfaces, for unit tests of the pipeline
and for anyone embedding the proxy (the C{treq.testing} idea).  Each fake
honours the same contract as the real implementation and is exercised by
the same shared tests.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IConsumer, IProtocol, IReactorTime
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from ssp.config import RateLimit
from ssp.errors import (
    AuditUnavailable,
    DirectoryUnavailable,
    ThrottleUnavailable,
    UpstreamFailed,
)
from ssp.interfaces import IAuditSink, IDirectory, IThrottle, IUpstream
from ssp.model import AccreditedSystem, AuditRecord, MessageHandler, RateDecision
from ssp.throttle import gcra


@implementer(IDirectory)
@attrs.define
class MemoryDirectory:
    """
    An SDS held in lists, matching like SDS: ASIDs and interaction IDs
    case-exactly, party keys ignoring case.

    @ivar available: when false every lookup fails with
        L{DirectoryUnavailable}, as an unreachable SDS would.
    @ivar queries: how many lookups were made, to assert on caching.
    """

    systems: list[AccreditedSystem] = attrs.Factory(list)
    handlers: list[MessageHandler] = attrs.Factory(list)
    available: bool = True
    queries: int = 0

    @property
    def reachable(self) -> bool:
        return self.available

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        self.queries += 1
        if not self.available:
            return fail(DirectoryUnavailable())
        found = [s for s in self.systems if s.asid == asid]
        return succeed(found[0] if found else None)

    def message_handlers(
        self, party_key: str, interaction: str | None
    ) -> Deferred[tuple[MessageHandler, ...]]:
        self.queries += 1
        if not self.available:
            return fail(DirectoryUnavailable())
        return succeed(
            tuple(
                h
                for h in self.handlers
                if h.party_key.lower() == party_key.lower()
                and (interaction is None or h.interaction == interaction)
            )
        )

    def knows_interaction(self, interaction: str) -> bool:
        return any(interaction in s.interactions for s in self.systems) or any(
            interaction == h.interaction for h in self.handlers)


@implementer(IThrottle)
@attrs.define
class MemoryThrottle:
    """
    The same allowance for every ASID: C{allowance} requests at once,
    refilling evenly over C{period} seconds of the injected clock (the
    GCRA of L{ssp.throttle.gcra}, so decisions match the real throttle's).
    A fresh L{Clock} never moves, so by default nothing refills and tests
    can say exactly which request is refused.

    @ivar available: when false every decision fails with
        L{ThrottleUnavailable}, as a shared store that is down does under
        C{on_store_failure = "closed"}.
    """

    consumer_allowance: int = 1_000_000
    provider_allowance: int = 1_000_000
    period: float = 60.0
    clock: IReactorTime = attrs.Factory(Clock)
    available: bool = True
    _tats: dict[str, int] = attrs.field(factory=dict, init=False)
    _spent: int = attrs.field(default=0, init=False)

    def consume_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self._decide(f"consumer:{asid}", self.consumer_allowance, spend=True)

    def consume_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self._decide(f"provider:{asid}", self.provider_allowance, spend=True)

    def peek_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self._decide(f"consumer:{asid}", self.consumer_allowance, spend=False)

    def peek_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self._decide(f"provider:{asid}", self.provider_allowance, spend=False)

    @property
    def spent(self) -> int:
        """
        How many requests were allowed, over every ASID: zero means no
        allowance was touched.
        """
        return self._spent

    def _decide(self, key: str, allowance: int, spend: bool) -> Deferred[RateDecision | None]:
        if not self.available:
            return fail(ThrottleUnavailable())
        return succeed(self._gcra(key, allowance, spend))

    def _gcra(self, key: str, allowance: int, spend: bool) -> RateDecision:
        if allowance <= 0:
            return RateDecision(False, 0, 0, self.period, self.period)
        limit = RateLimit(rate=allowance, period=self.period, burst=allowance)
        now = round(self.clock.seconds() * 1_000_000)
        tat, decision = gcra(self._tats.get(key), now, limit)
        if spend and tat is not None:
            self._tats[key] = tat
            self._spent += 1
        return decision


def _later(clock: IReactorTime, deferred: Deferred[Any], outcome: Any) -> Deferred[Any]:
    """
    Fire C{deferred} with C{outcome} on a later turn of C{clock}, as real
    I/O would: callers must not rely on an answer arriving synchronously.
    """
    if isinstance(outcome, Exception):
        clock.callLater(0, deferred.errback, outcome)
    else:
        clock.callLater(0, deferred.callback, outcome)
    return deferred


def _reactor() -> IReactorTime:
    from twisted.internet import reactor

    return reactor


@implementer(IAuditSink)
@attrs.define
class RecordingAuditSink:
    """
    An audit sink that keeps records in a list.  Like the file sink, an
    append is durable (and its Deferred fires) only on a later turn of
    C{clock}; until then it counts in C{pending}.

    @ivar writable: set false to make every append fail, as a full or
        read-only audit disk would; set true again to repair it.
    """

    records: list[AuditRecord] = attrs.Factory(list)
    writable: bool = True
    clock: IReactorTime = attrs.Factory(_reactor)
    pending: int = 0

    def append(self, record: AuditRecord) -> Deferred[None]:
        self.pending += 1
        d: Deferred[None] = Deferred()

        def settle() -> None:
            # As in the file sink, a caller cancelling its Deferred does not
            # take the record back: it is kept (or fails) all the same.
            self.pending -= 1
            if not self.writable:
                d.errback(AuditUnavailable())
                return
            self.records.append(record)
            d.callback(None)

        self.clock.callLater(0, settle)
        return d

    def completed(self) -> list[AuditRecord]:
        """
        The final record of each request, in order.
        """
        return [r for r in self.records if r.event == "completed"]


@attrs.frozen
class Sent:
    """
    A request L{MemoryUpstream} received, with its body read.
    """

    method: bytes
    url: bytes
    headers: Headers
    body: bytes


@implementer(IUpstream)
@attrs.define
class MemoryUpstream:
    """
    Providers held in a dict: C{url -> (status, body)}.  A URL not listed
    is unreachable (L{UpstreamFailed}), as a closed port would be.  Answers
    arrive on a later turn of C{clock}, after the request body was read.

    @ivar sent: every request received, in order, to assert that refused
        requests were never forwarded.
    """

    providers: dict[bytes, tuple[int, bytes]] = attrs.Factory(dict)
    clock: IReactorTime = attrs.Factory(_reactor)
    sent: list[Sent] = attrs.Factory(list)

    def request(
        self, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None
    ) -> Deferred[IResponse]:
        return Deferred.fromCoroutine(self._answer(method, url, headers, body))

    async def _answer(
        self, method: bytes, url: bytes, headers: Headers, body: IBodyProducer | None
    ) -> IResponse:
        content = b"" if body is None else await _read(body)
        self.sent.append(Sent(method, url, headers, content))
        answer = self.providers.get(url)
        if answer is None:
            return await _later(self.clock, Deferred(), UpstreamFailed(url.decode("ascii")))
        status, payload = answer
        return await _later(self.clock, Deferred(), _Response(status, payload))


@implementer(IResponse)
@attrs.define
class _Response:
    """
    A complete response whose body is delivered at once.
    """

    code: int
    body: bytes
    version: tuple[bytes, int, int] = (b"HTTP", 1, 1)
    phrase: bytes = b"OK"
    headers: Headers = attrs.Factory(Headers)
    request: Any = None
    previousResponse: Any = None

    @property
    def length(self) -> int:
        return len(self.body)

    def deliverBody(self, protocol: IProtocol) -> None:
        protocol.makeConnection(None)  # type: ignore[arg-type]
        if self.body:
            protocol.dataReceived(self.body)
        protocol.connectionLost(Failure(ResponseDone()))

    def setPreviousResponse(self, response: Any) -> None:
        self.previousResponse = response


async def _read(body: IBodyProducer) -> bytes:
    chunks: list[bytes] = []

    @implementer(IConsumer)
    class _Collect:
        def registerProducer(self, producer: Any, streaming: bool) -> None:
            pass

        def unregisterProducer(self) -> None:
            pass

        def write(self, data: bytes) -> None:
            chunks.append(data)

    await body.startProducing(_Collect())
    return b"".join(chunks)
