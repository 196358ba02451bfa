"""
The alert rules and the Grafana dashboard cannot drift from the code: every
metric, label and exactly-matched label value they use is scraped from a
real proxy's admin /metrics after traffic that produces each of them.  The
dashboard's JSON is checked as Grafana imports it.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp.directory import CachingDirectory, parse_ldif
from ssp.metrics import Metrics
from ssp.model import RateDecision
from ssp.service import Concerns
from ssp.testing import MemoryDirectory, MemoryThrottle, RecordingAuditSink
from ssp.throttle import ThrottleUnavailable
from tests import promql
from tests.ports import free_port
from tests.support import DEMO_LDIF, Provider, Proxy, pki, spine_headers
from tests.test_alert_rules import NO_PROMTOOL, PROMTOOL
from tests.test_metrics import _get, samples


class _SwitchableThrottle(MemoryThrottle):
    """
    A throttle whose store can be switched off, as a Redis outage would.
    """

    available: bool = True

    def consume_consumer(self, asid: str) -> Deferred[RateDecision]:
        return super().consume_consumer(asid) if self.available else fail(ThrottleUnavailable())

    def consume_provider(self, asid: str) -> Deferred[RateDecision]:
        return super().consume_provider(asid) if self.available else fail(ThrottleUnavailable())


class LiveMetricsTests(unittest.TestCase):
    timeout = 120

    async def scrape_after_every_outcome(self) -> str:
        """
        Start a proxy (a CRL, cached SDS, switchable throttle store and
        audit), drive a request to each outcome the rules match on, and
        return its admin /metrics.
        """
        behind = MemoryDirectory(*parse_ldif(DEMO_LDIF.read_text()))
        cache_clock = Clock()
        directory = CachingDirectory(behind, cache_clock, ttl=60, negative_ttl=60,
                                     stale_limit=3600)
        throttle = _SwitchableThrottle()
        audit = RecordingAuditSink()
        admin = free_port()
        proxy = await Proxy(self, Provider(self),
                            Concerns(directory=directory, throttle=throttle, audit=audit),
                            admin={"endpoint": f"tcp:{admin}:interface=127.0.0.1"},
                            tls={"crls": (pki().path(pki().crl),)}).start()
        consumer = proxy.consumer()

        async def status(**headers: str) -> int:
            return (await consumer.get("metadata", headers=spine_headers(**headers))).status

        self.assertEqual(await status(), 200)
        self.assertEqual(await status(sender="999999999999"), 403)
        behind.available = False
        cache_clock.advance(61)
        self.assertEqual(await status(), 200)  # served stale
        self.assertEqual(await status(sender="888888888888"), 503)  # SDS_UNAVAILABLE
        behind.available = True
        throttle.available = False
        self.assertEqual(await status(), 503)  # THROTTLE_UNAVAILABLE
        throttle.available = True
        audit.writable = False
        self.assertEqual(await status(), 503)  # AUDIT_UNAVAILABLE
        code, text = await deferToThread(_get, f"http://127.0.0.1:{admin}/metrics")
        self.assertEqual(code, 200)
        ready = {labels[0][1]: value for (name, labels), value in samples(text.encode()).items()
                 if name == "ssp_ready"}
        self.assertEqual((ready["listening"], ready["audit"], ready["directory"]), (1, 0, 1))
        return text

    async def test_every_expression_is_backed_by_the_proxy(self) -> None:
        """
        Each selector of every alert and dashboard query names a metric the
        proxy exports, with the labels it matches and groups on and the
        label values it matches exactly.
        """
        exposed = promql.Exposed.parse(await self.scrape_after_every_outcome())
        found = {f"{name}: {problem}"
                 for name, expr in promql.every_expression()
                 for problem in promql.problems(promql.parse(expr), exposed)}
        self.assertEqual(found, set())

    async def test_the_check_catches_drift(self) -> None:
        """
        The same check against the same scrape rejects a misspelt metric, a
        label the metric lacks, a value never seen and a grouping label
        nothing has.
        """
        exposed = promql.Exposed.parse(await self.scrape_after_every_outcome())
        for expr, expected in [
            ("rate(ssp_request_total[5m])", "ssp_request_total: not exported"),
            ('ssp_refusals_total{decision="refused"}', "ssp_refusals_total: no label decision"),
            ('ssp_refusals_total{reason="AUDIT_DOWN"}', "ssp_refusals_total: reason='AUDIT_DOWN'"),
            ("sum by (role) (ssp_in_flight)", "grouping label role: on none of its metrics"),
            ('ssp_throttle_store_up{store="redis"}', "ssp_throttle_store_up: no label store"),
        ]:
            found = promql.problems(promql.parse(expr), exposed)
            self.assertEqual(len(found), 1, (expr, found))
            self.assertTrue(found[0].startswith(expected), (expr, found))


class ReadinessGaugeTests(unittest.TestCase):
    def test_one_sample_per_check(self) -> None:
        """
        Each C{/readyz} check is a C{ssp_ready{check}} sample, 1 when it
        passes and 0 when it fails, read when scraped.
        """
        checks = {"listening": True, "audit": True}
        metrics = Metrics(readiness=lambda: checks)
        checks["audit"] = False
        exposed = promql.Exposed.parse(metrics.exposition().decode())
        self.assertEqual(exposed.series["ssp_ready"], {"check": {"listening", "audit"}})
        found = samples(metrics.exposition())
        self.assertEqual((found[("ssp_ready", (("check", "listening"),))],
                          found[("ssp_ready", (("check", "audit"),))]), (1, 0))


class DashboardTests(unittest.TestCase):
    def setUp(self) -> None:
        self.board = promql.dashboard()

    def test_importable(self) -> None:
        """
        The JSON has what Grafana's import needs: a uid and title, panels
        with unique ids and grid positions, and every query on the
        data-source variable (a Prometheus picker), so importing asks
        nothing and one file serves every Grafana.
        """
        board = self.board
        self.assertEqual((board["uid"], board["title"]), ("ssp-overview", "Spine Security Proxy"))
        self.assertNotIn("__inputs", board)
        panels = promql.dashboard_panels(board)
        self.assertEqual(len({p["id"] for p in panels}), len(panels))
        for panel in panels:
            self.assertEqual(set(panel["gridPos"]), {"h", "w", "x", "y"}, panel["title"])
            self.assertLessEqual(panel["gridPos"]["x"] + panel["gridPos"]["w"], 24)
            if panel["type"] != "row":
                self.assertTrue(panel["targets"], panel["title"])
                self.assertTrue(panel["description"], panel["title"])
                self.assertEqual(panel["datasource"]["uid"], "${datasource}")
        variables = {v["name"]: v for v in board["templating"]["list"]}
        self.assertEqual((variables["datasource"]["type"], variables["datasource"]["query"]),
                         ("datasource", "prometheus"))

    def test_required_panels(self) -> None:
        """
        The panels the operations team asked for are there, each over the
        metric it is about.
        """
        by_title: dict[str, set[str]] = {}
        for title, expr in promql.dashboard_expressions(self.board):
            by_title.setdefault(title, set()).update(
                s.metric for s in promql.parse(expr).selectors)
        expected = {
            "Requests by decision and status": {"ssp_requests_total"},
            "Refusals by reason": {"ssp_refusals_total"},
            "Total latency percentiles": {"ssp_request_seconds_bucket"},
            "Upstream latency percentiles": {"ssp_upstream_seconds_bucket"},
            "In-flight requests and connections": {
                "ssp_in_flight", "ssp_connections", "ssp_connections_refused_total"},
            "Throttle decisions": {"ssp_throttle_decisions_total"},
            "SDS cache outcomes": {"ssp_sds_cache_lookups_total"},
            "Audit backlog": {"ssp_audit_pending"},
            "Certificate time to expiry": {"ssp_certificate_expiry_timestamp_seconds"},
            "CRL time to nextUpdate": {"ssp_crl_next_update_timestamp_seconds"},
        }
        for title, metrics in expected.items():
            self.assertEqual(by_title.get(title), metrics, title)

    def test_queries_are_promql(self) -> None:
        """
        C{promtool check rules} parses every dashboard query (as recording
        rules, Grafana's variables replaced).
        """
        if PROMTOOL is None:
            raise unittest.SkipTest(NO_PROMTOOL)
        with tempfile.TemporaryDirectory() as scratch:
            rules = Path(scratch) / "dashboard-queries.yml"
            rules.write_text(promql.as_rule_file(promql.dashboard_expressions(self.board)))
            result = subprocess.run([PROMTOOL, "check", "rules", str(rules)],
                                    capture_output=True, text=True, timeout=120)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
