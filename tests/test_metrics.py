"""
Prometheus metrics and the admin listener: unit tests over records and
fakes, then the real admin port of a running proxy.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import urllib.error
import urllib.request

from typing import Any

import attrs
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.defer import fail, gatherResults
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp.directory import CachingDirectory
from ssp.metrics import MAX_INTERACTION_LABELS, Metrics
from ssp.model import AuditRecord
from ssp.testing import MemoryDirectory, MemoryThrottle
from ssp.throttle import ThrottleUnavailable
from tests.ports import free_port
from tests.support import ENDPOINT, METADATA, Provider, Proxy, spine_headers


def samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """
    Every sample of an exposition, keyed by name and sorted labels.
    """
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition.decode())
        for sample in family.samples
    }


def completed(interaction: str = "", token: str = "", status: int = 200,
              decision: str = "forwarded") -> AuditRecord:
    return AuditRecord(event="completed", request_id="r", time=0.0, interaction=interaction,
                       token=token, status=status, decision=decision, total_latency=0.002,
                       upstream_latency=0.001 if decision == "forwarded" else None)


class ObserveTests(unittest.TestCase):
    def test_requests_and_refusals(self) -> None:
        """
        Completed records count by status, decision and (known) interaction;
        refusals by status and the fixed part of their token (no ASIDs in
        label values); latencies land in histograms.
        """
        metrics = Metrics(known_interaction=lambda interaction: interaction == "urn:i")
        metrics.observe(completed("urn:i"))
        for sender in ("1", "2"):
            metrics.observe(completed("urn:i", f"ASID_CHECK_FAILED_MESSAGESENDER_{sender}", 403,
                                      "refused"))
        metrics.observe(AuditRecord(event="connection-refused", request_id="", time=0.0,
                                    token="TLS_HANDSHAKE_FAILED: no shared cipher"))
        found = samples(metrics.exposition())
        self.assertEqual(found[("ssp_requests_total", (("decision", "forwarded"),
                                                       ("interaction", "urn:i"),
                                                       ("status", "200")))], 1)
        self.assertEqual(found[("ssp_refusals_total", (("reason", "ASID_CHECK_FAILED"),
                                                       ("status", "403")))], 2)
        self.assertEqual(found[("ssp_request_seconds_count", ())], 3)
        self.assertEqual(found[("ssp_upstream_seconds_count", ())], 1)
        self.assertEqual(found[("ssp_tls_handshake_failures_total", ())], 1)

    def test_labels_bounded(self) -> None:
        """
        An interaction neither the directory nor the configuration knows, a
        status outside 100-599, a decision or token of no documented kind,
        and the origin in a CORS refusal all become C{other} or the kind:
        never the consumer's own text.
        """
        metrics = Metrics(known_interaction=lambda interaction: False)
        metrics.observe(completed("urn:nhs:names:services:gpconnect:" + "x" * 1000))
        metrics.observe(completed("", status=1234))
        metrics.observe(completed("", "CORS_PREFLIGHT_REFUSED_https://evil.example", 403,
                                  "refused"))
        metrics.observe(completed("", "SOMETHING_NEW: detail", 400, "refused"))
        metrics.observe(completed("", "CLIENT_CERTIFICATE_INVALID_EXPIRED", 495, "refused"))
        metrics.observe(completed("", decision="invented"))
        values = {value for (name, labels) in samples(metrics.exposition())
                  if name != "ssp_build_info" for _, value in labels}
        self.assertEqual(
            values,
            {"200", "403", "400", "495", "forwarded", "refused", "other",
             "CORS_PREFLIGHT_REFUSED", "CLIENT_CERTIFICATE_INVALID_EXPIRED"} | _BUCKET_LABELS)

    def test_interaction_labels_capped(self) -> None:
        """
        However many interactions the directory knows, at most
        C{MAX_INTERACTION_LABELS} become label values; the rest are
        C{other}.
        """
        metrics = Metrics(known_interaction=lambda interaction: True)
        for n in range(MAX_INTERACTION_LABELS + 50):
            metrics.observe(completed(f"urn:i:{n}"))
        interactions = {dict(labels).get("interaction")
                        for name, labels in samples(metrics.exposition())
                        if name == "ssp_requests_total"}
        self.assertEqual(len(interactions), MAX_INTERACTION_LABELS + 1)
        self.assertIn("other", interactions)

    def test_gauges(self) -> None:
        """
        In-flight requests, the audit queue depth and connection counts are
        read when scraped.
        """
        state = {"in_flight": 3, "pending": 7, "open": 4, "refused": 2, "store": True}
        metrics = Metrics(throttle_store_up=lambda: state["store"],
                          in_flight=lambda: state["in_flight"],
                          audit_pending=lambda: state["pending"],
                          connections=lambda: state["open"],
                          refused_connections=lambda: state["refused"])
        state["pending"] = 9
        found = samples(metrics.exposition())
        self.assertEqual([found[(name, ())] for name in (
            "ssp_in_flight", "ssp_audit_pending", "ssp_connections",
            "ssp_connections_refused_total", "ssp_throttle_store_up")], [3, 9, 4, 2, 1])
        state["store"] = False
        self.assertEqual(samples(metrics.exposition())[("ssp_throttle_store_up", ())], 0)


_BUCKET_LABELS = {str(float(b)) for b in (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                          1, 2.5, 5, 10, 30, 60)} | {"+Inf"}


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
        service._certificate_expiry = dict(service._certificate_expiry,
                                           server=reactor.seconds() - 1)
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"),
                         (503, "not ready: audit, directory, tls\n"))


def _flood(port: int, context: ssl.SSLContext, count: int, batch: int = 100) -> list[int]:
    """
    Blocking: C{count} requests pipelined over TLS, each with its own
    random C{Ssp-InteractionID} (half well-formed, half junk of up to
    2 KiB); the statuses of the answers.  A connection the proxy closes
    (as after a 496) is replaced, resuming its TLS session, and the
    unanswered requests sent again.
    """
    statuses: list[int] = []
    session = None
    while len(statuses) < count:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
            replies = tls.makefile("rb")
            closed = False
            while not closed and len(statuses) < count:
                heads = [_random_interaction_request(n)
                         for n in range(min(batch, count - len(statuses)))]
                tls.sendall(b"".join(heads))
                for _ in heads:
                    status, closed = _read_response(replies)
                    statuses.append(status)
                    if closed:
                        break
            session = tls.session
    return statuses


def _random_interaction_request(n: int) -> bytes:
    interaction = (f"urn:nhs:names:services:gpconnect:fhir:rest:read:"
                   f"{secrets.token_hex(8)}-1" if n % 2 else
                   secrets.token_urlsafe(secrets.randbelow(2048) + 1))
    headers = {**spine_headers(), "Ssp-InteractionID": interaction, "Host": "localhost"}
    return (f"GET /{ENDPOINT}/metadata HTTP/1.1\r\n".encode()
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers.items()) + b"\r\n")


def _read_response(replies: Any) -> tuple[int, bool]:
    """
    Read one response; its status and whether it closes the connection.
    """
    status = int(replies.readline().split()[1])
    length, closes = 0, False
    while (line := replies.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection":
            closes = value.strip().lower() == b"close"
    replies.read(length)
    return status, closes


class BoundedExpositionTests(unittest.TestCase):
    timeout = 600

    async def test_random_interactions(self) -> None:
        """
        10,000 requests, 8,000 with a client certificate (pipelined) and
        2,000 without (a connection each: a 496 closes it),
        each with a random C{Ssp-InteractionID}: C{/metrics} stays under
        12 KiB (it grew by a series per request, up to 32 KiB each) and
        names none of the IDs.
        """
        provider = Provider(self)
        admin = free_port()
        proxy = await Proxy(self, provider,
                            admin={"endpoint": f"tcp:{admin}:interface=127.0.0.1"}).start()
        base = f"http://127.0.0.1:{admin}"
        self.assertEqual((await proxy.consumer().get("metadata")).status, 200)
        before = len((await deferToThread(_get, f"{base}/metrics"))[1])
        statuses = await gatherResults([
            deferToThread(_flood, proxy.port, proxy.consumer(cert).context, count)
            for cert, count in (("consumer-0", 8000), (None, 2000))
        ])
        self.assertEqual(set(statuses[0]), {400, 403})
        self.assertEqual(set(statuses[1]), {496})
        status, text = await deferToThread(_get, f"{base}/metrics")
        self.assertEqual(status, 200)
        found = samples(text.encode())
        interactions = {dict(labels)["interaction"] for name, labels in found
                        if name == "ssp_requests_total"}
        self.assertEqual(interactions, {METADATA, "other"})
        self.assertEqual(sum(value for (name, _), value in found.items()
                             if name == "ssp_requests_total"), 10_001)
        self.assertLess(len(text), 12 * 1024, f"grew from {before} bytes")
