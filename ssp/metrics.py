# -*- test-case-name: tests.test_metrics -*-
"""
Prometheus metrics and the admin listener's health endpoints.

Metrics are fed from the same completed-exchange records the audit trail
gets, so the two can never disagree about what happened.

Every label value comes from a bounded set, whatever a consumer sends: an
interaction ID is a label only when the directory or the configuration
knows it, a status only when it is an HTTP status, a refusal reason only
as one of the documented token kinds; anything else is C{other}.  Each
series costs memory here and in Prometheus, so raw consumer input (even
from a connection without a certificate) must never mint one.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterator

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from zope.interface import implementer

from ssp import __version__
from ssp.interfaces import ICacheCounters, IDirectory, IThrottle
from ssp.model import AuditRecord, RateDecision
from ssp.refusals import TLS_HANDSHAKE

#: The label value for anything outside a label's bounded set.
OTHER = "other"
#: At most this many interaction IDs become label values, however many the
#: directory knows; later ones count as C{other}.
MAX_INTERACTION_LABELS = 500
_DECISIONS = frozenset({"forwarded", "refused", "failed", "abandoned", "answered"})
#: The token kinds of C{docs/errors.md}: a refusal's C{reason} label is the
#: kind its token starts with (without the ASIDs, URLs or origins after it),
#: except that a certificate's verification failure keeps its OpenSSL reason.
_REASONS = (
    "BAD_REQUEST", "ENDPOINT", "ASID_CHECK_FAILED", "PARTYKEY_INTERACTION_CHECK_FAILED",
    "FOT_CHECK_FAILED", "CORS_PREFLIGHT_REFUSED", "405", "REQUEST_TIMEOUT",
    "REQUEST_BODY_LARGER_THAN", "REQUEST_LINE_LONGER_THAN", "REQUEST_HEADERS_LARGER_THAN",
    "MORE_THAN", "RATE_LIMIT", "CLIENT_CERTIFICATE_INVALID", "CERTIFICATE_FQDN_NOT_REGISTERED",
    "CLIENT_CERTIFICATE_REQUIRED",
    "HTTP_REQUEST_SENT_TO_HTTPS_PORT", "ERROR_COMMUNICATING", "TIMEOUT_COMMUNICATING",
    "SDS_UNAVAILABLE", "THROTTLE_UNAVAILABLE", "AUDIT_UNAVAILABLE",
)
_CERTIFICATE_REASON = re.compile(r"CLIENT_CERTIFICATE_INVALID_[A-Z0-9_]{1,32}")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """
    Counters and histograms over completed exchanges, in a registry of
    their own so several proxies can live in one test process.
    """

    def __init__(self, in_flight: Callable[[], float] = lambda: 0,
                 audit_pending: Callable[[], float] = lambda: 0,
                 readiness: Callable[[], dict[str, bool]] = dict,
                 directory: Callable[[], IDirectory | None] = lambda: None,
                 connections: Callable[[], float] = lambda: 0,
                 refused_connections: Callable[[], float] = lambda: 0,
                 certificate_expiry: Callable[[], dict[str, float]] = dict,
                 crl_next_update: Callable[[], dict[str, float]] = dict,
                 known_interaction: Callable[[str], bool] = lambda interaction: False,
                 throttle_store_up: Callable[[], bool] = lambda: True) -> None:
        """
        @param in_flight: the number of requests in progress.
        @param audit_pending: L{IAuditSink.pending} of the audit sink.
        @param readiness: what C{/readyz} checks, by name; exported as
            C{ssp_ready} so an alert can say which check fails.
        @param directory: the directory in use (it changes on reload).
        @param connections: open consumer connections.
        @param refused_connections: connections refused so far for being
            over the connection caps.
        @param certificate_expiry: the notAfter (POSIX time) of the
            proxy's own certificates, by role (C{server}, C{upstream_client}).
        @param crl_next_update: the earliest nextUpdate (POSIX time) of
            each configured CRL file, by path.
        @param known_interaction: whether the directory or the
            configuration knows an interaction ID, so that it may be a
            label value.
        @param throttle_store_up: whether the rate store answers
            (L{IThrottle.available}).
        """
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "ssp_requests", "Completed requests.",
            ["status", "decision", "interaction"], registry=self.registry,
        )
        self.refusals = Counter(
            "ssp_refusals", "Requests the proxy refused, by token kind.",
            ["status", "reason"], registry=self.registry,
        )
        self.total_latency = Histogram(
            "ssp_request_seconds", "Time from request start to completion.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.upstream_latency = Histogram(
            "ssp_upstream_seconds", "Time from forwarding to the provider's response headers.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tls_failures = Counter(
            "ssp_tls_handshake_failures", "Failed inbound TLS handshakes.", registry=self.registry
        )
        self.throttle_decisions = Counter(
            "ssp_throttle_decisions", "Rate-limit decisions by role and outcome.",
            ["role", "decision"], registry=self.registry,
        )
        self._requests = _Children(self.requests)
        self._refusals = _Children(self.refusals)
        gauge = Gauge("ssp_in_flight", "Requests in progress.", registry=self.registry)
        gauge.set_function(in_flight)
        pending = Gauge("ssp_audit_pending",
                        "Audit records accepted but not yet durable (the queue depth).",
                        registry=self.registry)
        pending.set_function(audit_pending)
        self.registry.register(_Readiness(readiness))
        open_connections = Gauge("ssp_connections", "Open consumer connections.",
                                 registry=self.registry)
        open_connections.set_function(connections)
        store_up = Gauge("ssp_throttle_store_up",
                         "1 while the rate-limit store answers, 0 during an outage.",
                         registry=self.registry)
        store_up.set_function(lambda: 1 if throttle_store_up() else 0)
        self.registry.register(_CacheCollector(directory))
        self.registry.register(_RefusedConnections(refused_connections))
        self.registry.register(_Timestamps(
            "ssp_certificate_expiry_timestamp_seconds",
            "When the proxy's own certificate expires (notAfter), by role.", "role",
            certificate_expiry))
        self.registry.register(_Timestamps(
            "ssp_crl_next_update_timestamp_seconds",
            "When a configured CRL file expires (its earliest nextUpdate).", "file",
            crl_next_update))
        self._known_interaction = known_interaction
        self._interaction_labels: set[str] = set()
        Gauge("ssp_build_info", "The running SSP version (always 1).", ["version"],
              registry=self.registry).labels(version=__version__).set(1)

    def counting(self, throttle: IThrottle) -> IThrottle:
        """
        C{throttle}, counting its decisions in C{ssp_throttle_decisions}.
        """
        return _CountingThrottle(throttle, _Children(self.throttle_decisions))

    def observe(self, record: AuditRecord) -> None:
        if record.event == "connection-refused" and record.token.startswith(TLS_HANDSHAKE):
            self.tls_failures.inc()
            return
        status = _status(record.status)
        decision = record.decision if record.decision in _DECISIONS else OTHER
        self._requests(status, decision, self._interaction(record.interaction)).inc()
        if record.decision == "refused":
            self._refusals(status, refusal_kind(record.token)).inc()
        if record.total_latency is not None:
            self.total_latency.observe(record.total_latency)
        if record.upstream_latency is not None:
            self.upstream_latency.observe(record.upstream_latency)

    def _interaction(self, interaction: str) -> str:
        """
        The label value for an interaction ID: itself when known and within
        L{MAX_INTERACTION_LABELS}, else L{OTHER}.
        """
        if interaction in self._interaction_labels:
            return interaction
        if (len(self._interaction_labels) < MAX_INTERACTION_LABELS
                and self._known_interaction(interaction)):
            self._interaction_labels.add(interaction)
            return interaction
        return OTHER

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Children:
    """
    The children of a labelled metric, remembered by their label values:
    C{labels()} checks and converts its arguments and takes a lock on
    every call, for a child that exists after the first.  Holds what the
    metric itself holds, one child per label set.
    """

    def __init__(self, metric: Any) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child


@implementer(IThrottle)
@attrs.frozen
class _CountingThrottle:
    throttle: IThrottle
    decisions: _Children

    def consume_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self._count("consumer", self.throttle.consume_consumer(asid))

    def consume_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self._count("provider", self.throttle.consume_provider(asid))

    def peek_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self.throttle.peek_consumer(asid)  # a peek decides nothing: not counted

    def peek_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self.throttle.peek_provider(asid)
    @property
    def available(self) -> bool:
        return bool(self.throttle.available)

    def _count(self, role: str, d: Deferred[RateDecision | None]) -> Deferred[RateDecision | None]:
        def decided(decision: RateDecision | None) -> RateDecision | None:
            outcome = "unlimited" if decision is None else (
                "allowed" if decision.allowed else "refused")
            self.decisions(role, outcome).inc()
            return decision

        def failed(failure: Any) -> Any:
            self.decisions(role, "unavailable").inc()
            return failure

        return d.addCallbacks(decided, failed)


@attrs.frozen
class _Readiness:
    """
    C{ssp_ready{check}}: 1 when that C{/readyz} check passes, else 0.
    """

    readiness: Callable[[], dict[str, bool]]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "ssp_ready", "1 when the /readyz check passes, 0 when it fails.", labels=["check"])
        for check, ok in sorted(self.readiness().items()):
            family.add_metric([check], 1 if ok else 0)
        yield family


@attrs.frozen
class _CacheCollector:
    """
    The SDS cache's counters, read when scraped; absent for a directory
    without a cache (LDIF).
    """

    directory: Callable[[], IDirectory | None]

    def collect(self) -> Iterator[Metric]:
        directory = self.directory()
        if ICacheCounters.providedBy(directory):
            lookups = CounterMetricFamily(
                "ssp_sds_cache_lookups", "SDS lookups by cache outcome.", labels=["outcome"])
            lookups.add_metric(["hit"], directory.hits)
            lookups.add_metric(["miss"], directory.misses)
            lookups.add_metric(["stale"], directory.stale_served)
            yield lookups


@attrs.frozen
class _RefusedConnections:
    refused: Callable[[], float]

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "ssp_connections_refused", "Connections closed at once for being over the caps.")
        family.add_metric([], self.refused())
        yield family


@attrs.frozen
class _Timestamps:
    """
    A gauge of POSIX times, one per label value, read when scraped (they
    change on reload).
    """

    name: str
    documentation: str
    label: str
    values: Callable[[], dict[str, float]]

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, timestamp in sorted(self.values().items()):
            family.add_metric([value], timestamp)
        yield family


def refusal_kind(token: str) -> str:
    """
    The documented kind a refusal token starts with, or L{OTHER}: never
    the ASIDs, URLs or origins that follow it.
    """
    if _CERTIFICATE_REASON.fullmatch(token):
        return token
    for kind in _REASONS:
        if token.startswith(kind):
            return kind
    return OTHER


def _status(status: int) -> str:
    """
    An HTTP status as a label value; anything a provider sent outside
    100-599 (or no status at all) is L{OTHER}.
    """
    return str(status) if 100 <= status <= 599 else OTHER


class _Text(Resource):
    isLeaf = True

    def __init__(self, render: Callable[[], tuple[int, bytes, bytes]]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request: Any) -> bytes:
        status, content_type, body = self._render()
        request.setResponseCode(status)
        request.setHeader(b"Content-Type", content_type)
        return body


def admin_resource(metrics: Metrics, readiness: Callable[[], dict[str, bool]],
                   degraded: Callable[[], list[str]] = list) -> Resource:
    """
    C{/healthz} (the process answers), C{/readyz} (every dependency is
    usable: 200 or 503 with the failing ones named, and the degraded ones
    named either way) and C{/metrics}.

    @param degraded: dependencies that are down but stood in for (the
        rate store under C{on_store_failure = "local"}): still ready.
    """

    def ready() -> tuple[int, bytes, bytes]:
        checks = readiness()
        failing = sorted(name for name, ok in checks.items() if not ok)
        text = "not ready: " + ", ".join(failing) if failing else "ready"
        stood_in = sorted(degraded())
        if stood_in:
            text += " (degraded: " + ", ".join(stood_in) + ")"
        return (503 if failing else 200), b"text/plain", text.encode() + b"\n"

    root = Resource()
    root.putChild(b"healthz", _Text(lambda: (200, b"text/plain", b"ok\n")))
    root.putChild(b"readyz", _Text(ready))
    root.putChild(
        b"metrics",
        _Text(lambda: (200, CONTENT_TYPE_LATEST.encode(), metrics.exposition())),
    )
    return root
