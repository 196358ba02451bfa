# -*- test-case-name: tests.test_chain -*-
"""
The audit chain: how records become lines bound to their predecessor, and
where the lines of a trail are (files, archived files, worker chains).

Two seals (docs/audit.md, "Threat model"):

 - L{KeyedSeal}: each line ends in C{"mac"}, HMAC-SHA256 under a secret
   key of the line without it (its C{prev} included); the next line's
   C{prev} is that MAC.  Nobody without the key can alter, insert or
   re-chain a record.
 - L{UnkeyedSeal}: C{prev} is the SHA-256 of the previous line.  It shows
   an accidental or naive edit, not a rewrite by someone who re-chains.
"""

from __future__ import annotations

import gzip
import hashlib
import hmac
import json
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from operator import attrgetter
from pathlib import Path
from typing import IO, Any, Protocol

import attrs
import orjson

from ssp.model import AuditRecord

GENESIS = "0" * 64
MIN_KEY_BYTES = 32
_NAME = re.compile(r"audit-(\d{8})-(\d+)\.jsonl(\.gz)?\Z")
_WORKER = re.compile(r"worker-\d+\Z")
_BLOCK = 64 * 1024
_MAC_SUFFIX = re.compile(rb',"mac":"([0-9a-f]{64})"\}\Z')


class ChainError(ValueError):
    """
    A line that cannot be part of a chain (not a record, or a bad MAC).
    """


class Seal(Protocol):
    keyed: bool
    key_id: str

    def seal(self, record: AuditRecord, previous: str) -> bytes: ...

    def open(self, line: bytes) -> tuple[dict[str, Any], str]: ...

    def link(self, line: bytes) -> str: ...


_FIELDS = tuple(field.name for field in attrs.fields(AuditRecord))
_VALUES = attrgetter(*_FIELDS)


def _body(record: AuditRecord, previous: str) -> bytes:
    """
    One record as compact JSON with sorted keys, in ASCII.

    orjson does the common case in about a seventh of C{json.dumps}' time
    (it reads the record's fields directly, nested claims through
    L{_as_dict}).  It writes UTF-8 rather than C{\\u} escapes, NaN and
    infinity as C{null}, and refuses lone surrogates and integers beyond
    64 bits: a record with any of those takes the standard library's path,
    which escapes non-ASCII text (and DEL) and raises C{ValueError} for
    NaN and infinity, so the trail's format and refusals stay as documented.
    Both agree byte for byte except for exponents (C{1e-7}, not
    C{1e-07}); a line is verified by its bytes, never re-serialised.
    """
    values = _VALUES(record)
    fields = dict(zip(_FIELDS, values))
    fields["prev"] = previous
    try:
        body = orjson.dumps(fields, default=_as_dict, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError:
        pass
    else:
        # Each None writes one "null"; NaN and infinity would write more.
        # Only when there are more (or text holds "null") are the floats
        # checked one by one (they are top-level fields: claims hold text).
        # json.dumps escapes DEL (\x7f) too; orjson writes it as it is.
        plain = body.isascii() and b"\x7f" not in body
        if plain and (body.count(b"null") == values.count(None)
                      or all(type(value) is not float or math.isfinite(value)
                             for value in values)):
            return body
    fields = attrs.asdict(record)
    fields["prev"] = previous
    return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("ascii")


_READERS: dict[type, Callable[[Any], dict[str, Any]]] = {}


def _as_dict(value: Any) -> dict[str, Any]:
    """
    A nested attrs value (the claims) for orjson, one level at a time (as
    C{attrs.asdict} would give it): orjson comes back here for any attrs
    value inside it.  Each class's fields are read in C (C{attrgetter}).
    """
    reader = _READERS.get(type(value))
    if reader is None:
        if not attrs.has(type(value)):
            raise TypeError(f"{type(value).__name__} in an audit record")
        names = tuple(field.name for field in attrs.fields(type(value)))
        values = attrgetter(*names, names[0])  # two names or more: always a tuple
        reader = _READERS[type(value)] = lambda v: dict(zip(names, values(v)))
    return reader(value)


def _parse(line: bytes) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("prev"), str):
        raise ChainError("not a JSON audit record with a 'prev' hash")
    return record


@attrs.frozen
class UnkeyedSeal:
    """
    SHA-256 links: C{prev} is the hash of the previous line's bytes.
    """

    keyed = False
    key_id = ""

    def seal(self, record: AuditRecord, previous: str) -> bytes:
        """
        @raise ValueError: the record holds NaN or infinity.
        """
        return _body(record, previous) + b"\n"

    def open(self, line: bytes) -> tuple[dict[str, Any], str]:
        """
        @return: the record and the link the next line must carry.
        @raise ChainError: not a record.
        """
        line = line.rstrip(b"\n")
        return _parse(line), hashlib.sha256(line).hexdigest()

    def link(self, line: bytes) -> str:
        """
        The link the next line must carry, for a line this seal just made.
        """
        return hashlib.sha256(line.rstrip(b"\n")).hexdigest()


