# -*- test-case-name: tests.test_chain -*-
"""
Checking an audit chain: every link, every MAC when the key is given, and
every position the anchor file recorded.  The first problem is named by
file and line.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ssp import anchor
from ssp.chain import GENESIS, ChainError, Seal, UncheckedSeal, chains, open_file, order, stem


@attrs.frozen
class VerifyResult:
    """
    The outcome of checking one chain.

    @ivar records: records checked (up to the break, if any).
    @ivar last_hash: link of the last record checked (the chain head).
    @ivar broken_file: file of the first problem.
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


@attrs.define
class _Walk:
    files: Sequence[Path]
    seal: Seal
    expected: str | None
    checkpoints: dict[tuple[str, int], dict[str, Any]]
    counted: int = 0
    records: int = 0
    last_position: tuple[str, int] | None = None

    def broken(self, path: Path | None, line: int | None, reason: str) -> VerifyResult:
        return VerifyResult(False, self.records, len(self.files), self.expected or GENESIS,
                            path, line, reason)

    def run(self) -> VerifyResult:
        note = ""
        for index, path in enumerate(self.files):
            with open_file(path) as f:
                for number, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n"):
                        if index == len(self.files) - 1:
                            note = (f"{path}:{number}: incomplete final line ignored (being "
                                    "written, or torn by a crash: the sink cuts it on restart)")
                            break
                        return self.broken(path, number, "incomplete line inside the chain")
                    problem = self.step(path, number, raw)
                    if problem is not None:
                        return problem
        if self.checkpoints:
            newest = max(self.checkpoints, key=lambda p: (order(Path(p[0])), p[1]))
            checkpoint = self.checkpoints[newest]
            where = (f"{self.last_position[0]}:{self.last_position[1]}"
                     if self.last_position else "the start")
            return self.broken(None, None, (
                f"the anchor's checkpoint at {checkpoint['file']}:{checkpoint['line']} "
                f"({checkpoint['records']} records, time {checkpoint['time']}) is not in the "
                f"trail, which ends at {where}: records or files were removed (cut tail)"))
        return VerifyResult(True, self.records, len(self.files), self.expected or GENESIS,
                            note=note)

    def step(self, path: Path, number: int, raw: bytes) -> VerifyResult | None:
        try:
            record, link = self.seal.open(raw)
        except ChainError as e:
            return self.broken(path, number, str(e))
        if self.expected is not None and record["prev"] != self.expected:
            if self.records == 0:
                return self.broken(path, number, (
                    f"first record continues a chain from {record['prev']}, expected "
                    f"{self.expected} (earlier files missing? pass --anchor)"))
            return self.broken(path, number, (
                "prev does not match the link of the record before it: that record or this "
                "one was altered, or records were removed or reordered"))
        self.expected = link
        self.records += 1
        position = (stem(path), number)
        checkpoint = self.checkpoints.pop(position, None)
        if checkpoint is not None:
            if checkpoint.get("head") != link:
                return self.broken(path, number, (
                    f"differs from the anchor's checkpoint of time {checkpoint['time']}: the "
                    "trail was cut and continued, or rewritten and re-chained"))
            if checkpoint.get("records") != self.counted + self.records:
                return self.broken(path, number, (
                    f"the anchor counted {checkpoint['records']} records up to here, the trail "
                    f"has {self.counted + self.records}: records were removed or inserted"))
        self.last_position = position
        return None


def verify(files: Sequence[Path], seal: Seal, start: str | None = GENESIS,
           entries: Sequence[dict[str, Any]] = (),
           public_key: Ed25519PublicKey | None = None) -> VerifyResult:
    """
    Check one chain.

    @param files: its files in chain order (L{ssp.chain.chains}).
    @param seal: L{ssp.chain.KeyedSeal} to check every MAC,
        L{ssp.chain.UncheckedSeal} to follow links only.
    @param start: the C{prev} the first record must carry: L{GENESIS}, the
        link before the first file kept, or L{None} to accept any.  The
        anchor's C{removed} entries replace L{GENESIS}.
    @param entries: the anchor entries of this chain.
    @param public_key: when given, every entry must be signed by it.
    """
    if not files:
        return VerifyResult(False, 0, 0, GENESIS, reason="no audit files found")
    if public_key is not None:
        for entry in entries:
            if not anchor.signature_valid(entry, public_key):
                return VerifyResult(False, 0, len(files), GENESIS, reason=(
                    f"anchor entry {entry.get('kind')} of time {entry.get('time')} has no valid "
                    "signature: the anchor file was altered"))
    removed = sorted((e for e in entries if e.get("kind") == "removed"),
                     key=lambda e: order(Path(e["file"])))
    counted = sum(e["lines"] for e in removed)
    if removed and start == GENESIS:
        start = removed[-1]["head"]
    gone = {e["file"] for e in removed}
    checkpoints = {(e["file"], e["line"]): e for e in entries
                   if e.get("kind") == "checkpoint" and e["file"] not in gone and e["line"] > 0}
    keyed = [e for e in entries if e.get("kind") == "checkpoint" and e.get("key_id")]
    if seal.keyed and any(e["key_id"] != seal.key_id for e in keyed):
        return VerifyResult(False, 0, len(files), GENESIS,
                            reason="the anchor's checkpoints were made with another key")
    return _Walk(files, seal, start, checkpoints, counted).run()


def verify_files(paths: Sequence[Path], seal: Seal = UncheckedSeal(),
                 start: str | None = GENESIS) -> VerifyResult:
    """
    Check the links of audit files and/or one directory as one chain (no
    anchor): a shorthand for scripts and tests.
    """
    files = [f for found in chains(paths).values() for f in found]
    return verify(files, seal, start)
