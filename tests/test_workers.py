"""
C{twistd ssp --workers N}: the master's supervision with a fake process
reactor, the per-worker configuration, the inherited-socket and
C{SO_REUSEPORT} endpoints, and real C{twistd} masters serving through two
workers, on a shared socket or on one socket each (C{listen.reuse_port}).
Also: two proxy processes sharing one Redis enforce one combined consumer
limit, as several workers or hosts must.
"""

from __future__ import annotations

import fcntl
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import Service
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, serverFromString
from twisted.internet.error import (
    CannotListenError,
    ProcessDone,
    ProcessExitedAlready,
    ProcessTerminated,
)
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from ssp import chain, demo, workers
from ssp.auditcli import main_verify
from ssp.config import ConfigError, ThrottleConfig
from ssp.pki import DevelopmentPKI
from ssp.report import main_report
from ssp.verify import verify_files
from tests import redis
from tests.ports import free_port
from tests.support import ENDPOINT, ROOT, Consumer, Provider, audit_key, pki, spine_headers
from tests.support import Proxy as InProcessProxy
from tests.test_crash import TWISTD, wait_listening, write_config

# Unit tests: the master against a fake reactor.


@attrs.define
class FakeProcess:
    pid: int
    signals: list[str] = attrs.Factory(list)
    ended: bool = False

    def signalProcess(self, name: str) -> None:
        if self.ended:
            raise ProcessExitedAlready()
        self.signals.append(name)


@attrs.define
class Spawned:
    protocol: Any
    args: list[str]
    env: dict[str, str]
    fds: dict[int, Any]
    process: FakeProcess

    @property
    def worker(self) -> int:
        return int(self.args[self.args.index("--worker") + 1])

    def end(self, reason: Exception) -> None:
        self.process.ended = True
        self.protocol.processEnded(Failure(reason))


class ProcessReactor(MemoryReactorClock):
    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []

    def spawnProcess(self, protocol, executable, args, env=None, path=None, uid=None, gid=None,
                     usePTY=False, childFDs=None):
        assert executable == args[0]
        process = FakeProcess(1000 + len(self.spawned))
        self.spawned.append(Spawned(protocol, list(args), env, childFDs, process))
        protocol.makeConnection(process)
        return process


@implementer(IListeningPort)
class FakePort:
    def __init__(self, host: Any = None) -> None:
        self.host = host or IPv4Address("TCP", "127.0.0.1", 8443)
        self.reading, self.closed = True, False

    def fileno(self) -> int:
        return 42

    def getHost(self) -> Any:
        return self.host

    def startListening(self) -> None:
        pass

    def stopReading(self) -> None:
        self.reading = False

    def stopListening(self) -> Deferred[None]:
        self.closed = True
        return succeed(None)


@attrs.define
class FakeEndpoint:
    port: FakePort = attrs.Factory(FakePort)
    factory: Any = None

    def listen(self, factory: Any) -> Deferred[FakePort]:
        self.factory = factory
        return succeed(self.port)


class FailingEndpoint:
    def listen(self, factory: Any) -> Deferred[Any]:
        return fail(CannotListenError("", 443, "in use"))


class RecordingNotifier(Service):
    def __init__(self) -> None:
        self.sent: list[str] = []

    def ready(self) -> None:
        self.sent.append("READY=1")

    def reloading(self) -> None:
        self.sent.append("RELOADING=1")

    def stopping(self) -> None:
        self.sent.append("STOPPING=1")


def master(count: int = 2, environ: dict[str, str] | None = None, endpoint: Any = None,
           notifier: Any = None) -> tuple[workers.Master, ProcessReactor, FakeEndpoint]:
    fake = ProcessReactor()
    endpoint = endpoint or FakeEndpoint()
    supervisor = workers.Master(fake, endpoint, count,
                                lambda listen: ["--config=/etc/ssp.toml", f"--listen={listen}"],
                                drain_timeout=30.0, environ=environ or {"PATH": "/bin"},
                                backoff=workers.Backoff(initial=0.5, maximum=4.0,
                                                        stable_after=10.0),
                                notifier=notifier)
    return supervisor, fake, endpoint


