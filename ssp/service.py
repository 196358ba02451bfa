# -*- test-case-name: tests.test_service -*-
"""
The proxy as a Twisted service: builds every concern from the
configuration, listens, reloads on SIGHUP and drains on stop.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from weakref import WeakSet

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.python.failure import Failure
from twisted.web.server import Site

from ssp import __version__, preflight, runtime
from ssp import config as ssp_config
from ssp.accesslog import AccessLogFile
from ssp.audit import FileAuditSink
from ssp.channel import ProxySite
from ssp.config import Config, ThrottleConfig
from ssp.directory import directory_from_config
from ssp.forward import Upstream
from ssp.interfaces import IAuditSink, IDirectory, IThrottle
from ssp.metrics import Metrics, admin_resource
from ssp.model import AuditRecord
from ssp.pipeline import Checks
from ssp.proxy import Proxy, ProxyResource
from ssp.refusals import ConnectionRefusals
from ssp.systemd import SystemdNotifier
from ssp.throttle import Throttle, throttle_from_config
from ssp.tls import (
    BulkTLSFactory,
    ServerTLS,
    TLSOrPlainFactory,
    UpstreamTLS,
    handshake_failure_reason,
    read_certificates,
)

log = Logger()


@attrs.define
class Concerns:
    """
    The pluggable concerns; tests may supply fakes for any of them.
    """

    directory: IDirectory | None = None
    throttle: IThrottle | None = None
    audit: IAuditSink | None = None


class SSPService(MultiService):
    """
    The Spine Security Proxy.

    @ivar proxy: the request handler, available once started.
    """

    def __init__(self, config: Config, reactor: Any, config_path: Path | None = None,
                 concerns: Concerns | None = None,
                 adjust: Callable[[Config], Config] | None = None) -> None:
        """
        @param adjust: applied to each configuration re-read on SIGHUP, as
            it was to C{config}: command-line overrides, a worker's own
            audit directory and admin port (L{ssp.workers.worker_config}).
        """
        super().__init__()
        self.config = config
        self._adjust = adjust or (lambda loaded: loaded)
        self.reactor = reactor
        self.config_path = config_path
        self._given = concerns or Concerns()
        self._lifecycle: list[Any] = []
        self.metrics: Metrics | None = None
        self.access_log: AccessLogFile | None = None
        self.proxy: Proxy | None = None
        self.site: ProxySite | None = None
        self._listener: StreamServerEndpointService | None = None
        self._directory_service: IService | None = None
        self._retiring: list[tuple[IDelayedCall, tuple[Any, ...]]] = []

    def privilegedStartService(self) -> None:
        """
        Build everything and bind the listeners (before twistd drops
        privileges).  A port that cannot be bound ends the process with
        one line naming the key or option, as any configuration mistake.
        """
        try:
            self._build()
        except ssp_config.ConfigError as e:
            raise SystemExit(f"{self.config_path}: {e}" if self.config_path else str(e)) from None
        Service.privilegedStartService(self)
        for child in self:
            try:
                child.privilegedStartService()
            except CannotListenError as e:
                raise SystemExit(cannot_listen(
                    self.config_path, child.name, _setting(self.config, child.name), e)) from None

    def startService(self) -> None:
        if self.proxy is None:
            self._build()
        for part in self._lifecycle:
            part.start()
        super().startService()
        self.reactor.addSystemEventTrigger("during", "startup", self._install_sighup)
        # After startup, so that SIGHUP is handled by the time systemd may send it.
        self.reactor.callWhenRunning(lambda: self.listening().addCallback(self._ready))

    def stopService(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        """
        Stop accepting, let in-flight requests finish for up to
        C{drain_timeout} seconds while idle keep-alive connections are
        closed, abort what remains, then stop the concerns.
        """
        self.systemd.stopping()
        if self._listener is not None and self._listener.parent is self:
            await maybeDeferred(self._listener.disownServiceParent)
        await self._drain(self.config.listen.drain_timeout)
        await self._retire_now()
        await maybeDeferred(super().stopService)
        await DeferredList([maybeDeferred(p.stop) for p in reversed(self._lifecycle)])

    async def _drain(self, timeout: float) -> None:
        if self.site is None:
            return
        deadline = self.reactor.seconds() + timeout
        while True:
            for channel in list(self.site.channels):
                if channel.idle:
                    _close_idle(channel.transport)
                else:
                    channel.persistent = False
            if not self.site.channels or self.reactor.seconds() >= deadline:
                break
            await deferLater(self.reactor, min(0.05, timeout), lambda: None)
        # Channels left after the timeout, and connections accepted before
        # the port closed that never became channels (silent, or still in
        # the handshake): none may bring a request once the audit closes.
        remaining = [*self.site.channels, *self._accepting.open()]
        for protocol in remaining:
            protocol.transport.abortConnection()
        while any(protocol.transport.connected for protocol in remaining):
            await deferLater(self.reactor, 0.01, lambda: None)

    def _build(self) -> None:
        config = self.config
        self.systemd = SystemdNotifier(self.reactor, os.environ)
        self.systemd.setServiceParent(self)
        self.server_tls = ServerTLS(config.tls, self.reactor)
        self._certificate_expiry = _expiry(config)
        parts = self._reloadable(config, None)
        if parts.directory_service is not None:
            parts.directory_service.setServiceParent(self)
            self._directory_service = parts.directory_service
        upstream, directory, throttle = parts.upstream, parts.directory, parts.throttle
        self.throttle = throttle
        if self._given.throttle is None:
            self._lifecycle.append(throttle)
        audit = self._given.audit
        if audit is None:
            audit = FileAuditSink.from_config(config.audit, self.reactor)
            self._lifecycle.append(audit)
        self.audit = audit
        hsts = config.tls.hsts.encode("ascii")
        self.metrics = Metrics(
            in_flight=lambda: self.proxy.in_flight if self.proxy else 0,
            audit_pending=lambda: audit.pending,
            readiness=lambda: self.readiness() if self.proxy else {},
            directory=lambda: self.proxy.checks.directory if self.proxy else None,
            connections=lambda: self.site.caps.open_connections if self.site else 0,
            refused_connections=lambda: self.site.caps.refused_connections if self.site else 0,
            certificate_expiry=lambda: self._certificate_expiry,
            crl_next_update=lambda: {str(f.path): f.next_update
                                     for f in self.server_tls.trust.crl_files},
            known_interaction=self._known_interaction,
            throttle_store_up=lambda: self.throttle.available,
        )
        observers: tuple[Callable[[AuditRecord], None], ...] = (self.metrics.observe,)
        if config.log.access_log and config.log.access_log_file is not None:
            self.access_log = AccessLogFile(config.log.access_log_file, self.reactor)
            self._lifecycle.append(self.access_log)
            observers += (self.access_log,)
        elif config.log.access_log:
            observers += (_access_log,)
        self.connection_refusals = ConnectionRefusals(
            audit, self.reactor, config.audit.connection_interval, self.metrics.observe)
        self._lifecycle.append(self.connection_refusals)
        self.proxy = Proxy(
            self._checks(config, directory, throttle), upstream, audit, self.reactor,
            config.upstream.idle_timeout, hsts, observers=observers, cors=config.cors,
        )
        site = self.site = ProxySite(ProxyResource(self.proxy), self.reactor, config.listen,
                                     self.proxy.refuse_early)
        listener = self._accepting = _Accepting(
            BulkTLSFactory(self.server_tls, False, site), hsts,
            self.reactor, config.listen.header_timeout,
            on_handshake_failure=self._handshake_failed,
            on_plain_http=self._plain_http,
            caps=site.caps, proxy_protocol=config.listen.proxy_protocol,
            on_refused=self._over_connection_caps,
        )
        endpoint = self._endpoint("listen.endpoint")
        if config.listen.proxy_protocol:
            endpoint = proxyEndpoint(endpoint)
        self._listener = StreamServerEndpointService(endpoint, listener)
        self._listener._raiseSynchronously = True
        self._listener.setName("listen.endpoint")
        self._listener.setServiceParent(self)
        if config.admin.endpoint:
            admin = StreamServerEndpointService(
                self._endpoint("admin.endpoint"),
                _QuietSite(admin_resource(self.metrics, self.readiness, self.degraded)),
            )
            admin._raiseSynchronously = True
            admin.setName("admin.endpoint")
            admin.setServiceParent(self)

    def _endpoint(self, key: str) -> Any:
        """
        The server endpoint configured at C{key}.

        @raise ssp_config.ConfigError: a socket systemd should have passed
            is missing.
        """
        description = _setting(self.config, key)
        try:
            return serverFromString(self.reactor, description)
        except (KeyError, IndexError) as e:
            raise ssp_config.ConfigError(
                f"{key}: {description}: systemd passed no such socket ({e}): is ssp.socket "
                "running, with FileDescriptorName= matching name=?") from None

    def _checks(self, config: Config, directory: IDirectory, throttle: IThrottle) -> Checks:
        return Checks(
            identify=self.server_tls.client_identity,
            directory=directory,
            throttle=self.metrics.counting(throttle),
            agreements=config.agreements,
            token=config.token,
            clock=self.reactor,
        )

    def _known_interaction(self, interaction: str) -> bool:
        """
        Whether the agreements or the directory name C{interaction}, so
        that metrics may label with it.
        """
        if any(interaction in agreement.interactions for agreement in self.config.agreements):
            return True
        return self.proxy is not None and self.proxy.checks.directory.knows_interaction(interaction)

    def listening(self) -> Deferred[Any]:
        """
        Fires with the listening port once it is bound (L{None} if that
        failed).  A Deferred of the caller's own: whatever its callbacks
        return, the listener keeps its port, and stops it on stop.
        """
        assert self._listener is not None
        waiting = self._listener._waitingForPort
        assert waiting is not None  # set by startService
        return _branch(waiting)

    def _ready(self, port: Any) -> Any:
        if port is not None:  # None: listening failed and was logged
            self.systemd.ready()
            address = port.getHost()
            log.info(
                "SSP {version} started with {config}: proxy on {listen} ({address}), "
                "admin on {admin}",
                version=__version__,
                config=str(self.config_path) if self.config_path else "the demo configuration",
                listen=self.config.listen.endpoint,
                address=f"{getattr(address, 'host', '')}:{getattr(address, 'port', '')}",
                admin=self.config.admin.endpoint or "(off)",
            )
        return port

    def readiness(self) -> dict[str, bool]:
        """
        What C{/readyz} reports: listening (no longer once a stop began,
        so a balancer looks elsewhere during the drain), the audit
        writable, the directory reachable, the server certificate within
        its validity, every CRL more than C{tls.crl_expiry_margin} seconds
        from its nextUpdate (past it, every consumer would be refused), and
        the rate store answering, unless C{on_store_failure = "local"}
        stands in for it (see L{degraded}).
        """
        assert self.proxy is not None
        now = self.reactor.seconds()
        return {
            "listening": self._listener is not None and self._listener.running,
            "audit": bool(self.audit.writable),
            "directory": bool(self.proxy.checks.directory.reachable),
            "tls": now < self._certificate_expiry["server"],
            "crl": now < self.server_tls.trust.valid_until - self.config.tls.crl_expiry_margin,
            "throttle": self.throttle.available or self.config.throttle.on_store_failure == "local",
        }

    def degraded(self) -> list[str]:
        """
        What C{/readyz} names as degraded but ready: the rate store while
        per-process limits stand in for it.
        """
        local = self.config.throttle.on_store_failure == "local"
        return ["throttle"] if local and not self.throttle.available else []

    def _handshake_failed(self, peer: Any, reason: Failure) -> None:
        self.connection_refusals.refused(peer, handshake_failure_reason(reason))

    def _over_connection_caps(self, peer: Any) -> None:
        self.connection_refusals.refused(peer, "CONNECTION_LIMIT_EXCEEDED")

    def _plain_http(self, peer: Any) -> None:
        self.connection_refusals.refused(peer, "HTTP_REQUEST_SENT_TO_HTTPS_PORT", 497)

    def _install_sighup(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def _reloadable(self, config: Config, running: Config | None) -> _Parts:
        """
        Build what a configuration describes that can change while
        serving: nothing here is started or swapped in yet.

        @param running: the configuration in use, to keep a directory or
            throttle store whose settings did not change (an LDAP cache and
            rate-limit state survive a reload); L{None} builds everything.
        """
        upstream = Upstream(self.reactor, config.upstream, UpstreamTLS(config.upstream))
        directory, directory_service = self._given.directory, None
        if directory is None:
            if (running is not None and config.directory.kind == "ldap"
                    and config.directory == running.directory):
                assert self.proxy is not None
                directory = self.proxy.checks.directory
            else:
                directory, directory_service = directory_from_config(
                    config.directory, self.reactor, self.reactor,
                    (config.upstream.certificate, config.upstream.private_key),
                )
        throttle, new_store = self._given.throttle, False
        if throttle is None:
            if running is not None and _same_store(config.throttle, running.throttle):
                assert self.proxy is not None
                throttle = Throttle(config.throttle, cast(Throttle, self.throttle).store)
            else:
                throttle, new_store = throttle_from_config(config.throttle, self.reactor), True
        return _Parts(upstream, directory, directory_service, throttle, new_store)

    def reload(self) -> bool:
        """
        L{_reload}, bracketed by systemd's C{RELOADING=1} and C{READY=1}.
        """
        self.systemd.reloading()
        try:
            return self._reload()
        finally:
            self.systemd.ready()

    def _reload(self) -> bool:
        """
        Re-read the configuration file and swap certificates, CRLs,
        agreements, token settings, limits, the directory and the provider
        connection pool atomically: everything new is built first, so a bad
        file or unreadable certificate leaves the running configuration in
        place.  Connections in progress are not dropped.
        """
        if self.access_log is not None:
            self.access_log.reopen()
        if self.config_path is None:
            log.warn("SIGHUP ignored: no configuration file to reload")
            return False
        assert self.proxy is not None
        try:
            config = self._adjust(ssp_config.load(self.config_path))
            preflight.check(config, self.config_path, self.reactor.seconds())
            parts = self._reloadable(config, self.config)
            certificate_expiry = _expiry(config)
            self.server_tls.reload(config.tls)
            self._certificate_expiry = certificate_expiry
        except Exception as e:
            log.error("Reload rejected, keeping the running configuration: {error}", error=e)
            return False
        for key in _RESTART_KEYS:
            if _setting(config, key) != _setting(self.config, key):
                log.warn("{key} changed: takes effect on restart", key=key)
        self._swap(config, parts)
        runtime.thaw()
        log.info("Configuration reloaded from {path}", path=str(self.config_path))
        return True

    def _swap(self, config: Config, parts: _Parts) -> None:
        proxy = self.proxy
        assert proxy is not None
        old_checks, old_upstream = proxy.checks, proxy.upstream
        retired_directory, retired_throttle = None, None
        if parts.directory_service is not None:
            parts.directory_service.setServiceParent(self)
            retired_directory, self._directory_service = self._directory_service, parts.directory_service
        if parts.new_store:
            cast(Throttle, parts.throttle).start()
            retired_throttle = self.throttle
        if self._given.throttle is None:
            self._lifecycle[self._lifecycle.index(self.throttle)] = parts.throttle
        self.throttle = parts.throttle
        proxy.checks = attrs.evolve(
            old_checks, directory=parts.directory, throttle=self.metrics.counting(parts.throttle),
            agreements=config.agreements, token=config.token,
        )
        proxy.upstream = parts.upstream
        proxy.idle_timeout = config.upstream.idle_timeout
        proxy.hsts = config.tls.hsts.encode("ascii")
        proxy.cors = config.cors
        if self.site is not None:
            self.site.limits = config.listen
            self.site.timeOut = config.listen.idle_timeout
        self.config = config
        # Requests admitted before the swap may still use the old parts: retire them later.
        grace = config.directory.receive_timeout + config.upstream.response_timeout
        retired = (old_upstream, retired_directory, retired_throttle)
        self._retiring.append((self.reactor.callLater(grace, self._retire, *retired), retired))

    def _retire(self, upstream: Upstream, directory_service: IService | None,
                throttle: IThrottle | None) -> Deferred[Any]:
        self._retiring = [(call, parts) for call, parts in self._retiring if call.active()]
        stopping = [upstream.pool.closeCachedConnections()]
        if directory_service is not None and directory_service.parent is self:
            stopping.append(maybeDeferred(directory_service.disownServiceParent))
        if throttle is not None:
            stopping.append(cast(Throttle, throttle).stop())
        return DeferredList(stopping)

    async def _retire_now(self) -> None:
        for call, retired in list(self._retiring):
            if call.active():
                call.cancel()
                await self._retire(*retired)


class _Accepting(TLSOrPlainFactory):
    """
    The listening factory, remembering the connections it accepted (weakly:
    a closed one is forgotten with its transport), so that a stop can cut
    those the site does not know yet.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._accepted: WeakSet[Any] = WeakSet()

    def buildProtocol(self, addr: object) -> Any:
        protocol = super().buildProtocol(addr)
        self._accepted.add(protocol)
        return protocol

    def open(self) -> list[Any]:
        """
        The accepted connections still open, as the protocols their TCP
        transports drive (the PROXY-protocol wrapper, when there is one).
        """
        transports = {_socket_of(p.transport) for p in self._accepted if p.transport is not None}
        return [t.protocol for t in transports if t.connected]