@attrs.frozen
class KeyedSeal:
    """
    HMAC-SHA256 links under a secret key (see the module docstring).
    """

    key: bytes = attrs.field(repr=False)
    keyed = True

    @property
    def key_id(self) -> str:
        """
        Names the key in checkpoints without revealing it.
        """
        return hashlib.sha256(b"ssp-audit-key-id:" + self.key).hexdigest()[:16]

    def seal(self, record: AuditRecord, previous: str) -> bytes:
        body = _body(record, previous)
        mac = hmac.new(self.key, body, hashlib.sha256).hexdigest()
        return body[:-1] + b',"mac":"' + mac.encode("ascii") + b'"}\n'

    def open(self, line: bytes) -> tuple[dict[str, Any], str]:
        """
        @raise ChainError: not a record, no MAC, or a MAC the key did not
            make (altered, or written without the key).
        """
        line = line.rstrip(b"\n")
        match = _MAC_SUFFIX.search(line)
        if match is None:
            _parse(line)
            raise ChainError("record has no MAC (written unkeyed, or the MAC was removed)")
        body = line[: match.start()] + b"}"
        expected = hmac.new(self.key, body, hashlib.sha256).hexdigest().encode("ascii")
        if not hmac.compare_digest(expected, match[1]):
            raise ChainError("MAC does not match: record altered, or written with another key")
        return _parse(line), match[1].decode("ascii")

    def link(self, line: bytes) -> str:
        """
        The MAC of a line this seal just made (its last 64 characters
        before C{"}}}}\\n}).
        """
        return line.rstrip(b"\n")[-66:-2].decode("ascii")


@attrs.frozen
class UncheckedSeal:
    """
    For verifying without the key: follows the links (the C{mac} field of a
    keyed line, the SHA-256 of an unkeyed one) without authenticating them.
    """

    keyed = False
    key_id = ""

    def seal(self, record: AuditRecord, previous: str) -> bytes:
        raise TypeError("an unchecked seal only reads")

    def link(self, line: bytes) -> str:
        return self.open(line)[1]

    def open(self, line: bytes) -> tuple[dict[str, Any], str]:
        line = line.rstrip(b"\n")
        match = _MAC_SUFFIX.search(line)
        if match is None:
            return UnkeyedSeal().open(line)
        return _parse(line), match[1].decode("ascii")


def read_key(path: Path) -> bytes:
    """
    The chain key from a file (surrounding whitespace ignored, so a hex
    key written by C{openssl rand -hex 32} works as it is).

    @raise ValueError: shorter than L{MIN_KEY_BYTES}.
    @raise OSError: unreadable.
    """
    key = path.read_bytes().strip()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"{path}: an audit key needs at least {MIN_KEY_BYTES} bytes")
    return key


def order(path: Path) -> tuple[str, int]:
    """
    Chain order of an audit file: by day, then sequence as an integer.
    """
    match = _NAME.match(path.name)
    assert match is not None
    return match[1], int(match[2])


def stem(path: Path) -> str:
    """
    The name a file had when written (C{.gz} of an archived one removed):
    the name checkpoints use.
    """
    return path.name.removesuffix(".gz")


def is_audit_file(path: Path) -> bool:
    return bool(_NAME.match(path.name))


def audit_files(directory: Path) -> list[Path]:
    """
    The audit files of one chain directory, archived (C{.gz}) or not,
    oldest first.  Were a file present both ways (an archive interrupted),
    the plain one counts.
    """
    found: dict[str, Path] = {}
    for path in directory.iterdir():
        if _NAME.match(path.name) and path.is_file():
            if stem(path) not in found or not path.name.endswith(".gz"):
                found[stem(path)] = path
    return sorted(found.values(), key=order)


def chains(paths: Sequence[Path]) -> dict[Path, list[Path]]:
    """
    The chains in a set of paths, each with its files in chain order.  A
    directory is a chain; its C{worker-K} subdirectories (C{--workers})
    are chains of their own.  Loose files form one chain together (put in
    chain order when all are named like audit files).
    """
    found: dict[Path, list[Path]] = {}
    loose: list[Path] = []
    for path in paths:
        if not path.is_dir():
            loose.append(path)
            continue
        files = audit_files(path)
        if files:
            found[path] = files
        for worker in sorted(p for p in path.iterdir() if _WORKER.match(p.name) and p.is_dir()):
            found[worker] = audit_files(worker)
    if loose:
        loose = list(dict.fromkeys(loose))
        if all(_NAME.match(p.name) for p in loose):
            loose.sort(key=order)
        found[Path(loose[0].parent)] = loose
    return found


def open_file(path: Path) -> IO[bytes]:
    """
    An audit file opened for reading, decompressing an archived one.
    """
    if path.name.endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]  # a binary file
    return path.open("rb")


def read_records(paths: Sequence[Path]) -> Iterator[dict[str, Any]]:
    """
    Every record of every chain in C{paths} (chain after chain, each in
    order).  An incomplete final line (being written, or torn by a crash)
    is skipped.

    @raise ValueError: naming file and line of a line that is not a record.
    """
    for files in chains(paths).values():
        for index, path in enumerate(files):
            with open_file(path) as f:
                for number, raw in enumerate(f, 1):
                    if not raw.endswith(b"\n") and index == len(files) - 1:
                        break
                    try:
                        record = json.loads(raw)
                    except ValueError:
                        record = None
                    if not isinstance(record, dict):
                        raise ValueError(f"{path}:{number}: not a JSON audit record")
                    yield record


def lines_from_end(fd: int, size: int) -> Iterator[tuple[int, bytes]]:
    """
    The complete lines of a file, last first, each with the offset just
    past its newline (a torn final line is skipped), reading backwards in
    blocks: the newest lines of a large file cost one read.
    """
    position, data = size, b""

    def earlier() -> bytes:
        nonlocal position
        start = max(0, position - _BLOCK)
        block, position = os.pread(fd, position - start, start), start
        return block

    while b"\n" not in data:
        if position == 0:
            return
        data = earlier() + data
    data = data[: data.rfind(b"\n") + 1]
    while data:
        previous = data.rfind(b"\n", 0, len(data) - 1)
        if previous < 0 and position > 0:
            data = earlier() + data
            continue
        yield position + len(data), data[previous + 1 : -1]
        data = data[: previous + 1]
