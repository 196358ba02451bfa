"""
What an operator meets at the edges, end to end over real TLS: reason
phrases, an unexpected failure while forwarding, throttling switched off,
the admin listener's logging, the version.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial import unittest
from twisted.web.client import Agent, readBody

import ssp
from ssp.config import LimitSet, RateLimit, ThrottleConfig
from ssp.throttle import throttle_from_config
from tests.support import ROOT, Provider, Proxy
from tests.test_dependency_faults import until
from tests.test_proxy import ProxyTestCase


class ExplodingUpstream:
    """
    An upstream whose request fails with an exception no layer expects,
    as a misconfigured C{[upstream.resolve]} entry once did (C{ValueError}
    from C{int()}).
    """

    def __init__(self, real: Any) -> None:
        self.pool = real.pool

    def request(self, *args: Any) -> Deferred[Any]:
        raise ValueError("invalid literal for int() with base 10: ''")


class ForwardCrashTests(ProxyTestCase):
    async def test_unexpected_error_is_a_502(self) -> None:
        """
        The consumer gets a 502 OperationOutcome and the audit says
        C{failed} with that status (it used to get no answer at all, and
        the audit said status 0, C{forwarded}).
        """
        provider, proxy = await self.setup()
        service_proxy = proxy.service.proxy
        service_proxy.upstream = ExplodingUpstream(service_proxy.upstream)
        reply = await proxy.consumer().get("metadata")
        self.assertEqual((reply.status, reply.reason), (502, "Bad Gateway"))
        self.assertEqual(reply.outcome()["resourceType"], "OperationOutcome")
        self.assertTrue(reply.token().startswith("ERROR_COMMUNICATING_TO_ENDPOINT_URL_https://"))
        [completed] = proxy.audit.completed()
        self.assertEqual((completed.status, completed.decision), (502, "failed"))
        self.assertEqual(completed.token, reply.token())
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)


class ReasonPhraseTests(ProxyTestCase):
    async def test_refusal_reason_phrases(self) -> None:
        """
        429, 495 and 496 carry their registered (or nginx) reason phrases,
        not C{Unknown Status}.
        """
        provider, proxy = await self.setup()
        proxy.throttle.consumer_allowance = 0
        self.assertEqual((await proxy.consumer().get("metadata")).reason, "Too Many Requests")
        reply = await proxy.consumer(cert="consumer-expired").get("metadata")
        self.assertEqual((reply.status, reply.reason), (495, "SSL Certificate Error"))
        reply = await proxy.consumer(cert=None).get("metadata")
        self.assertEqual((reply.status, reply.reason), (496, "SSL Certificate Required"))

    async def test_plain_http_reason_phrase(self) -> None:
        provider, proxy = await self.setup()

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return s.recv(200)

        head = await deferToThread(plain)
        self.assertTrue(head.startswith(b"HTTP/1.1 497 HTTP Request Sent to HTTPS Port\r\n"), head)


class ThrottleOffTests(ProxyTestCase):
    def test_disabled_limits_nothing(self) -> None:
        """
        C{[throttle] enabled = false} ignores the limit tables and the
        Redis store.
        """
        config = ThrottleConfig(enabled=False, store="redis", redis_url="redis://127.0.0.1:1/0",
                                consumer=LimitSet(default=RateLimit(rate=1, burst=1)))
        throttle = throttle_from_config(config, reactor)
        for _ in range(5):
            self.assertIsNone(self.successResultOf(throttle.consume_consumer("200000000359")))

    async def test_disabled_end_to_end(self) -> None:
        """
        Over TLS, with the real throttle switched off, no C{X-Rate-Limit-*}
        header is sent even though the demo configures a consumer limit.
        """
        from ssp.service import Concerns
        from ssp.testing import RecordingAuditSink

        provider = Provider(self)
        proxy = await Proxy(self, provider, concerns=Concerns(audit=RecordingAuditSink()),
                            throttle={"enabled": False}).start()
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 200)
        self.assertIsNone(reply.header("X-Rate-Limit-Limit"))


class AdminLogTests(unittest.TestCase):
    async def test_scrapes_not_logged(self) -> None:
        """
        C{/metrics} and C{/healthz} scrapes on the admin listener leave no
        access-log line (docs/operations.md says that log is off).
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        provider = Provider(self)
        proxy = await Proxy(self, provider, admin={"endpoint": "tcp:0:interface=127.0.0.1"}).start()
        [admin] = [s for s in proxy.service if s.name == "admin.endpoint"]
        port = (await admin._waitingForPort).getHost().port
        agent = Agent(reactor)
        for path in (b"/metrics", b"/healthz"):
            response = await agent.request(b"GET", b"http://127.0.0.1:%d%s" % (port, path))
            await readBody(response)
            self.assertEqual(response.code, 200)
        lines = [formatEvent(e) for e in events]
        self.assertEqual([line for line in lines if "GET /" in line], [])


class StartupTests(unittest.TestCase):
    async def test_startup_line_and_build_info(self) -> None:
        """
        Once listening, one log line names the version, the configuration
        and the endpoints; C{ssp_build_info} carries the version.
        """
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        provider = Provider(self)
        proxy = await Proxy(self, provider).start()

        def started() -> list[dict[str, Any]]:
            return [e for e in events if e.get("log_format", "").startswith("SSP {version} started")]

        await until(started)
        self.assertEqual(len(started()), 1)
        self.assertEqual(
            formatEvent(started()[0]),
            f"SSP {ssp.__version__} started with the demo configuration: proxy on "
            f"tcp:0:interface=127.0.0.1 (127.0.0.1:{proxy.port}), admin on (off)")
        from prometheus_client import generate_latest

        exposition = generate_latest(proxy.service.metrics.registry).decode()
        self.assertIn(f'ssp_build_info{{version="{ssp.__version__}"}} 1.0', exposition)


class VersionTests(unittest.TestCase):
    def run_command(self, *args: str) -> Deferred[subprocess.CompletedProcess[str]]:
        return deferToThread(subprocess.run, [sys.executable, "-c", *args],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)

    async def test_ssp_version(self) -> None:
        result = await self.run_command("from ssp.cli import main; raise SystemExit(main())",
                                        "--version")
        self.assertEqual((result.returncode, result.stdout), (0, f"ssp {ssp.__version__}\n"))

    async def test_twistd_ssp_version(self) -> None:
        result = await self.run_command(
            "from twisted.scripts.twistd import run; run()", "ssp", "--version")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertEqual(result.stdout, f"ssp {ssp.__version__}\n")

    def test_one_source(self) -> None:
        """
        C{setup.cfg} reads the version from C{ssp/__init__.py}.
        """
        self.assertIn("version = attr: ssp.__version__",
                      (ROOT / "setup.cfg").read_text().splitlines())
        self.assertRegex(ssp.__version__, r"^\d+\.\d+\.\d+")