class _QuietSite(Site):
    """
    The admin listener's site: a scrape every few seconds would drown the
    operational log, so requests are not logged (docs/operations.md).
    """

    noisy = False

    def log(self, request: Any) -> None:
        pass


@attrs.frozen
class _Parts:
    """
    The reloadable collaborators built from one configuration.

    @ivar directory_service: runs a newly built directory's threads;
        L{None} when the running directory is kept or was supplied.
    @ivar new_store: the throttle has a store of its own to start (a kept
        store keeps its rate-limit state).
    """

    upstream: Upstream
    directory: IDirectory
    directory_service: IService | None
    throttle: IThrottle
    new_store: bool


# What a reload cannot change in a running process.
_RESTART_KEYS = ("listen.endpoint", "listen.proxy_protocol", "listen.workers", "listen.reuse_port",
                 "admin", "audit", "log")


def cannot_listen(config_path: Path | None, key: str, endpoint: str,
                  error: CannotListenError) -> str:
    """
    The one line for a port that cannot be bound: the key (or, for the
    demo, the option) to change, the endpoint and the operating system's
    reason.
    """
    reason = getattr(error.socketError, "strerror", None) or str(error.socketError)
    option = key.split(".")[0]
    if config_path is None:
        return f"{key}: cannot listen on {endpoint}: {reason} (choose another with --{option})"
    return (f"{config_path}: {key}: cannot listen on {endpoint}: {reason} "
            f"(set {key}, or override it with --{option})")


