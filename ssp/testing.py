# -*- test-case-name: tests.test_testing -*-
"""
In-memory fakes of the proxy's interfaces, for unit tests of the pipeline
and for anyone embedding the proxy (the C{treq.testing} idea).  Each fake
honours the same contract as the real implementation and is exercised by
the same shared tests.
"""

from __future__ import annotations

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from ssp.errors import AuditUnavailable, DirectoryUnavailable
from ssp.interfaces import IAuditSink, IDirectory, IThrottle
from ssp.model import AccreditedSystem, AuditRecord, MessageHandler, RateDecision


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
    A throttle that allows a fixed number of requests per ASID and never
    refills, so tests can say exactly which request is refused.
    """

    consumer_allowance: int = 1_000_000
    provider_allowance: int = 1_000_000
    spent: dict[tuple[str, str], int] = attrs.Factory(dict)
    available: bool = True

    def consume_consumer(self, asid: str) -> Deferred[RateDecision]:
        return succeed(self._spend("consumer", asid, self.consumer_allowance))

    def consume_provider(self, asid: str) -> Deferred[RateDecision]:
        return succeed(self._spend("provider", asid, self.provider_allowance))

    def _spend(self, role: str, asid: str, allowance: int) -> RateDecision:
        used = self.spent.get((role, asid), 0)
        if used >= allowance:
            return RateDecision(False, allowance, 0, 60.0, 60.0)
        self.spent[(role, asid)] = used + 1
        return RateDecision(True, allowance, allowance - used - 1, 60.0)


@implementer(IAuditSink)
@attrs.define
class RecordingAuditSink:
    """
    An audit sink that keeps records in a list.

    @ivar writable: set false to make every append fail, as a full or
        read-only audit disk would.
    """

    records: list[AuditRecord] = attrs.Factory(list)
    writable: bool = True
    pending: int = 0

    def append(self, record: AuditRecord) -> Deferred[None]:
        if not self.writable:
            return fail(AuditUnavailable())
        self.records.append(record)
        return succeed(None)

    def completed(self) -> list[AuditRecord]:
        """
        The final record of each request, in order.
        """
        return [r for r in self.records if r.event == "completed"]