class MasterTests(unittest.TestCase):
    def test_binds_once_and_never_accepts(self):
        """
        The master listens through the configured endpoint, stops reading
        at once, and passes the socket to every worker as fd 3, with the
        endpoint string that adopts it.
        """
        supervisor, fake, endpoint = master()
        supervisor.privilegedStartService()
        supervisor.startService()
        self.assertFalse(endpoint.port.reading)
        self.assertIsNone(endpoint.factory.buildProtocol(None))
        self.assertEqual([s.worker for s in fake.spawned], [0, 1])
        for spawned in fake.spawned:
            self.assertEqual(spawned.fds, {0: "w", 1: "r", 2: "r", 3: 42, 4: "r"})
            self.assertIn("--listen=ssp-inherit:fd=3:domain=INET", spawned.args)
            self.assertIn("--config=/etc/ssp.toml", spawned.args)
            self.assertEqual(spawned.args[spawned.args.index("--logger") + 1],
                             "ssp.workers.worker_observer")
        self.assertEqual(supervisor.pids(), {0: 1000, 1: 1001})

    def test_worker_environment(self):
        """
        Socket activation and sd_notify variables are the master's alone.
        """
        supervisor, fake, _ = master(environ={
            "PATH": "/bin", "PYTHONPATH": "/srv", "LISTEN_PID": "1", "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "ssp-https", "NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "5",
            "WATCHDOG_PID": "1",
        })
        supervisor.startService()
        self.assertEqual(fake.spawned[0].env, {"PATH": "/bin", "PYTHONPATH": "/srv"})

    def test_bind_failure_fails_start(self):
        supervisor, fake, _ = master(endpoint=FailingEndpoint())
        self.assertRaises(CannotListenError, supervisor.privilegedStartService)
        self.assertEqual(fake.spawned, [])

    def test_inherited_domain(self):
        for host, domain in [(IPv6Address("TCP", "::1", 1), "INET6"),
                             (UNIXAddress("/run/ssp.sock"), "UNIX")]:
            self.assertEqual(workers.inherited_endpoint(FakePort(host)),
                             f"ssp-inherit:fd=3:domain={domain}")

    def test_listening_once_every_worker_listens(self):
        supervisor, fake, endpoint = master()
        supervisor.startService()
        ready = supervisor.listening()
        fake.spawned[0].protocol.childDataReceived(4, b"listening\n")
        self.assertNoResult(ready)
        fake.spawned[1].protocol.childDataReceived(4, b"listening\n")
        self.assertIs(self.successResultOf(ready), endpoint.port)

    def test_dead_worker_replaced_at_once_after_a_stable_run(self):
        supervisor, fake, _ = master()
        supervisor.startService()
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        fake.advance(60)
        fake.spawned[0].end(ProcessTerminated(signal=9))
        fake.advance(0)
        self.assertEqual([s.worker for s in fake.spawned], [0, 1, 0])
        self.assertEqual(supervisor.pids(), {0: 1002, 1: 1001})
        died = [e for e in logged if e["log_level"] is LogLevel.error]
        self.assertEqual((died[0]["worker"], died[0]["pid"], died[0]["status"]),
                         (0, 1000, "signal 9"))

    def test_crash_loop_backs_off(self):
        """
        A worker that keeps dying young is replaced after 0.5, 1, 2, 4, 4
        seconds; a stable run resets the delay.
        """
        supervisor, fake, _ = master(count=1)
        supervisor.startService()
        for delay in [0.5, 1, 2, 4, 4]:
            count = len(fake.spawned)
            fake.spawned[-1].end(ProcessDone(0))
            fake.advance(delay - 0.01)
            self.assertEqual(len(fake.spawned), count)
            fake.advance(0.01)
            self.assertEqual(len(fake.spawned), count + 1)
        fake.advance(10)
        fake.spawned[-1].end(ProcessDone(0))
        fake.advance(0)
        self.assertEqual(len(fake.spawned), 7)

    def test_reload_forwards_sighup_to_serving_workers(self):
        supervisor, fake, _ = master()
        supervisor.startService()
        fake.spawned[1].protocol.childDataReceived(4, b"listening\n")
        supervisor.reload()
        self.assertEqual([s.process.signals for s in fake.spawned], [[], ["HUP"]])

    def test_stop_closes_the_socket_and_waits_for_the_workers(self):
        supervisor, fake, endpoint = master()
        supervisor.startService()
        stopped = supervisor.stopService()
        self.assertTrue(endpoint.port.closed)
        self.assertEqual([s.process.signals for s in fake.spawned], [["TERM"], ["TERM"]])
        fake.spawned[0].end(ProcessTerminated(signal=15))
        self.assertNoResult(stopped)
        fake.spawned[1].end(ProcessDone(0))
        self.successResultOf(stopped)
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 2)
        self.assertEqual(fake.getDelayedCalls(), [])

    def test_stop_kills_what_outlives_the_drain_timeout(self):
        supervisor, fake, _ = master()
        supervisor.startService()
        stopped = supervisor.stopService()
        fake.spawned[0].end(ProcessDone(0))
        fake.advance(34.9)
        self.assertEqual(fake.spawned[1].process.signals, ["TERM"])
        fake.advance(0.1)
        self.assertEqual(fake.spawned[1].process.signals, ["TERM", "KILL"])
        fake.spawned[1].end(ProcessTerminated(signal=9))
        self.successResultOf(stopped)

    def test_service_manager_notifications(self):
        """
        READY=1 once every worker listens, around a reload, STOPPING=1 at
        once on stop; the notifier (and its watchdog) runs until the
        workers are gone.
        """
        notifier = RecordingNotifier()
        supervisor, fake, _ = master(notifier=notifier)
        supervisor.startService()
        self.assertTrue(notifier.running)
        fake.spawned[0].protocol.childDataReceived(4, b"listening\n")
        self.assertEqual(notifier.sent, [])
        fake.spawned[1].protocol.childDataReceived(4, b"listening\n")
        supervisor.reload()
        stopped = supervisor.stopService()
        self.assertEqual(notifier.sent, ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"])
        self.assertTrue(notifier.running)
        for spawned in fake.spawned:
            spawned.end(ProcessTerminated(signal=15))
        self.successResultOf(stopped)
        self.assertFalse(notifier.running)

    def test_stop_cancels_a_pending_replacement(self):
        supervisor, fake, _ = master(count=1)
        supervisor.startService()
        fake.spawned[0].end(ProcessDone(1))
        self.successResultOf(supervisor.stopService())
        fake.advance(60)
        self.assertEqual(len(fake.spawned), 1)


class ReusePortMasterTests(unittest.TestCase):
    """
    With a L{workers.ReusePortEndpoint} the master binds nothing: each
    worker listens on the C{ssp-reuseport:} endpoint itself.
    """

    def test_workers_bind_their_own_sockets(self):
        port = free_port()
        endpoint = workers.ReusePortEndpoint(reactor, port, "127.0.0.1")
        supervisor, fake, _ = master(endpoint=endpoint)
        supervisor.privilegedStartService()
        supervisor.startService()
        self.assertIsNone(supervisor.port)
        for spawned in fake.spawned:
            self.assertEqual(spawned.fds, {0: "w", 1: "r", 2: "r", 4: "r"})
            self.assertIn(f"--listen=ssp-reuseport:{port}:interface=127.0.0.1:backlog=50",
                          spawned.args)
        ready = supervisor.listening()
        for spawned in fake.spawned:
            spawned.protocol.childDataReceived(4, b"listening\n")
        self.assertIsNone(self.successResultOf(ready))
        fake.advance(60)
        fake.spawned[1].end(ProcessTerminated(signal=9))
        fake.advance(0)
        self.assertEqual(fake.spawned[-1].fds, {0: "w", 1: "r", 2: "r", 4: "r"})
        stopped = supervisor.stopService()
        self.assertEqual([s.process.signals for s in fake.spawned], [["TERM"], [], ["TERM"]])
        fake.spawned[0].end(ProcessDone(0))
        fake.spawned[2].end(ProcessDone(0))
        self.successResultOf(stopped)

    def test_start_fails_if_the_workers_could_not_bind(self):
        """
        The master tries the bind first (without listening), so a taken
        port fails its start instead of every worker's, in a loop.
        """
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = workers.ReusePortEndpoint(reactor, taken.getsockname()[1], "127.0.0.1")
        supervisor, fake, _ = master(endpoint=endpoint)
        supervisor.privilegedStartService()
        self.assertRaises(CannotListenError, supervisor.startService)
        self.assertEqual(fake.spawned, [])


class RelayTests(unittest.TestCase):
    def setUp(self):
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def test_worker_records_keep_level_and_namespace(self):
        supervisor, fake, _ = master()
        supervisor.startService()
        protocol = fake.spawned[1].protocol
        line = json.dumps({"level": "warn", "namespace": "ssp.audit", "text": "disk {full}"})
        protocol.childDataReceived(1, line[:10].encode())
        protocol.childDataReceived(1, line[10:].encode() + b"\n")
        (event,) = [e for e in self.logged if e.get("worker") == 1 and "text" in e]
        self.assertEqual((event["log_level"], event["log_namespace"], event["text"]),
                         (LogLevel.warn, "ssp.audit", "disk {full}"))
        self.assertIn("[worker 1] disk {full}", _text(event))

    def test_raw_output_and_a_final_partial_line(self):
        supervisor, fake, _ = master()
        supervisor.startService()
        spawned = fake.spawned[0]
        spawned.protocol.childDataReceived(2, b"Traceback (most recent call last):\nboom")
        spawned.end(ProcessDone(1))
        relayed = [(e["log_level"], e["text"]) for e in self.logged if e.get("worker") == 0
                   and "text" in e]
        self.assertEqual(relayed, [(LogLevel.warn, "Traceback (most recent call last):"),
                                   (LogLevel.warn, "boom")])

    def test_worker_observer_writes_one_json_line_per_event(self):
        out = io.StringIO()
        observer = workers.worker_observer(out)
        log = Logger(namespace="ssp.x", observer=observer)
        log.info("hello {who}", who="there")
        try:
            raise ZeroDivisionError("no")
        except ZeroDivisionError:
            log.failure("it {broke}", broke="broke")
        first, second = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(first, {"level": "info", "namespace": "ssp.x", "text": "hello there"})
        self.assertEqual(second["level"], "critical")
        self.assertIn("ZeroDivisionError", second["text"])


def _text(event: dict[str, Any]) -> str:
    from twisted.logger import formatEvent

    return formatEvent(event)


class WorkerConfigTests(unittest.TestCase):
    def test_admin_endpoint_per_worker(self):
        cases = [
            ("tcp:8081:interface=127.0.0.1", "tcp:8083:interface=127.0.0.1"),
            ("tcp:interface=127.0.0.1:port=8081", "tcp:interface=127.0.0.1:port=8083"),
            (r"tcp6:8081:interface=\:\:1", r"tcp6:8083:interface=\:\:1"),
            ("tcp:0", "tcp:0"),
            ("unix:/run/ssp/admin.sock:mode=600", "unix:/run/ssp/admin.sock.2:mode=600"),
            ("unix:address=/run/a", "unix:address=/run/a.2"),
            ("", ""),
            (None, None),
        ]
        self.assertEqual([workers.admin_endpoint(e, 2) for e, _ in cases], [w for _, w in cases])
        self.assertEqual(workers.admin_endpoint("systemd:domain=INET:index=1", 0),
                         "systemd:domain=INET:index=1")
        error = self.assertRaises(ConfigError, workers.admin_endpoint,
                                  "systemd:domain=INET:index=1", 1)
        self.assertIn("admin.endpoint", str(error))
        self.assertRaises(ConfigError, workers.admin_endpoint, "tcp:http", 1)

    def test_worker_config(self):
        config = demo.demo_config(ROOT, DevelopmentPKI(ROOT / "certs"), 1)
        config = attrs.evolve(config, listen=attrs.evolve(config.listen, workers=4))
        mine = workers.worker_config(config, 3)
        self.assertEqual(mine.audit.directory, config.audit.directory / "worker-3")
        self.assertEqual(mine.admin.endpoint, "tcp:8084:interface=127.0.0.1")
        self.assertEqual(mine.listen.workers, 1)
        self.assertEqual(mine.listen.endpoint, config.listen.endpoint)

    def test_master_endpoint(self):
        """
        Shared by default; with reuse_port a C{tcp:} endpoint becomes the
        same address with C{SO_REUSEPORT}, for every worker to bind.
        """
        config = demo.demo_config(ROOT, DevelopmentPKI(ROOT / "certs"), 1)

        def endpoint(listen: str, reuse: bool = True) -> Any:
            changed = attrs.evolve(config.listen, endpoint=listen, reuse_port=reuse)
            return workers.master_endpoint(reactor, attrs.evolve(config, listen=changed))

        self.assertNotIsInstance(endpoint("tcp:8443", reuse=False), workers.ReusePortEndpoint)
        self.assertEqual(endpoint(r"tcp:8443:interface=\:\:1:backlog=10"),
                         workers.ReusePortEndpoint(reactor, 8443, "::1", 10))
        self.assertEqual(endpoint("tcp:interface=127.0.0.1:port=8443").description(),
                         "ssp-reuseport:8443:interface=127.0.0.1:backlog=50")
        for refused in ["systemd:domain=INET:name=ssp-https", "tcp6:8443", "unix:/run/ssp"]:
            error = self.assertRaises(ConfigError, endpoint, refused)
            self.assertIn("listen.reuse_port: needs a tcp: listen.endpoint", str(error))
            self.assertIn(refused, str(error))
        self.assertIn("not 0", str(self.assertRaises(ConfigError, endpoint, "tcp:0")))
        # A malformed endpoint is refused when the configuration is built.
        self.assertIn("'endpoint' invalid endpoint 'tcp:http'",
                      str(self.assertRaises(ValueError, endpoint, "tcp:http")))

    def test_memory_store_warns_with_several_workers(self):
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        config = demo.demo_config(ROOT, DevelopmentPKI(ROOT / "certs"), 1)
        workers.per_worker_warning(config, 1)
        workers.per_worker_warning(attrs.evolve(config, throttle=ThrottleConfig(store="redis")), 2)
        self.assertEqual(len(logged), 0)
        workers.per_worker_warning(config, 3)
        self.assertIn("per worker", _text(logged[0]))
        self.assertEqual(logged[0]["log_level"], LogLevel.warn)


class InheritedEndpointTests(unittest.TestCase):
    def test_parse(self):
        endpoint = serverFromString(reactor, "ssp-inherit:fd=7:domain=INET6")
        self.assertIsInstance(endpoint, AdoptedStreamServerEndpoint)
        self.assertEqual((endpoint.fileno, endpoint.addressFamily), (7, socket.AF_INET6))
        self.assertRaises(ValueError, serverFromString, reactor, "ssp-inherit:fd=7:domain=NOPE")

    async def test_serves_on_the_inherited_socket(self):
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        self.addCleanup(listener.close)

        class Greet(Protocol):
            def connectionMade(self):
                self.transport.write(b"hello")
                self.transport.loseConnection()

        endpoint = serverFromString(reactor, f"ssp-inherit:fd={os.dup(listener.fileno())}")
        port = await endpoint.listen(Factory.forProtocol(Greet))
        self.addCleanup(port.stopListening)
        self.assertEqual(port.getHost().port, listener.getsockname()[1])

        def fetch() -> bytes:
            with socket.create_connection(listener.getsockname(), timeout=5) as s:
                return s.recv(10)

        self.assertEqual(await deferToThread(fetch), b"hello")


class _Hangup(Protocol):
    def connectionMade(self) -> None:
        self.transport.loseConnection()


class _Counting(Factory):
    protocol = _Hangup

    def __init__(self) -> None:
        self.count = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.count += 1
        return super().buildProtocol(addr)


class ReusePortEndpointTests(unittest.TestCase):
    def listen(self, port: int) -> tuple[Any, _Counting]:
        factory = _Counting()
        listening = self.successResultOf(
            workers.ReusePortEndpoint(reactor, port, "127.0.0.1").listen(factory))
        self.addCleanup(listening.stopListening)
        return listening, factory

    async def burst(self, port: int, count: int) -> None:
        def connect() -> list[socket.socket]:
            return [socket.create_connection(("127.0.0.1", port), timeout=5)
                    for _ in range(count)]

        for client in await deferToThread(connect):
            self.addCleanup(client.close)

    async def test_each_socket_takes_a_share(self):
        """
        Every socket listening on the port gets a share of a burst, by
        hash: two that accept split it; one that never accepts, as a
        master's would not, keeps its share queued, which is why the
        master binds nothing with reuse_port.  The chance that 32
        connections leave one socket fewer than 4 is below 1e-5.
        """
        port = free_port()
        (_, first), (second_port, second) = self.listen(port), self.listen(port)
        await self.burst(port, 32)
        for _ in range(500):
            if first.count + second.count == 32:
                break
            await _tick()
        self.assertEqual(first.count + second.count, 32)
        self.assertGreaterEqual(min(first.count, second.count), 4, (first.count, second.count))

        second_port.stopReading()
        queued, before = [], first.count
        await self.burst(port, 32)
        second_port.socket.setblocking(False)
        for _ in range(500):
            try:
                while True:
                    queued.append(second_port.socket.accept()[0])
            except BlockingIOError:
                pass
            if first.count - before + len(queued) == 32:
                break
            await _tick()
        for connection in queued:
            connection.close()
        self.assertEqual(first.count - before + len(queued), 32)
        self.assertGreaterEqual(len(queued), 4)

    def test_a_port_taken_without_reuse_port(self):
        taken = socket.socket()
        self.addCleanup(taken.close)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = workers.ReusePortEndpoint(reactor, taken.getsockname()[1], "127.0.0.1")
        self.failureResultOf(endpoint.listen(_Counting()), CannotListenError)
        self.assertRaises(CannotListenError, endpoint.probe)


class _Recorder:
    """
    The real reactor, except that stopping and start-up hooks are recorded.
    """

    def __init__(self) -> None:
        self.stops = 0
        self.when_running: list[Any] = []

    def stop(self) -> None:
        self.stops += 1

    def callWhenRunning(self, f: Any, *a: Any) -> None:
        self.when_running.append(f)

    def __getattr__(self, name: str) -> Any:
        return getattr(reactor, name)


class StopListeningTests(unittest.TestCase):
    """
    The proxy itself (what each worker runs), over real TLS sockets.
    """

    timeout = 60

    async def test_stop_closes_the_port_at_once_whatever_listeners_returned(self):
        """
        A worker's link and the demo's announcement add callbacks to
        C{listening()} that return nothing; stop still closes the port at
        once, not after the drain, and readiness says so, while the
        request in flight finishes and is audited.
        """
        provider = Provider(self)
        proxy = await InProcessProxy(self, provider).start()
        proxy.service.listening().addCallback(lambda _: None)
        stalled = proxy.consumer().get("stall")
        await _until(lambda: hasattr(provider.resource, "stalled"))
        stopped = proxy.service.stopService()
        await _until(lambda: not proxy.service.readiness()["listening"])
        with self.assertRaises(ConnectionRefusedError):
            await deferToThread(socket.create_connection, ("127.0.0.1", proxy.port), 10)
        self.assertNoResult(stopped)
        provider.resource.stalled.write(b"late")
        provider.resource.stalled.finish()
        self.assertEqual((await stalled).status, 200)
        await stopped
        self.assertEqual([(r.event, r.status) for r in proxy.audit.records],
                         [("authorised", 0), ("completed", 200)])

    async def test_stop_cuts_connections_that_never_became_channels(self):
        """
        A connection accepted before the stop but silent through the drain
        is cut before the audit closes, so it can never bring a request
        that would be answered unaudited (as C{503 AUDIT_UNAVAILABLE}).
        """
        provider = Provider(self)
        proxy = await InProcessProxy(self, provider, listen={"header_timeout": 120.0}).start()
        silent = await deferToThread(socket.create_connection, ("127.0.0.1", proxy.port), 10)
        self.addCleanup(silent.close)
        # The accept queue is FIFO: once a later connection is served, the
        # silent one has been accepted.
        self.assertEqual((await proxy.consumer().get("metadata")).status, 200)
        await proxy.service.stopService()

        def read() -> bytes:
            silent.settimeout(10)
            try:
                return silent.recv(1)
            except ConnectionResetError:
                return b""

        self.assertEqual(await deferToThread(read), b"")


class TrailLockTests(unittest.TestCase):
    async def test_waits_for_the_previous_writer(self):
        """
        While another process (here: another open file) holds a worker's
        audit chain, the worker says so and waits; then it holds the lock.
        """
        directory = Path(self.mktemp())
        directory.mkdir()
        orphan = os.open(directory / workers.TRAIL_LOCK, os.O_RDWR | os.O_CREAT)
        fcntl.flock(orphan, fcntl.LOCK_EX)
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        lock = workers.TrailLock(directory)
        started = deferToThread(lock.privilegedStartService)
        await _until(lambda: any("still open in another process" in _text(e) for e in logged))
        self.assertNoResult(started)
        os.close(orphan)
        await started
        self.addCleanup(os.close, lock._fd)
        other = os.open(directory / workers.TRAIL_LOCK, os.O_RDWR)
        self.addCleanup(os.close, other)
        self.assertRaises(BlockingIOError, fcntl.flock, other, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def test_free_lock_taken_silently(self):
        directory = Path(self.mktemp()) / "worker-1"
        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        lock = workers.TrailLock(directory)
        lock.startService()
        self.addCleanup(os.close, lock._fd)
        self.assertTrue(lock.running)
        self.assertTrue((directory / workers.TRAIL_LOCK).exists())
        self.assertEqual(len(logged), 0)


class WorkerLinkTests(unittest.TestCase):
    def link(self) -> tuple[workers.WorkerLink, _Recorder, Deferred[None], int, int]:
        lifeline_r, lifeline_w = os.pipe()
        status_r, status_w = os.pipe()
        recorder = _Recorder()
        listening: Deferred[None] = Deferred()
        link = workers.WorkerLink(recorder, lambda: listening, stdin=lifeline_r, status=status_w)
        link.startService()
        self.addCleanup(lambda: link._io.loseConnection())
        self.addCleanup(os.close, status_r)
        return link, recorder, listening, lifeline_w, status_r

    async def test_reports_listening_and_stops_when_the_master_goes(self):
        _, recorder, listening, lifeline_w, status_r = self.link()
        listening.callback(None)
        self.assertEqual(await deferToThread(os.read, status_r, 100), b"listening\n")
        os.close(lifeline_w)
        for _ in range(100):
            if recorder.stops:
                break
            await _tick()
        self.assertEqual(recorder.stops, 1)

    async def test_no_stop_when_already_stopping(self):
        link, recorder, _, lifeline_w, _ = self.link()
        link.stopService()
        os.close(lifeline_w)
        for _ in range(20):
            await _tick()
        self.assertEqual(recorder.stops, 0)

    def test_second_stop_signal_is_ignored(self):
        link = workers.WorkerLink(_Recorder(), lambda: Deferred())
        calls = []
        handler = link._once(lambda number, frame: calls.append(number))
        handler(signal.SIGINT, None)
        handler(signal.SIGTERM, None)
        self.assertEqual(calls, [signal.SIGINT])


def _tick() -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, 0.01)


# Integration: real twistd masters.


@attrs.define
class MasterProcess:
    """
    C{twistd ssp} as a master process, its log, and its workers' pids as
    it reports them.
    """

    workdir: Path
    args: list[str]
    environ: dict[str, str] = attrs.Factory(dict)
    activation: socket.socket | None = None
    log_name: str = "twistd.log"
    process: subprocess.Popen | None = None

    @property
    def log(self) -> Path:
        return self.workdir / self.log_name

    def start(self, case: unittest.TestCase) -> None:
        command, fds = TWISTD + ["-n", "--pidfile=", "ssp", *self.args], ()
        if self.activation is not None:
            fds = (self.activation.fileno(),)
            command = [command[0], "-c", ACTIVATE, str(fds[0]), *command[1:]]
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                command, cwd=self.workdir, pass_fds=fds,
                env={**os.environ, "PYTHONPATH": str(ROOT), **self.environ}, stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        case.addCleanup(self.kill)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 30.0) -> list[re.Match]:
        """
        Block until the log matches C{pattern} C{count} times.
        """
        deadline = time.monotonic() + timeout
        while True:
            found = list(re.finditer(pattern, self.text()))
            if len(found) >= count:
                return found
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {count} x {pattern!r} in the log "
                                     f"(exit {self.process.poll()}):\n{self.text()[-4000:]}")
            time.sleep(0.05)

    def pids(self) -> dict[int, int]:
        return {int(m[1]): int(m[2])
                for m in re.finditer(r"Worker (\d+) started, pid (\d+)", self.text())}

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pid in self.pids().values():
            _kill(pid)


