"""
The service's life: SIGHUP reloads everything that may change while
serving (atomically, keeping connections), and stopping drains.
"""

from __future__ import annotations

import gc
import http.client
import os
import signal
import subprocess
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import config as ssp_config
from ssp import demo, runtime
from ssp.service import SSPService
from tests.ports import free_port
from tests.support import (
    DEMO_LDIF,
    ROOT,
    Consumer,
    Provider,
    audit_key,
    certificates_toml,
    pki,
    spine_headers,
)
from tests.test_crash import TWISTD, wait_listening

AGREEMENT = f"""
[[agreements]]
sender = "{demo.CONSUMER_ASID}"
receiver = "{demo.PROVIDER_ASID}"
"""


class ConfigFile:
    """
    A configuration file on disk with its own copy of the demo SDS, edited
    by the tests between reloads.
    """

    def __init__(self, case: unittest.TestCase, provider: Provider, port: int = 0) -> None:
        self.directory = Path(case.mktemp()).resolve()
        self.directory.mkdir()
        self.path = self.directory / "ssp.toml"
        self.ldif = self.directory / "sds.ldif"
        self.ldif.write_text(DEMO_LDIF.read_text())
        self.port = port
        self.provider_port = provider.port.getHost().port

    def write(self, extra: str = AGREEMENT, listen: str = "") -> None:
        self.path.write_text(f"""
{certificates_toml(audit=False)}
resolve = {{ "{demo.PROVIDER_HOST}:443" = "127.0.0.1:{self.provider_port}" }}
[listen]
endpoint = "tcp:{self.port}:interface=127.0.0.1"
drain_timeout = 5.0
{listen}
[admin]
endpoint = "tcp:0:interface=127.0.0.1"
[directory]
kind = "ldif"
ldif = "{self.ldif}"
[audit]
directory = "{self.directory / 'audit'}"
durability = "never"
key_file = "{audit_key()}"
{extra}
""")

    def drop_consumer(self) -> None:
        """
        Remove the demo consumer's accredited system from the SDS copy.
        """
        entries = self.ldif.read_text().split("\n\n")
        kept = [e for e in entries
                if not ("objectClass: nhsAs\n" in e and demo.CONSUMER_ASID in e)]
        self.ldif.write_text("\n\n".join(kept))


async def start(case: unittest.TestCase, config: ConfigFile) -> tuple[SSPService, Consumer]:
    service = SSPService(ssp_config.load(config.path), reactor, config.path)
    service.startService()
    case.addCleanup(lambda: service.stopService().addCallback(
        lambda _: service.proxy.upstream.pool.closeCachedConnections()))
    port = await service.listening()
    return service, Consumer(port.getHost().port, pki(), "consumer-0")


class ReloadTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.provider = Provider(self)
        self.config = ConfigFile(self, self.provider)

    async def test_agreements(self) -> None:
        """
        Removing the agreement refuses the next request with 403 FOT.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.config.write(extra="")
        self.assertTrue(service.reload())
        reply = await consumer.get("metadata")
        self.assertEqual((reply.status, reply.token()), (
            403, f"FOT_CHECK_FAILED_MESSAGESENDER_{demo.CONSUMER_ASID}"
                 f"_MESSAGERECEIVER_{demo.PROVIDER_ASID}"))
        self.assertEqual(len(self.provider.seen), 1)

    async def test_directory(self) -> None:
        """
        The LDIF directory is re-read: a consumer removed from SDS is
        refused after the reload.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.config.drop_consumer()
        self.assertTrue(service.reload())
        reply = await consumer.get("metadata")
        self.assertEqual((reply.status, reply.token()),
                         (403, f"ASID_CHECK_FAILED_MESSAGESENDER_{demo.CONSUMER_ASID}"))

    async def test_reload_thaws_a_settled_heap(self) -> None:
        """
        A reload hands start-up objects frozen by L{runtime.settle_heap}
        back to the collector, so the configuration it replaces can be
        freed even when it holds reference cycles.
        """
        self.addCleanup(gc.set_threshold, *gc.get_threshold())
        self.addCleanup(gc.unfreeze)
        self.config.write()
        service, _ = await start(self, self.config)
        runtime.settle_heap()
        self.assertGreater(gc.get_freeze_count(), 0)
        self.assertTrue(service.reload())
        self.assertEqual(gc.get_freeze_count(), 0)

    async def test_limits_keep_state(self) -> None:
        """
        New limits apply at once; requests already spent under the same
        store still count, so a reload is no way round a limit.
        """
        limit = "\n[throttle.consumer.default]\nrate = 1\nperiod = 3600.0\nburst = {}\n"
        self.config.write(extra=AGREEMENT + limit.format(3))
        service, consumer = await start(self, self.config)
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.config.write(extra=AGREEMENT + limit.format(2))
        self.assertTrue(service.reload())
        reply = await consumer.get("metadata")
        self.assertEqual((reply.status, reply.header("X-Rate-Limit-Limit")), (429, "2"))

    async def test_crl(self) -> None:
        """
        Adding a CRL to the configuration refuses a revoked certificate
        that was accepted before.
        """
        self.config.write()
        service, _ = await start(self, self.config)
        revoked = Consumer(service.listening().result.getHost().port, pki(), "consumer-revoked")
        self.assertNotEqual((await revoked.get("metadata")).status, 495)
        self.config.path.write_text(self.config.path.read_text().replace(
            'client_ca = ', f'crls = ["{pki().directory}/spine-ca.crl.pem"]\nclient_ca = ', 1))
        self.assertTrue(service.reload())
        reply = await revoked.get("metadata")
        self.assertEqual(reply.status, 495)
        self.assertIn("REVOKED", reply.token())

    async def test_bad_file_keeps_running_configuration(self) -> None:
        """
        Invalid TOML, an unknown key and an unreadable certificate are each
        rejected; the proxy keeps serving with what it had.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        good = self.config.path.read_text()
        for broken in ("[listen\n", good + "\n[token]\nbogus = 1\n",
                       good.replace("proxy.pem", "missing.pem")):
            self.config.path.write_text(broken)
            self.assertFalse(service.reload())
            self.assertEqual((await consumer.get("metadata")).status, 200)

    async def test_connection_survives(self) -> None:
        """
        A keep-alive connection opened before the reload carries requests
        after it, under the new rules.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        connection = await deferToThread(consumer.connect)
        self.addCleanup(connection.close)
        self.assertEqual((await consumer.get("metadata", connection=connection)).status, 200)
        self.config.write(extra="")
        self.assertTrue(service.reload())
        reply = await consumer.get("metadata", connection=connection)
        self.assertEqual(reply.status, 403)

    async def test_listen_change_needs_restart(self) -> None:
        """
        The listening endpoint cannot change in place: the reload applies
        the rest and keeps the port.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        self.config.port = free_port()
        self.config.write(extra="")
        self.assertTrue(service.reload())
        self.assertEqual((await consumer.get("metadata")).status, 403)

    async def test_request_limits(self) -> None:
        """
        The request limits of C{[listen]} apply to connections made after
        the reload.
        """
        self.config.write()
        service, consumer = await start(self, self.config)
        many = dict(spine_headers(), **{f"X-Extra-{n}": "1" for n in range(12)})
        self.assertEqual((await consumer.get("metadata", many)).status, 200)
        self.config.write(listen="max_headers = 10")
        self.assertTrue(service.reload())
        reply = await consumer.get("metadata", many)
        self.assertEqual((reply.status, reply.token()), (431, "MORE_THAN_10_REQUEST_HEADERS"))


class DrainTests(unittest.TestCase):
    timeout = 60

    def setUp(self) -> None:
        self.provider = Provider(self)
        self.config = ConfigFile(self, self.provider)
        self.config.write()

    async def test_in_flight_finishes_idle_closed(self) -> None:
        """
        Stopping lets a request in progress complete while an idle
        keep-alive connection is closed, and new connections are refused.
        """
        self.config.path.write_text(self.config.path.read_text().replace(
            "drain_timeout = 5.0", "drain_timeout = 600.0"))
        service, consumer = await start(self, self.config)
        idle = await deferToThread(consumer.connect)
        self.addCleanup(idle.close)
        self.assertEqual((await consumer.get("metadata", connection=idle)).status, 200)
        in_flight = consumer.get("stall")
        while not hasattr(self.provider.resource, "stalled"):
            await deferLater(reactor, 0.01, lambda: None)
        stopped = service.stopService()
        # Events, not a pause: the idle connection is closed and the port
        # no longer accepts, while the stop still waits for the request.
        self.assertEqual(await deferToThread(lambda: idle.sock.recv(1)), b"")
        with self.assertRaises(OSError):
            await deferToThread(lambda: Consumer(consumer.port, pki(), "consumer-0")
                                .connect().connect())
        self.assertFalse(stopped.called)
        self.provider.resource.stalled.write(b"late but whole")
        self.provider.resource.stalled.finish()
        reply = await in_flight
        self.assertEqual((reply.status, reply.body), (200, b"late but whole"))
        await stopped

    async def test_idle_consumer_does_not_hold_the_drain(self) -> None:
        """
        An idle keep-alive consumer that never answers the TLS close is
        disconnected at once instead of holding the stop for the whole drain
        timeout (600 s here).
        """
        self.config.path.write_text(self.config.path.read_text().replace(
            "drain_timeout = 5.0", "drain_timeout = 600.0"))
        service, consumer = await start(self, self.config)
        idle = await deferToThread(consumer.connect)
        self.addCleanup(idle.close)
        self.assertEqual((await consumer.get("metadata", connection=idle)).status, 200)
        began = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - began, 60)  # far below the 600 s drain

    async def test_timeout_aborts(self) -> None:
        """
        A request still running at the drain timeout is cut off and the
        service stops anyway.
        """
        self.config.path.write_text(self.config.path.read_text().replace(
            "drain_timeout = 5.0", "drain_timeout = 0.3"))
        service, consumer = await start(self, self.config)
        in_flight = consumer.get("stall")
        while not hasattr(self.provider.resource, "stalled"):
            await deferLater(reactor, 0.01, lambda: None)
        began = reactor.seconds()
        await service.stopService()
        self.assertLess(reactor.seconds() - began, 30)  # cut off, not waited for
        await self.assertFailure(in_flight, OSError, http.client.HTTPException)


class SignalTests(unittest.TestCase):
    """
    The signals an operator (or systemd) sends to a real C{twistd ssp}.
    """

    timeout = 60

    async def test_sighup_reloads_sigterm_drains(self) -> None:
        provider = Provider(self)
        config = ConfigFile(self, provider, port=free_port())
        config.write()
        log = config.directory / "twistd.log"

        def spawn() -> subprocess.Popen[bytes]:
            with log.open("ab") as out:
                process = subprocess.Popen(
                    TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(config.path)],
                    cwd=config.directory, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdout=out, stderr=subprocess.STDOUT)
            self.addCleanup(lambda: process.poll() is None and process.kill())
            wait_listening(config.port, process, log)
            return process

        process = await deferToThread(spawn)
        consumer = Consumer(config.port, pki(), "consumer-0")
        self.assertEqual((await consumer.get("metadata")).status, 200)
        config.write(extra="")
        process.send_signal(signal.SIGHUP)
        await self._until(lambda: b"Configuration reloaded" in log.read_bytes())
        self.assertEqual((await consumer.get("metadata")).status, 403)
        config.path.write_text("[listen\n")
        process.send_signal(signal.SIGHUP)
        await self._until(lambda: b"Reload rejected" in log.read_bytes())
        self.assertEqual((await consumer.get("metadata")).status, 403)
        process.send_signal(signal.SIGTERM)
        # twistd shuts down cleanly, then re-raises the signal so its exit
        # status says why it stopped (systemd counts SIGTERM as success).
        self.assertEqual(await deferToThread(process.wait, 30), -signal.SIGTERM)
        self.assertIn("Server Shut Down.", log.read_text())

    async def _until(self, condition) -> None:  # type: ignore[no-untyped-def]
        for _ in range(500):
            if condition():
                return
            await deferLater(reactor, 0.02, lambda: None)
        self.fail("condition never held")

