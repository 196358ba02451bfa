# -*- test-case-name: tests.test_chain -*-
"""
The anchor: what the audit chain looked like, kept outside the audit
directory so that whoever rewrites the directory cannot rewrite it too.

It is a JSON-lines file of entries, each naming its chain (the audit
directory's absolute path; one per worker):

 - C{checkpoint}: the chain head (the link of the record at C{file}:C{line}),
   the number of records since the chain began, and the time.  A cut tail,
   a re-chained or rewritten past, deleted files all change what is at
   that position.
 - C{archived} / C{removed}: what retention compressed or deleted, with
   the links around it, so the rest still verifies.

Entries may carry C{sig}, an Ed25519 signature of the entry without it,
which the holder of the anchor file cannot forge either.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from ssp.chain import is_audit_file, lines_from_end

def _canonical(entry: dict[str, Any]) -> bytes:
    unsigned = {k: v for k, v in entry.items() if k != "sig"}
    return json.dumps(unsigned, sort_keys=True, separators=(",", ":")).encode("ascii")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """
    @raise ValueError: not a PEM Ed25519 private key.
    """
    key = load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """
    @raise ValueError: not a PEM Ed25519 public key.
    """
    key = load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path}: not an Ed25519 public key")
    return key


def signature_valid(entry: dict[str, Any], key: Ed25519PublicKey) -> bool:
    try:
        key.verify(base64.b64decode(entry.get("sig", ""), validate=True), _canonical(entry))
    except (InvalidSignature, ValueError):
        return False
    return True


def append(path: Path, entry: dict[str, Any], signer: Ed25519PrivateKey | None = None,
           fsync: Callable[[int], None] = os.fsync) -> dict[str, Any]:
    """
    Append one entry (signed when a key is given) in a single C{write()}
    with C{O_APPEND}, so workers sharing the file never interleave, and
    fsync it.  Blocking: call off the reactor thread.

    @return: the entry as written.
    """
    if signer is not None:
        entry = dict(entry, sig=base64.b64encode(signer.sign(_canonical(entry))).decode("ascii"))
    line = json.dumps(entry, sort_keys=True, separators=(",", ":")).encode("ascii") + b"\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, line)
        fsync(fd)
    finally:
        os.close(fd)
    return entry


# The fields each kind of entry must have, and their types.
_SHAPES: dict[str, dict[str, type | tuple[type, ...]]] = {
    "checkpoint": {"chain": str, "file": str, "line": int, "records": int, "head": str,
                   "time": (int, float)},
    "archived": {"chain": str, "file": str},
    "removed": {"chain": str, "file": str, "lines": int, "head": str},
}


def read(path: Path, chain: Path | None = None) -> list[dict[str, Any]]:
    """
    The entries of an anchor file, oldest first; only C{chain}'s when
    given.  Lines that are not JSON (a torn last line) are skipped.

    @raise ValueError: naming a line that is JSON but not a valid entry.
    """
    entries = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            entry = _entry(raw)
            if entry is None:
                continue
            if not _valid(entry):
                raise ValueError(f"{path}:{number}: not a valid anchor entry")
            if chain is None or entry["chain"] == str(chain):
                entries.append(entry)
    return entries


def _valid(entry: dict[str, Any]) -> bool:
    shape = _SHAPES.get(entry.get("kind"))  # type: ignore[arg-type]
    return shape is not None and all(
        isinstance(entry.get(name), kind) and not isinstance(entry.get(name), bool)
        for name, kind in shape.items()) and is_audit_file(Path(entry["file"]))


def last_checkpoint(path: Path, chain: Path) -> dict[str, Any] | None:
    """
    The newest checkpoint of a chain, reading the file backwards (it
    grows for years; a start must not read all of it).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        for _, raw in lines_from_end(fd, os.fstat(fd).st_size):
            entry = _entry(raw)
            if (entry is not None and entry.get("kind") == "checkpoint" and _valid(entry)
                    and entry["chain"] == str(chain)):
                return entry
    finally:
        os.close(fd)
    return None


def _entry(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None
    return entry if isinstance(entry, dict) else None