# What systemd does for a socket-activated service: the socket as fd 3, and
# LISTEN_PID naming the process it execs (exec keeps the pid).
ACTIVATE = (
    "import os, sys; fd = int(sys.argv[1]); fd == 3 or (os.dup2(fd, 3), os.close(fd)); "
    "os.execve(sys.executable, [sys.executable, *sys.argv[2:]], {**os.environ, "
    "'LISTEN_PID': str(os.getpid()), 'LISTEN_FDS': '1', 'LISTEN_FDNAMES': 'ssp-https'})"
)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _two_free_ports() -> int:
    """
    A port P with P + 1 free too, for two workers' admin listeners.
    """
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
                return port
            except OSError:
                continue


def _completed(audit_dir: Path, event: str = "completed") -> int:
    if not audit_dir.exists():
        return 0
    return sum(1 for r in chain.read_records(chain.audit_files(audit_dir))
               if r["event"] == event)


def _listeners(port: int, pids: list[int]) -> dict[int, int]:
    """
    How many sockets listening on C{port} each of C{pids} holds, after
    checking that they hold all there are.
    """
    inodes = _listen_inodes(port)
    counts = {pid: _held(pid, inodes) for pid in pids}
    assert sum(counts.values()) == len(inodes), (counts, inodes)
    return counts


