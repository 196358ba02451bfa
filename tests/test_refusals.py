"""
Audit volume under a flood of refused connections (issue 17), and the
bounded audit queue.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from ssp.audit import FileAuditSink
from ssp.chain import KeyedSeal, audit_files, read_records
from ssp.directory import LDIFDirectory
from ssp.errors import AuditUnavailable
from ssp.interfaces import IAuditSink
from ssp.model import AuditRecord
from ssp.refusals import MAX_KEYS, ConnectionRefusals
from ssp.service import Concerns
from ssp.testing import MemoryThrottle
from tests.support import DEMO_LDIF, ENDPOINT, Provider, Proxy, spine_headers

# The start of a TLS record, then nothing: the handshake fails.
CUT_HANDSHAKE = b"\x16\x03\x01\x00\x05"
PLAIN = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def flood(port: int, payload: bytes, connections: int) -> None:
    for _ in range(connections):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(4096):
                pass


class FloodTests(TestCase):
    async def test_twenty_second_flood_writes_a_few_kilobytes(self) -> None:
        """
        13,401 refused connections from one address in 20 s (the figure of
        issue 17, 7.8 MB before) become one record per reason and 10-s
        interval: about 2 KB, keyed.
        """
        directory = Path(self.mktemp())
        clock = Clock()
        sink = FileAuditSink(directory, reactor, clock, durability="never",
                             seal=KeyedSeal(os.urandom(32)))
        await sink.start()
        refusals = ConnectionRefusals(sink, clock, 10.0)
        refusals.start()
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        for n in range(13401):
            refusals.refused(IPv4Address("TCP", "192.0.2.7", 40000 + n % 20000),
                             "TLS_HANDSHAKE_INCOMPLETE: Connection was closed cleanly.")
            if n % 670 == 669:
                clock.advance(1)
        refusals.refused(peer, "HTTP_REQUEST_SENT_TO_HTTPS_PORT", 497)
        refusals.stop()
        await sink.stop()
        records = list(read_records([directory]))
        size = sum(p.stat().st_size for p in audit_files(directory))
        self.assertEqual(sum(r["count"] for r in records), 13402)
        self.assertLessEqual(len(records), 4)
        self.assertLess(size, 3072)  # measured: 2,168 bytes in 4 records
        self.assertEqual({r["consumer_address"] for r in records}, {"192.0.2.7"})

    def test_many_addresses_bounded(self) -> None:
        written: list[AuditRecord] = []

        class Sink:
            def append(self, record: AuditRecord):  # type: ignore[no-untyped-def]
                from twisted.internet.defer import succeed
                written.append(record)
                return succeed(None)

        refusals = ConnectionRefusals(Sink(), Clock(), 10.0)  # type: ignore[arg-type]
        for n in range(MAX_KEYS + 500):
            refusals.refused(IPv4Address("TCP", f"10.0.{n // 256}.{n % 256}", 1), "X")
        refusals.flush()
        self.assertEqual(len(written), MAX_KEYS + 1)
        self.assertEqual(written[-1].consumer_address, "other")
        self.assertEqual(written[-1].count, 500)


class RealSocketFloodTests(TestCase):
    async def test_flood_over_real_sockets_is_counted_not_recorded(self) -> None:
        """
        300 cut handshakes and 100 plain-HTTP requests from one address to
        a real proxy: two C{connection-refused} records in a keyed file
        audit (before: 400 records, ~200 KB).
        """
        directory = Path(self.mktemp())
        sink = FileAuditSink(directory, reactor, durability="never",
                             seal=KeyedSeal(os.urandom(32)))
        await sink.start()
        concerns = Concerns(directory=LDIFDirectory.from_file(DEMO_LDIF),
                            throttle=MemoryThrottle(), audit=sink)
        proxy = await Proxy(self, Provider(self), concerns=concerns).start()
        await deferToThread(flood, proxy.port, CUT_HANDSHAKE, 300)
        await deferToThread(flood, proxy.port, PLAIN, 100)
        refusals = proxy.service.connection_refusals
        while refusals.counted < 400:
            await deferLater(reactor, 0.01, lambda: None)
        refusals.flush()
        await sink.stop()
        records = list(read_records([directory]))
        self.assertEqual(sorted((r["token"][:10], r["count"], r["status"]) for r in records),
                         [("HTTP_REQUE", 100, 497), ("TLS_HANDSH", 300, 0)])
        self.assertLess(sum(p.stat().st_size for p in audit_files(directory)), 1500)


class BoundedQueueTests(TestCase):
    async def test_slow_disk_refuses_over_real_sockets(self) -> None:
        """
        While the disk holds the writer (a stalled write) the queue fills
        to C{max_pending}; the next request is refused with 503
        C{AUDIT_UNAVAILABLE} instead of queueing, and nothing of it is
        forwarded.  Once the disk answers, the queued requests go on.
        """
        stalled = threading.Event()

        def slow_write(fd: int, data: memoryview) -> int:
            stalled.wait(30)  # a synchronous (O_DSYNC) write waits for the disk
            return os.write(fd, data)

        directory = Path(self.mktemp())
        sink = FileAuditSink(directory, reactor, raw_write=slow_write, max_pending=2)
        self.addCleanup(sink.stop)
        await sink.start()
        concerns = Concerns(directory=LDIFDirectory.from_file(DEMO_LDIF),
                            throttle=MemoryThrottle(), audit=sink)
        provider = Provider(self)
        proxy = await Proxy(self, provider, concerns=concerns).start()
        self.addCleanup(stalled.set)  # first, or the proxy's drain waits on the disk
        consumer = proxy.consumer()
        waiting = []
        for expected in (1, 2):
            waiting.append(consumer.get("metadata"))
            while sink.pending < expected:
                await deferLater(reactor, 0.01, lambda: None)
        refused = await consumer.get("metadata")
        self.assertEqual(refused.status, 503)
        self.assertEqual(refused.outcome()["issue"][0]["diagnostics"], "AUDIT_UNAVAILABLE")
        self.assertEqual(provider.seen, [])
        stalled.set()
        self.assertEqual([(await d).status for d in waiting], [200, 200])
        self.assertEqual(len(provider.seen), 2)


    async def test_full_queue_refuses_instead_of_growing(self) -> None:
        directory = Path(self.mktemp())
        sink = FileAuditSink(directory, reactor, Clock(), durability="never", max_pending=3)
        await sink.start()
        accepted = [sink.append(AuditRecord("completed", str(n), 0.0)) for n in range(3)]
        overflow = sink.append(AuditRecord("authorised", "x", 0.0))
        self.failureResultOf(overflow, AuditUnavailable)
        self.assertEqual(sink.pending, 3)
        await sink.stop()
        for d in accepted:
            self.successResultOf(d)
        self.assertEqual(len(list(read_records([directory]))), 3)


@implementer(IAuditSink)
class HeldAuditSink:
    """
    An audit sink whose appends succeed only when the test says so.
    """

    writable = True

    def __init__(self) -> None:
        self.held: list[tuple[AuditRecord, Deferred[None]]] = []

    @property
    def pending(self) -> int:
        return len(self.held)

    def append(self, record: AuditRecord) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.held.append((record, d))
        return d


class RefusalRecordTests(TestCase):
    async def test_consumer_leaving_while_its_refusal_is_recorded(self) -> None:
        """
        A consumer that goes away while its refusal's record is being
        written is no error: the record is written all the same, the
        answer is dropped, and nothing is logged as a crash.
        """
        sink = HeldAuditSink()
        concerns = Concerns(directory=LDIFDirectory.from_file(DEMO_LDIF),
                            throttle=MemoryThrottle(), audit=sink)
        proxy = await Proxy(self, Provider(self), concerns=concerns).start()
        consumer = proxy.consumer()

        def send_and_leave() -> None:
            connection = consumer.connect()
            connection.request("GET", f"/{ENDPOINT}/metadata",
                               headers=spine_headers(sender="200000000999"))
            connection.sock.close()

        await deferToThread(send_and_leave)
        while not sink.held:
            await deferLater(reactor, 0.01, lambda: None)
        while proxy.service.site.channels:
            await deferLater(reactor, 0.01, lambda: None)
        [(record, written)] = sink.held
        written.callback(None)
        self.assertEqual((record.event, record.decision, record.status),
                         ("completed", "refused", 403))
        self.assertEqual(self.flushLoggedErrors(), [])
