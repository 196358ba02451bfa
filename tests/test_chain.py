"""
Tampering with the audit trail, case by case: each is detected by
C{ssp audit verify --key --anchor}; what the weaker modes miss is asserted
too, as documented in docs/audit.md ("Threat model").  Retention keeps the
chain verifiable, and a sink restarted on a cut tail raises the alarm.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path

import attrs
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp import anchor, chain
from ssp.audit import FileAuditSink
from ssp.auditcli import main_archive, main_verify
from ssp.chain import KeyedSeal, UnkeyedSeal, audit_files, read_records
from ssp.config import AuditConfig
from ssp.model import AuditRecord, Claims

DAY = datetime(2024, 3, 1, 12, tzinfo=UTC).timestamp()


def record(n: int) -> AuditRecord:
    return AuditRecord("completed", f"req-{n}", DAY + n, sender="200000000359",
                       receiver="918999198738", decision="forwarded", status=200,
                       interaction="urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1")


class TamperTests(TestCase):
    """
    A keyed, anchored trail of 30 records in several files, written by the
    real sink in three runs (a checkpoint at each stop).
    """

    async def setUp(self) -> None:
        root = Path(self.mktemp()).resolve()
        self.directory = root / "audit"
        self.key = root / "audit.key"
        root.mkdir()
        self.key.write_text(os.urandom(32).hex())
        self.anchor = root / "anchor.jsonl"
        self.seal = KeyedSeal(self.key.read_bytes().strip())
        for run in range(3):
            await self.write(range(run * 10, run * 10 + 10))

    async def write(self, numbers: range, seal: object = None) -> None:
        clock = Clock()
        clock.advance(DAY)
        sink = FileAuditSink(self.directory, reactor, clock, durability="never",
                             rotate_bytes=4096, rotate_daily=False,
                             seal=seal or self.seal, anchor_file=self.anchor)
        await sink.start()
        for n in numbers:
            await sink.append(record(n))
        await sink.stop()

    def verify(self, *extra: str) -> tuple[int, str]:
        out = io.StringIO()
        code = main_verify([str(self.directory), *extra], out)
        return code, out.getvalue()

    def full(self) -> tuple[int, str]:
        return self.verify("--key", str(self.key), "--anchor", str(self.anchor))

    def assertDetected(self, reason: str) -> None:
        code, out = self.full()
        self.assertEqual(code, 1, out)
        self.assertIn(reason, out)

    def files(self) -> list[Path]:
        return audit_files(self.directory)

    def edit(self, path: Path, change) -> None:  # type: ignore[no-untyped-def]
        lines = path.read_bytes().splitlines(keepends=True)
        change(lines)
        path.write_bytes(b"".join(lines))

    def test_intact(self) -> None:
        code, out = self.full()
        self.assertEqual(code, 0, out)
        self.assertIn("30 records", out)
        self.assertGreater(len(self.files()), 3)
        checkpoints = [e for e in anchor.read(self.anchor) if e["kind"] == "checkpoint"]
        self.assertEqual([e["records"] for e in checkpoints], [10, 20, 30])

    def test_flipped_byte(self) -> None:
        self.edit(self.files()[1], lambda lines: lines.__setitem__(
            1, lines[1].replace(b'"status":200', b'"status":201')))
        self.assertDetected(f"{self.files()[1]}:2: MAC does not match")
        # Without the key the altered record still links: the flip shows
        # only because the MAC is checked.
        self.assertEqual(self.verify("--anchor", str(self.anchor))[0], 0)

    def test_deleted_record(self) -> None:
        self.edit(self.files()[1], lambda lines: lines.pop(1))
        self.assertDetected(f"{self.files()[1]}:2: prev does not match")
        self.assertEqual(self.verify()[0], 1)

    def test_cut_tail(self) -> None:
        newest = self.files()[-1]
        self.edit(newest, lambda lines: lines.pop())
        self.assertDetected("is not in the trail")
        # Without the anchor a cut tail is invisible.
        self.assertEqual(self.verify("--key", str(self.key))[0], 0)

    def test_deleted_newest_file(self) -> None:
        self.files()[-1].unlink()
        self.assertDetected("cut tail")
        self.assertEqual(self.verify("--key", str(self.key))[0], 0)

    def test_deleted_middle_and_first_files(self) -> None:
        files = self.files()
        files[2].unlink()
        self.assertDetected(f"{files[3]}:1: prev does not match")
        files[0].unlink()
        self.assertDetected("first record continues a chain")

    def test_rewritten_and_rechained_without_the_key(self) -> None:
        """
        The attacker rewrites the whole trail with a key of their own (or
        none): every link is consistent again.
        """
        self.rechain(KeyedSeal(os.urandom(32)))
        self.assertDetected("MAC does not match")
        self.assertEqual(self.verify()[0], 0)  # links alone: consistent

    async def test_unkeyed_rechain_caught_by_the_anchor(self) -> None:
        """
        In unkeyed mode a rewrite that re-chains passes every link; only the
        anchor's checkpoints show it.
        """
        shutil.rmtree(self.directory)
        self.anchor.unlink()
        for run in range(3):
            await self.write(range(run * 10, run * 10 + 10), UnkeyedSeal())
        self.rechain(UnkeyedSeal(), alter=True)
        self.assertEqual(self.verify()[0], 0)
        code, out = self.verify("--anchor", str(self.anchor))
        self.assertEqual(code, 1, out)
        self.assertIn("rewritten and re-chained", out)

    def rechain(self, seal: object, alter: bool = False) -> None:
        records = list(read_records([self.directory]))
        previous = "0" * 64
        for path in self.files():
            out = []
            for _ in path.read_bytes().splitlines():
                fields = records.pop(0)
                fields = {k: v for k, v in fields.items() if k not in ("prev", "mac")}
                if alter and fields["request_id"] == "req-3":
                    fields["status"] = 500
                line = seal.seal(AuditRecord(**fields), previous)  # type: ignore[attr-defined]
                previous = seal.link(line)  # type: ignore[attr-defined]
                out.append(line)
            path.write_bytes(b"".join(out))

    def test_swapped_files(self) -> None:
        first, second = self.files()[1:3]
        a, b = first.read_bytes(), second.read_bytes()
        first.write_bytes(b)
        second.write_bytes(a)
        self.assertDetected("prev does not match")
        self.assertEqual(self.verify()[0], 1)

    def test_deleted_worker_chain(self) -> None:
        parent = self.directory.parent / "workers"
        parent.mkdir()
        self.directory.rename(parent / "worker-0")
        self.directory = parent / "worker-0"
        self.anchor.write_text(self.anchor.read_text().replace(
            str(self.directory.parent.parent / "audit"), str(self.directory)))
        code, out = self.verify_dir(parent)
        self.assertEqual(code, 0, out)
        shutil.rmtree(self.directory)
        code, out = self.verify_dir(parent)
        self.assertEqual(code, 1, out)
        self.assertIn("a worker's trail was deleted", out)

    def verify_dir(self, directory: Path) -> tuple[int, str]:
        out = io.StringIO()
        code = main_verify([str(directory), "--key", str(self.key), "--anchor",
                            str(self.anchor)], out)
        return code, out.getvalue()

    def test_forged_anchor_caught_by_signature(self) -> None:
        """
        With signed checkpoints an altered anchor is refused too.
        """
        signer = Ed25519PrivateKey.generate()
        public = self.directory.parent / "anchor.pub"
        public.write_bytes(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        entries = anchor.read(self.anchor)
        self.anchor.unlink()
        for entry in entries:
            anchor.append(self.anchor, entry, signer)
        self.assertEqual(self.full()[0], 0)
        self.assertEqual(self.verify("--anchor", str(self.anchor), "--public-key",
                                     str(public))[0], 0)
        self.anchor.write_text(self.anchor.read_text().replace('"records":30', '"records":31'))
        code, out = self.verify("--anchor", str(self.anchor), "--public-key", str(public))
        self.assertEqual(code, 1)
        self.assertIn("no valid signature", out)

    def test_archive_keeps_chain_verifiable(self) -> None:
        """
        Compressed files still verify; removed ones are recorded in the
        anchor, from which the rest verifies; tampering after an archive
        is still caught.
        """
        files = self.files()
        for index, path in enumerate(files):  # spread the files over days
            path.rename(path.with_name(f"audit-202403{index + 1:02d}-0001.jsonl"))
        self.edit_anchor_names(files)
        now = datetime(2024, 3, 1, tzinfo=UTC) + timedelta(days=len(files) + 1)
        out = io.StringIO()
        code = main_archive([str(self.directory), "--older-than", f"{len(files) - 2}d",
                             "--delete-after", f"{len(files) - 1}d", "--anchor",
                             str(self.anchor), "--key", str(self.key)], out, lambda: now)
        self.assertEqual(code, 0, out.getvalue())
        names = [p.name for p in self.files()]
        self.assertTrue(names[0].endswith(".jsonl.gz"), names)
        self.assertFalse(names[-1].endswith(".gz"))
        self.assertLess(len(names), len(files))
        removed = [e for e in anchor.read(self.anchor) if e["kind"] == "removed"]
        self.assertEqual(len(removed), len(files) - len(names))
        code, text = self.full()
        self.assertEqual(code, 0, text)
        self.files()[-1].unlink()
        self.assertDetected("cut tail")

    def edit_anchor_names(self, files: list[Path]) -> None:
        text = self.anchor.read_text()
        for index, path in enumerate(files):
            text = text.replace(f'"file":"{path.name}"',
                                f'"file":"audit-202403{index + 1:02d}-0001.jsonl"')
        self.anchor.write_text(text)

    async def test_restart_on_cut_tail_raises_the_alarm(self) -> None:
        """
        A sink started on a trail whose tail was cut says so (critical log
        and a C{chain-alarm} record) instead of carrying on silently.
        """
        self.edit(self.files()[-1], lambda lines: lines.pop())
        logged: list[dict] = []
        observer = logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        await self.write(range(100, 101))
        alarms = [r for r in read_records([self.directory]) if r["event"] == "chain-alarm"]
        self.assertEqual(len(alarms), 1)
        self.assertIn("the tail was cut", alarms[0]["token"])
        self.assertTrue(any(e.get("log_level") == LogLevel.critical for e in logged))
        self.assertDetected("differs from the anchor's checkpoint")


class LinesFromEndTests(SynchronousTestCase):
    def lines(self, content: bytes, block: int) -> list[tuple[int, bytes]]:
        self.patch(chain, "_BLOCK", block)
        path = Path(self.mktemp())
        path.write_bytes(content)
        with path.open("rb") as f:
            return list(chain.lines_from_end(f.fileno(), len(content)))

    def test_across_block_boundaries(self) -> None:
        """
        Whatever the block size, every complete line comes back, last
        first, with the offset past its newline; a torn tail is skipped.
        """
        content = b"first\n\nthird line\nfourth\ntorn"
        expected = [(25, b"fourth"), (18, b"third line"), (7, b""), (6, b"first")]
        for block in (1, 2, 3, 5, 7, 64):
            self.assertEqual(self.lines(content, block), expected, block)

    def test_nothing_complete(self) -> None:
        self.assertEqual(self.lines(b"", 4), [])
        self.assertEqual(self.lines(b"no newline", 4), [])


class EmptyTests(SynchronousTestCase):
    def test_nothing_to_verify_is_a_warning_and_an_error(self) -> None:
        """
        An empty directory (a wrong path, a proxy that never wrote) is not
        "OK": exit 1 with a warning, unless C{--allow-empty}.
        """
        empty = Path(self.mktemp())
        (empty / "worker-0").mkdir(parents=True)
        out = io.StringIO()
        self.assertEqual(main_verify([str(empty)], out), 1)
        self.assertIn("WARNING: no audit records found", out.getvalue())
        self.assertEqual(main_verify([str(empty), "--allow-empty"], io.StringIO()), 0)


class SinkAnchorTests(TestCase):
    async def test_signed_checkpoints_from_the_configuration(self) -> None:
        """
        With C{signing_key} every checkpoint the sink writes is signed, and
        C{verify --public-key} accepts them.
        """
        root = Path(self.mktemp()).resolve()
        root.mkdir()
        signer = Ed25519PrivateKey.generate()
        (root / "sign.pem").write_bytes(signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        (root / "sign.pub").write_bytes(signer.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        (root / "audit.key").write_text(os.urandom(32).hex())
        config = AuditConfig(directory=root / "audit", durability="never",
                             key_file=root / "audit.key", anchor_file=root / "anchor.jsonl",
                             signing_key=root / "sign.pem")
        sink = FileAuditSink.from_config(config, reactor)
        await sink.start()
        await sink.append(record(1))
        await sink.stop()
        [checkpoint] = anchor.read(root / "anchor.jsonl")
        self.assertIn("sig", checkpoint)
        out = io.StringIO()
        code = main_verify([str(root / "audit"), "--key", str(root / "audit.key"), "--anchor",
                            str(root / "anchor.jsonl"), "--public-key", str(root / "sign.pub")],
                           out)
        self.assertEqual(code, 0, out.getvalue())

    async def test_unwritable_anchor_does_not_stop_the_trail(self) -> None:
        """
        Checkpoints that cannot be written are logged as errors; records
        are still written and acknowledged.
        """
        root = Path(self.mktemp()).resolve()
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        sink = FileAuditSink(root / "audit", reactor, durability="never",
                             anchor_file=root / "missing" / "anchor.jsonl")
        await sink.start()
        await sink.append(record(1))
        await sink.stop()
        self.assertEqual(len(list(read_records([root / "audit"]))), 1)
        failures = [e for e in logged if "not written" in e.get("log_format", "")]
        self.assertEqual(len(failures), 1)
        self.flushLoggedErrors(FileNotFoundError)


class AnchorFileTests(SynchronousTestCase):
    def test_malformed_entries(self) -> None:
        """
        A torn last line is skipped; an entry of the wrong shape is an
        error for C{verify}, and ignored by the sink's start.
        """
        path = Path(self.mktemp())
        good = {"kind": "checkpoint", "chain": "/a", "file": "audit-20240301-0001.jsonl",
                "line": 3, "records": 3, "head": "ab" * 32, "time": 1.0}
        anchor.append(path, good)
        with path.open("ab") as f:
            f.write(b'{"kind":"checkpoint","chain":"/a","line":"x"}\n{"kind":"che')
        self.assertEqual(anchor.last_checkpoint(path, Path("/a")), good)
        path.write_text(path.read_text().replace("audit-20240301-0001.jsonl", "../x"))
        self.assertIsNone(anchor.last_checkpoint(path, Path("/a")))
        path.unlink()
        anchor.append(path, good)
        with path.open("ab") as f:
            f.write(b'{"kind":"checkpoint","chain":"/a","line":"x"}\n{"kind":"che')
        self.assertEqual(anchor.last_checkpoint(path, Path("/a")), good)
        with self.assertRaises(ValueError) as caught:
            anchor.read(path)
        self.assertIn(f"{path}:2: not a valid anchor entry", str(caught.exception))


def _reference_body(record: AuditRecord, previous: str) -> bytes:
    """
    The format the trail documents, written the slow obvious way: sorted
    keys, no spaces, ASCII with C{\\u} escapes, NaN refused.
    """
    fields = attrs.asdict(record)
    fields["prev"] = previous
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("ascii")


def _exponents(line: bytes) -> bytes:
    """
    C{line} with exponents written one way (C{1e-07} and C{1e+16} as
    C{1e-7} and C{1e16}).
    """
    return re.sub(rb"(\d)e\+?(-?)0*(\d)", rb"\1e\2\3", line)


_finite = st.floats(allow_nan=False, allow_infinity=False)
_records = st.builds(
    AuditRecord, event=st.sampled_from(["authorised", "completed"]), request_id=st.text(),
    time=_finite, target=st.text(), trace_id=st.text(), client_subject=st.text(),
    claims=st.none() | st.builds(Claims, subject=st.text(),
                                 practitioner_ids=st.lists(st.text()).map(tuple),
                                 validated=st.booleans()),
    status=st.integers(0, 999), bytes_out=st.integers(0, 2**63 - 1),
    upstream_latency=st.none() | _finite, total_latency=st.none() | _finite)


class SerialisationTests(SynchronousTestCase):
    """
    The fast serialiser writes what the documented format says, and the
    chain verifies it by its bytes.
    """

    @settings(max_examples=300, deadline=None)
    @given(_records)
    def test_same_record_as_the_reference(self, record: AuditRecord) -> None:
        """
        Every line is ASCII, parses to exactly what the reference
        serialisation parses to, and equals it byte for byte unless a float
        is written with an exponent (C{1e-7} against C{1e-07}).
        """
        line = UnkeyedSeal().seal(record, "p" * 64).rstrip(b"\n")
        reference = _reference_body(record, "p" * 64)
        self.assertTrue(line.isascii())
        self.assertEqual(json.loads(line), json.loads(reference))
        self.assertEqual(_exponents(line), _exponents(reference))

    def test_non_ascii_escaped(self) -> None:
        """
        Non-ASCII text, lone surrogates and DEL are C{\\u} escaped, as
        documented (orjson would write DEL as it is).
        """
        for text in ("é\u2028", "\udcff", "\x00\"\\", "\x7f"):
            line = UnkeyedSeal().seal(attrs.evolve(record(1), target=text), chain.GENESIS)
            self.assertEqual(line.rstrip(b"\n"), _reference_body(
                attrs.evolve(record(1), target=text), chain.GENESIS))

    def test_nan_and_infinity_refused(self) -> None:
        """
        A record holding NaN or infinity is refused (C{ValueError}) rather
        than written with C{null} in its place.
        """
        for value in (float("nan"), float("inf"), float("-inf")):
            for field in ("time", "upstream_latency", "total_latency"):
                with self.assertRaises(ValueError):
                    KeyedSeal(b"k" * 32).seal(attrs.evolve(record(1), **{field: value}), "p")

    def test_keyed_line_verifies(self) -> None:
        """
        A keyed line made by the fast path opens under its key.
        """
        seal = KeyedSeal(b"k" * 32)
        line = seal.seal(attrs.evolve(record(1), total_latency=1e-7), chain.GENESIS)
        fields, link = seal.open(line)
        self.assertEqual(fields["total_latency"], 1e-7)
        self.assertEqual(link, seal.link(line))
