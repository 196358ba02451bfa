# -*- test-case-name: tests.test_throttle -*-
"""
A real C{redis-server} on loopback, for integration tests of the shared
rate store and end to end.

One server per test, cleaned up by the test::

    class MyTests(TestCase):
        skip = redis.SKIP

        def test_x(self):
            server = redis.RedisServer.start_for(self)
            ... server.url ...

L{RedisServer.stop} kills the server with C{SIGKILL}, as a crash would,
and L{RedisServer.start} brings it back on the same port, empty (nothing
is persisted), to simulate an outage.  L{RedisServer.pause} and
L{RedisServer.resume} stall it with C{SIGSTOP} and C{SIGCONT}: the kernel
still accepts connections, nothing answers.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import attrs
from twisted.trial.unittest import SynchronousTestCase

from tests.ports import free_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"

SKIP: str | None = None
if not os.access(REDIS_SERVER, os.X_OK):
    SKIP = "redis-server not installed (apt-get install redis-server)"




@attrs.define
class RedisServer:
    """
    A C{redis-server} process bound to 127.0.0.1 in its own directory,
    with persistence off.
    """

    directory: Path
    port: int = attrs.field(factory=free_port)
    _process: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)

    @classmethod
    def start_for(cls, testcase: SynchronousTestCase) -> RedisServer:
        """
        Start a server for one test and kill it in the test's clean-up.
        """
        if SKIP:
            raise testcase.skipException(SKIP)
        server = cls(Path(testcase.mktemp()).resolve())
        server.directory.mkdir(parents=True)
        testcase.addCleanup(server.stop)
        server.start()
        return server

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        """
        Start the server and wait until it answers C{PING}.

        @raise RuntimeError: if it exits or does not answer in C{timeout}
            seconds; the message carries its log.
        """
        assert self._process is None, "already running"
        self._process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(self.log),
                "--daemonize", "no",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while not self._pong():
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log = self.log.read_text() if self.log.exists() else "(no log)"
                raise RuntimeError(f"redis-server did not start:\n{log}")
            time.sleep(0.02)

    def pause(self) -> None:
        """
        Stall the server (C{SIGSTOP}); L{resume} or L{stop} ends it.
        """
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """
        Let a paused server run again (C{SIGCONT}).
        """
        assert self._process is not None, "not running"
        self._process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """
        Kill the server (C{SIGKILL}) and reap it; a no-op if not running.
        """
        process, self._process = self._process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()

    def _pong(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(7) == b"+PONG\r\n"
        except OSError:
            return False