def _listen_inodes(port: int) -> set[str]:
    """
    The sockets listening on C{port}, as C{/proc/PID/fd} links name them.
    """
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{fields[9]}]")
    return inodes


def _held(pid: int, inodes: set[str]) -> int:
    """
    How many of C{inodes} process C{pid} holds (none once it is gone).
    """
    try:
        links = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
    except FileNotFoundError:
        return 0
    return len(inodes.intersection(links))


def _fetch(connection: http.client.HTTPSConnection, resource: str) -> tuple[int, bytes]:
    """
    One Spine request on C{connection}, left open.
    """
    connection.request("GET", f"/{ENDPOINT}/{resource}", headers=spine_headers())
    response = connection.getresponse()
    return response.status, response.read()


def _get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.status, response.read()


class _Masters:
    """
    A real C{twistd ssp --workers 2} in front of the test provider.
    """

    reuse_port = False
    proxy_protocol = False
    drain_timeout = 30.0
    admin_listeners = True

    def setUp(self):
        self.provider = Provider(self)
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        self.port = free_port()
        self.admin = _two_free_ports()
        self.config = self.workdir / "ssp.toml"
        self.write(agreements=True)

    def write(self, agreements: bool) -> None:
        write_config(self.config, self.port, self.provider.port.getHost().port,
                     self.workdir / "audit")
        text = self.config.read_text()
        if self.admin_listeners:
            text = text.replace('[admin]\nendpoint = ""',
                                f'[admin]\nendpoint = "tcp:{self.admin}:interface=127.0.0.1"')
        if not agreements:
            text = text[:text.index("[[agreements]]")]
        for key in ("reuse_port", "proxy_protocol"):
            if getattr(self, key):
                text = text.replace("\n[listen]\n", f"\n[listen]\n{key} = true\n")
        text = text.replace("\n[listen]\n", f"\n[listen]\ndrain_timeout = {self.drain_timeout}\n")
        self.config.write_text(text)

    def launch(self, log_name: str = "twistd.log", **environ: str) -> MasterProcess:
        proxy = MasterProcess(self.workdir, ["--config", str(self.config), "--workers", "2"],
                              environ, log_name=log_name)
        proxy.start(self)
        return proxy

    async def start(self, **environ: str) -> MasterProcess:
        proxy = self.launch(**environ)
        await deferToThread(proxy.wait_for, r"Worker \d listening", 2)
        return proxy


