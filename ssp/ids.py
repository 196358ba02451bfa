# -*- test-case-name: tests.test_ids -*-
"""
Request ids: unique without a system call per request.

C{uuid.uuid4()} reads 16 bytes from C{os.urandom} for every id, a system
call on the hot path twice per exchange.  An id here is 64 random bits
drawn once per process (and again in a forked child) followed by a 64-bit
counter: 32 lower-case hex digits like C{uuid4().hex}, unique within the
process and, with overwhelming probability, across processes and
restarts.  Ids only need to tie records together, not to be secret.
"""

from __future__ import annotations

import itertools
import os

_state: tuple[str, itertools.count[int]]


def _reseed() -> None:
    global _state
    _state = (os.urandom(8).hex(), itertools.count())


def new_request_id() -> str:
    """
    A fresh request id (32 hex digits).
    """
    prefix, counter = _state
    return f"{prefix}{next(counter):016x}"


_reseed()
os.register_at_fork(after_in_child=_reseed)
