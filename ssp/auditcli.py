# -*- test-case-name: tests.test_auditcli -*-
"""
C{ssp audit verify} and C{ssp audit archive}: the operator's side of the
audit chain (docs/audit.md).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

from ssp import anchor, retention
from ssp.chain import GENESIS, KeyedSeal, Seal, UncheckedSeal, chains, read_key
from ssp.verify import VerifyResult, verify

_DURATION = re.compile(r"(\d+)([smhdwy])\Z")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def duration(text: str) -> float:
    """
    Seconds in C{30d}, C{8y}, C{12h}... (C{y} is 365 days).
    """
    match = _DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a duration such as 30d or 8y: {text}")
    return int(match[1]) * _UNIT[match[2]]


def _parser(command: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"ssp audit {command}", description=description)
    parser.add_argument("paths", nargs="+", type=Path,
                        help="audit directories (worker-K chains found inside) or files")
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    try:
        return parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2


def _seal(key: Path | None) -> Seal:
    return KeyedSeal(read_key(key)) if key is not None else UncheckedSeal()


def verify_paths(paths: Sequence[Path], seal: Seal, start: str | None,
                 anchor_file: Path | None, public_key: Path | None
                 ) -> list[tuple[Path, VerifyResult]]:
    """
    Verify every chain found in C{paths} on its own, and report the chains
    the anchor knows under those paths that are gone.

    @raise OSError, ValueError: a file or key that cannot be read.
    """
    entries = anchor.read(anchor_file) if anchor_file is not None else []
    key = anchor.load_public_key(public_key) if public_key is not None else None
    found = chains(paths)
    results = []
    for directory, files in found.items():
        mine = [e for e in entries if e.get("chain") == str(directory.resolve())]
        if not files and not mine:
            results.append((directory, VerifyResult(True, 0, 0, GENESIS)))
            continue
        results.append((directory, verify(files, seal, start, mine, key)))
    known = {str(d.resolve()) for d in found}
    roots = [p.resolve() for p in paths if p.is_dir()]
    for chain in sorted({e.get("chain", "") for e in entries} - known):
        if any(Path(chain) == root or Path(chain).parent == root for root in roots):
            results.append((Path(chain), VerifyResult(
                False, 0, 0, GENESIS, reason="the anchor has checkpoints of this chain, and "
                "its directory is gone: a worker's trail was deleted")))
    return results


def main_verify(argv: list[str], out: TextIO | None = None) -> int:
    """
    C{ssp audit verify [--key FILE] [--anchor FILE] DIR|FILE...}: exit 0
    when every chain is intact, 1 naming the first problem of each chain
    that is not (or when there is nothing to verify, without
    C{--allow-empty}).
    """
    out = out if out is not None else sys.stdout
    parser = _parser("verify", "Check the audit chains (one per worker-K directory) against the "
                               "key and the anchor file.")
    parser.add_argument("--key", type=Path, help="the chain's secret key file: check every MAC")
    parser.add_argument("--anchor", type=Path,
                        help="the anchor file: check checkpoints (cut tail, re-chaining, "
                             "deleted files) and what retention removed")
    parser.add_argument("--public-key", type=Path,
                        help="Ed25519 public key (PEM): every anchor entry must be signed by it")
    parser.add_argument("--start", default=GENESIS,
                        help="prev the first record must carry (default: the genesis hash, or "
                             "what the anchor says was removed; 'any' to accept whatever it is)")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0 when no audit record is found")
    options = _parse(parser, argv)
    if isinstance(options, int):
        return options
    start = None if options.start == "any" else options.start
    try:
        results = verify_paths(options.paths, _seal(options.key), start, options.anchor,
                               options.public_key)
    except OSError as e:
        print(f"ERROR: {e.filename}: {e.strerror}", file=out)
        return 1
    except ValueError as e:
        print(f"ERROR: {e}", file=out)
        return 1
    failed = False
    for directory, result in results:
        failed |= _print_result(directory, result, out)
    if options.key is None:
        print("  note: no --key: MACs not checked, a rewrite that re-chains is not detected",
              file=out)
    if options.anchor is None:
        print("  note: no --anchor: a cut tail or deleted newest files are not detected",
              file=out)
    if not failed and sum(r.records for _, r in results) == 0:
        print("WARNING: no audit records found in " + " ".join(map(str, options.paths)),
              file=out)
        return 0 if options.allow_empty else 1
    return 1 if failed else 0


def _print_result(directory: Path, result: VerifyResult, out: TextIO) -> bool:
    if not result.ok:
        where = f"{result.broken_file}:{result.broken_line}: " if result.broken_file else ""
        print(f"BROKEN: {directory}: {where}{result.reason}", file=out)
        print(f"  {result.records} records before it verified", file=out)
        return True
    print(f"OK: {directory}: {result.records} records in {result.files} files, chain intact; "
          f"last hash {result.last_hash}", file=out)
    if result.note:
        print(f"  note: {result.note}", file=out)
    return False


def main_archive(argv: list[str], out: TextIO | None = None,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> int:
    """
    C{ssp audit archive DIR [--older-than 30d] [--delete-after 8y]
    [--anchor FILE] [--key FILE]}: compress closed files, remove expired
    ones, and record both in the anchor so the chain still verifies.
    """
    out = out if out is not None else sys.stdout
    parser = _parser("archive", "Compress closed audit files and remove expired ones, "
                                "recording both in the anchor file.")
    parser.add_argument("--older-than", type=duration, default=duration("30d"),
                        help="compress closed files whose day is older than this (default 30d)")
    parser.add_argument("--delete-after", type=duration,
                        help="remove files whose day is older than this (e.g. 8y); needs --anchor")
    parser.add_argument("--anchor", type=Path, help="the anchor file to record removals in")
    parser.add_argument("--key", type=Path,
                        help="the chain key: files are checked before they are removed")
    options = _parse(parser, argv)
    if isinstance(options, int):
        return options
    if options.delete_after is not None and options.anchor is None:
        print("ERROR: --delete-after needs --anchor (or the rest of the chain cannot be "
              "verified)", file=out)
        return 2
    if options.delete_after is not None and options.delete_after < options.older_than:
        print("ERROR: --delete-after is shorter than --older-than", file=out)
        return 2
    today = now()
    try:
        seal = _seal(options.key)
        for directory, files in chains(options.paths).items():
            done = retention.archive(directory, files, today, options.older_than,
                                     options.delete_after, options.anchor, seal)
            for line in done:
                print(line, file=out)
    except (OSError, ValueError) as e:
        print(f"ERROR: {e}", file=out)
        return 1
    return 0

