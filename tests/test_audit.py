"""
Tests for L{ssp.audit}: record encoding, the file sink (rotation, group
commit, durability, fail-closed, recovery after a crash) and chain
verification.
"""

from __future__ import annotations

import errno
import fcntl
import io
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp import audit
from ssp.audit import FileAuditSink
from ssp.auditcli import main_verify
from ssp.chain import GENESIS, UnkeyedSeal, audit_files, read_records
from ssp.config import AuditConfig
from ssp.errors import AuditUnavailable
from ssp.model import AuditRecord, Claims
from ssp.verify import verify_files as verify
from tests.slapd import _die_with_parent

REPO = Path(__file__).resolve().parents[1]
MARCH_1_LATE = datetime(2024, 3, 1, 23, 59, 50, tzinfo=UTC).timestamp()


def record(n: int, **changes: Any) -> AuditRecord:
    fields: dict[str, Any] = {
        "event": "completed",
        "request_id": f"req-{n}",
        "time": 1709337590.25 + n,
        "consumer_address": "127.0.0.1:50000",
        "method": "GET",
        "target": "https://provider.example/B82617/STU3/1/gpconnect/fhir/metadata",
        "trace_id": "06efbd0f-058f-43ec-aa4b-cd0dc76bd5b1",
        "sender": "200000000359",
        "receiver": "918999198738",
        "interaction": "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
        "decision": "forwarded",
        "status": 200,
        "bytes_in": 0,
        "bytes_out": 1234,
        "upstream_latency": 0.05,
        "total_latency": 0.06,
    }
    fields.update(changes)
    return AuditRecord(**fields)


def encode(record: AuditRecord, previous: str) -> bytes:
    return UnkeyedSeal().seal(record, previous)


def line_hash(line: bytes) -> str:
    return UnkeyedSeal().link(line)


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def write_chain(directory: Path, per_file: list[int]) -> list[Path]:
    """
    Write a valid chain by hand: C{per_file[i]} records in file i.
    """
    directory.mkdir(parents=True, exist_ok=True)
    previous = GENESIS
    paths = []
    n = 0
    for index, count in enumerate(per_file, 1):
        path = directory / f"audit-20240301-{index:04d}.jsonl"
        with path.open("wb") as f:
            for _ in range(count):
                line = encode(record(n), previous)
                f.write(line)
                previous = line_hash(line)
                n += 1
        paths.append(path)
    return paths


class EncodeTests(SynchronousTestCase):
    def test_fields(self) -> None:
        """
        A line holds every field of the record, claims nested, plus the
        previous hash; keys are sorted and the line ends with a newline.
        """
        claims = Claims(
            "10019",
            "https://p/fhir",
            ("G1", "10019"),
            "GPC001",
            "directcare",
            "patient/*.read",
            True,
        )
        line = encode(record(1, claims=claims), "ab" * 32)
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        document = json.loads(line)
        self.assertEqual(list(document), sorted(document))
        self.assertEqual(set(document) - {"prev"}, {f.name for f in attrs.fields(AuditRecord)})
        self.assertEqual(document["prev"], "ab" * 32)
        self.assertEqual(document["claims"]["practitioner_ids"], ["G1", "10019"])
        self.assertEqual(document["claims"]["organisation_ods"], "GPC001")
        self.assertEqual(document["status"], 200)
        self.assertIsNone(
            json.loads(encode(record(1, upstream_latency=None), GENESIS))["upstream_latency"]
        )

    def test_newlines_escaped(self) -> None:
        """
        Request-supplied text cannot forge a second line.
        """
        line = encode(record(1, trace_id='x"\n{"event":"forged"}'), GENESIS)
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(json.loads(line)["trace_id"], 'x"\n{"event":"forged"}')

    def test_hash_covers_prev(self) -> None:
        self.assertNotEqual(
            line_hash(encode(record(1), GENESIS)), line_hash(encode(record(1), "1" * 64))
        )
        line = encode(record(1), GENESIS)
        self.assertEqual(line_hash(line), line_hash(line.rstrip(b"\n")))

    def test_nan_refused(self) -> None:
        self.assertRaises(ValueError, encode, record(1, total_latency=float("nan")), GENESIS)