class WorkersTests(_Masters, unittest.TestCase):
    timeout = 120

    async def test_two_workers_serve_reload_drain_and_stop(self):
        """
        Both workers serve the one port, each with its own audit chain and
        admin listener; SIGHUP reaches both without dropping an in-flight
        request; SIGTERM lets that request finish, then everything exits.
        Only the master talks to systemd.
        """
        manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(manager.close)
        # Abstract namespace: a path under the trial directory can exceed
        # the 108 bytes AF_UNIX allows.
        name = f"ssp-workers-{uuid.uuid4().hex}"
        manager.bind("\0" + name)
        manager.settimeout(10)
        proxy = await self.start(NOTIFY_SOCKET="@" + name)
        self.assertEqual(await deferToThread(manager.recv, 100), b"READY=1")
        self.assertIn("limit applies per worker", proxy.text())
        for k in range(2):
            status, body = await deferToThread(_get, f"http://127.0.0.1:{self.admin + k}/healthz")
            self.assertEqual((status, body), (200, b"ok\n"))
        consumer = Consumer(self.port, pki(), "consumer-0")
        audit_dirs = [self.workdir / "audit" / f"worker-{k}" for k in range(2)]
        for _ in range(200):
            reply = await consumer.get("metadata")
            self.assertEqual(reply.status, 200)
            if all(_completed(d) for d in audit_dirs):
                break
        self.assertTrue(all(_completed(d) for d in audit_dirs), "one worker served everything")
        self.assertEqual(chain.audit_files(self.workdir / "audit"), [])

        stalled = consumer.get("stall")
        for _ in range(500):
            if hasattr(self.provider.resource, "stalled"):
                break
            await _tick()
        self.write(agreements=False)
        os.kill(proxy.process.pid, signal.SIGHUP)
        await deferToThread(proxy.wait_for, r"\[worker \d\] Configuration reloaded", 2)
        self.assertEqual([await deferToThread(manager.recv, 100) for _ in range(2)],
                         [b"RELOADING=1", b"READY=1"])
        self.assertEqual(sorted(re.findall(r"\[worker (\d)\] Configuration reloaded",
                                           proxy.text())), ["0", "1"])
        self.assertNotIn("takes effect on restart", proxy.text())
        refused = await consumer.get("metadata")
        self.assertEqual(refused.status, 403)

        os.kill(proxy.process.pid, signal.SIGTERM)
        await deferToThread(proxy.wait_for, r"\[worker \d\] Received SIGTERM", 2)
        self.assertIsNone(proxy.process.poll(), "master left before the workers drained")
        self.provider.resource.stalled.write(b"late")
        self.provider.resource.stalled.finish()
        reply = await stalled
        self.assertEqual((reply.status, reply.body), (200, b"late"))
        self.assertEqual(await deferToThread(proxy.process.wait, 30), -signal.SIGTERM)
        self.assertEqual([pid for pid in proxy.pids().values() if _alive(pid)], [])
        self.assertNotIn("Traceback", proxy.text())
        self.assertEqual(await deferToThread(manager.recv, 100), b"STOPPING=1")
        manager.setblocking(False)
        self.assertRaises(BlockingIOError, manager.recv, 100)

    async def test_audit_verify_and_report_read_the_worker_layout(self):
        """
        C{ssp audit verify DIR} checks each C{worker-K} chain on its own
        against the key and the shared anchor, C{ssp report DIR} merges
        them; a deleted worker chain is caught (issue 18).
        """
        proxy = await self.start()
        consumer = Consumer(self.port, pki(), "consumer-0")
        audit_dir = self.workdir / "audit"
        served = 0
        while not all(_completed(audit_dir / f"worker-{k}") for k in range(2)):
            self.assertEqual((await consumer.get("metadata")).status, 200)
            served += 1
            self.assertLess(served, 200, "one worker served everything")
        os.kill(proxy.process.pid, signal.SIGTERM)
        self.assertEqual(await deferToThread(proxy.process.wait, 30), -signal.SIGTERM)
        check = ["--key", str(audit_key()), "--anchor", str(self.workdir / "audit-anchor.jsonl")]
        out = io.StringIO()
        self.assertEqual(main_verify([str(audit_dir), *check], out), 0, out.getvalue())
        self.assertEqual(out.getvalue().count("chain intact"), 2)
        workers_given = [str(audit_dir / f"worker-{k}") for k in range(2)]
        self.assertEqual(main_verify([*workers_given, *check], io.StringIO()), 0)
        out = io.StringIO()
        self.assertEqual(main_report([str(audit_dir), "--format", "json"], out), 0)
        [total] = [row for row in json.loads(out.getvalue()) if row["scope"] == "total"]
        self.assertEqual(total["requests"], served)
        shutil.rmtree(audit_dir / "worker-1")
        out = io.StringIO()
        self.assertEqual(main_verify([str(audit_dir), *check], out), 1)
        self.assertIn("a worker's trail was deleted", out.getvalue())

    async def test_killed_worker_is_replaced(self):
        proxy = await self.start()
        before = proxy.pids()
        os.kill(before[0], signal.SIGKILL)
        consumer = Consumer(self.port, pki(), "consumer-0")
        statuses = [(await consumer.get("metadata")).status for _ in range(10)]
        self.assertEqual(statuses, [200] * 10)
        await deferToThread(proxy.wait_for, r"Worker 0 listening", 2)
        self.assertIn(f"Worker 0 (pid {before[0]}) died: signal 9", proxy.text())
        after = proxy.pids()
        self.assertNotEqual(after[0], before[0])
        self.assertEqual(after[1], before[1])
        self.assertEqual((await consumer.get("metadata")).status, 200)