def _setting(config: Config, key: str) -> Any:
    for name in key.split("."):
        config = getattr(config, name)
    return config


def _expiry(config: Config) -> dict[str, float]:
    """
    When the server certificate and the upstream client certificate
    expire, as POSIX times, by role.
    """
    return {
        role: read_certificates(path)[0].not_valid_after_utc.timestamp()
        for role, path in (("server", config.tls.certificate),
                           ("upstream_client", config.upstream.certificate))
    }


def _branch(trunk: Deferred[Any]) -> Deferred[Any]:
    """
    A new Deferred that fires with C{trunk}'s result, leaving C{trunk}'s
    own result as it was.
    """
    branch: Deferred[Any] = Deferred()

    def fire(result: Any) -> Any:
        branch.callback(result)
        return result

    trunk.addCallback(fire)
    return branch


def _close_idle(transport: Any) -> None:
    """
    Close an idle connection without waiting for the consumer's TLS
    C{close_notify}: one that is not reading would hold the drain for its
    whole timeout.  The TLS layer writes its own alert first.
    """
    transport.loseConnection()
    _socket_of(transport).loseConnection()


def _socket_of(transport: Any) -> Any:
    """
    The TCP transport under a TLS or PROXY-protocol layer.
    """
    return getattr(transport, "transport", transport)


def _same_store(new: ThrottleConfig, old: ThrottleConfig) -> bool:
    return (new.enabled, new.store, new.redis_url, new.on_store_failure) == (
        old.enabled, old.store, old.redis_url, old.on_store_failure)


def _access_log(record: AuditRecord) -> None:
    """
    One line per completed request.  The line is formatted here, once:
    formatting a many-field template in the log observer cost twice as
    much.  The fields still travel with the event for JSON logs.
    """
    if record.event == "completed":
        log.info(
            "{line}",
            line=f"{record.method} {record.target} {record.status} {record.decision} "
                 f"{record.token} from={record.sender} to={record.receiver} "
                 f"trace={record.trace_id} {record.total_latency or 0.0:.4f}s",
            status=record.status, decision=record.decision, sender=record.sender,
            receiver=record.receiver, trace_id=record.trace_id,
        )
