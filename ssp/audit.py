# -*- test-case-name: tests.test_audit -*-
"""
The durable, tamper-evident audit trail: the writer.

Records are JSON lines in C{<directory>/audit-YYYYMMDD-NNNN.jsonl}, each
bound to the one before it (L{ssp.chain}: HMAC-SHA256 under a secret key,
or SHA-256 when unkeyed by explicit choice).  Every C{checkpoint_interval}
seconds, and at stop, the chain head, record count and time go outside
the directory: to the log (journal/syslog) and to the anchor file
(L{ssp.anchor}), which is what exposes a cut tail or a re-chained past.

Writing is the security boundary of the proxy: a forwarded request's
C{"authorised"} record must be on disk before anything goes upstream.  So
L{FileAuditSink} writes on its own thread, batches every append that arrives
while a write and fsync are in flight into the next one (group commit), and
fails closed: when the disk refuses, or the queue is full, appends fail
with L{AuditUnavailable} (and C{writable} turns false until a write
succeeds, after a disk failure).
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from ssp import anchor
from ssp.chain import (
    GENESIS,
    ChainError,
    KeyedSeal,
    Seal,
    UncheckedSeal,
    UnkeyedSeal,
    audit_files,
    lines_from_end,
    open_file,
    order,
    read_key,
    stem,
)
from ssp.config import AuditConfig
from ssp.errors import AuditUnavailable
from ssp.interfaces import IAuditSink
from ssp.model import AuditRecord, audit_record


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%d")


def _count_lines(path: Path) -> int:
    with open_file(path) as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def _line_at(path: Path, wanted: int) -> tuple[int, bytes | None]:
    """
    The number of complete lines of a file, and its line C{wanted}.
    """
    found, count = None, 0
    with open_file(path) as f:
        for count, raw in enumerate(f, 1):
            if not raw.endswith(b"\n"):
                count -= 1
                break
            if count == wanted:
                found = raw
    return count, found


@attrs.define
class _ChainWriter:
    """
    The blocking half of the sink: files, rotation, the chain and the
    checkpoints.  Only ever called from the sink's single writer thread.

    @ivar last_hash: link of the last line written.
    @ivar size: bytes written to the current file.
    @ivar synced: bytes of the current file known to be durable; a failed
        batch is cut back to this, unless it was already acknowledged.
    @ivar lines: complete lines in the current file (C{synced_lines}
        durable).
    @ivar records: records in the chain since it began (for checkpoints).
    @ivar alarms: what recovery found that looks like tampering.
    """

    directory: Path
    durability: str
    rotate_bytes: int
    rotate_daily: bool
    fsync: Callable[[int], None]
    raw_write: Callable[[int, memoryview], int] = os.write
    seal: Seal = UnkeyedSeal()
    anchor_file: Path | None = None
    signer: Ed25519PrivateKey | None = None
    last_hash: str = GENESIS
    path: Path | None = None
    day: str = ""
    sequence: int = 0
    size: int = 0
    synced: int = 0
    lines: int = 0
    synced_lines: int = 0
    records: int = 0
    checkpointed: tuple[str, int] | None = None
    acknowledged: bool = False
    fd: int | None = None
    notes: list[str] = attrs.Factory(list)
    alarms: list[str] = attrs.Factory(list)

    def start(self) -> tuple[list[str], list[str]]:
        """
        L{recover}, then compare the tail with the anchor's last checkpoint
        and count the records of the chain.  A mismatch is an alarm: the
        chain goes on, so that the proxy keeps serving, but loudly (the
        sink logs it as critical and writes it into the chain), and
        C{verify} with the anchor shows the break.

        @return: notes worth logging, and alarms.
        """
        notes = self.recover()
        files = [p for p in audit_files(self.directory) if not p.name.endswith(".gz")]
        self.records = self._count(files)
        alarms, self.alarms = self.alarms, []
        return notes, alarms

    def recover(self) -> list[str]:
        """
        Continue the chain from disk: reopen the newest file, cut a line a
        crash left half-written, and take the link of the last complete
        line (checking its MAC).  With no records on disk the in-memory
        link is kept, so a trail deleted under a running proxy shows as a
        break, not as a fresh chain.

        @return: what was found worth logging.
        """
        self.close()
        self.directory.mkdir(parents=True, exist_ok=True)
        files = [p for p in audit_files(self.directory) if not p.name.endswith(".gz")]
        if files:
            newest = files[-1]
            fd = os.open(newest, self._flags())
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
            self.day, self.sequence = order(newest)
            self.lines = self.synced_lines = _count_lines(newest)
            for older in reversed(files[:-1]):
                if last is not None:
                    break
                with older.open("rb") as f:
                    _, last = _last_line(f.fileno(), os.fstat(f.fileno()).st_size)
            if last is not None:
                self.last_hash = self._link(last)
        notes, self.notes = self.notes, []
        return notes

    def _link(self, line: bytes) -> str:
        try:
            return self.seal.open(line)[1]
        except ChainError as e:
            self.alarms.append(f"the last record on disk fails its check ({e})")
            return UncheckedSeal().open(line)[1]

    def _count(self, files: list[Path]) -> int:
        """
        Records in the chain so far: from the anchor's last checkpoint when
        the trail still holds it, by counting every line otherwise.
        """
        checkpoint = self.anchor_file and anchor.last_checkpoint(self.anchor_file, self.directory)
        if not checkpoint:
            everything = audit_files(self.directory)
            return sum(_count_lines(p) for p in everything)
        names = [stem(p) for p in files]
        position = f"{checkpoint['file']}:{checkpoint['line']}"
        if checkpoint["file"] not in names:
            archived = any(stem(p) == checkpoint["file"] for p in audit_files(self.directory))
            if not archived:
                self.alarms.append(f"the anchor's last checkpoint is in {position}, and that "
                                   "file is gone: files were deleted")
            return checkpoint["records"] + sum(_count_lines(p) for p in files)
        at = names.index(checkpoint["file"])
        count, line = _line_at(files[at], checkpoint["line"])
        later = sum(_count_lines(p) for p in files[at + 1:])
        if line is None:
            self.alarms.append(f"the anchor's last checkpoint is at {position}, and that file "
                               f"now ends at line {count}: the tail was cut")
        elif UncheckedSeal().open(line)[1] != checkpoint["head"]:
            self.alarms.append(f"the record at {position} differs from the anchor's last "
                               "checkpoint: the trail was rewritten")
        else:
            self.checkpointed = (checkpoint["file"], checkpoint["line"])
        return checkpoint["records"] + count - checkpoint["line"] + later

    def checkpoint(self, now: float) -> dict[str, Any] | None:
        """
        Record the chain head outside the directory, if records were
        written since the last checkpoint.

        @return: the entry, for the log; L{None} when there was nothing new.
        @raise OSError: the anchor file could not be written.
        """
        if self.path is None or self.checkpointed == (self.path.name, self.lines):
            return None
        entry = {"kind": "checkpoint", "chain": str(self.directory), "time": now,
                 "file": self.path.name, "line": self.lines, "records": self.records,
                 "head": self.last_hash, "key_id": self.seal.key_id}
        if self.anchor_file is not None:
            entry = anchor.append(self.anchor_file, entry, self.signer, self._sync)
        self.checkpointed = (self.path.name, self.lines)
        return entry

    def write(
        self,
        records: Sequence[AuditRecord],
        now: float,
        written: Callable[[dict[int, Exception]], None],
    ) -> tuple[dict[int, Exception], list[str]]:
        """
        Append a batch: one write (per file) and one sync (the write itself
        with durability C{"always"}, see L{_flags}).

        @param now: the clock's time, which decides daily rotation.
        @param written: called once the batch is written, before any fsync.
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
        today = _day(now)
        rejected: dict[int, Exception] = {}
        chunk: list[bytes] = []
        pending = 0
        chain = self.last_hash
        for index, record in enumerate(records):
            try:
                line = self.seal.seal(record, chain)
            except (TypeError, ValueError) as e:
                rejected[index] = e
                continue
            if self._rotation_due(pending, len(line), today):
                self._commit(chunk, chain)
                self._sync_current()
                self._open_next(today)
                chunk, pending = [], 0
            chunk.append(line)
            pending += len(line)
            chain = self.seal.link(line)
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

    def _rotation_due(self, pending: int, length: int, today: str) -> bool:
        if self.fd is None:
            return True
        if self.rotate_daily and today > self.day:
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
        self.lines += len(chunk)
        self.records += len(chunk)
        self.last_hash = chain

    def _open_next(self, today: str) -> None:
        day = max(today, self.day)
        sequence = self.sequence + 1 if day == self.day else 1
        self.close()
        while True:
            path = self.directory / f"audit-{day}-{sequence:04d}.jsonl"
            try:
                fd = os.open(path, self._flags() | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                sequence += 1
                continue
            break
        self.fd, self.path, self.day, self.sequence = fd, path, day, sequence
        self.size = self.synced = self.lines = self.synced_lines = 0
        directory = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._sync(directory)
        finally:
            os.close(directory)

    def _flags(self) -> int:
        """
        How a trail file is opened.  With durability C{"always"} every write
        is synchronous (C{O_DSYNC}: its bytes and the file's size are on
        disk when it returns, as after C{fdatasync}): a batch is one system
        call, one release of the GIL, instead of a write and an fsync.
        """
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC
        return flags | os.O_DSYNC if self.durability == "always" else flags

    def _sync_current(self) -> None:
        if self.fd is not None:
            if self.durability == "batch":  # "always" wrote synchronously
                self.fsync(self.fd)
            self.synced, self.synced_lines = self.size, self.lines

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
            if not self.acknowledged:
                self.records -= self.lines - self.synced_lines
                self.lines = self.synced_lines
            try:
                os.ftruncate(self.fd, self.size if self.acknowledged else self.synced)
            except OSError:
                pass
            self.close()


def _last_line(fd: int, size: int) -> tuple[int, bytes | None]:
    """
    Where the complete lines of a file end, and the last complete line.
    """
    for end, line in lines_from_end(fd, size):
        return end, line
    return 0, None


class _WriterThread:
    """
    The one thread where a sink's blocking file work runs, one job at a
    time, in order.

    Why not Twisted's C{ThreadPool}: a job there passes through a Python
    C{queue.Queue}, its Condition and the pool's team coordinator, each a
    lock the reactor thread and the writer take in turn; on a busy reactor
    every such hand-off of the GIL is a cross-CPU wake-up.  Here a job is
    one C{SimpleQueue.put} (in C) and its result one C{callFromThread}.
    """

    def __init__(self, reactor: IReactorFromThreads, name: str) -> None:
        self._reactor = reactor
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Deferred[Any]] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._exited: Deferred[None] = Deferred()

    def start(self) -> None:
        self._thread.start()

    def run(self, job: Callable[[], Any]) -> Deferred[Any]:
        """
        @return: fires on the reactor thread with what C{job} returned, or
            fails with what it raised.
        """
        done: Deferred[Any] = Deferred()
        self._jobs.put((job, done))
        return done

    def stop(self) -> Deferred[None]:
        """
        Let the jobs already submitted finish, then end the thread.

        @return: fires once the thread has run its last job.
        """
        if self._thread.is_alive():
            self._jobs.put(None)
        elif not self._exited.called:
            self._exited.callback(None)
        return self._exited

    def _run(self) -> None:
        call = self._reactor.callFromThread
        while (item := self._jobs.get()) is not None:
            job, done = item
            try:
                result = job()
            except BaseException:
                call(done.errback, Failure())
            else:
                call(done.callback, result)
        call(self._exited.callback, None)