class ReusePortWorkersTests(_Masters, unittest.TestCase):
    timeout = 120
    reuse_port = True
    proxy_protocol = True

    def connect(self, source: int) -> http.client.HTTPSConnection:
        """
        A connection from consumer C{203.0.113.<source>}, as a balancer
        in front would announce it with the PROXY protocol.
        """
        return self.https(socket.create_connection(("127.0.0.1", self.port), timeout=30),
                          source)

    def https(self, sock: socket.socket, source: int) -> http.client.HTTPSConnection:
        sock.sendall(f"PROXY TCP4 203.0.113.{source} 127.0.0.1 {40000 + source} 443\r\n"
                     .encode())
        consumer = Consumer(self.port, pki(), "consumer-0")
        connection = consumer.connect()
        connection.sock = consumer.context.wrap_socket(sock, server_hostname="localhost")
        return connection

    async def burst(self, count: int) -> list[int]:
        """
        Open C{count} connections at once, before any is served, then make
        one request on each, keeping them all open; how many requests
        each worker forwarded.
        """
        trails = [self.workdir / "audit" / f"worker-{k}" for k in range(2)]
        before = [_completed(d, "authorised") for d in trails]

        def run() -> list[tuple[int, bytes]]:
            raw = [socket.create_connection(("127.0.0.1", self.port), timeout=30)
                   for _ in range(count)]
            connections = []
            try:
                for n, sock in enumerate(raw):
                    connections.append(self.https(sock, n + 1))
                return [_fetch(connection, "metadata") for connection in connections]
            finally:
                for closing in connections + raw:
                    closing.close()

        self.assertEqual([status for status, _ in await deferToThread(run)], [200] * count)
        return [_completed(d, "authorised") - n for d, n in zip(trails, before)]

    async def test_one_socket_per_worker(self):
        """
        Each worker listens on a socket of its own, the master on none. A
        burst of keep-alive connections is split between the workers
        (fewer than 4 of 32 on one worker has a chance below 1e-5), each
        reading the PROXY header. A worker killed with SIGKILL is
        replaced and takes its share again; SIGTERM drains.
        """
        proxy = await self.start()
        self.assertIn(f"Each worker listens on ssp-reuseport:{self.port}:interface=127.0.0.1",
                      proxy.text())
        self.assertNotIn("Shared socket", proxy.text())
        pids = proxy.pids()
        self.assertEqual(_listeners(self.port, [proxy.process.pid, *pids.values()]),
                         {proxy.process.pid: 0, pids[0]: 1, pids[1]: 1})
        split = await self.burst(32)
        self.assertEqual(sum(split), 32)
        self.assertGreaterEqual(min(split), 4, split)
        consumers = {r["consumer_address"] for r in chain.read_records(
            chain.audit_files(self.workdir / "audit" / "worker-0")
            + chain.audit_files(self.workdir / "audit" / "worker-1"))}
        self.assertEqual(consumers, {f"203.0.113.{n}:{40000 + n}" for n in range(1, 33)})

        os.kill(pids[0], signal.SIGKILL)
        await deferToThread(proxy.wait_for, r"Worker 0 listening", 2)
        self.assertIn(f"Worker 0 (pid {pids[0]}) died: signal 9", proxy.text())
        replaced = proxy.pids()
        self.assertNotEqual(replaced[0], pids[0])
        self.assertEqual(_listeners(self.port, [proxy.process.pid, *replaced.values()]),
                         {proxy.process.pid: 0, replaced[0]: 1, replaced[1]: 1})
        split = await self.burst(32)
        self.assertGreaterEqual(min(split), 4, split)

        def stall() -> tuple[int, bytes]:
            connection = self.connect(99)
            try:
                return _fetch(connection, "stall")
            finally:
                connection.close()

        stalled = deferToThread(stall)
        for _ in range(500):
            if hasattr(self.provider.resource, "stalled"):
                break
            await _tick()
        os.kill(proxy.process.pid, signal.SIGTERM)
        await deferToThread(proxy.wait_for, r"\[worker \d\] Received SIGTERM", 2)
        self.provider.resource.stalled.write(b"late")
        self.provider.resource.stalled.finish()
        self.assertEqual(await stalled, (200, b"late"))
        self.assertEqual(await deferToThread(proxy.process.wait, 30), -signal.SIGTERM)
        self.assertEqual([pid for pid in proxy.pids().values() if _alive(pid)], [])
        self.assertNotIn("Traceback", proxy.text())

    def test_refused_with_socket_activation(self):
        """
        A socket from systemd is one socket: reuse_port cannot split it,
        and says so at start and in --check-config.
        """
        text = self.config.read_text().replace("\n[listen]\n", "\n[listen]\nworkers = 2\n")
        self.config.write_text(text.replace(f"tcp:{self.port}:interface=127.0.0.1",
                                            "systemd:domain=INET:name=ssp-https"))
        for options in (["--workers", "2"], ["--check-config"]):
            ran = subprocess.run(TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(self.config),
                                           *options],
                                 cwd=self.workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                 capture_output=True, text=True, timeout=60, check=False)
            self.assertNotEqual(ran.returncode, 0)
            self.assertIn("listen.reuse_port: needs a tcp: listen.endpoint, not "
                          "'systemd:domain=INET:name=ssp-https'", ran.stdout + ran.stderr)


