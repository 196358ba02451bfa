# -*- test-case-name: tests.test_auditcli -*-
"""
Retention of the audit trail: closed files are compressed after a while
and removed once expired, without making the rest unverifiable.

Compression keeps every byte of a file (C{audit-….jsonl.gz} reads back as
the same lines), so the chain runs through archived files unchanged.  A
removal is recorded in the anchor with the link of the file's last
record, which is where the rest of the chain starts from.
"""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Sequence
from datetime import datetime, timedelta
from pathlib import Path

from ssp import anchor
from ssp.chain import ChainError, Seal, open_file, order, stem


def archive(directory: Path, files: Sequence[Path], now: datetime, older_than: float,
            delete_after: float | None, anchor_file: Path | None, seal: Seal) -> list[str]:
    """
    Compress and remove the closed files of one chain.  The newest file is
    never touched: the proxy may be writing it.

    @param files: the chain's files in order (L{ssp.chain.chains}).
    @param now: today, for the ages (a file's age is its day's).
    @param older_than: seconds after which a closed file is compressed.
    @param delete_after: seconds after which a file is removed.
    @param seal: checks each file before it is removed.
    @return: what was done, one line each.
    @raise ChainError: a file to remove fails its check: nothing removed.
    """
    done = []
    closed = list(files[:-1])
    for path in closed:
        day = datetime.strptime(order(path)[0], "%Y%m%d").replace(tzinfo=now.tzinfo)
        age = (now - day - timedelta(days=1)).total_seconds()
        if delete_after is not None and age > delete_after:
            assert anchor_file is not None
            done.append(_remove(directory, path, anchor_file, seal, now.timestamp()))
        elif age > older_than and not path.name.endswith(".gz"):
            done.append(_compress(directory, path, anchor_file, now.timestamp()))
    return done


def _compress(directory: Path, path: Path, anchor_file: Path | None, when: float) -> str:
    target = path.with_name(path.name + ".gz")
    partial = path.with_name(path.name + ".gz.partial")
    with path.open("rb") as source, open(partial, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as packed:
            shutil.copyfileobj(source, packed, 1 << 20)
        raw.flush()
        os.fsync(raw.fileno())
    os.chmod(partial, 0o440)
    os.rename(partial, target)
    _sync_directory(directory)
    path.unlink()
    _sync_directory(directory)
    if anchor_file is not None:
        anchor.append(anchor_file, {"kind": "archived", "chain": str(directory.resolve()),
                                    "file": path.name, "time": when})
    return f"compressed {path} -> {target.name}"


def _remove(directory: Path, path: Path, anchor_file: Path, seal: Seal, when: float) -> str:
    lines, head = 0, ""
    with open_file(path) as f:
        for lines, raw in enumerate(f, 1):
            try:
                head = seal.open(raw)[1]
            except ChainError as e:
                raise ChainError(f"{path}:{lines}: {e}; not removed") from None
    anchor.append(anchor_file, {"kind": "removed", "chain": str(directory.resolve()),
                                "file": stem(path), "lines": lines, "head": head,
                                "time": when})
    path.unlink()
    _sync_directory(directory)
    return f"removed {path} ({lines} records, last link {head})"


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
