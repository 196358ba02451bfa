"""
Tests for L{ssp.ids}.
"""

from __future__ import annotations

import os
import re

from twisted.trial.unittest import TestCase

from ssp.ids import new_request_id


class RequestIdTests(TestCase):
    def test_shape(self) -> None:
        """
        An id is 32 lower-case hex digits, like C{uuid4().hex}.
        """
        self.assertTrue(re.fullmatch(r"[0-9a-f]{32}", new_request_id()))

    def test_unique_in_process(self) -> None:
        """
        Ids drawn one after another never repeat.
        """
        ids = {new_request_id() for _ in range(10000)}
        self.assertEqual(len(ids), 10000)

    def test_forked_child_draws_a_new_prefix(self) -> None:
        """
        A forked child does not continue its parent's sequence, so two
        workers forked from one process cannot hand out the same id.
        """
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                os.write(write, new_request_id().encode())
            finally:
                os._exit(0)
        os.close(write)
        child = os.read(read, 64).decode()
        os.close(read)
        os.waitpid(pid, 0)
        parent = new_request_id()
        self.assertEqual(len(child), 32)
        self.assertNotEqual(child[:16], parent[:16])