class _Stopping(_Masters):
    """
    Issue 17: a worker stops listening the moment it is asked to stop (a
    signal to it or to its master) or its master dies, and drains what it
    holds; a proxy restarted at once binds and serves; every answer has
    its audit record, in one unbroken chain per worker.

    The drain timeout is long, so a worker that kept listening while
    draining (as before) is caught listening by every wait below.
    """

    drain_timeout = 300.0
    # Fewer fixed ports to race other processes for.
    admin_listeners = False

    def setUp(self):
        super().setUp()
        self.consumer = Consumer(self.port, pki(), "consumer-0")
        self.answered: list[tuple[str, int]] = []

    async def get(self, path: str = "metadata") -> Any:
        headers = spine_headers()
        reply = await self.consumer.get(path, headers)
        self.answered.append((headers["Ssp-TraceID"], reply.status))
        return reply

    async def served(self, count: int = 4) -> None:
        self.assertEqual([(await self.get()).status for _ in range(count)], [200] * count)

    async def stall(self) -> tuple[Deferred[Any], int]:
        """
        A request the provider holds, and the worker that forwarded it.
        """
        resource = self.provider.resource
        resource.__dict__.pop("stalled", None)
        reply = Deferred.fromCoroutine(self.get("stall"))
        await _until(lambda: hasattr(resource, "stalled"))
        (worker,) = [k for k in range(2) if _holding(self.workdir / "audit" / f"worker-{k}")]
        return reply, worker

    async def release(self, reply: Deferred[Any]) -> None:
        self.provider.resource.stalled.write(b"late")
        self.provider.resource.stalled.finish()
        answer = await reply
        self.assertEqual((answer.status, answer.body), (200, b"late"))

    def unaudited(self) -> set[tuple[str, int]]:
        """
        The answers without their completed record.
        """
        trails = [self.workdir / "audit" / f"worker-{k}" for k in range(2)]
        completed = {(r["trace_id"], r["status"]) for trail in trails if trail.exists()
                     for r in chain.read_records(chain.audit_files(trail))
                     if r["event"] == "completed"}
        return set(self.answered) - completed

    async def assert_audited(self, *masters: MasterProcess) -> None:
        """
        Every answer gets its completed record (written just after the
        answer), each worker's chain is whole, and nothing crashed.
        """
        await _until(lambda: not self.unaudited())
        for k in range(2):
            files = chain.audit_files(self.workdir / "audit" / f"worker-{k}")
            self.assertTrue(not files or verify_files(files).ok, verify_files(files))
        self.assertEqual({status for _, status in self.answered}, {200})
        for master in masters:
            self.assertNotIn("Traceback", master.text())
        for master in masters:
            self.assertNotIn("Traceback", master.text())

    async def test_sigterm_to_a_worker(self):
        """
        The worker stops listening at once and drains its request while
        the other serves; the master replaces it.
        """
        proxy = await self.start()
        pids = proxy.pids()
        stalled, worker = await self.stall()
        os.kill(pids[worker], signal.SIGTERM)
        await _until(lambda: not _held(pids[worker], _listen_inodes(self.port)))
        self.assertTrue(_alive(pids[worker]))
        await self.served()
        await self.release(stalled)
        await deferToThread(proxy.wait_for, rf"Worker {worker} listening", 2)
        await self.served()
        await self.assert_audited(proxy)

    async def test_kill_9_of_the_master_and_restart(self):
        """
        The orphaned workers notice through their lifeline and stop
        listening; a master restarted at once binds (no EADDRINUSE) and
        serves while an orphan still drains its request.  The restarted
        worker with the orphan's number waits for it to close its audit
        chain.
        """
        proxy = await self.start()
        stalled, worker = await self.stall()
        orphans = proxy.pids()
        os.kill(proxy.process.pid, signal.SIGKILL)
        restarted = self.launch("restarted.log")
        await _until(lambda: not any(_held(pid, _listen_inodes(self.port))
                                     for pid in orphans.values()))
        self.assertTrue(_alive(orphans[worker]))
        await deferToThread(restarted.wait_for, r"Worker \d listening")
        await self.served()
        await self.release(stalled)
        await deferToThread(restarted.wait_for, r"Worker \d listening", 2)
        await _until(lambda: not any(_alive(pid) for pid in orphans.values()))
        await self.served()
        await self.assert_audited(proxy, restarted)

    async def test_sigterm_to_the_master(self):
        """
        Nothing listens any more, at once, while the workers drain; then
        everything exits.
        """
        proxy = await self.start()
        stalled, _ = await self.stall()
        os.kill(proxy.process.pid, signal.SIGTERM)
        await _until(lambda: not _listen_inodes(self.port))
        with self.assertRaises(ConnectionRefusedError):
            await deferToThread(socket.create_connection, ("127.0.0.1", self.port), 10)
        self.assertIsNone(proxy.process.poll())
        await self.release(stalled)
        self.assertEqual(await deferToThread(proxy.process.wait, 60), -signal.SIGTERM)
        self.assertEqual([pid for pid in proxy.pids().values() if _alive(pid)], [])
        await self.assert_audited(proxy)


    async def test_sigterm_to_the_master_under_load(self):
        """
        Eight consumers keep requesting (half on keep-alive connections,
        half on a new one each time) through a stop: they meet refused or
        closed connections, never a 503, and every answer is audited (as
        the issue found, 503 C{AUDIT_UNAVAILABLE} without a record came
        from workers still accepting after their audit closed).
        """
        proxy = await self.start()
        results: list[tuple[str, int]] = []
        failures: list[str] = []
        done = threading.Event()

        def consume(keep_alive: bool) -> None:
            connection = None
            while not done.is_set():
                try:
                    if connection is None:
                        connection = self.consumer.connect()
                    headers = spine_headers()
                    connection.request("GET", f"/{ENDPOINT}/metadata", headers=headers)
                    response = connection.getresponse()
                    response.read()
                    results.append((headers["Ssp-TraceID"], response.status))
                    if not keep_alive or response.will_close:
                        connection.close()
                        connection = None
                except OSError as e:
                    failures.append(type(e).__name__)
                    connection = None
                    done.wait(0.01)

        consumers = [threading.Thread(target=consume, args=(n % 2 == 0,)) for n in range(8)]
        for thread in consumers:
            thread.start()
        try:
            await _until(lambda: len(results) >= 50)
            os.kill(proxy.process.pid, signal.SIGTERM)
            self.assertEqual(await deferToThread(proxy.process.wait, 60), -signal.SIGTERM)
            await _until(lambda: len(failures) >= 8)
        finally:
            done.set()
            for thread in consumers:
                await deferToThread(thread.join)
        self.answered = results
        await self.assert_audited(proxy)


