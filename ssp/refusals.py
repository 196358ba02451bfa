# -*- test-case-name: tests.test_refusals -*-
"""
Connection-level refusals (no HTTP request seen: a failed or abandoned TLS
handshake, plain HTTP answered 497, a connection over a cap) are audited
in aggregate: one C{connection-refused} record per source address and
reason per interval, with a C{count}.  A flood of such connections then
costs a few hundred bytes of audit per interval instead of one durable
record each (issue 17); every HTTP request still has its own record.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ssp.interfaces import IAuditSink
from ssp.model import AuditRecord, audit_record

log = Logger()

# Distinct (address, reason) pairs kept per interval; past it, further
# addresses are counted under "other" (a flood from many addresses must
# not grow memory or the record count either).
MAX_KEYS = 1024
OTHER = "other"
# Token prefix of a handshake that failed or was cut short
# (L{ssp.tls.handshake_failure_reason}).
TLS_HANDSHAKE = "TLS_HANDSHAKE"


@attrs.define
class _Tally:
    first: AuditRecord
    count: int = 0


class ConnectionRefusals:
    """
    Counts refused connections and writes the counts every C{interval}
    seconds, and at stop.
    """

    def __init__(self, sink: IAuditSink, clock: IReactorTime, interval: float,
                 observe: Callable[[AuditRecord], None] = lambda record: None) -> None:
        """
        @param observe: sees each refusal as it happens (metrics).
        """
        self._sink = sink
        self._clock = clock
        self._observe = observe
        self._tallies: dict[tuple[str, str], _Tally] = {}
        self._flusher = LoopingCall(self.flush)
        self._flusher.clock = clock
        self._interval = interval

    def start(self) -> None:
        self._flusher.start(self._interval, now=False)

    def stop(self) -> None:
        if self._flusher.running:
            self._flusher.stop()
        self.flush()

    @property
    def counted(self) -> int:
        """
        Refusals counted and not yet written.
        """
        return sum(tally.count for tally in self._tallies.values())

    def refused(self, peer: object, reason: str, status: int = 0) -> None:
        """
        Count one refused connection from C{peer} (an address with C{host}).

        @param reason: the refusal token or TLS error (cut to 200 characters).
        @param status: the HTTP status answered (497), 0 when none.
        """
        now = self._clock.seconds()
        record = audit_record("connection-refused", now, peer, with_port=False,
                              decision="refused", token=reason[:200], status=status)
        self._observe(record)
        key = (record.consumer_address, record.token)
        if key not in self._tallies and len(self._tallies) >= MAX_KEYS:
            key = (OTHER, record.token)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(record)
        tally.count += 1

    def flush(self) -> None:
        """
        Append one record per address and reason counted since the last
        flush.  Records that cannot be written are logged (there is no
        request to refuse).
        """
        tallies, self._tallies = self._tallies, {}
        for (address, reason), tally in sorted(tallies.items()):
            record = attrs.evolve(tally.first, consumer_address=address, count=tally.count)
            self._sink.append(record).addErrback(
                lambda f, n=tally.count: log.failure("{n} connection refusals not audited", f, n=n))
