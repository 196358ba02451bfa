"""
Prometheus metrics and the admin listener: unit tests over records and
fakes, then the real admin port of a running proxy.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp.directory import CachingDirectory
from ssp.errors import ThrottleUnavailable
from ssp.metrics import Metrics
from ssp.model import AuditRecord
from ssp.testing import MemoryDirectory, MemoryThrottle
from tests.ports import free_port
from tests.support import Provider, Proxy, spine_headers


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of an exposition, keyed by name and sorted labels.
    """
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


class ObserveTests(unittest.TestCase):
    def test_requests_and_refusals(self) -> None:
        """
        Completed records count by status, decision and interaction;
        refusals by status and the fixed part of their token (no ASIDs in
        label values); latencies land in histograms.
        """
        metrics = Metrics()
        for token, status, decision in [("", 200, "forwarded"),
                                        ("ASID_CHECK_FAILED_MESSAGESENDER_1", 403, "refused"),
                                        ("ASID_CHECK_FAILED_MESSAGESENDER_2", 403, "refused")]:
            metrics.observe(AuditRecord(event="completed", request_id="r", time=0.0,
                                        interaction="urn:i", token=token, status=status,
                                        decision=decision, total_latency=0.002,
                                        upstream_latency=0.001 if status == 200 else None))
        metrics.observe(AuditRecord(event="tls-failed", request_id="", time=0.0))
        found = samples(metrics.exposition())
        self.assertEqual(found[("ssp_requests_total", (("decision", "forwarded"),
                                                       ("interaction", "urn:i"),
                                                       ("status", "200")))], 1)
        self.assertEqual(found[("ssp_refusals_total", (("reason", "ASID_CHECK_FAILED"),
                                                       ("status", "403")))], 2)
        self.assertEqual(found[("ssp_request_seconds_count", ())], 3)
        self.assertEqual(found[("ssp_upstream_seconds_count", ())], 1)
        self.assertEqual(found[("ssp_tls_handshake_failures_total", ())], 1)

    def test_gauges(self) -> None:
        """
        In-flight requests, the audit queue depth and connection counts are
        read when scraped.
        """
        state = {"in_flight": 3, "pending": 7, "open": 4, "refused": 2}
        metrics = Metrics(in_flight=lambda: state["in_flight"],
                          audit_pending=lambda: state["pending"],
                          connections=lambda: state["open"],
                          refused_connections=lambda: state["refused"])
        state["pending"] = 9
        found = samples(metrics.exposition())
        self.assertEqual([found[(name, ())] for name in (
            "ssp_in_flight", "ssp_audit_pending", "ssp_connections",
            "ssp_connections_refused_total")], [3, 9, 4, 2])


class ThrottleDecisionTests(unittest.TestCase):
    async def test_counted(self) -> None:
        """
        Every decision is counted by role and outcome, including an
        unlimited ASID and a store that is down.
        """
        metrics = Metrics()
        counted = metrics.counting(MemoryThrottle(consumer_allowance=1))
        await counted.consume_consumer("a")
        await counted.consume_consumer("a")
        await counted.consume_provider("b")
        unavailable = metrics.counting(_DownThrottle())
        with self.assertRaises(ThrottleUnavailable):
            await unavailable.consume_provider("b")
        found = samples(metrics.exposition())
        for role, decision, count in [("consumer", "allowed", 1), ("consumer", "refused", 1),
                                      ("provider", "allowed", 1), ("provider", "unavailable", 1)]:
            key = ("ssp_throttle_decisions_total", (("decision", decision), ("role", role)))
            self.assertEqual(found[key], count, key)


class _DownThrottle:
    def consume_provider(self, asid: str):  # type: ignore[no-untyped-def]
        return fail(ThrottleUnavailable())


class CacheTests(unittest.TestCase):
    async def test_sds_cache(self) -> None:
        """
        The SDS cache's hits and misses are exported; an LDIF directory
        (no cache) exports none.
        """
        cache = CachingDirectory(MemoryDirectory(), Clock(), ttl=60, negative_ttl=60,
                                 stale_limit=60)
        metrics = Metrics(directory=lambda: cache)
        await cache.accredited_system("1")
        await cache.accredited_system("1")
        await cache.accredited_system("1")
        found = samples(metrics.exposition())
        lookup = "ssp_sds_cache_lookups_total"
        self.assertEqual(
            [found[(lookup, (("outcome", o),))] for o in ("hit", "miss", "stale")], [2, 1, 0])
        self.assertFalse(any(name == lookup for name, _ in
                             samples(Metrics(directory=MemoryDirectory).exposition())))


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


class AdminListenerTests(unittest.TestCase):
    timeout = 60

    async def test_health_readiness_metrics(self) -> None:
        """
        The admin port answers C{/healthz}, C{/readyz} (503 naming the
        audit when it cannot write) and C{/metrics} counting real traffic.
        """
        provider = Provider(self)
        admin = free_port()
        proxy = await Proxy(self, provider,
                            admin={"endpoint": f"tcp:{admin}:interface=127.0.0.1"}).start()
        consumer = proxy.consumer()
        self.assertEqual((await consumer.get("metadata")).status, 200)
        refused = spine_headers(sender="999999999999")
        self.assertEqual((await consumer.get("metadata", headers=refused)).status, 403)
        base = f"http://127.0.0.1:{admin}"
        self.assertEqual(await deferToThread(_get, f"{base}/healthz"), (200, "ok\n"))
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"), (200, "ready\n"))
        status, text = await deferToThread(_get, f"{base}/metrics")
        found = samples(text.encode())
        self.assertEqual(found[("ssp_refusals_total", (("reason", "ASID_CHECK_FAILED"),
                                                       ("status", "403")))], 1)
        self.assertEqual(found[("ssp_throttle_decisions_total",
                                (("decision", "allowed"), ("role", "consumer")))], 1)
        proxy.audit.writable = False
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"),
                         (503, "not ready: audit\n"))
        service = proxy.service
        service.proxy.checks = attrs.evolve(service.proxy.checks,
                                            directory=MemoryDirectory(available=False))
        service._certificate_expiry = reactor.seconds() - 1
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"),
                         (503, "not ready: audit, directory, tls\n"))