class FsyncSeam:
    """
    Counts the points where a batch becomes durable: fsyncs, and writes to
    a file opened with C{O_DSYNC} (durability C{"always"}: such a write is
    the sync).  Can fail them or hold them until released.

    @ivar synchronous: for each write, whether its file was C{O_DSYNC}.
    """

    def __init__(self) -> None:
        self.calls = 0
        self.error: OSError | None = None
        self.hold: threading.Event | None = None
        self.entered: Deferred[None] | None = None
        self.events: list[str] = []
        self.synchronous: list[bool] = []

    def __call__(self, fd: int) -> None:
        self._durable()
        os.fsync(fd)

    def write(self, fd: int, data: memoryview) -> int:
        synchronous = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DSYNC)
        self.synchronous.append(synchronous)
        if synchronous:
            self._durable()
        return os.write(fd, data)

    def _durable(self) -> None:
        if self.entered is not None:
            entered, self.entered = self.entered, None
            reactor.callFromThread(entered.callback, None)
        if self.hold is not None and not self.hold.wait(10):
            self.events.append("fsync-timeout")
        self.calls += 1
        self.events.append("fsync")
        if self.error is not None:
            raise self.error


class SinkTests(TestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.clock = Clock()
        self.clock.advance(MARCH_1_LATE)
        self.fsync = FsyncSeam()

    def sink(self, **options: Any) -> FileAuditSink:
        options.setdefault("fsync", self.fsync)
        options.setdefault("raw_write", self.fsync.write)
        sink = FileAuditSink(self.directory, reactor, self.clock, **options)
        self.addCleanup(sink.stop)
        return sink

    async def started(self, **options: Any) -> FileAuditSink:
        sink = self.sink(**options)
        await sink.start()
        return sink

    async def test_from_config(self) -> None:
        config = AuditConfig(
            directory=self.directory, durability="never", rotate_bytes=4096, rotate_daily=False,
            unkeyed=True,
        )
        self.assertRaises(ValueError, FileAuditSink.from_config,
                          attrs.evolve(config, unkeyed=False), reactor)
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        sink = FileAuditSink.from_config(config, reactor, self.clock)
        self.addCleanup(sink.stop)
        self.assertTrue(any("UNKEYED" in e.get("log_format", "") and
                            e["log_level"] == LogLevel.warn for e in logged))
        await sink.start()
        await sink.append(record(1))
        self.assertEqual(len(read_all(self.directory)), 1)

    async def test_size_rotation_keeps_chain(self) -> None:
        """
        Files rotate before they would exceed C{rotate_bytes}, also in the
        middle of one batch; the first line of each file chains to the
        last line of the one before.
        """
        size = len(encode(record(0), GENESIS))
        sink = await self.started(rotate_bytes=size * 3 + 10)
        await gatherResults([sink.append(record(n)) for n in range(7)])
        for n in range(7, 10):
            await sink.append(record(n))
        files = audit_files(self.directory)
        self.assertEqual(
            [p.name for p in files],
            [f"audit-20240301-{i:04d}.jsonl" for i in (1, 2, 3, 4)],
        )
        self.assertEqual([len(lines(p)) for p in files], [3, 3, 3, 1])
        for earlier, later in itertools.pairwise(files):
            self.assertEqual(json.loads(lines(later)[0])["prev"], line_hash(lines(earlier)[-1]))
        self.assertEqual(json.loads(lines(files[0])[0])["prev"], GENESIS)
        result = verify([self.directory])
        self.assertEqual((result.ok, result.records, result.files), (True, 10, 4))
        self.assertEqual(
            [r["request_id"] for r in read_all(self.directory)], [f"req-{n}" for n in range(10)]
        )

    async def test_daily_rotation(self) -> None:
        """
        The first write after UTC midnight (by the injected clock) opens a
        file named for the new day, numbered from 1, chained to the last.
        """
        sink = await self.started()
        await sink.append(record(1))
        await sink.append(record(2))
        self.clock.advance(20)
        await sink.append(record(3))
        self.assertEqual(
            [p.name for p in audit_files(self.directory)],
            ["audit-20240301-0001.jsonl", "audit-20240302-0001.jsonl"],
        )
        self.assertEqual(verify([self.directory]).records, 3)
        self.assertTrue(verify([self.directory]).ok)

    async def test_daily_rotation_off(self) -> None:
        sink = await self.started(rotate_daily=False)
        await sink.append(record(1))
        self.clock.advance(20)
        await sink.append(record(2))
        self.assertEqual(
            [p.name for p in audit_files(self.directory)], ["audit-20240301-0001.jsonl"]
        )

    async def test_restart_continues_chain(self) -> None:
        """
        A new sink appends to the newest file, chained to its last line.
        """
        first = await self.started()
        for n in range(3):
            await first.append(record(n))
        await first.stop()
        second = await self.started()
        await second.append(record(3))
        (path,) = audit_files(self.directory)
        self.assertEqual(len(lines(path)), 4)
        self.assertEqual(verify([self.directory]).records, 4)
        self.assertTrue(verify([self.directory]).ok)

    async def test_torn_line_cut_on_restart(self) -> None:
        """
        A line a crash left half-written is cut when the sink starts, and
        the chain continues from the last complete line.
        """
        first = await self.started()
        for n in range(3):
            await first.append(record(n))
        await first.stop()
        (path,) = audit_files(self.directory)
        intact = path.read_bytes()
        with path.open("ab") as f:
            f.write(encode(record(99), GENESIS)[:40])
        self.assertIn("incomplete final line", verify([self.directory]).note)
        second = await self.started()
        self.assertEqual(path.read_bytes(), intact)
        await second.append(record(3))
        result = verify([self.directory])
        self.assertEqual((result.ok, result.records, result.note), (True, 4, ""))

    async def test_newest_file_empty(self) -> None:
        """
        A crash just after rotation leaves an empty newest file: the chain
        continues from the last line of the file before it.
        """
        write_chain(self.directory, [2])
        (self.directory / "audit-20240301-0002.jsonl").touch()
        sink = await self.started()
        await sink.append(record(2))
        self.assertEqual(len(lines(self.directory / "audit-20240301-0002.jsonl")), 1)
        self.assertTrue(verify([self.directory]).ok)

    async def test_group_commit_one_tick(self) -> None:
        """
        Everything appended in one reactor turn shares one write and fsync.
        """
        sink = await self.started()
        await sink.append(record(0))
        self.fsync.calls = 0
        await gatherResults([sink.append(record(n)) for n in range(1, 51)])
        self.assertEqual(self.fsync.calls, 1)
        self.assertEqual(verify([self.directory]).records, 51)

    async def test_group_commit_while_in_flight(self) -> None:
        """
        Appends arriving while a write and fsync are in flight go together
        into the next one.
        """
        sink = await self.started()
        await sink.append(record(0))
        self.fsync.calls = 0
        self.fsync.hold = threading.Event()
        self.fsync.entered = Deferred()
        first = sink.append(record(1))
        await self.fsync.entered
        later = [sink.append(record(n)) for n in range(2, 21)]
        self.fsync.hold.set()
        await gatherResults([first, *later])
        self.assertEqual(self.fsync.calls, 2)
        self.assertNotIn("fsync-timeout", self.fsync.events)
        self.assertEqual(verify([self.directory]).records, 21)

    async def test_always_fires_after_fsync(self) -> None:
        sink = await self.started(durability="always")
        await sink.append(record(0))
        self.fsync.events.clear()
        d = sink.append(record(1))
        d.addCallback(lambda _: self.fsync.events.append("fired"))
        await d
        self.assertEqual(self.fsync.events, ["fsync", "fired"])

    async def test_always_writes_synchronously(self) -> None:
        """
        With durability C{"always"} the trail is written with C{O_DSYNC}
        (each batch's write returns once it is on disk); with C{"batch"}
        and C{"never"} it is not (an fsync follows, or nothing).
        """
        for durability in ("always", "batch", "never"):
            self.fsync.synchronous.clear()
            sink = await self.started(durability=durability)
            await sink.append(record(1))
            self.clock.advance(20)  # the next day: a new file
            await sink.append(record(2))
            await sink.stop()
            self.assertEqual(self.fsync.synchronous, [durability == "always"] * 2)

    async def test_batch_fires_before_fsync(self) -> None:
        """
        With C{batch} durability the append is acknowledged once written;
        the fsync still follows in the same group commit.
        """
        setup = await self.started()
        await setup.append(record(0))
        await setup.stop()
        sink = await self.started(durability="batch")
        fired = threading.Event()
        self.fsync.events.clear()
        self.fsync.hold = fired
        d = sink.append(record(1))
        d.addCallback(lambda _: (self.fsync.events.append("fired"), fired.set()))
        await d
        await sink.stop()
        self.assertEqual(self.fsync.events, ["fired", "fsync"])

    async def test_never_fsyncs(self) -> None:
        sink = await self.started(durability="never")
        for n in range(3):
            await sink.append(record(n))
        self.clock.advance(20)
        await sink.append(record(3))
        self.assertEqual(self.fsync.calls, 0)
        self.assertEqual(verify([self.directory]).records, 4)

    async def test_unusable_directory_fails_closed(self) -> None:
        """
        When the directory cannot be used, appends fail with
        L{AuditUnavailable} and C{writable} is false; once it can be, the
        next append succeeds and C{writable} is true again.
        """
        self.directory.write_text("not a directory")
        sink = await self.started()
        self.assertFalse(sink.writable)
        await self.assertFailure(sink.append(record(1)), AuditUnavailable)
        self.assertFalse(sink.writable)
        self.assertTrue(self.flushLoggedErrors(OSError))
        self.directory.unlink()
        await sink.append(record(2))
        self.assertTrue(sink.writable)
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-2"])

    async def test_failed_fsync_fails_batch_and_recovers(self) -> None:
        """
        A disk error fails every append of the batch and nothing of it
        stays on disk; the next append retries and succeeds.
        """
        sink = await self.started()
        await sink.append(record(0))
        self.fsync.error = OSError(errno.ENOSPC, "No space left on device")
        failed = [sink.append(record(n)) for n in (1, 2)]
        for d in failed:
            await self.assertFailure(d, AuditUnavailable)
        self.assertFalse(sink.writable)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-0"])
        self.fsync.error = None
        await sink.append(record(3))
        self.assertTrue(sink.writable)
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-0", "req-3"])
        self.assertTrue(verify([self.directory]).ok)

    async def test_records_nobody_waits_for_ride_with_the_next_authorised(self) -> None:
        """
        A completed record is not written on its own at the end of the turn:
        it waits up to C{LINGER} and goes with the next authorised record,
        in one write and one fsync; the authorised one is not delayed.

        C{LINGER} is an hour here, so the outcome does not depend on how
        fast the machine is: a completed record written early, or an
        authorised one made to wait, would show (the latter as a time-out).
        """
        self.patch(audit, "LINGER", 3600.0)
        sink = await self.started(durability="always")
        await sink.append(record(0, event="authorised"))
        calls = self.fsync.calls
        completed = sink.append(record(1, event="completed"))
        await deferLater(reactor, 0, lambda: None)
        self.assertEqual((self.fsync.calls, sink.pending), (calls, 1))
        await sink.append(record(2, event="authorised"))
        self.assertTrue(completed.called)
        self.assertEqual(self.fsync.calls, calls + 1)
        self.assertEqual([r["event"] for r in read_all(self.directory)][-2:],
                         ["completed", "authorised"])

    async def test_lingering_record_written_alone_or_at_stop(self) -> None:
        """
        Without company a completed record is written after C{LINGER}; one
        still waiting when the sink stops is written by the stop.
        """
        sink = await self.started(durability="always")
        await sink.append(record(1, event="completed"))
        self.assertEqual(len(read_all(self.directory)), 1)
        sink.append(record(2, event="completed"))
        await sink.stop()
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-1", "req-2"])

    async def test_pending_counts_records_not_yet_durable(self) -> None:
        """
        C{pending} counts queued records and those of the batch being
        written until its fsync returns; it is zero again once everything
        is durable.
        """
        sink = await self.started()
        self.assertEqual(sink.pending, 0)
        self.fsync.hold = threading.Event()
        self.fsync.entered = Deferred()
        first = [sink.append(record(n)) for n in range(3)]
        self.assertEqual(sink.pending, 3)
        await self.fsync.entered
        later = [sink.append(record(n)) for n in range(3, 5)]
        self.assertEqual(sink.pending, 5)
        self.fsync.hold.set()
        await gatherResults(first + later)
        self.assertEqual(sink.pending, 0)

    async def test_partial_write_then_disk_full(self) -> None:
        """
        A write that stops half-way with ENOSPC fails the whole batch,
        leaves no torn line behind, and the next append continues the chain.
        """
        sink = await self.started(raw_write=self.partial_write)
        await sink.append(record(0))
        self.full = True
        failed = [sink.append(record(n)) for n in (1, 2)]
        for d in failed:
            await self.assertFailure(d, AuditUnavailable)
        self.assertEqual(sink.pending, 0)
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-0"])
        self.full = False
        await sink.append(record(3))
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-0", "req-3"])
        self.assertTrue(verify([self.directory]).ok)

    full = False

    def partial_write(self, fd: int, data: memoryview) -> int:
        """
        C{os.write} on a disk that fills up after ten more bytes.
        """
        if not self.full:
            return os.write(fd, data)
        if len(data) > 10:
            return os.write(fd, data[:10])
        raise OSError(errno.ENOSPC, "No space left on device")

    async def test_file_removed_underneath(self) -> None:
        """
        Deleting the open file does not swallow later records: they go to
        a new file that still chains to the deleted one, so verification
        reveals the gap.
        """
        sink = await self.started()
        await sink.append(record(0))
        (path,) = audit_files(self.directory)
        last = line_hash(lines(path)[-1])
        path.unlink()
        await sink.append(record(1))
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-1"])
        self.assertFalse(verify([self.directory]).ok)
        self.assertTrue(verify([self.directory], start=last).ok)

    async def test_unencodable_record_rejected_alone(self) -> None:
        sink = await self.started()
        good = sink.append(record(1))
        bad = sink.append(record(2, total_latency=float("inf")))
        await good
        await self.assertFailure(bad, ValueError)
        self.assertTrue(sink.writable)
        self.assertEqual([r["request_id"] for r in read_all(self.directory)], ["req-1"])

    async def test_one_writer_thread_ended_by_stop(self) -> None:
        """
        A sink writes on one thread of its own, started by C{start} and
        ended by C{stop} once the queued records are written; a sink never
        started starts none.
        """
        before = set(threading.enumerate())
        unused = self.sink()
        await unused.stop()
        self.assertEqual(set(threading.enumerate()) - before, set())
        sink = await self.started()
        (writer,) = set(threading.enumerate()) - before
        self.assertEqual(writer.name, "ssp-audit")
        pending = [sink.append(record(n)) for n in range(3)]
        await sink.stop()
        writer.join(10)
        self.assertFalse(writer.is_alive())
        await gatherResults(pending)
        self.assertEqual(verify([self.directory]).records, 3)

    async def test_stop_drains_then_refuses(self) -> None:
        sink = await self.started()
        pending = [sink.append(record(n)) for n in range(5)]
        await sink.stop()
        await gatherResults(pending)
        self.assertEqual(verify([self.directory]).records, 5)
        await self.assertFailure(sink.append(record(6)), AuditUnavailable)


def read_all(directory: Path) -> list[dict[str, Any]]:
    return list(read_records([directory]))


class VerifyTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.paths = write_chain(self.directory, [4, 4, 4])

    def rewrite(self, path: Path, edit: Any) -> None:
        content = lines(path)
        edit(content)
        path.write_bytes(b"".join(line + b"\n" for line in content))

    def assertBroken(self, path: Path, line: int, reason: str = "") -> None:
        result = verify([self.directory])
        self.assertFalse(result.ok, result)
        self.assertEqual((result.broken_file, result.broken_line), (path, line))
        self.assertIn(reason, result.reason)

    def test_intact(self) -> None:
        result = verify([self.directory])
        self.assertEqual((result.ok, result.records, result.files), (True, 12, 3))
        self.assertEqual(result.last_hash, line_hash(lines(self.paths[2])[-1]))

    def test_altered_record(self) -> None:
        """
        An edited record keeps its own C{prev}, so the break shows at the
        next record.
        """

        def edit(content: list[bytes]) -> None:
            content[1] = content[1].replace(b'"status":200', b'"status":201')

        self.rewrite(self.paths[1], edit)
        self.assertBroken(self.paths[1], 3, "altered")

    def test_altered_last_record_of_file(self) -> None:
        self.rewrite(self.paths[0], lambda c: c.__setitem__(3, c[3].replace(b"req-3", b"req-x")))
        self.assertBroken(self.paths[1], 1)

    def test_deleted_record(self) -> None:
        self.rewrite(self.paths[1], lambda c: c.pop(1))
        self.assertBroken(self.paths[1], 2, "removed")

    def test_reordered(self) -> None:
        def swap(content: list[bytes]) -> None:
            content[1], content[2] = content[2], content[1]

        self.rewrite(self.paths[2], swap)
        self.assertBroken(self.paths[2], 2, "reordered")

    def test_missing_file(self) -> None:
        self.paths[1].unlink()
        self.assertBroken(self.paths[2], 1)

    def test_missing_first_file(self) -> None:
        """
        A trail whose start is gone is refused unless anchored at the last
        hash of the part archived elsewhere.
        """
        anchor = line_hash(lines(self.paths[0])[-1])
        self.paths[0].unlink()
        self.assertBroken(self.paths[1], 1, "--anchor")
        self.assertTrue(verify([self.directory], start=anchor).ok)
        self.assertTrue(verify([self.directory], start=None).ok)

    def test_not_json(self) -> None:
        self.rewrite(self.paths[0], lambda c: c.__setitem__(2, b"garbage"))
        self.assertBroken(self.paths[0], 3, "not a JSON audit record")

    def test_torn_final_line(self) -> None:
        with self.paths[2].open("ab") as f:
            f.write(b'{"event":"auth')
        result = verify([self.directory])
        self.assertEqual((result.ok, result.records), (True, 12))
        self.assertIn(f"{self.paths[2]}:5: incomplete final line", result.note)

    def test_torn_line_inside_chain(self) -> None:
        with self.paths[0].open("ab") as f:
            f.write(b'{"event":"auth')
        self.assertBroken(self.paths[0], 5, "incomplete line")

    def test_chain_order_not_name_order(self) -> None:
        """
        Files are checked by sequence number, not as the shell sorts them.
        """
        for path, sequence in zip(self.paths, (9998, 9999, 10000)):
            path.rename(self.directory / f"audit-20240301-{sequence:04d}.jsonl")
        files = sorted(self.directory.iterdir(), key=lambda p: p.name)
        self.assertEqual(files[0].name, "audit-20240301-10000.jsonl")
        self.assertTrue(verify(files).ok)
        self.assertTrue(verify([self.directory]).ok)

    def test_no_files(self) -> None:
        empty = Path(self.mktemp())
        empty.mkdir()
        result = verify([empty])
        self.assertFalse(result.ok)
        self.assertEqual(result.reason, "no audit files found")

    def test_main_ok(self) -> None:
        out = io.StringIO()
        self.assertEqual(main_verify([str(self.directory)], out), 0)
        self.assertTrue(
            out.getvalue().startswith(f"OK: {self.directory}: 12 records in 3 files, chain intact")
        )

    def test_main_broken(self) -> None:
        self.rewrite(self.paths[1], lambda c: c.pop(0))
        out = io.StringIO()
        self.assertEqual(main_verify([str(p) for p in self.paths], out), 1)
        self.assertTrue(
            out.getvalue().startswith(f"BROKEN: {self.directory}: {self.paths[1]}:1: prev does not")
        )

    def test_main_anchor(self) -> None:
        self.paths[0].unlink()
        out = io.StringIO()
        self.assertEqual(main_verify([str(self.directory), "--start", "any"], out), 0)
        self.assertEqual(main_verify([str(self.directory)], io.StringIO()), 1)

    def test_main_missing_path(self) -> None:
        out = io.StringIO()
        self.assertEqual(main_verify([str(self.directory / "nope.jsonl")], out), 1)
        self.assertTrue(out.getvalue().startswith("ERROR: "))

    def test_main_usage(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main_verify([]), 2)


CHILD = """
import os
import sys
from pathlib import Path
from twisted.internet import reactor
from ssp.audit import FileAuditSink
from ssp.model import AuditRecord

sink = FileAuditSink(Path(sys.argv[1]), reactor, durability="always", rotate_bytes=4096)
counter = iter(range(10 ** 9))

def one(_=None):
    n = next(counter)
    d = sink.append(AuditRecord(event="authorised", request_id=f"r{n}", time=float(n)))
    d.addCallback(lambda _: (sys.stdout.write(f"r{n}\\n"), sys.stdout.flush()))
    d.addCallback(one)
    # A failing sink ends the child, so the parent's readline sees EOF.
    d.addErrback(lambda _: os._exit(3))

sink.start().addCallback(lambda _: [one() for _ in range(16)])
reactor.run()
"""


class CrashTests(TestCase):
    def kill_appender(self, directory: Path, acknowledged: int) -> list[str]:
        """
        Run a process that appends as fast as it can, SIGKILL it once it
        has been told C{acknowledged} records are durable.

        @return: every request id it was told is durable.
        """
        env = dict(os.environ, PYTHONPATH=str(REPO))
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, env=env,
            preexec_fn=_die_with_parent,
        )
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        assert child.stdout is not None
        durable = []
        while len(durable) < acknowledged:
            line = child.stdout.readline()
            self.assertTrue(line, "child died early")
            durable.append(line.decode().strip())
        os.kill(child.pid, signal.SIGKILL)
        durable.extend(line.decode().strip() for line in child.stdout)
        child.stdout.close()
        child.wait()
        self.assertEqual(child.returncode, -signal.SIGKILL)
        return durable

    async def test_sigkill(self) -> None:
        """
        Every record a killed process was told is durable is on disk, the
        chain verifies, and a restarted sink continues it.
        """
        directory = Path(self.mktemp()).resolve()
        durable = self.kill_appender(directory, 400)
        on_disk = {r["request_id"] for r in read_records([directory])}
        self.assertEqual(set(durable) - on_disk, set())
        self.assertGreater(len(audit_files(directory)), 10)
        self.assertTrue(verify([directory]).ok)

        sink = FileAuditSink(directory, reactor)
        self.addCleanup(sink.stop)
        await sink.start()
        await sink.append(AuditRecord(event="completed", request_id="after", time=0.0))
        result = verify([directory])
        self.assertEqual((result.ok, result.note), (True, ""))
        self.assertEqual(result.records, len(on_disk) + 1)