class SharedSocketStopTests(_Stopping, unittest.TestCase):
    timeout = 180


class ReusePortStopTests(_Stopping, unittest.TestCase):
    timeout = 180
    reuse_port = True


def _holding(audit_dir: Path) -> bool:
    """
    Whether the worker of C{audit_dir} forwarded a C{stall} request that has
    not completed.
    """
    if not audit_dir.exists():
        return False
    counts = {"authorised": 0, "completed": 0}
    for record in chain.read_records(chain.audit_files(audit_dir)):
        if record["target"].endswith("/stall") and record["event"] in counts:
            counts[record["event"]] += 1
    return counts["authorised"] > counts["completed"]


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    """
    Wait for C{predicate()} to hold, polling; fail after C{timeout} seconds:
    generous, yet below the test consumer's 30-s socket timeout, which
    would end a held request (and the drain) anyway.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"still not {predicate}")
        await _tick()


class ActivatedWorkersTests(unittest.TestCase):
    timeout = 120

    async def test_socket_activation(self):
        """
        Under systemd the master takes the activated socket and the
        workers serve it.
        """
        provider = Provider(self)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        listening = socket.socket()
        self.addCleanup(listening.close)
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        write_config(workdir / "ssp.toml", port, provider.port.getHost().port, workdir / "audit")
        proxy = MasterProcess(workdir, ["--config", str(workdir / "ssp.toml"), "--workers", "2",
                                        "--listen", "systemd:domain=INET:name=ssp-https"],
                              activation=listening)
        proxy.start(self)
        await deferToThread(proxy.wait_for, r"Worker \d listening", 2)
        self.assertIn(f"Shared socket for the workers starting on {port}", proxy.text())
        reply = await Consumer(port, pki(), "consumer-0").get("metadata")
        self.assertEqual(reply.status, 200)


class DemoWorkersTests(unittest.TestCase):
    timeout = 120

    async def test_demo_with_two_workers(self):
        """
        The README demo (no --config) runs under a master too.
        """
        workdir = Path(self.mktemp()).resolve()
        (workdir / "etc").mkdir(parents=True)
        shutil.copy(ROOT / "etc" / "demo-sds.ldif", workdir / "etc")
        port, admin = free_port(), _two_free_ports()
        proxy = MasterProcess(workdir, ["--workers", "2",
                                        "--listen", f"tcp:{port}:interface=127.0.0.1",
                                        "--admin", f"tcp:{admin}:interface=127.0.0.1"])
        proxy.start(self)
        await deferToThread(proxy.wait_for, "SSP demo is listening")
        self.assertIn(f"https://localhost:{port}/", proxy.text())
        consumer = Consumer(port, DevelopmentPKI(workdir / "certs"), "consumer-0")
        reply = await consumer.get("metadata")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.outcome()["resourceType"], "CapabilityStatement")
        for k in range(2):
            self.assertEqual(await deferToThread(_get, f"http://127.0.0.1:{admin + k}/healthz"),
                             (200, b"ok\n"))


class SharedThrottleTests(unittest.TestCase):
    skip = redis.SKIP
    timeout = 120

    async def test_two_processes_one_limit(self):
        server = redis.RedisServer.start_for(self)
        provider = Provider(self)
        ports = []
        for _ in range(2):
            workdir = Path(self.mktemp()).resolve()
            workdir.mkdir()
            port = free_port()
            write_config(workdir / "ssp.toml", port, provider.port.getHost().port,
                         workdir / "audit", extra=f"""
[throttle]
store = "redis"
redis_url = "{server.url}"
[throttle.consumer.default]
rate = 1
period = 3600.0
burst = 3
""")
            log = workdir / "twistd.log"

            def start(workdir=workdir, port=port, log=log):
                with log.open("ab") as out:
                    process = subprocess.Popen(
                        TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(workdir / "ssp.toml")],
                        cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                        stdout=out, stderr=subprocess.STDOUT)
                self.addCleanup(lambda: process.poll() is None and process.kill())
                wait_listening(port, process, log)

            await deferToThread(start)
            ports.append(port)

        statuses = []
        for n in range(6):
            reply = await Consumer(ports[n % 2], pki(), "consumer-0").get("metadata")
            statuses.append(reply.status)
        self.assertEqual(statuses, [200, 200, 200, 429, 429, 429])
        self.assertEqual(len(provider.seen), 3)
