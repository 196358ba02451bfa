# -*- test-case-name: tests.test_systemd -*-
"""
The systemd service-manager protocol (C{sd_notify(3)}) without a
dependency: readiness, reload and stop notifications and watchdog pings,
sent as datagrams to C{$NOTIFY_SOCKET}.

Everything is inert when C{NOTIFY_SOCKET} is absent, so the proxy behaves
the same under C{twistd -n} in a terminal, in tests and in containers.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger()


def notify_address(environ: Mapping[str, str]) -> str | None:
    """
    The C{AF_UNIX} address of the service manager's notification socket.

    @param environ: the process environment.
    @return: a filesystem path, or an abstract-namespace name starting
        with a NUL byte (systemd writes those with a leading C{@}); L{None}
        when not supervised or when the address is of a kind we do not
        speak (C{vsock:} on newer systemd), which is logged.
    """
    value = environ.get("NOTIFY_SOCKET", "")
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.warn("NOTIFY_SOCKET={value!r} is not a unix socket: systemd not notified",
                 value=value)
    return None


def watchdog_interval(environ: Mapping[str, str], pid: int) -> float | None:
    """
    Seconds between watchdog pings: half of C{WATCHDOG_USEC}, as
    C{sd_watchdog_enabled(3)} recommends, so one late ping is not fatal.

    @param environ: the process environment.
    @param pid: our process id; C{WATCHDOG_PID}, when set, names the one
        process the watchdog is meant for (not a child that inherited it).
    @return: L{None} when the watchdog is off or meant for another process.
    """
    owner = environ.get("WATCHDOG_PID")
    if owner is not None and owner != str(pid):
        return None
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2_000_000 if usec > 0 else None


class SystemdNotifier(Service):
    """
    Tells systemd (C{Type=notify}) how the service is doing, and keeps its
    watchdog fed from the reactor loop: a wedged reactor stops the pings and
    systemd restarts the process.

    Datagrams are sent non-blocking from the reactor thread: a service
    manager that does not read its queue costs a logged warning, never a
    stalled proxy.

    @ivar interval: seconds between watchdog pings, or L{None}.
    """

    def __init__(self, clock: IReactorTime, environ: Mapping[str, str],
                 pid: int | None = None) -> None:
        """
        @param clock: drives the watchdog pings.
        @param environ: the process environment (C{os.environ} in
            production); read once, here.
        @param pid: our process id, for C{WATCHDOG_PID}; defaults to ours.
        """
        self._address = notify_address(environ)
        self.interval = (
            watchdog_interval(environ, os.getpid() if pid is None else pid)
            if self._address else None
        )
        self._watchdog = LoopingCall(self.notify, "WATCHDOG=1")
        self._watchdog.clock = clock

    @property
    def enabled(self) -> bool:
        """
        Whether a service manager is listening at all.
        """
        return self._address is not None

    def ready(self) -> bool:
        """
        Startup (or a reload) is complete: the port is serving.
        """
        return self.notify("READY=1")

    def reloading(self) -> bool:
        """
        A reload has begun; follow it with L{ready}, whatever its outcome.
        """
        return self.notify("RELOADING=1")

    def stopping(self) -> bool:
        """
        Shutdown has begun (the drain may take a while).
        """
        return self.notify("STOPPING=1")

    def notify(self, *assignments: str) -> bool:
        """
        Send C{KEY=value} assignments in one datagram.

        @return: whether the datagram was sent; failures are logged.
        """
        if self._address is None:
            return False
        message = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self._address)
        except OSError as e:
            log.warn("systemd notification {notification!r} not sent: {error}",
                     notification=message.decode("utf-8"), error=e)
            return False
        return True

    def startService(self) -> None:
        super().startService()
        if self.interval is not None:
            self._watchdog.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._watchdog.running:
            self._watchdog.stop()
