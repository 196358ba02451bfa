# -*- test-case-name: tests.test_audit -*-
"""
The durable, tamper-evident audit trail.

Records are JSON lines in C{<directory>/audit-YYYYMMDD-NNNN.jsonl}.  Each
line carries C{prev}, the SHA-256 of the line before it (the previous file's
last line for the first line of a file, 64 zeros for the first record
ever), so removing, altering or reordering any record breaks the chain at
that point; L{verify} finds the first break.

Writing is the security boundary of the proxy: a forwarded request's
C{"authorised"} record must be on disk before anything goes upstream.  So
L{FileAuditSink} writes on its own thread, batches every append that arrives
while a write and fsync are in flight into the next one (group commit), and
fails closed: when the disk refuses, every waiting append fails with
L{AuditUnavailable} and C{writable} turns false until a write succeeds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO, cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from ssp.config import AuditConfig
from ssp.errors import AuditUnavailable
from ssp.interfaces import IAuditSink
from ssp.model import AuditRecord

GENESIS = "0" * 64
_NAME = re.compile(r"audit-(\d{8})-(\d+)\.jsonl\Z")
_TAIL_BLOCK = 64 * 1024


def encode(record: AuditRecord, previous_hash: str) -> bytes:
    """
    Serialise a record as one JSON line (sorted keys, ASCII, no spaces,
    terminated by C{\\n}) chained to the line before it.

    @param previous_hash: L{line_hash} of the previous line, or L{GENESIS}.
    @raise ValueError: if the record holds something JSON cannot carry
        faithfully (NaN, infinity).
    """
    fields = attrs.asdict(record)
    fields["prev"] = previous_hash
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\n"


def line_hash(line: bytes) -> str:
    """
    The chain hash of one line: hex SHA-256 of its bytes, C{prev} included,
    the terminating newline excluded.
    """
    return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


def audit_files(directory: Path) -> list[Path]:
    """
    The audit files of a directory, oldest first (by day, then by sequence
    number compared as integers).
    """
    found = [p for p in directory.iterdir() if _NAME.match(p.name) and p.is_file()]
    return sorted(found, key=_order)


def expand(paths: Sequence[Path]) -> list[Path]:
    """
    Directories replaced by their audit files; when every file is named
    like an audit file, the set is put in chain order whatever order the
    shell listed it in.
    """
    files: list[Path] = []
    for path in paths:
        files.extend(audit_files(path) if path.is_dir() else [path])
    files = list(dict.fromkeys(files))
    if all(_NAME.match(p.name) for p in files):
        files.sort(key=_order)
    return files


def read_records(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """
    Every record in a file set, in chain order.  An incomplete final line
    (being written, or torn by a crash) is skipped.

    @raise ValueError: naming file and line of a line that is not a record.
    """
    files = expand(paths)
    for index, path in enumerate(files):
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n") and index == len(files) - 1:
                    return
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: not a JSON audit record")
                yield record


def _order(path: Path) -> tuple[str, int]:
    match = _NAME.match(path.name)
    assert match is not None
    return match[1], int(match[2])


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%d")


@attrs.define
class _ChainWriter:
    """
    The blocking half of the sink: files, rotation and the chain.  Only
    ever called from the sink's single writer thread.

    @ivar last_hash: hash of the last line written.
    @ivar size: bytes written to the current file.
    @ivar synced: bytes of the current file known to be durable; a failed
        batch is cut back to this, unless it was already acknowledged.
    """

    directory: Path
    durability: str
    rotate_bytes: int
    rotate_daily: bool
    fsync: Callable[[int], None]
    raw_write: Callable[[int, memoryview], int] = os.write
    last_hash: str = GENESIS
    path: Path | None = None
    day: str = ""
    sequence: int = 0
    size: int = 0
    synced: int = 0
    acknowledged: bool = False
    fd: int | None = None
    notes: list[str] = attrs.Factory(list)

    def recover(self) -> list[str]:
        """
        Continue the chain from disk: reopen the newest file, cut a line a
        crash left half-written, and take the hash of the last complete
        line.  With no records on disk the in-memory hash is kept, so a
        trail deleted under a running proxy shows as a break, not as a
        fresh chain.

        @return: what was found worth logging.
        """
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        files = audit_files(self.directory)
        if files:
            newest = files[-1]
            fd = os.open(newest, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            try:
                size = os.fstat(fd).st_size
                good, last = _last_line(fd, size)
                if good < size:
                    os.ftruncate(fd, good)
                    self._sync(fd)
                    self.notes.append(f"cut {size - good} bytes of a torn final line from {newest}")
            except BaseException:
                os.close(fd)
                raise
            self.fd, self.path, self.size, self.synced = fd, newest, good, good
            self.day, self.sequence = _order(newest)
            for older in reversed(files[:-1]):
                if last is not None:
                    break
                with older.open("rb") as f:
                    _, last = _last_line(f.fileno(), os.fstat(f.fileno()).st_size)
            if last is not None:
                self.last_hash = line_hash(last)
        notes, self.notes = self.notes, []
        return notes

    def write(
        self,
        records: Sequence[AuditRecord],
        now: float,
        written: Callable[[dict[int, Exception]], None],
    ) -> tuple[dict[int, Exception], list[str]]:
        """
        Append a batch: one write (per file) and one fsync.

        @param now: the clock's time, which decides daily rotation.
        @param written: called once the batch is written, before the fsync.
        @return: records that could not be encoded (by index), and notes.
        @raise OSError: nothing of the batch can be trusted durable; the
            current file is closed and the next batch recovers from disk.
        """
        try:
            return self._write(records, now, written)
        except BaseException:
            self._abandon()
            raise

    def _write(
        self,
        records: Sequence[AuditRecord],
        now: float,
        written: Callable[[dict[int, Exception]], None],
    ) -> tuple[dict[int, Exception], list[str]]:
        self.acknowledged = False
        if self.fd is None or not self._still_linked():
            self.recover()
        rejected: dict[int, Exception] = {}
        chunk: list[bytes] = []
        pending = 0
        chain = self.last_hash
        for index, record in enumerate(records):
            try:
                line = encode(record, chain)
            except (TypeError, ValueError) as e:
                rejected[index] = e
                continue
            if self._rotation_due(pending, len(line), now):
                self._commit(chunk, chain)
                self._sync_current()
                self._open_next(now)
                chunk, pending = [], 0
            chunk.append(line)
            pending += len(line)
            chain = line_hash(line)
        self._commit(chunk, chain)
        written(rejected)
        self.acknowledged = self.durability != "always"
        self._sync_current()
        notes, self.notes = self.notes, []
        return rejected, notes

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def _still_linked(self) -> bool:
        """
        Whether the open file is still the one at its path (not deleted or
        replaced by someone else, which would swallow records).
        """
        assert self.fd is not None and self.path is not None
        try:
            on_disk = os.stat(self.path)
        except FileNotFoundError:
            on_disk = None
        mine = os.fstat(self.fd)
        if on_disk is not None and (on_disk.st_dev, on_disk.st_ino) == (mine.st_dev, mine.st_ino):
            return True
        self.notes.append(f"audit file {self.path} was removed or replaced; continuing the chain")
        return False

    def _rotation_due(self, pending: int, length: int, now: float) -> bool:
        if self.fd is None:
            return True
        if self.rotate_daily and _day(now) > self.day:
            return True
        used = self.size + pending
        return used > 0 and used + length > self.rotate_bytes

    def _commit(self, chunk: list[bytes], chain: str) -> None:
        if not chunk:
            return
        assert self.fd is not None
        data = b"".join(chunk)
        view = memoryview(data)
        while view:
            view = view[self.raw_write(self.fd, view) :]
        self.size += len(data)
        self.last_hash = chain

    def _open_next(self, now: float) -> None:
        day = max(_day(now), self.day)
        sequence = self.sequence + 1 if day == self.day else 1
        self.close()
        while True:
            path = self.directory / f"audit-{day}-{sequence:04d}.jsonl"
            try:
                fd = os.open(
                    path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640
                )
            except FileExistsError:
                sequence += 1
                continue
            break
        self.fd, self.path, self.day, self.sequence = fd, path, day, sequence
        self.size = self.synced = 0
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._sync(directory)
        finally:
            os.close(directory)

    def _sync_current(self) -> None:
        if self.fd is not None:
            self._sync(self.fd)
            self.synced = self.size

    def _sync(self, fd: int) -> None:
        if self.durability != "never":
            self.fsync(fd)

    def _abandon(self) -> None:
        """
        After a failure: drop what the failed batch may have half-written,
        unless the batch was already acknowledged (best effort), and close,
        so the next batch recovers from disk.
        """
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, self.size if self.acknowledged else self.synced)
            except OSError:
                pass
            self.close()


def _last_line(fd: int, size: int) -> tuple[int, bytes | None]:
    """
    Where the complete lines of a file end, and the last complete line.
    """
    end = size
    tail = b""
    while end > 0:
        start = max(0, end - _TAIL_BLOCK)
        tail = os.pread(fd, end - start, start) + tail
        end = start
        cut = tail.rfind(b"\n")
        if cut < 0:
            continue
        before = tail.rfind(b"\n", 0, cut)
        if before >= 0 or end == 0:
            return end + cut + 1, tail[before + 1 : cut]
    return 0, None


# Seconds a record nobody waits for may wait for company (see append).
LINGER = 0.05


@attrs.define(eq=False)
class _Batch:
    entries: list[tuple[AuditRecord, Deferred[None]]]
    settled: bool = False


@implementer(IAuditSink)
class FileAuditSink:
    """
    Audit records as hash-chained JSON lines, written off the reactor
    thread with group commit.

    @ivar writable: false after a write failed, true again after one
        succeeded; the proxy refuses new requests while it is false.
    """

    log = Logger()

    def __init__(
        self,
        directory: Path,
        reactor: IReactorFromThreads,
        clock: IReactorTime | None = None,
        durability: str = "always",
        rotate_bytes: int = 256 * 1024 * 1024,
        rotate_daily: bool = True,
        fsync: Callable[[int], None] = os.fsync,
        raw_write: Callable[[int, memoryview], int] = os.write,
    ) -> None:
        """
        @param reactor: runs the writer thread's results (and the flush).
        @param clock: decides the day for daily rotation; the reactor when
            not given.
        @param durability: C{"always"}: an append's Deferred fires after
            fsync; C{"batch"}: after write, the fsync following; C{"never"}:
            after write, no fsync at all.
        @param fsync: the fsync to use (a seam for tests).
        @param raw_write: the C{os.write} to use for records (a seam for tests
            that emulate a full or read-only disk).
        """
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else cast(IReactorTime, reactor)
        self._durability = durability
        self._writer = _ChainWriter(
            Path(directory), durability, rotate_bytes, rotate_daily, fsync, raw_write
        )
        self._pool = ThreadPool(minthreads=1, maxthreads=1, name="ssp-audit")
        self._queue: list[tuple[AuditRecord, Deferred[None]]] = []
        self._writing: _Batch | None = None
        self._busy = False
        self._flush_call: Any = None
        self._idle: list[Deferred[None]] = []
        self._started = False
        self._stopped = False
        self._stopping: Deferred[None] | None = None
        self.writable = True

    @classmethod
    def from_config(
        cls, config: AuditConfig, reactor: IReactorFromThreads, clock: IReactorTime | None = None
    ) -> FileAuditSink:
        return cls(
            config.directory,
            reactor,
            clock,
            durability=config.durability,
            rotate_bytes=config.rotate_bytes,
            rotate_daily=config.rotate_daily,
        )

    def start(self) -> Deferred[None]:
        """
        Start the writer thread and recover the chain from disk.  The
        Deferred always succeeds; if the directory is unusable C{writable}
        is false and the next append retries.
        """
        self._pool.start()
        self._started = True
        self._busy = True
        d = deferToThreadPool(self._reactor, self._pool, self._writer.recover)
        return d.addCallbacks(
            self._log_notes, self._unavailable, errbackArgs=(None,)
        ).addBoth(self._finished)

    def stop(self) -> Deferred[None]:
        """
        Refuse new appends, finish the queued ones, close the file and stop
        the writer thread.
        """
        self._stopped = True
        if not self._started:
            return succeed(None)
        if self._flush_call is not None and not self._busy:
            self._flush_call.reset(0)
        if self._stopping is None:
            self._stopping = self._when_idle()
            self._stopping.addCallback(
                lambda _: deferToThreadPool(self._reactor, self._pool, self._writer.close)
            )
            self._stopping.addBoth(self._stop_pool)
        done: Deferred[None] = Deferred()
        self._stopping.addCallback(done.callback)
        return done

    @property
    def pending(self) -> int:
        """
        Records appended but not yet durable: queued, or in the batch being
        written and synced (until its fsync returns, or its write fails).
        A gauge for metrics: it grows while the disk is slow.
        """
        in_flight = len(self._writing.entries) if self._writing is not None else 0
        return len(self._queue) + in_flight

    def append(self, record: AuditRecord) -> Deferred[None]:
        """
        Queue a record.  An C{authorised} record is written at the end of
        this reactor turn, with everything else appended in it: a request
        waits for it before going upstream.  Other records (completed
        requests, failed handshakes) wait on no one: they join the next
        batch, or are written after L{LINGER} seconds, which halves the
        writer thread's wake-ups under load.
        """
        if self._stopped:
            return fail(AuditUnavailable())
        d: Deferred[None] = Deferred()
        self._queue.append((record, d))
        if not self._busy:
            self._schedule(record.event == "authorised")
        return d

    def _schedule(self, urgent: bool) -> None:
        call = self._flush_call
        if call is None:
            self._flush_call = self._reactor.callLater(  # type: ignore[attr-defined]
                0 if urgent else LINGER, self._flush)
        elif urgent and call.getTime() > self._reactor.seconds():  # type: ignore[attr-defined]
            call.reset(0)

    def _flush(self) -> None:
        if self._flush_call is not None and self._flush_call.active():
            self._flush_call.cancel()
        self._flush_call = None
        if not self._queue:
            return
        batch = self._writing = _Batch(self._queue)
        self._queue = []
        self._busy = True
        records = [record for record, _ in batch.entries]

        def written(rejected: dict[int, Exception]) -> None:
            if self._durability != "always":
                self._reactor.callFromThread(self._settle, batch, rejected)

        d = deferToThreadPool(
            self._reactor, self._pool, self._writer.write, records, self._clock.seconds(), written
        )
        d.addCallbacks(self._wrote, self._unavailable, callbackArgs=(batch,), errbackArgs=(batch,))
        d.addBoth(self._finished)

    def _wrote(self, result: tuple[dict[int, Exception], list[str]], batch: _Batch) -> None:
        self._writing = None
        rejected, notes = result
        self._log_notes(notes)
        if not self.writable:
            self.log.info(
                "Audit trail writable again in {directory}", directory=self._writer.directory
            )
        self.writable = True
        self._settle(batch, rejected)

    def _settle(self, batch: _Batch, rejected: dict[int, Exception]) -> None:
        if batch.settled:
            return
        batch.settled = True
        for index, (_, d) in enumerate(batch.entries):
            if index in rejected:
                d.errback(rejected[index])
            else:
                d.callback(None)

    def _unavailable(self, reason: Failure, batch: _Batch | None) -> None:
        self._writing = None
        if self.writable:
            self.log.failure(
                "Audit trail cannot be written in {directory}: refusing requests until it can",
                reason,
                directory=self._writer.directory,
            )
        self.writable = False
        if batch is not None and not batch.settled:
            batch.settled = True
            for _, d in batch.entries:
                d.errback(AuditUnavailable())

    def _log_notes(self, notes: list[str]) -> None:
        for note in notes:
            self.log.warn("Audit trail: {note}", note=note)

    def _finished(self, _: object) -> None:
        self._busy = False
        if self._queue and (self._stopped or any(
                record.event == "authorised" for record, _ in self._queue)):
            self._flush()
        elif self._queue:
            self._schedule(False)
        elif self._flush_call is None:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    def _when_idle(self) -> Deferred[None]:
        if not self._busy and not self._queue:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _stop_pool(self, result: object) -> None:
        self._pool.stop()
        if isinstance(result, Failure):
            self.log.failure("Audit trail not closed cleanly", result)


@attrs.frozen
class VerifyResult:
    """
    The outcome of checking a chain.

    @ivar records: records checked (up to the break, if any).
    @ivar last_hash: hash of the last record checked; keep it (or compare
        it with the SIEM's copy) to detect truncation of the tail later.
    @ivar broken_file: file of the first broken record.
    @ivar broken_line: its 1-based line number.
    @ivar note: something worth saying that is not a break.
    """

    ok: bool
    records: int
    files: int
    last_hash: str
    broken_file: Path | None = None
    broken_line: int | None = None
    reason: str = ""
    note: str = ""


def verify(paths: Sequence[Path], anchor: str | None = GENESIS) -> VerifyResult:
    """
    Check the hash chain of a file set.

    @param paths: audit files and/or directories holding them.
    @param anchor: the C{prev} the first record must carry: L{GENESIS} for
        a complete trail, the last hash of the archived part otherwise, or
        L{None} to accept any.
    """
    files = expand(paths)
    if not files:
        return VerifyResult(False, 0, 0, GENESIS, reason="no audit files found")
    expected = anchor
    records = 0
    note = ""

    def broken(path: Path, number: int, reason: str) -> VerifyResult:
        return VerifyResult(False, records, len(files), expected or GENESIS, path, number, reason)

    for index, path in enumerate(files):
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                if not raw.endswith(b"\n"):
                    if index == len(files) - 1:
                        note = (
                            f"{path}:{number}: incomplete final line ignored (being written, "
                            "or torn by a crash: the sink cuts it when it restarts)"
                        )
                        break
                    return broken(path, number, "incomplete line inside the chain")
                try:
                    record = json.loads(raw)
                except ValueError:
                    record = None
                if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
                    return broken(path, number, "not a JSON audit record with a 'prev' hash")
                if expected is not None and record["prev"] != expected:
                    if records == 0:
                        return broken(
                            path,
                            number,
                            f"first record continues a chain from {record['prev']}, expected "
                            f"{expected} (earlier files missing? pass --anchor)",
                        )
                    return broken(
                        path,
                        number,
                        "prev does not match the hash of the record before it: that record "
                        "or this one was altered, or records were removed or reordered",
                    )
                expected = line_hash(raw)
                records += 1
    return VerifyResult(True, records, len(files), expected or GENESIS, note=note)


def main_verify(argv: list[str], out: TextIO | None = None) -> int:
    """
    C{ssp audit verify [--anchor HASH|any] DIR|FILE...}: exit 0 when the
    chain is intact, 1 naming the first broken record otherwise.
    """
    out = out if out is not None else sys.stdout
    parser = argparse.ArgumentParser(
        prog="ssp audit verify", description="Check the hash chain of audit files."
    )
    parser.add_argument("paths", nargs="+", type=Path, help="audit directories or files")
    parser.add_argument(
        "--anchor",
        default=GENESIS,
        help="prev hash the first record must carry (default: the genesis hash; "
        "'any' to accept whatever it is)",
    )
    try:
        options = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    anchor = None if options.anchor == "any" else options.anchor
    try:
        result = verify(options.paths, anchor)
    except OSError as e:
        print(f"ERROR: {e.filename}: {e.strerror}", file=out)
        return 1
    if not result.ok:
        where = f"{result.broken_file}:{result.broken_line}: " if result.broken_file else ""
        print(f"BROKEN: {where}{result.reason}", file=out)
        print(f"  {result.records} records before it verified", file=out)
        return 1
    print(
        f"OK: {result.records} records in {result.files} files, chain intact; "
        f"last hash {result.last_hash}",
        file=out,
    )
    if result.note:
        print(f"  note: {result.note}", file=out)
    return 0