# Seconds a record nobody waits for may wait for company (see append).
LINGER = 0.05


def _urgent(record: AuditRecord) -> bool:
    """
    Whether someone waits for the record before answering (see append).
    """
    return record.event == "authorised" or record.decision == "refused"


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
        seal: Seal = UnkeyedSeal(),
        anchor_file: Path | None = None,
        signer: Ed25519PrivateKey | None = None,
        checkpoint_interval: float = 60.0,
        max_pending: int = 10000,
    ) -> None:
        """
        @param reactor: runs the writer thread's results (and the flush).
        @param clock: decides the day for daily rotation; the reactor when
            not given.
        @param durability: C{"always"}: an append's Deferred fires once its
            batch is on disk (files opened C{O_DSYNC}); C{"batch"}: after
            write, the fsync following; C{"never"}: after write, no fsync.
        @param fsync: the fsync to use (a seam for tests): C{"batch"}'s data
            syncs, and the syncs of directories and cut files.
        @param raw_write: the C{os.write} to use for records (a seam for tests
            that emulate a full or read-only disk).
        @param seal: how records are bound to each other (L{ssp.chain}).
        @param anchor_file: where checkpoints are appended (outside the
            directory); L{None}: to the log only.
        @param signer: signs each checkpoint (Ed25519) when given.
        @param checkpoint_interval: seconds between checkpoints.
        @param max_pending: records queued or in flight beyond which an
            append fails at once with L{AuditUnavailable}: a flood cannot
            grow the queue without bound.
        """
        self._reactor = reactor
        self._clock: IReactorTime = clock if clock is not None else cast(IReactorTime, reactor)
        self._durability = durability
        self._writer = _ChainWriter(
            Path(directory).resolve(), durability, rotate_bytes, rotate_daily, fsync, raw_write,
            seal, anchor_file, signer,
        )
        self._checkpoints = LoopingCall(self._checkpoint)
        self._checkpoints.clock = self._clock
        self._checkpoint_interval = checkpoint_interval
        self._max_pending = max_pending
        self._overflowing = False
        self._thread = _WriterThread(reactor, "ssp-audit")
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
        """
        @raise ValueError: no key and unkeyed mode not chosen, or a key that
            cannot be used.
        @raise OSError: a key file that cannot be read.
        """
        if config.key_file is not None:
            seal: Seal = KeyedSeal(read_key(config.key_file))  # type: ignore[assignment]
        elif config.unkeyed:
            cls.log.warn(
                "Audit trail UNKEYED ([audit] unkeyed = true): anyone who can write {directory} "
                "can rewrite it undetectably; set [audit] key_file", directory=config.directory)
            seal = UnkeyedSeal()
        else:
            raise ValueError("[audit] key_file is required (or unkeyed = true)")
        signer = anchor.load_signing_key(config.signing_key) if config.signing_key else None
        return cls(
            config.directory,
            reactor,
            clock,
            durability=config.durability,
            rotate_bytes=config.rotate_bytes,
            rotate_daily=config.rotate_daily,
            seal=seal,
            anchor_file=config.anchor_file,
            signer=signer,
            checkpoint_interval=config.checkpoint_interval,
            max_pending=config.max_pending,
        )

    def start(self) -> Deferred[None]:
        """
        Start the writer thread and recover the chain from disk.  The
        Deferred always succeeds; if the directory is unusable C{writable}
        is false and the next append retries.
        """
        self._thread.start()
        self._started = True
        self._busy = True
        d = self._thread.run(self._writer.start)
        started = d.addCallbacks(
            self._started_chain, self._unavailable, errbackArgs=(None,)
        ).addBoth(self._finished)
        self._checkpoints.start(self._checkpoint_interval, now=False)
        return started

    def _started_chain(self, found: tuple[list[str], list[str]]) -> None:
        notes, alarms = found
        self._log_notes(notes)
        for alarm in alarms:
            self.log.critical("Audit trail tampered with? {alarm} (in {directory}); run "
                              "ssp audit verify with --key and --anchor", alarm=alarm,
                              directory=self._writer.directory)
            self.append(audit_record("chain-alarm", self._clock.seconds(), None, with_port=False,
                                     token=alarm[:500])
                        ).addErrback(lambda f: self.log.failure("Chain alarm not audited", f))

    def _checkpoint(self) -> Deferred[None]:
        d = self._thread.run(partial(self._writer.checkpoint, self._clock.seconds()))
        return d.addCallbacks(self._log_checkpoint, self._checkpoint_failed)

    def _log_checkpoint(self, entry: dict[str, Any] | None) -> None:
        if entry is not None:
            self.log.info(
                "Audit checkpoint {chain} {file}:{line} records={records} head={head}",
                **{k: entry[k] for k in ("chain", "file", "line", "records", "head")})

    def _checkpoint_failed(self, reason: Failure) -> None:
        self.log.failure("Audit checkpoint not written to {anchor}", reason,
                         anchor=self._writer.anchor_file)

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
        if self._checkpoints.running:
            self._checkpoints.stop()
        if self._stopping is None:
            self._stopping = self._when_idle()
            self._stopping.addCallback(lambda _: self._checkpoint())
            self._stopping.addCallback(lambda _: self._thread.run(self._writer.close))
            self._stopping.addBoth(self._stop_thread)
        done: Deferred[None] = Deferred()
        self._stopping.addCallback(done.callback)
        return done

    @property
    def pending(self) -> int:
        """
        Records appended but not yet durable: queued, or in the batch being
        written and synced (until its sync returns, or its write fails).
        A gauge for metrics: it grows while the disk is slow.
        """
        in_flight = len(self._writing.entries) if self._writing is not None else 0
        return len(self._queue) + in_flight

    def append(self, record: AuditRecord) -> Deferred[None]:
        """
        Queue a record.  An C{authorised} record, and the record of a
        refusal, are written at the end of this reactor turn, with
        everything else appended in it: the request waits for it before
        going upstream, or before its refusal is answered.  Other records
        (completed requests) wait on no one: they join the next batch, or
        are written after L{LINGER} seconds, which halves the writer
        thread's wake-ups under load.

        Fails at once with L{AuditUnavailable} once C{max_pending} records
        are waiting: the disk is not keeping up, and memory must not grow.
        """
        if self._stopped:
            return fail(AuditUnavailable())
        if self.pending >= self._max_pending:
            if not self._overflowing:
                self.log.error("Audit queue full ({pending} records): refusing requests until "
                               "the disk catches up", pending=self.pending)
            self._overflowing = True
            return fail(AuditUnavailable())
        self._overflowing = False
        d: Deferred[None] = Deferred()
        self._queue.append((record, d))
        if not self._busy:
            self._schedule(_urgent(record))
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

        d = self._thread.run(partial(self._writer.write, records, self._clock.seconds(), written))
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
        if self._queue and (self._stopped or any(_urgent(record) for record, _ in self._queue)):
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

    def _stop_thread(self, result: object) -> Deferred[None]:
        if isinstance(result, Failure):
            self.log.failure("Audit trail not closed cleanly", result)
        return self._thread.stop()
