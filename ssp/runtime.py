# -*- test-case-name: tests.test_runtime -*-
"""
Interpreter tuning for a long-running proxy process.

A serving process holds tens of thousands of long-lived objects (modules,
classes, configuration, the directory) that the cyclic garbage collector
would otherwise walk again at every full collection, for nothing: they
live as long as the process.  Each request allocates a few hundred short
lived objects, so young collections also run often.
"""

from __future__ import annotations

import gc

#: allocations between young collections (CPython's default is 700): a
#: request's objects are mostly freed by reference counting before a
#: young collection sees them, so fewer collections promote fewer of them.
YOUNG_THRESHOLD = 10_000


def settle_heap() -> None:
    """
    Once the service is running: collect what start-up left behind, move
    every surviving object out of the collector's view (C{gc.freeze}) and
    make young collections less frequent.  Frozen objects are still freed
    by reference counting; only cycles among them are never collected,
    and start-up objects live for the whole process anyway.
    """
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)


def thaw() -> None:
    """
    After a reload: hand the frozen objects back to the collector.  The
    configuration, directory and TLS contexts a reload replaces were
    frozen; any of them in a reference cycle would otherwise never be
    freed, a leak per C{SIGHUP}.  Full collections walk them again until
    the next restart (the cost L{settle_heap} avoided, not a correctness
    matter).  Nothing happens in a process that never settled.
    """
    if gc.get_freeze_count():
        gc.unfreeze()
