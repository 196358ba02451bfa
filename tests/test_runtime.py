"""
Tests for L{ssp.runtime}.
"""

from __future__ import annotations

import gc
import weakref

from twisted.trial.unittest import TestCase

from ssp import runtime


class SettleHeapTests(TestCase):
    """
    L{runtime.settle_heap} and L{runtime.thaw}; each test leaves the
    process's collector as it found it.
    """

    def setUp(self) -> None:
        threshold = gc.get_threshold()
        self.addCleanup(gc.set_threshold, *threshold)
        self.addCleanup(gc.unfreeze)

    def test_freezes_and_raises_young_threshold(self) -> None:
        """
        After L{runtime.settle_heap} the objects alive at start-up are out
        of the collector's view and young collections are rarer.
        """
        survivor = [object()]
        runtime.settle_heap()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertEqual(gc.get_threshold()[0], runtime.YOUNG_THRESHOLD)
        self.assertFalse(any(o is survivor for o in gc.get_objects()))

    def test_refcounted_objects_still_freed(self) -> None:
        """
        Freezing does not stop reference counting: an object created after
        settling and dropped is gone at once.
        """
        class Thing:
            pass

        runtime.settle_heap()
        thing = Thing()
        ref = weakref.ref(thing)
        del thing
        self.assertIsNone(ref())

    def test_reload_garbage_collectable_again(self) -> None:
        """
        A cycle frozen at start-up and dropped later (what a reload
        replaces) is freed by a collection after L{runtime.thaw}.
        """
        class Node:
            pass

        node = Node()
        node.itself = node  # type: ignore[attr-defined]
        ref = weakref.ref(node)
        runtime.settle_heap()
        del node
        gc.collect()
        self.assertIsNotNone(ref())
        runtime.thaw()
        gc.collect()
        self.assertIsNone(ref())
        self.assertEqual(gc.get_freeze_count(), 0)
