# -*- test-case-name: tests.test_workers -*-
"""
C{twistd ssp --workers N}: N worker processes serving one address.

By default the master binds the configured endpoint once (C{tcp:},
C{systemd:}, any endpoint string), never accepts on it, and hands the
descriptor to each worker as fd 3.  A worker is C{twistd ssp --worker K}
listening on C{ssp-inherit:fd=3} (L{twisted.plugins.ssp_endpoints}), so it
runs the whole proxy unchanged; the workers take turns in C{accept}, and a
burst of new connections can all go to whichever worker wakes first.

With C{listen.reuse_port} (a C{tcp:} endpoint only) the master binds
nothing: each worker listens on C{ssp-reuseport:} (L{ReusePortEndpoint}),
a socket of its own with C{SO_REUSEPORT}, and the kernel picks the socket
of each new connection by a hash of its addresses, so even a burst is
spread evenly.  The master must hold no listening socket then: one it
never accepts on would take its share of the connections.

Per worker K the configuration is adjusted by L{worker_config}: its own
audit chain in C{<audit.directory>/worker-K} (one hash chain must have one
writer; L{TrailLock} keeps it so across a restart) and its own admin
listener on the configured port + K.

A worker stops listening as soon as it is told to stop, by C{SIGTERM} or
by the end of its lifeline, and then drains (L{ssp.service.SSPService}).

Between master and worker::

    fd 0  lifeline, master -> worker: end of file means the master is gone
    fd 1  worker log as JSON lines (L{worker_observer}), fd 2 raw stderr
    fd 3  the shared listening socket (not passed with reuse_port)
    fd 4  status, worker -> master: C{listening\\n} once it serves
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import attrs
from twisted.application.service import IService, MultiService, Service
from twisted.internet import error, tcp
from twisted.internet.abstract import isIPv6Address
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, execute, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import (
    ILogObserver,
    InvalidLogLevelError,
    LogEvent,
    Logger,
    LogLevel,
    eventAsText,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from ssp.config import Config, ConfigError

log = Logger()

INHERITED_FD = 3
STATUS_FD = 4
LISTENING = b"listening\n"
REUSE_PORT = "ssp-reuseport"
TRAIL_LOCK = ".worker.lock"

# What the service manager gave the master alone: a worker must not act on it.
_MASTER_ONLY_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                    "NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
_TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
_UNESCAPED_COLON = re.compile(r"(?<!\\):")


def worker_config(config: Config, worker: int) -> Config:
    """
    The configuration worker C{worker} (from 0) runs with.

    @raise ConfigError: if the admin endpoint cannot be given one address
        per worker.
    """
    return attrs.evolve(
        config,
        listen=attrs.evolve(config.listen, workers=1),
        audit=attrs.evolve(config.audit, directory=config.audit.directory / f"worker-{worker}"),
        admin=attrs.evolve(config.admin, endpoint=admin_endpoint(config.admin.endpoint, worker)),
    )


def admin_endpoint(endpoint: str | None, worker: int) -> str | None:
    """
    Worker C{worker}'s admin endpoint: C{tcp:}/C{tcp6:} on the port plus
    C{worker} (port 0 stays ephemeral), C{unix:} on the path with C{.K}
    appended for K > 0.  Worker 0 keeps the configured address.

    @raise ConfigError: for any other endpoint type.
    """
    if not endpoint or worker == 0:
        return endpoint
    parts = _UNESCAPED_COLON.split(endpoint)
    kind = parts[0]
    if kind in ("tcp", "tcp6"):
        try:
            return ":".join(_shifted(parts, "port", lambda v: str(int(v) + worker if int(v) else 0)))
        except ValueError:
            raise ConfigError(f"admin.endpoint: {endpoint!r}: the port is not a number") from None
    if kind == "unix":
        return ":".join(_shifted(parts, "address", lambda v: f"{v}.{worker}"))
    raise ConfigError(f"admin.endpoint: {endpoint!r} cannot be split over workers; "
                      "use tcp:, tcp6: or unix:")


def _shifted(parts: list[str], name: str, change: Callable[[str], str]) -> list[str]:
    """
    Change the argument C{name}, given as C{name=value} or as the first
    positional argument, as Twisted's endpoint parsers accept both.
    """
    for i, part in enumerate(parts[1:], 1):
        if part.startswith(f"{name}="):
            return parts[:i] + [f"{name}={change(part[len(name) + 1:])}"] + parts[i + 1:]
    for i, part in enumerate(parts[1:], 1):
        if "=" not in part:
            return parts[:i] + [change(part)] + parts[i + 1:]
    raise ConfigError(f"admin.endpoint: {':'.join(parts)!r} has no {name}")


def inherited_endpoint(port: IListeningPort) -> str:
    """
    The endpoint string a worker listens on for the master's C{port}.
    """
    host = port.getHost()
    domain = {IPv4Address: "INET", IPv6Address: "INET6", UNIXAddress: "UNIX"}[type(host)]
    return f"ssp-inherit:fd={INHERITED_FD}:domain={domain}"


def master_endpoint(reactor: Any, config: Config) -> IStreamServerEndpoint:
    """
    What the master of several workers listens through: the configured
    endpoint, bound once and shared; with C{listen.reuse_port}, a
    L{ReusePortEndpoint} that each worker binds for itself.

    @raise ConfigError: for C{reuse_port} with an endpoint other than
        C{tcp:} (C{systemd:} hands over one socket, which can only be
        shared) or with port 0 (each worker would get a port of its own).
    """
    endpoint = config.listen.endpoint
    if not config.listen.reuse_port:
        return serverFromString(reactor, endpoint)
    kind, _, arguments = endpoint.partition(":")
    if kind != "tcp":
        raise ConfigError(
            f"listen.reuse_port: needs a tcp: listen.endpoint, not {endpoint!r}: each worker "
            "binds a socket of its own, and a systemd: (socket-activated) or other endpoint is "
            "one socket, which the workers can only share. Set reuse_port = false, or listen on "
            r"tcp:PORT (tcp:PORT:interface=\:\: for IPv6)")
    try:
        reusing = serverFromString(reactor, f"{REUSE_PORT}:{arguments}")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"listen.endpoint: {endpoint!r}: {e}") from None
    if reusing.port == 0:
        raise ConfigError("listen.reuse_port: needs a fixed port in listen.endpoint, not 0 "
                          "(each worker would listen on a port of its own)")
    return reusing


class _ReusePort(tcp.Port):
    """
    A TCP port whose socket has C{SO_REUSEPORT} besides C{SO_REUSEADDR}.
    """

    def createInternetSocket(self) -> socket.socket:
        s: socket.socket = super().createInternetSocket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        return s


@implementer(IStreamServerEndpoint)
@attrs.frozen
class ReusePortEndpoint:
    """
    C{ssp-reuseport:PORT[:interface=ADDRESS][:backlog=N]}, the arguments of
    C{tcp:}: a listening socket with C{SO_REUSEPORT}, so that several
    processes of one user listen on the same address, each with an accept
    queue of its own.  The kernel chooses the socket of each new
    connection by a hash of its addresses: an even spread that does not
    depend on which process wakes first.  When a socket closes, the
    connections still queued on it are reset (unless
    C{net.ipv4.tcp_migrate_req} moves them to another socket).
    """

    reactor: Any
    port: int
    interface: str = ""
    backlog: int = 50

    def listen(self, factory: Factory) -> Deferred[IListeningPort]:
        def bind() -> IListeningPort:
            port = _ReusePort(self.port, factory, self.backlog, self.interface, self.reactor)
            port.startListening()
            return port

        return execute(bind)

    def probe(self) -> None:
        """
        Bind a socket as L{listen} does and close it again, without
        listening, so that it takes no connection: tells now, as the user
        the workers run as, whether they will be able to listen.

        @raise error.CannotListenError: if the port is taken (other than
            by C{SO_REUSEPORT} sockets of this user) or may not be bound.
        """
        family = socket.AF_INET6 if isIPv6Address(self.interface) else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                probe.bind((self.interface, self.port))
            except OSError as e:
                raise error.CannotListenError(self.interface, self.port, e) from None

    def description(self) -> str:
        """
        The endpoint string that parses back into this endpoint.
        """
        interface = self.interface.replace("\\", "\\\\").replace(":", "\\:")
        return f"{REUSE_PORT}:{self.port}:interface={interface}:backlog={self.backlog}"


def worker_environment(environ: dict[str, str]) -> dict[str, str]:
    """
    The master's environment without what only the master may use (socket
    activation and C{sd_notify} variables).
    """
    return {k: v for k, v in environ.items() if k not in _MASTER_ONLY_ENV}


def worker_command(worker: int, arguments: Sequence[str]) -> list[str]:
    """
    The argv of worker C{worker}: C{twistd} in the foreground, logging JSON
    lines for the master, then the C{ssp} options.
    """
    return _TWISTD + ["-n", "--pidfile=", "--logger", "ssp.workers.worker_observer",
                      "ssp", "--worker", str(worker), *arguments]


def worker_observer(out: TextIO | None = None) -> ILogObserver:
    """
    The log observer of a worker (C{twistd --logger
    ssp.workers.worker_observer}): one JSON object per line with level,
    namespace and text, which the master re-emits.  No timestamp: the
    master's log stamps it.
    """
    stream = out if out is not None else sys.stdout

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        level = event.get("log_level", LogLevel.info)
        text = eventAsText(event, includeTimestamp=False, includeSystem=False)
        stream.write(json.dumps({"level": level.name, "namespace": event.get("log_namespace", "-"),
                                 "text": text}) + "\n")
        stream.flush()

    return observe


@attrs.frozen
class Backoff:
    """
    How long to wait before replacing a worker that died: at once after
    a run of at least C{stable_after} seconds, else C{initial} doubling
    per consecutive short run up to C{maximum}.
    """

    initial: float = 0.5
    maximum: float = 30.0
    stable_after: float = 10.0

    def delay(self, failures: int) -> float:
        """
        @param failures: consecutive short runs, this one included.
        """
        if failures == 0:
            return 0.0
        return float(min(self.maximum, self.initial * 2 ** (failures - 1)))


class _NeverAccepts(Factory):
    """
    The master's factory on the shared socket; the port stops reading at
    once, so this is never asked for a protocol.
    """

    noisy = False

    def logPrefix(self) -> str:
        return "Shared socket for the workers"

    def buildProtocol(self, addr: Any) -> None:
        return None


@attrs.define(eq=False)
class _Slot:
    number: int
    process: Any = None
    pid: int | None = None
    started: float = 0.0
    failures: int = 0
    listening: bool = False
    respawn: Any = None


class _WorkerProtocol(ProcessProtocol):
    """
    One worker process: relays its output to the master's log, notices
    when it listens and when it ends.
    """

    def __init__(self, master: Master, slot: _Slot) -> None:
        self._master, self._slot = master, slot
        self._partial: dict[int, bytes] = {}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd == STATUS_FD:
            if LISTENING in data:
                self._master._listening(self._slot)
            return
        lines = (self._partial.pop(fd, b"") + data).split(b"\n")
        self._partial[fd] = lines.pop()
        for line in lines:
            relay_line(self._slot.number, line, fd)

    def processEnded(self, reason: Failure) -> None:
        for fd, rest in sorted(self._partial.items()):
            if rest:
                relay_line(self._slot.number, rest, fd)
        self._master._ended(self._slot, reason)


def _describe(reason: Failure) -> str:
    value = reason.value
    if getattr(value, "signal", None):
        return f"signal {value.signal}"
    return f"exit code {getattr(value, 'exitCode', '?')}"


def relay_line(worker: int, line: bytes, fd: int) -> None:
    """
    Re-emit one line a worker wrote: a L{worker_observer} record keeps its
    level and namespace; anything else (a crash before logging started)
    is logged as is, at warn level for stderr.
    """
    text = line.decode("utf-8", "replace").rstrip("\r")
    if not text:
        return
    try:
        record = json.loads(text)
        level = LogLevel.levelWithName(record["level"])
        namespace, text = str(record["namespace"]), str(record["text"]).rstrip("\n")
    except (ValueError, TypeError, KeyError, InvalidLogLevelError):
        level = LogLevel.warn if fd == 2 else LogLevel.info
        namespace = "ssp.workers"
    Logger(namespace=namespace).emit(level, "[worker {worker}] {text}", worker=worker, text=text)


class _Silent:
    """
    A notifier for when no service manager is told anything.
    """

    def ready(self) -> None:
        pass

    reloading = stopping = ready


class Master(MultiService):
    """
    Binds the shared socket, runs and supervises the workers; serves
    nothing itself.

    @ivar port: the shared listening port, once bound; L{None} with a
        L{ReusePortEndpoint}, where the master binds nothing.
    """

    def __init__(
        self,
        reactor: Any,
        endpoint: IStreamServerEndpoint,
        count: int,
        arguments: Callable[[str], Sequence[str]],
        drain_timeout: float,
        environ: dict[str, str] | None = None,
        backoff: Backoff = Backoff(),
        grace: float = 5.0,
        notifier: Any = None,
    ) -> None:
        """
        @param reactor: provides C{spawnProcess} and C{IReactorTime}.
        @param endpoint: the configured listen endpoint (L{master_endpoint}):
            bound here and shared, or, a L{ReusePortEndpoint}, bound by
            each worker for itself.
        @param arguments: the C{ssp} options of a worker, given the
            endpoint string it listens on.
        @param drain_timeout: how long a worker may drain on stop; after
            that and C{grace} more seconds, it is killed.
        @param notifier: a L{ssp.systemd.SystemdNotifier}, run as a child
            (its watchdog pings from the master's loop); told C{READY=1}
            once every worker listens, C{RELOADING=1} and C{READY=1}
            around a forwarded reload, C{STOPPING=1} on stop.
        """
        super().__init__()
        self._reactor = reactor
        self._endpoint = endpoint
        self._arguments = arguments
        self._drain_timeout = drain_timeout
        self._environ = worker_environment(dict(os.environ if environ is None else environ))
        self._backoff = backoff
        self._grace = grace
        self._slots = [_Slot(n) for n in range(count)]
        self._stopping = False
        self._exited: dict[int, Deferred[None]] = {}
        self._all_listening: Deferred[IListeningPort | None] = Deferred()
        self._binding: Deferred[Any] | None = None
        self._reusing = isinstance(endpoint, ReusePortEndpoint)
        self.port: IListeningPort | None = None
        self._notifier = notifier if notifier is not None else _Silent()
        if notifier is not None:
            notifier.setServiceParent(self)

    def privilegedStartService(self) -> None:
        # Bind before twistd sheds privileges (a port below 1024), and fail
        # twistd's start-up, not some later callback, if the bind fails.
        if not self._reusing:
            failed: list[Failure] = []
            self._binding = self._endpoint.listen(_NeverAccepts())
            self._binding.addCallbacks(self._bound, failed.append)
            if failed:
                failed[0].raiseException()
        super().privilegedStartService()

    def _bound(self, port: IListeningPort) -> IListeningPort:
        port.stopReading()  # type: ignore[attr-defined]
        # Closing the master's copy must not shut the socket down: that
        # would pull it from under workers still accepting (their accept
        # fails with EINVAL).  Each worker closes its own copy as it stops,
        # as Twisted already does for an adopted (systemd) socket.
        port._shouldShutdown = False  # type: ignore[attr-defined]
        self.port = port
        return port

    def startService(self) -> None:
        if self._reusing:
            # Now, with privileges shed, as the workers will bind: fail the
            # start rather than have every worker fail in a loop.
            self._endpoint.probe()
            log.info("Each worker listens on {endpoint} (listen.reuse_port)",
                     endpoint=self._endpoint.description())
            self._binding = succeed(None)
        elif self._binding is None:
            self.privilegedStartService()
        assert self._binding is not None
        super().startService()
        self._binding.addCallback(lambda _: [self._spawn(slot) for slot in self._slots])

    def listening(self) -> Deferred[IListeningPort | None]:
        """
        Fires with the shared port (L{None} with a L{ReusePortEndpoint})
        once every worker has listened (the first time round; replacements
        do not re-fire it).
        """
        return self._all_listening

    def pids(self) -> dict[int, int]:
        """
        The live workers' process ids, by worker number.
        """
        return {s.number: s.pid for s in self._slots if s.pid is not None}

    def reload(self) -> None:
        """
        Forward a reload (C{SIGHUP}) to every worker that is serving; one
        still starting reads the configuration afresh anyway.
        """
        self._notifier.reloading()
        serving = [slot for slot in self._slots if slot.process is not None and slot.listening]
        for slot in serving:
            self._signal(slot, "HUP")
        log.info("Reload forwarded to {count} workers", count=len(serving))
        self._notifier.ready()

    def install_sighup(self) -> None:
        """
        Make C{SIGHUP} call L{reload} (twistd leaves it fatal).
        """
        signal.signal(signal.SIGHUP, lambda *_: self._reactor.callFromThread(self.reload))

    def stopService(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """
        Close the master's copy of a shared socket (so it goes away with
        the last worker's), ask every worker to drain (C{SIGTERM}), and kill
        the ones still there after the drain timeout and the grace.  The
        notifier's watchdog keeps pinging until the workers are gone.
        """
        self._stopping = True
        self._notifier.stopping()
        for slot in self._slots:
            if slot.respawn is not None and slot.respawn.active():
                slot.respawn.cancel()
        if self.port is not None:
            await self.port.stopListening()
        waiting = []
        for slot in self._slots:
            if slot.process is not None:
                self._exited[slot.number] = exited = Deferred()
                waiting.append(exited)
                self._signal(slot, "TERM")
        if waiting:
            deadline = self._reactor.callLater(self._drain_timeout + self._grace,
                                               self._kill_remaining)
            await DeferredList(waiting)
            if deadline.active():
                deadline.cancel()
            log.info("All workers stopped")
        await super().stopService()

    def _kill_remaining(self) -> None:
        for slot in self._slots:
            if slot.process is not None:
                log.warn("Worker {worker} did not drain in time; killing it", worker=slot.number)
                self._signal(slot, "KILL")

    def _signal(self, slot: _Slot, name: str) -> None:
        try:
            slot.process.signalProcess(name)
        except error.ProcessExitedAlready:
            pass

    def _spawn(self, slot: _Slot) -> None:
        slot.respawn = None
        fds: dict[int, Any] = {0: "w", 1: "r", 2: "r", STATUS_FD: "r"}
        if self._reusing:
            listen = self._endpoint.description()
        else:
            assert self.port is not None
            listen = inherited_endpoint(self.port)
            fds[INHERITED_FD] = self.port.fileno()  # type: ignore[attr-defined]
        command = worker_command(slot.number, self._arguments(listen))
        protocol = _WorkerProtocol(self, slot)
        slot.started, slot.listening = self._reactor.seconds(), False
        try:
            slot.process = self._reactor.spawnProcess(
                protocol, command[0], command, env=self._environ, path=os.getcwd(), childFDs=fds
            )
        except Exception:
            log.failure("Worker {worker} could not be started", worker=slot.number)
            self._replace_later(slot, short=True)
            return
        slot.pid = slot.process.pid
        log.info("Worker {worker} started, pid {pid}", worker=slot.number, pid=slot.pid)

    def _listening(self, slot: _Slot) -> None:
        slot.listening = True
        log.info("Worker {worker} listening", worker=slot.number)
        if all(s.listening for s in self._slots) and not self._all_listening.called:
            self._notifier.ready()
            self._all_listening.callback(self.port)

    def _ended(self, slot: _Slot, reason: Failure) -> None:
        pid, status = slot.pid, _describe(reason)
        slot.process, slot.pid, slot.listening = None, None, False
        exited = self._exited.pop(slot.number, None)
        if exited is not None:
            log.info("Worker {worker} (pid {pid}) stopped: {status}", worker=slot.number, pid=pid,
                     status=status)
            exited.callback(None)
            return
        if self._stopping:
            return
        short = self._reactor.seconds() - slot.started < self._backoff.stable_after
        delay = self._replace_later(slot, short)
        log.error("Worker {worker} (pid {pid}) died: {status}; replacing it in {delay:.1f}s",
                  worker=slot.number, pid=pid, status=status, delay=delay)

    def _replace_later(self, slot: _Slot, short: bool) -> float:
        slot.failures = slot.failures + 1 if short else 0
        delay = self._backoff.delay(slot.failures)
        slot.respawn = self._reactor.callLater(delay, self._spawn, slot)
        return delay


class _Lifeline(Protocol):
    """
    The worker's end of its pipes to the master: fd 0 to notice the
    master is gone, fd 4 to report listening.
    """

    def __init__(self, link: WorkerLink) -> None:
        self._link = link

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._link.master_gone()


class WorkerLink(Service):
    """
    Ties a worker to its master: tells it when the proxy listens, stops
    the worker (draining as on C{SIGTERM}) if the master disappears, and
    makes any stop request after the first a no-op, since a worker may be
    told to stop twice (by its master and by a terminal's or a service
    manager's signal to the whole process group).
    """

    def __init__(self, reactor: Any, listening: Callable[[], Deferred[Any]],
                 stdin: int = 0, status: int = STATUS_FD) -> None:
        self._reactor = reactor
        self._listening = listening
        self._fds = (stdin, status)
        self._io: Any = None
        self.stopping = False

    def startService(self) -> None:
        from twisted.internet.stdio import StandardIO

        super().startService()
        self._io = StandardIO(_Lifeline(self), stdin=self._fds[0], stdout=self._fds[1],
                              reactor=self._reactor)
        self._listening().addCallback(lambda _: self._io.write(LISTENING))
        # After twistd's own handlers are in place, which happens at start-up.
        self._reactor.callWhenRunning(self._stop_signals_once)

    def stopService(self) -> None:
        self.stopping = True
        super().stopService()

    def master_gone(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        log.warn("Master process gone; stopping")
        self._reactor.stop()

    def _stop_signals_once(self) -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(number)
            if callable(previous):
                signal.signal(number, self._once(previous))

    def _once(self, previous: Callable[[int, Any], Any]) -> Callable[[int, Any], None]:
        def handler(number: int, frame: Any) -> None:
            if not self.stopping:
                self.stopping = True
                previous(number, frame)

        return handler


class TrailLock(Service):
    """
    An exclusive lock on a worker's audit directory, held for the life of
    the process (the kernel releases it at exit), so that one hash chain
    has one writer.  A worker whose master was killed drains on; worker K
    of a master restarted meanwhile waits here, before it opens the chain
    or listens, until that orphan has finished.

    It waits before the reactor runs (nothing else to do yet, no signal
    handler but the default, so C{SIGTERM} still ends it at once), and for
    at most the orphan's C{drain_timeout}.
    """

    def __init__(self, directory: Path) -> None:
        self._path = directory / TRAIL_LOCK
        self._fd: int | None = None

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warn("Audit trail {directory} is still open in another process (a worker "
                         "of a master that died, draining); waiting for it to finish",
                         directory=str(self._path.parent))
                fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def startService(self) -> None:
        if self._fd is None:
            self.privilegedStartService()
        super().startService()


def worker_service(proxy: IService, listening: Callable[[], Deferred[Any]], reactor: Any,
                   trail: Path) -> IService:
    """
    The service a worker runs: the lock on its audit trail C{trail}
    (first), the proxy and its L{WorkerLink}.
    """
    top = MultiService()
    TrailLock(trail).setServiceParent(top)
    proxy.setServiceParent(top)
    WorkerLink(reactor, listening).setServiceParent(top)
    return top


def per_worker_warning(config: Config, count: int) -> None:
    """
    Say so when limits cannot be shared between workers.
    """
    if count > 1 and config.throttle.store == "memory":
        log.warn(
            "throttle.store is \"memory\" with {count} workers: every worker keeps its own "
            "counters, so each consumer and provider limit applies per worker ({count} times "
            "the configured rate in total). Use store = \"redis\" to share them.",
            count=count,
        )

