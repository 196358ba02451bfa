"""
systemd integration: the C{sd_notify} client against real datagram
sockets, the unit files against C{systemd-analyze verify}, and the proxy
run as systemd would run it (an inherited listening socket, a notification
socket, a watchdog) with the test playing the service manager.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, race, succeed
from twisted.internet.protocol import DatagramProtocol, ProcessProtocol
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.trial import unittest

from ssp.config import ListenConfig
from ssp.systemd import SystemdNotifier, notify_address, watchdog_interval
from tests.support import ROOT, Consumer, Provider, pki
from tests.test_crash import TWISTD, write_config

UNITS = ROOT / "etc" / "systemd"


class Manager:
    """
    The service manager's end: a bound C{AF_UNIX} datagram socket.
    """

    def __init__(self, case: unittest.TestCase, abstract: bool = False) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        case.addCleanup(self.socket.close)
        if abstract:
            self.env = f"@ssp-test-{uuid.uuid4().hex}"
            self.socket.bind("\0" + self.env[1:])
        else:
            # Short: AF_UNIX paths are limited to 108 bytes.
            directory = tempfile.mkdtemp(prefix="ssp-sd-")
            case.addCleanup(shutil.rmtree, directory)
            self.env = os.path.join(directory, "notify")
            self.socket.bind(self.env)
        self.socket.setblocking(False)

    def received(self) -> list[bytes]:
        messages = []
        while True:
            try:
                messages.append(self.socket.recv(4096))
            except BlockingIOError:
                return messages


class NotifyAddressTests(unittest.SynchronousTestCase):
    def test_path(self):
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}),
                         "/run/systemd/notify")

    def test_abstract(self):
        self.assertEqual(notify_address({"NOTIFY_SOCKET": "@sd-notify"}), "\0sd-notify")

    def test_unset_or_empty(self):
        self.assertIsNone(notify_address({}))
        self.assertIsNone(notify_address({"NOTIFY_SOCKET": ""}))

    def test_unsupported_kind_is_logged(self):
        with capturedLogs() as events:
            self.assertIsNone(notify_address({"NOTIFY_SOCKET": "vsock:2:9999"}))
            self.assertIsNone(notify_address({"NOTIFY_SOCKET": "@"}))
        self.assertEqual(len(events), 2)
        self.assertIn("vsock:2:9999", events[0]["value"])


class WatchdogIntervalTests(unittest.SynchronousTestCase):
    def test_half_the_period(self):
        self.assertEqual(watchdog_interval({"WATCHDOG_USEC": "30000000"}, 42), 15.0)

    def test_for_this_process(self):
        self.assertEqual(
            watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "42"}, 42), 0.5)

    def test_for_another_process(self):
        self.assertIsNone(
            watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "41"}, 42))

    def test_off(self):
        for value in (None, "", "0", "-5", "ten"):
            environ = {} if value is None else {"WATCHDOG_USEC": value}
            self.assertIsNone(watchdog_interval(environ, 42), value)


class NotifierTests(unittest.TestCase):
    def test_inert_without_a_manager(self):
        clock = Clock()
        notifier = SystemdNotifier(clock, {"WATCHDOG_USEC": "1000000"})
        notifier.startService()
        self.assertFalse(notifier.enabled)
        self.assertIsNone(notifier.interval)
        self.assertFalse(notifier.ready())
        self.assertEqual(clock.getDelayedCalls(), [])
        notifier.stopService()

    def test_lifecycle_messages_to_a_path(self):
        manager = Manager(self)
        notifier = SystemdNotifier(Clock(), {"NOTIFY_SOCKET": manager.env})
        self.assertTrue(notifier.enabled)
        self.assertTrue(notifier.ready())
        self.assertTrue(notifier.reloading())
        self.assertTrue(notifier.ready())
        self.assertTrue(notifier.stopping())
        self.assertEqual(manager.received(),
                         [b"READY=1", b"RELOADING=1", b"READY=1", b"STOPPING=1"])

    def test_abstract_namespace(self):
        manager = Manager(self, abstract=True)
        notifier = SystemdNotifier(Clock(), {"NOTIFY_SOCKET": manager.env})
        self.assertTrue(notifier.notify("STATUS=warming up", "READY=1"))
        self.assertEqual(manager.received(), [b"STATUS=warming up\nREADY=1"])

    def test_watchdog_pings_every_half_period(self):
        manager = Manager(self)
        clock = Clock()
        notifier = SystemdNotifier(
            clock, {"NOTIFY_SOCKET": manager.env, "WATCHDOG_USEC": "4000000",
                    "WATCHDOG_PID": "42"}, pid=42)
        notifier.startService()
        self.assertEqual(manager.received(), [b"WATCHDOG=1"])
        clock.advance(1.9)
        self.assertEqual(manager.received(), [])
        clock.advance(0.1)
        self.assertEqual(manager.received(), [b"WATCHDOG=1"])
        clock.pump([2.0, 2.0])
        self.assertEqual(manager.received(), [b"WATCHDOG=1"] * 2)
        notifier.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(10.0)
        self.assertEqual(manager.received(), [])

    def test_watchdog_meant_for_another_process(self):
        manager = Manager(self)
        clock = Clock()
        notifier = SystemdNotifier(
            clock, {"NOTIFY_SOCKET": manager.env, "WATCHDOG_USEC": "4000000",
                    "WATCHDOG_PID": "41"}, pid=42)
        notifier.startService()
        clock.advance(10.0)
        self.assertEqual(manager.received(), [])
        self.assertEqual(clock.getDelayedCalls(), [])
        notifier.stopService()

    def test_manager_gone_is_logged_not_raised(self):
        manager = Manager(self)
        notifier = SystemdNotifier(Clock(), {"NOTIFY_SOCKET": manager.env})
        manager.socket.close()
        os.unlink(manager.env)
        with capturedLogs() as events:
            self.assertFalse(notifier.ready())
        self.assertEqual([e["notification"] for e in events], ["READY=1"])

    def test_full_queue_never_blocks(self):
        """
        A manager that stops reading fills its queue (C{max_dgram_qlen},
        10 by default); further notifications fail at once instead of
        blocking the reactor thread.
        """
        manager = Manager(self)
        notifier = SystemdNotifier(Clock(), {"NOTIFY_SOCKET": manager.env})
        sent = 0
        with capturedLogs() as events:
            while sent < 10_000 and notifier.notify(f"STATUS={sent}"):
                sent += 1
        self.assertLess(sent, 10_000)
        self.assertIn("Resource temporarily unavailable", str(events[0]["error"]))
        self.assertEqual(manager.received(), [f"STATUS={n}".encode() for n in range(sent)])


def unit_settings(path: Path) -> dict[str, list[str]]:
    """
    C{Key=value} settings of a unit file, continuation lines joined.
    """
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


class UnitFileTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.socket = unit_settings(UNITS / "ssp.socket")
        self.service = unit_settings(UNITS / "ssp.service")

    def test_service_adopts_the_named_socket(self):
        (name,) = self.socket["FileDescriptorName"]
        (listen,) = self.socket["ListenStream"]
        (command,) = self.service["ExecStart"]
        # domain=INET needs an IPv4 socket: a dual-stack one would be AF_INET6.
        self.assertRegex(listen, r"^\d+\.\d+\.\d+\.\d+:\d+$")
        self.assertIn(f"--listen systemd:domain=INET:name={name}", command)

    def test_notify_from_the_main_process(self):
        self.assertEqual(self.service["Type"], ["notify"])
        self.assertEqual(self.service["NotifyAccess"], ["main"])
        self.assertIn("--nodaemon", self.service["ExecStart"][0])

    def test_stop_timeout_exceeds_drain(self):
        """
        systemd's SIGKILL must not cut the drain short, nor the 5 s grace a
        C{--workers} master gives its workers after it.
        """
        (timeout,) = self.service["TimeoutStopSec"]
        self.assertGreater(float(timeout), ListenConfig().drain_timeout + 5)
        self.assertEqual(self.service["KillMode"], ["mixed"])

    def test_both_private_keys_are_credentials(self):
        self.assertEqual(
            sorted(c.split(":")[0] for c in self.service["LoadCredential"]),
            ["audit.key", "ssp-client.key", "ssp.key"],
        )


class SystemdAnalyzeTests(unittest.SynchronousTestCase):
    skip = None if shutil.which("systemd-analyze") else "systemd-analyze is not installed"

    def setUp(self) -> None:
        # verify insists that ExecStart's program exists: point it at one that does.
        self.directory = Path(self.mktemp()).resolve()
        self.directory.mkdir()
        for name in ("ssp.socket", "ssp.service", "ssp-audit.service", "ssp-audit.timer"):
            text = (UNITS / name).read_text()
            for program in ("/opt/ssp/venv/bin/twistd", "/opt/ssp/venv/bin/ssp"):
                text = text.replace(program, shutil.which("true") or "/bin/true")
            (self.directory / name).write_text(text)

    def analyze(self, *arguments: str) -> subprocess.CompletedProcess:
        return subprocess.run(["systemd-analyze", *arguments], cwd=self.directory, check=False,
                              capture_output=True, text=True, timeout=60)

    def test_verify(self):
        """
        No errors and no warnings (unknown keys, unparsable values are
        only warnings to systemd).
        """
        result = self.analyze("verify", str(self.directory / "ssp.socket"),
                              str(self.directory / "ssp.service"))
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_verify_audit_timer(self):
        """
        The daily verify-and-archive service and its timer.
        """
        result = self.analyze("verify", str(self.directory / "ssp-audit.service"),
                              str(self.directory / "ssp-audit.timer"))
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))

    def test_exposure(self):
        """
        The hardening keeps C{systemd-analyze security} at 2.0 or better
        (1.7 when written; 10 is an unconfined service).
        """
        result = self.analyze("security", "--offline=true", "--threshold=20",
                              str(self.directory / "ssp.service"))
        self.assertEqual(result.returncode, 0, result.stdout[-2000:])


# What systemd does between fork and exec, in the process it starts: the
# socket is already fd 3 (childFDs), and LISTEN_PID/WATCHDOG_PID name this
# very process, which exec keeps.
ACTIVATE = (
    "import os, sys; pid = str(os.getpid()); "
    "os.execve(sys.executable, [sys.executable, *sys.argv[1:]], "
    "{**os.environ, 'LISTEN_PID': pid, 'WATCHDOG_PID': pid})"
)
WATCHDOG_USEC = 200_000


class ServiceManager(DatagramProtocol):
    """
    The test's systemd: owns the notification socket (abstract namespace)
    and records what it receives.
    """

    def __init__(self, case: unittest.TestCase) -> None:
        self.address = f"@ssp-test-{uuid.uuid4().hex}"
        self.messages: list[bytes] = []
        self._waiters: list[tuple[bytes, int, Deferred[None]]] = []
        self.port = reactor.listenUNIXDatagram("\0" + self.address[1:], self)
        case.addCleanup(self.port.stopListening)

    def datagramReceived(self, data: bytes, address: Any) -> None:
        self.messages.append(data)
        for waiter in list(self._waiters):
            message, count, d = waiter
            if self.messages.count(message) >= count:
                self._waiters.remove(waiter)
                d.callback(None)

    def wait(self, message: bytes, count: int) -> Deferred[None]:
        if self.messages.count(message) >= count:
            return succeed(None)
        waiter: tuple[bytes, int, Deferred[None]]
        waiter = (message, count, Deferred(lambda _: self._waiters.remove(waiter)))
        self._waiters.append(waiter)
        return waiter[2]

    def drain(self) -> None:
        """
        Read what is queued now, ahead of the reactor.
        """
        while True:
            try:
                self.datagramReceived(self.port.socket.recv(4096), None)
            except BlockingIOError:
                return

    def lifecycle(self) -> list[bytes]:
        return [m for m in self.messages if m != b"WATCHDOG=1"]


class Activated(ProcessProtocol):
    """
    C{twistd ssp} started the way C{etc/systemd/ssp.service} starts it,
    with this test as the service manager.
    """

    def __init__(self, case: unittest.TestCase, listening: socket.socket,
                 manager: ServiceManager, config: Path) -> None:
        self.manager = manager
        self.output = bytearray()
        self.status: BaseException | None = None
        self._ended: list[Deferred[BaseException]] = []
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "ssp-https",
            "NOTIFY_SOCKET": manager.address,
            "WATCHDOG_USEC": str(WATCHDOG_USEC),
        }
        argv = [sys.executable, "-c", ACTIVATE, *TWISTD[1:], "-n", "--pidfile=", "ssp",
                "--config", str(config), "--listen", "systemd:domain=INET:name=ssp-https"]
        reactor.spawnProcess(self, sys.executable, argv, env=env, path=str(config.parent),
                             childFDs={0: "w", 1: "r", 2: "r", 3: listening.fileno()})
        case.addCleanup(self.kill)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output += data

    def processEnded(self, reason: Any) -> None:
        self.status = reason.value
        for d in self._ended:
            d.callback(reason.value)

    def ended(self) -> Deferred[BaseException]:
        """
        Fires with C{ProcessDone} or C{ProcessTerminated} when it exits.
        """
        if self.status is not None:
            return succeed(self.status)
        d: Deferred[BaseException] = Deferred()
        self._ended.append(d)
        return d

    async def notified(self, message: bytes, count: int = 1) -> None:
        """
        Wait until the manager has received C{message} C{count} times.
        """
        waiting = race([self.manager.wait(message, count), self.ended()])
        index, _ = await waiting.addTimeout(30, reactor)
        if index == 1:
            self.manager.drain()
            if self.manager.messages.count(message) < count:
                raise AssertionError(f"exited ({self.status}) before {message!r} x{count}:\n"
                                     + self.output.decode(errors="replace")[-3000:])

    def signal(self, name: str) -> None:
        self.transport.signalProcess(name)

    async def kill(self) -> None:
        if self.status is None:
            self.transport.signalProcess("KILL")
            await self.ended()


class ActivationTests(unittest.TestCase):
    """
    Socket activation end to end: this test binds the port and keeps it,
    as systemd does, and starts real C{twistd ssp} processes on it.
    """

    timeout = 60

    def setUp(self) -> None:
        self.provider = Provider(self)
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        self.config = self.workdir / "ssp.toml"
        write_config(self.config, 0, self.provider.port.getHost().port, self.workdir / "audit")
        self.listening = socket.socket()
        self.addCleanup(self.listening.close)
        self.listening.bind(("127.0.0.1", 0))
        self.listening.listen(64)
        self.consumer = Consumer(self.listening.getsockname()[1], pki(), "consumer-0")
        self.manager = ServiceManager(self)

    def activate(self) -> Activated:
        return Activated(self, self.listening, self.manager, self.config)

    async def test_lifecycle(self):
        """
        READY=1 once serving, watchdog pings, a SIGHUP reload bracketed by
        RELOADING=1/READY=1 that the process survives, STOPPING=1 on SIGTERM.
        """
        proxy = self.activate()
        await proxy.notified(b"READY=1")
        # No retry: at READY=1 the port serves mutual TLS end to end.
        self.assertEqual((await self.consumer.get("metadata")).status, 200)
        await proxy.notified(b"WATCHDOG=1", count=3)

        proxy.signal("HUP")
        await proxy.notified(b"READY=1", count=2)
        self.assertEqual((await self.consumer.get("metadata")).status, 200)
        self.assertIsNone(proxy.status)

        proxy.signal("TERM")
        status = await proxy.ended()
        self.manager.drain()
        self.assertEqual(self.manager.lifecycle(),
                         [b"READY=1", b"RELOADING=1", b"READY=1", b"STOPPING=1"])
        # twistd stops cleanly, then re-raises SIGTERM so the exit status
        # says why; systemd counts death by SIGTERM as a clean exit.
        self.assertEqual(status.signal, 15, proxy.output.decode(errors="replace")[-3000:])

    async def test_backlog_served_after_restart(self):
        """
        Connections that arrive while no process serves the port wait in
        the backlog of the socket systemd keeps, and the next process
        serves them.
        """
        first = self.activate()
        await first.notified(b"READY=1")
        first.signal("TERM")
        await first.ended()

        connections = [self.queue_connection() for _ in range(3)]
        second = self.activate()
        replies = await gatherResults([
            self.consumer.get("metadata", connection=connection) for connection in connections
        ])
        self.assertEqual([reply.status for reply in replies], [200, 200, 200])
        self.assertEqual(len(self.provider.seen), 3)
        await second.notified(b"READY=1", count=2)
        for connection in connections:
            connection.close()
        second.signal("TERM")
        await second.ended()

    def queue_connection(self) -> http.client.HTTPSConnection:
        """
        A connection that completes now, from the kernel's backlog; TLS
        and HTTP wait (in a thread) until a process accepts it.
        """
        raw = socket.create_connection(self.listening.getsockname(), timeout=30)
        connection = self.consumer.connect()
        connection.sock = self.consumer.context.wrap_socket(
            raw, server_hostname="localhost", do_handshake_on_connect=False)
        self.addCleanup(connection.close)
        return connection

    async def test_no_ready_when_startup_fails(self):
        """
        A proxy that cannot load its TLS material exits without READY=1, so
        systemd reports the start as failed instead of routing traffic to it.
        """
        self.config.write_text(self.config.read_text().replace("/proxy.key", "/missing.key"))
        proxy = self.activate()
        status = await proxy.ended()
        self.manager.drain()
        self.assertNotEqual(status.exitCode, 0)
        self.assertIn(b"missing.key: cannot read", proxy.output)
        self.assertNotIn(b"READY=1", self.manager.messages)
