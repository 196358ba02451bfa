# -*- test-case-name: tests.test_service -*-
"""
The proxy as a Twisted service: builds every concern from the
configuration, listens, reloads on SIGHUP and drains on stop.
"""

from __future__ import annotations

import signal
import uuid
from pathlib import Path
from typing import Any

import attrs
from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import deferLater
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.logger import Logger
from twisted.protocols.haproxy import proxyEndpoint
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from twisted.web.server import Site

from ssp import config as ssp_config
from ssp.audit import FileAuditSink
from ssp.config import Config
from ssp.directory import directory_from_config
from ssp.forward import Upstream
from ssp.interfaces import IAuditSink, IDirectory, IThrottle
from ssp.metrics import Metrics, admin_resource
from ssp.model import AuditRecord
from ssp.pipeline import Checks
from ssp.resource import Proxy, ProxyResource, ProxySite
from ssp.throttle import throttle_from_config
from ssp.tls import ServerTLS, TLSOrPlainFactory, UpstreamTLS

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
                 concerns: Concerns | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.config_path = config_path
        self._given = concerns or Concerns()
        self._lifecycle: list[Any] = []
        self.metrics: Metrics | None = None
        self.proxy: Proxy | None = None
        self.site: ProxySite | None = None
        self._listener: StreamServerEndpointService | None = None

    def privilegedStartService(self) -> None:
        self._build()
        super().privilegedStartService()

    def startService(self) -> None:
        if self.proxy is None:
            self._build()
        for part in self._lifecycle:
            part.start()
        super().startService()
        self.reactor.addSystemEventTrigger("during", "startup", self._install_sighup)

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
        if self._listener is not None and self._listener.parent is self:
            await maybeDeferred(self._listener.disownServiceParent)
        await self._drain(self.config.listen.drain_timeout)
        await maybeDeferred(super().stopService)
        await DeferredList([maybeDeferred(p.stop) for p in reversed(self._lifecycle)])

    async def _drain(self, timeout: float) -> None:
        if self.site is None:
            return
        deadline = self.reactor.seconds() + timeout
        while True:
            for channel in list(self.site.channels):
                if channel.idle:
                    channel.transport.loseConnection()
                else:
                    channel.persistent = False
            if not self.site.channels or self.reactor.seconds() >= deadline:
                break
            await deferLater(self.reactor, min(0.05, timeout), lambda: None)
        remaining = list(self.site.channels)
        for channel in remaining:
            channel.transport.abortConnection()
        if remaining:
            await waitUntilAllDisconnected(self.reactor, remaining)

    def _build(self) -> None:
        config = self.config
        self.server_tls = ServerTLS(config.tls)
        upstream = Upstream(self.reactor, config.upstream, UpstreamTLS(config.upstream))
        directory = self._given.directory
        if directory is None:
            directory, directory_service = directory_from_config(
                config.directory, self.reactor, self.reactor,
                (config.upstream.certificate, config.upstream.private_key),
            )
            directory_service.setServiceParent(self)
        throttle = self._given.throttle
        if throttle is None:
            throttle = throttle_from_config(config.throttle, self.reactor)
            self._lifecycle.append(throttle)
        audit = self._given.audit
        if audit is None:
            audit = FileAuditSink.from_config(config.audit, self.reactor)
            self._lifecycle.append(audit)
        self.audit = audit
        hsts = config.tls.hsts.encode("ascii")
        self.metrics = Metrics(lambda: self.proxy.in_flight if self.proxy else 0)
        self.proxy = Proxy(
            self._checks(config, directory, throttle), upstream, audit, self.reactor,
            config.upstream.idle_timeout, hsts,
            observers=(self.metrics.observe,) + ((_access_log,) if config.log.access_log else ()),
        )
        site = self.site = ProxySite(ProxyResource(self.proxy), self.reactor,
                                     config.listen.idle_timeout)
        listener = TLSOrPlainFactory(
            TLSMemoryBIOFactory(self.server_tls, False, site), hsts,
            on_handshake_failure=self._handshake_failed,
            on_plain_http=self._plain_http,
        )
        endpoint = serverFromString(self.reactor, config.listen.endpoint)
        if config.listen.proxy_protocol:
            endpoint = proxyEndpoint(endpoint)
        self._listener = StreamServerEndpointService(endpoint, listener)
        self._listener._raiseSynchronously = True
        self._listener.setServiceParent(self)
        if config.admin.endpoint:
            admin = StreamServerEndpointService(
                serverFromString(self.reactor, config.admin.endpoint),
                Site(admin_resource(self.metrics, self.readiness)),
            )
            admin._raiseSynchronously = True
            admin.setServiceParent(self)

    def validate(self) -> None:
        """
        Load everything the configuration points at without listening:
        certificates, keys, CRLs, the directory and the endpoint strings.
        """
        ServerTLS(self.config.tls)
        UpstreamTLS(self.config.upstream)
        serverFromString(self.reactor, self.config.listen.endpoint)
        if self.config.admin.endpoint:
            serverFromString(self.reactor, self.config.admin.endpoint)
        directory_from_config(self.config.directory, self.reactor, self.reactor)

    def _checks(self, config: Config, directory: IDirectory, throttle: IThrottle) -> Checks:
        return Checks(
            identify=self.server_tls.client_identity,
            directory=directory,
            throttle=throttle,
            agreements=config.agreements,
            token=config.token,
            clock=self.reactor,
        )

    def listening(self) -> Deferred[Any]:
        """
        Fires with the listening port once it is bound.
        """
        assert self._listener is not None
        return self._listener._waitingForPort

    def readiness(self) -> dict[str, bool]:
        return {"listening": self.running, "audit": bool(self.audit.writable)}

    def _handshake_failed(self, peer: Any, reason: Failure) -> None:
        self._record_connection_refusal(peer, "tls-failed", reason.getErrorMessage()[:200], 0)

    def _plain_http(self, peer: Any) -> None:
        self._record_connection_refusal(peer, "completed", "HTTP_REQUEST_SENT_TO_HTTPS_PORT", 497)

    def _record_connection_refusal(self, peer: Any, event: str, token: str, status: int) -> None:
        record = AuditRecord(
            event=event,
            request_id=uuid.uuid4().hex if status else "",
            time=self.reactor.seconds(),
            consumer_address=f"{getattr(peer, 'host', '')}:{getattr(peer, 'port', '')}",
            decision="refused",
            token=token,
            status=status,
        )
        if self.metrics is not None:
            self.metrics.observe(record)
        self.audit.append(record).addErrback(
            lambda f: log.failure("Connection refusal not audited", f)
        )

    def _install_sighup(self) -> None:
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))

    def reload(self) -> bool:
        """
        Re-read the configuration file and swap certificates, CRLs,
        agreements and token settings atomically; a bad file leaves the
        running configuration in place.
        """
        if self.config_path is None:
            log.warn("SIGHUP ignored: no configuration file to reload")
            return False
        try:
            config = ssp_config.load(self.config_path)
            self.server_tls.reload(config.tls)
        except Exception as e:
            log.error("Reload rejected, keeping the running configuration: {error}", error=e)
            return False
        assert self.proxy is not None
        current = self.proxy.checks
        self.proxy.checks = attrs.evolve(current, agreements=config.agreements, token=config.token)
        self.config = config
        log.info("Configuration reloaded from {path}", path=str(self.config_path))
        return True


def _access_log(record: AuditRecord) -> None:
    if record.event == "completed":
        log.info(
            "{method} {target} {status} {decision} {token} from={sender} to={receiver} "
            "trace={trace_id} {total_latency:.4f}s",
            method=record.method, target=record.target, status=record.status,
            decision=record.decision, token=record.token, sender=record.sender,
            receiver=record.receiver, trace_id=record.trace_id,
            total_latency=record.total_latency or 0.0,
        )
