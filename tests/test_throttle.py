"""
Tests for L{ssp.throttle}: GCRA sequences, the memory and Redis stores,
the throttle's configuration and the pipeline helpers.

The same table of exact sequences runs against L{gcra}, the memory store
and the Lua script in a real Redis: Redis's clock can't be faked, so the
script takes an injected C{now} there (production uses Redis C{TIME}).
Tests that need Redis's own clock use limits that refill once an hour, so
no timing noise can change a result.
"""

from __future__ import annotations

import json
import os
import sys
import tomllib
from pathlib import Path
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase
from txredisapi import Connection
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ssp.config import LimitSet, RateLimit, ThrottleConfig, parse
from ssp.errors import ProviderBusy, TooManyRequests
from ssp.interfaces import IThrottle
from ssp.model import RateDecision
from ssp.throttle import (
    IRateStore,
    MemoryRateStore,
    RedisRateStore,
    Throttle,
    ThrottleUnavailable,
    check_consumer,
    check_provider,
    emission_interval,
    gcra,
    retry_after,
    throttle_from_config,
)
from ssp.directory import LDIFDirectory
from ssp.service import Concerns
from ssp.testing import RecordingAuditSink
from tests import redis
from tests.ports import free_port
from tests.support import DEMO_LDIF, Provider, Proxy
from tests.test_metrics import _get

REPO = Path(__file__).resolve().parent.parent


@attrs.frozen
class Step:
    """
    At time C{at}, one request gets this decision.
    """

    at: float
    allowed: bool
    remaining: int
    reset_after: float
    retry_after: float = 0.0


# (limit, steps): every field of every decision, worked out by hand from
# T = period / rate and tau = T * (burst - 1).
SEQUENCES: dict[str, tuple[RateLimit, list[Step]]] = {
    # T = 1 s, tau = 0: one at a time, one per second.
    "1/s burst 1": (
        RateLimit(rate=1, period=1.0, burst=1),
        [
            Step(0.0, True, 0, 1.0),
            Step(0.0, False, 0, 1.0, 1.0),
            Step(0.5, False, 0, 0.5, 0.5),
            Step(1.0, True, 0, 1.0),
            Step(2.5, True, 0, 1.0),
            Step(3.0, False, 0, 0.5, 0.5),
        ],
    ),
    # T = 0.1 s, tau = 0.4 s: five at once, then one per 100 ms.
    "10/s burst 5": (
        RateLimit(rate=10, period=1.0, burst=5),
        [
            Step(0.0, True, 4, 0.1),
            Step(0.0, True, 3, 0.2),
            Step(0.0, True, 2, 0.3),
            Step(0.0, True, 1, 0.4),
            Step(0.0, True, 0, 0.5),
            Step(0.0, False, 0, 0.5, 0.1),
            Step(0.1, True, 0, 0.5),
            Step(0.35, True, 1, 0.35),
            Step(0.35, True, 0, 0.45),
            Step(0.35, False, 0, 0.45, 0.05),
            Step(2.0, True, 4, 0.1),
        ],
    ),
    # T = 20 s, tau = 40 s.
    "3/min burst 3": (
        RateLimit(rate=3, period=60.0, burst=3),
        [
            Step(0.0, True, 2, 20.0),
            Step(0.0, True, 1, 40.0),
            Step(0.0, True, 0, 60.0),
            Step(0.0, False, 0, 60.0, 20.0),
            Step(19.5, False, 0, 40.5, 0.5),
            Step(20.0, True, 0, 60.0),
            Step(70.0, True, 1, 30.0),
            Step(70.0, True, 0, 50.0),
            Step(70.0, False, 0, 50.0, 10.0),
        ],
    ),
    # T = 1/3 s rounded to 333333 us, tau = T.
    "3/s burst 2": (
        RateLimit(rate=3, period=1.0, burst=2),
        [
            Step(0.0, True, 1, 0.333333),
            Step(0.0, True, 0, 0.666666),
            Step(0.0, False, 0, 0.666666, 0.333333),
            Step(0.333333, True, 0, 0.666666),
        ],
    ),
}


def expected(limit: RateLimit, step: Step) -> RateDecision:
    return RateDecision(step.allowed, limit.burst, step.remaining, step.reset_after, step.retry_after)


class GCRATests(SynchronousTestCase):
    """
    The pure function everything else mirrors.
    """

    def test_sequences(self) -> None:
        for name, (limit, steps) in SEQUENCES.items():
            tat = None
            for i, step in enumerate(steps):
                new, decision = gcra(tat, round(step.at * 1_000_000), limit)
                self.assertEqual(decision, expected(limit, step), f"{name} step {i}")
                self.assertEqual(new is None, not step.allowed)
                tat = tat if new is None else new

    def test_interval_rounded_to_microsecond(self) -> None:
        self.assertEqual(emission_interval(RateLimit(rate=3, period=1.0)), 333_333)
        self.assertEqual(emission_interval(RateLimit(rate=2, period=3.0)), 1_500_000)
        self.assertEqual(emission_interval(RateLimit(rate=10**9, period=1.0)), 1)

    def test_expired_tat_is_a_fresh_key(self) -> None:
        """
        A TAT in the past counts as a full bucket, so dropping it is safe.
        """
        limit = RateLimit(rate=10, period=1.0, burst=5)
        self.assertEqual(gcra(1_000, 5_000_000, limit), gcra(None, 5_000_000, limit))

    def test_at_most_burst_plus_rate_per_period(self) -> None:
        """
        Hammering every millisecond for one period admits burst + rate.
        """
        limit = RateLimit(rate=20, period=1.0, burst=5)
        tat, allowed = None, 0
        for ms in range(1001):
            new, decision = gcra(tat, ms * 1000, limit)
            self.assertGreaterEqual(decision.remaining, 0)
            self.assertLessEqual(decision.remaining, limit.burst)
            if new is not None:
                tat, allowed = new, allowed + 1
        self.assertEqual(allowed, 25)


class MemoryRateStoreTests(SynchronousTestCase):
    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IRateStore, MemoryRateStore(Clock())))

    def test_sequences(self) -> None:
        for name, (limit, steps) in SEQUENCES.items():
            clock = Clock()
            store = MemoryRateStore(clock)
            for i, step in enumerate(steps):
                clock.advance(step.at - clock.seconds())
                decision = self.successResultOf(store.spend("k", limit))
                self.assertEqual(decision, expected(limit, step), f"{name} step {i}")

    def test_keys_independent(self) -> None:
        store = MemoryRateStore(Clock())
        limit = RateLimit(rate=1, period=60.0)
        self.assertTrue(self.successResultOf(store.spend("a", limit)).allowed)
        self.assertFalse(self.successResultOf(store.spend("a", limit)).allowed)
        self.assertTrue(self.successResultOf(store.spend("b", limit)).allowed)

    def test_prunes_idle_keys(self) -> None:
        """
        Keys whose bucket has refilled are dropped by the next sweep; keys
        still draining stay.
        """
        clock = Clock()
        store = MemoryRateStore(clock, sweep_interval=60.0)
        short, long = RateLimit(rate=1, period=1.0), RateLimit(rate=1, period=600.0)
        for i in range(100):
            store.spend(f"idle{i}", short)
        store.spend("busy", long)
        self.assertEqual(len(store), 101)
        clock.advance(30)
        store.spend("new", short)
        self.assertEqual(len(store), 102, "no sweep before the interval")
        clock.advance(30)
        store.spend("new", short)
        self.assertEqual(len(store), 2)
        self.assertFalse(self.successResultOf(store.spend("busy", long)).allowed)

    def test_start_stop(self) -> None:
        store = MemoryRateStore(Clock())
        store.start()
        self.assertIsNone(self.successResultOf(store.stop()))


CONSUMER = "200000000359"
PROVIDER = "918999198738"


def make_throttle(clock: Clock) -> Throttle:
    return Throttle(
        ThrottleConfig(
            consumer=LimitSet(
                default=RateLimit(rate=2, period=60.0, burst=2),
                overrides={"900001": RateLimit(rate=5, period=60.0, burst=5)},
            ),
            provider=LimitSet(overrides={PROVIDER: RateLimit(rate=3, period=60.0, burst=3)}),
        ),
        MemoryRateStore(clock),
    )


class ThrottleTests(SynchronousTestCase):
    def spend(self, d: Deferred[RateDecision | None]) -> RateDecision | None:
        return self.successResultOf(d)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IThrottle, make_throttle(Clock())))

    def test_default_and_override(self) -> None:
        throttle = make_throttle(Clock())
        default = [self.spend(throttle.consume_consumer(CONSUMER)) for _ in range(3)]
        self.assertEqual([d.allowed for d in default], [True, True, False])
        self.assertEqual({d.limit for d in default}, {2})
        override = [self.spend(throttle.consume_consumer("900001")) for _ in range(6)]
        self.assertEqual([d.allowed for d in override], [True] * 5 + [False])
        self.assertEqual([d.remaining for d in override], [4, 3, 2, 1, 0, 0])

    def test_unlimited_is_none(self) -> None:
        """
        The provider limits have no default: other providers are unlimited.
        """
        throttle = make_throttle(Clock())
        for _ in range(10):
            self.assertIsNone(self.spend(throttle.consume_provider("123456")))

    def test_consumer_and_provider_independent(self) -> None:
        """
        One ASID has separate consumer and provider allowances.
        """
        throttle = make_throttle(Clock())
        for _ in range(3):
            throttle.consume_provider(PROVIDER)
        self.assertFalse(self.spend(throttle.consume_provider(PROVIDER)).allowed)
        self.assertTrue(self.spend(throttle.consume_consumer(PROVIDER)).allowed)
        self.assertTrue(self.spend(throttle.consume_consumer(CONSUMER)).allowed)

    def test_refill(self) -> None:
        clock = Clock()
        throttle = make_throttle(clock)
        throttle.consume_consumer(CONSUMER)
        throttle.consume_consumer(CONSUMER)
        clock.advance(29.999)
        self.assertFalse(self.spend(throttle.consume_consumer(CONSUMER)).allowed)
        clock.advance(0.001)
        self.assertTrue(self.spend(throttle.consume_consumer(CONSUMER)).allowed)

    def test_start_stop(self) -> None:
        throttle = make_throttle(Clock())
        throttle.start()
        self.assertIsNone(self.successResultOf(throttle.stop()))


class HelperTests(SynchronousTestCase):
    def test_allowed_headers(self) -> None:
        throttle = make_throttle(Clock())
        decision = self.successResultOf(Deferred.fromCoroutine(check_consumer(throttle, CONSUMER)))
        self.assertEqual(
            decision.headers(),
            [
                (b"X-Rate-Limit-Limit", b"2"),
                (b"X-Rate-Limit-Remaining", b"1"),
                (b"X-Rate-Limit-Reset", b"30"),
            ],
        )

    def test_too_many_requests(self) -> None:
        clock = Clock()
        throttle = make_throttle(clock)
        for _ in range(2):
            self.successResultOf(Deferred.fromCoroutine(check_consumer(throttle, CONSUMER)))
        clock.advance(10.5)
        f = self.failureResultOf(
            Deferred.fromCoroutine(check_consumer(throttle, CONSUMER)), TooManyRequests
        )
        self.assertEqual(f.value.status, 429)
        self.assertEqual(f.value.token, f"RATE_LIMIT_EXCEEDED_MESSAGESENDER_{CONSUMER}")
        self.assertEqual(
            f.value.headers,
            (
                (b"X-Rate-Limit-Limit", b"2"),
                (b"X-Rate-Limit-Remaining", b"0"),
                (b"X-Rate-Limit-Reset", b"50"),
                (b"Retry-After", b"20"),
            ),
        )

    def test_unlimited_consumer(self) -> None:
        throttle = Throttle(ThrottleConfig(), MemoryRateStore(Clock()))
        self.assertIsNone(
            self.successResultOf(Deferred.fromCoroutine(check_consumer(throttle, CONSUMER)))
        )
        self.assertIsNone(
            self.successResultOf(Deferred.fromCoroutine(check_provider(throttle, PROVIDER)))
        )

    def test_provider_busy(self) -> None:
        throttle = make_throttle(Clock())
        for _ in range(3):
            self.successResultOf(Deferred.fromCoroutine(check_provider(throttle, PROVIDER)))
        f = self.failureResultOf(
            Deferred.fromCoroutine(check_provider(throttle, PROVIDER)), ProviderBusy
        )
        self.assertEqual(f.value.status, 503)
        self.assertEqual(f.value.token, f"RATE_LIMIT_EXCEEDED_MESSAGERECEIVER_{PROVIDER}")
        self.assertEqual(f.value.headers, ((b"Retry-After", b"20"),))

    def test_retry_after_rounding(self) -> None:
        self.assertEqual(retry_after(0.000001), (b"Retry-After", b"1"))
        self.assertEqual(retry_after(0.0), (b"Retry-After", b"1"))
        self.assertEqual(retry_after(1.0), (b"Retry-After", b"1"))
        self.assertEqual(retry_after(1.000001), (b"Retry-After", b"2"))
        self.assertEqual(retry_after(59.5), (b"Retry-After", b"60"))

    def test_store_unavailable(self) -> None:
        """
        A store that fails closed makes both checks fail with a 503 that is
        not a throttling verdict.
        """

        @implementer(IRateStore)
        class Down(MemoryRateStore):
            available = False

            def spend(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
                return fail(ThrottleUnavailable())

        throttle = Throttle(make_throttle(Clock()).config, Down(Clock()))
        f = self.failureResultOf(
            Deferred.fromCoroutine(check_consumer(throttle, CONSUMER)), ThrottleUnavailable
        )
        self.assertEqual((f.value.status, f.value.token), (503, "THROTTLE_UNAVAILABLE"))
        self.failureResultOf(
            Deferred.fromCoroutine(check_provider(throttle, PROVIDER)), ThrottleUnavailable
        )


DOC_EXAMPLE = {
    "tls": {"certificate": "c.pem", "private_key": "k.pem", "client_ca": "ca.pem"},
    "audit": {"key_file": "audit.key"},
    "upstream": {"certificate": "c.pem", "private_key": "k.pem", "ca": "ca.pem"},
    "throttle": {
        "store": "redis",
        "redis_url": "redis://:s3cret@10.0.0.5:6380/2",
        "on_store_failure": "closed",
        "consumer": {
            "default": {"rate": 100, "period": 60, "burst": 20},
            "overrides": {"200000000359": {"rate": 1000, "period": 60, "burst": 100}},
        },
        "provider": {"default": {"rate": 50, "period": 1, "burst": 50}},
    },
}


class FromConfigTests(SynchronousTestCase):
    def test_memory(self) -> None:
        throttle = throttle_from_config(ThrottleConfig(), Clock())
        self.assertIsInstance(throttle.store, MemoryRateStore)

    def test_redis(self) -> None:
        config = parse(DOC_EXAMPLE, Path("/etc/ssp/ssp.toml")).throttle
        throttle = throttle_from_config(config, reactor)
        store = throttle.store
        assert isinstance(store, RedisRateStore)
        self.assertEqual(
            (store.host, store.port, store.db, store.password, store.on_failure),
            ("10.0.0.5", 6380, 2, "s3cret", "closed"),
        )
        self.assertEqual(
            config.consumer.for_asid("200000000359"), RateLimit(rate=1000, period=60.0, burst=100)
        )
        self.assertEqual(config.provider.for_asid("x"), RateLimit(rate=50, period=1.0, burst=50))
        self.assertTrue(verifyObject(IRateStore, store))

    def test_doc_example(self) -> None:
        """
        The example in docs/throttling.md is a valid configuration.
        """
        doc = (REPO / "docs" / "throttling.md").read_text()
        example = tomllib.loads(doc.split("```toml\n")[1].split("```")[0])
        config = parse({**DOC_EXAMPLE, **example}, Path("/etc/ssp/ssp.toml")).throttle
        self.assertEqual(config.on_store_failure, "local")
        self.assertEqual(config.provider.for_asid("918999198738"), RateLimit(10, 1.0, 10))
        self.assertIsInstance(throttle_from_config(config, reactor).store, RedisRateStore)

    def test_bad_url(self) -> None:
        self.assertRaises(ValueError, RedisRateStore.from_url, reactor, "http://x:6379")
        self.assertRaises(ValueError, RedisRateStore.from_url, reactor, "redis:///0")

    def test_url_defaults(self) -> None:
        store = RedisRateStore.from_url(reactor, "redis://localhost")
        self.assertEqual((store.port, store.db, store.password), (6379, 0, None))


# Spends from one process and prints each decision as a JSON line.
CHILD = """
import json, sys
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from ssp.config import RateLimit
from ssp.throttle import RedisRateStore

async def main(reactor, url, count):
    store = RedisRateStore.from_url(reactor, url, on_failure="closed", timeout=5.0)
    store.start()
    limit = RateLimit(rate=1, period=3600.0, burst=10)
    for _ in range(int(count)):
        d = await store.spend("consumer:900001", limit)
        print(json.dumps([d.allowed, d.remaining]), flush=True)
    await store.stop()

react(lambda reactor, *argv: Deferred.fromCoroutine(main(reactor, *argv)), sys.argv[1:])
"""

# Refills once an hour: Redis TIME advancing during a test changes nothing.
HOURLY = RateLimit(rate=1, period=3600.0, burst=10)


class RedisRateStoreTests(TestCase):
    """
    Against a real C{redis-server} on loopback.
    """

    skip = redis.SKIP
    timeout = 20

    def setUp(self) -> None:
        self.server = redis.RedisServer.start_for(self)

    def store(self, **kwargs: Any) -> RedisRateStore:
        kwargs = {"timeout": 0.3, "backoff_initial": 0.05, "backoff_max": 0.2, **kwargs}
        store = RedisRateStore.from_url(reactor, self.server.url, **kwargs)
        store.start()
        self.addCleanup(store.stop)
        return store

    async def inspect(self) -> Any:
        """
        A plain client, to look at what the store wrote.
        """
        client = await Connection("127.0.0.1", self.server.port, reconnect=False)
        self.addCleanup(client.disconnect)
        return client

    async def until(self, predicate: Callable[[], bool], within: float = 10.0) -> None:
        deadline = reactor.seconds() + within
        while not predicate():
            self.assertLess(reactor.seconds(), deadline, "condition not reached")
            await deferLater(reactor, 0.02)

    async def test_sequences(self) -> None:
        """
        The Lua script, with an injected time, takes exactly the decisions
        of L{gcra}.
        """
        for n, (name, (limit, steps)) in enumerate(SEQUENCES.items()):
            clock = Clock()
            store = self.store(clock=clock)
            for i, step in enumerate(steps):
                clock.advance(step.at - clock.seconds())
                decision = await store.spend(f"seq:{n}", limit)
                self.assertEqual(decision, expected(limit, step), f"{name} step {i}")
            self.assertTrue(store.available)
        # Fake time: the key's real TTL has a minute's slack.
        client = await self.inspect()
        self.assertGreater(await client.execute_command("PTTL", "ssp:rl:seq:0"), 60_000)

    async def test_key_and_expiry(self) -> None:
        """
        With Redis's own clock, the key is C{ssp:rl:<key>} and expires when
        the bucket would be full again.
        """
        store = self.store()
        decision = await store.spend("consumer:900001", RateLimit(rate=1, period=10.0, burst=1))
        self.assertEqual((decision.allowed, decision.remaining), (True, 0))
        self.assertGreater(decision.reset_after, 9.9)
        client = await self.inspect()
        ttl = await client.execute_command("PTTL", "ssp:rl:consumer:900001")
        self.assertTrue(9000 < ttl <= 10000, ttl)

    async def test_noscript(self) -> None:
        """
        After C{SCRIPT FLUSH} the store falls back to C{EVAL} and carries
        on with the same state.
        """
        store = self.store()
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 9)
        client = await self.inspect()
        await client.script_flush()
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 8)
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 7)
        self.assertTrue(store.available)

    async def test_two_stores_share_one_limit(self) -> None:
        """
        Two stores with their own connections, as two workers would have,
        admit burst 10 exactly once between them.
        """
        a, b = self.store(), self.store()
        decisions = await gatherResults(
            [s.spend("consumer:900001", HOURLY) for _ in range(8) for s in (a, b)]
        )
        allowed = [d for d in decisions if d.allowed]
        self.assertEqual(sorted(d.remaining for d in allowed), list(range(10)))
        self.assertEqual(len(decisions) - len(allowed), 6)

    async def test_two_processes_share_one_limit(self) -> None:
        """
        Two OS processes spending 8 each from one burst of 10.
        """
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        results = await gatherResults(
            [
                getProcessOutputAndValue(
                    sys.executable, ["-c", CHILD, self.server.url, "8"], env=env, path=str(REPO)
                )
                for _ in range(2)
            ]
        )
        decisions = []
        for out, err, code in results:
            self.assertEqual(code, 0, err.decode())
            lines = out.decode().splitlines()
            self.assertEqual(len(lines), 8, out)
            decisions += [json.loads(line) for line in lines]
        remaining = sorted(r for allowed, r in decisions if allowed)
        self.assertEqual(remaining, list(range(10)))

    async def test_killed_local_policy(self) -> None:
        """
        With C{"local"}, a Redis outage falls back to a per-process limit;
        once Redis is back the shared counter is used again.
        """
        store = self.store(on_failure="local")
        limit = RateLimit(rate=1, period=3600.0, burst=3)
        self.assertEqual([(await store.spend("k", limit)).remaining for _ in range(2)], [2, 1])
        self.server.stop()
        local = [await store.spend("k", limit) for _ in range(4)]
        self.assertFalse(store.available)
        self.assertEqual([(d.allowed, d.remaining) for d in local],
                         [(True, 2), (True, 1), (True, 0), (False, 0)])
        self.server.start()
        await self.until(lambda: store.available)
        # Redis came back empty: the local bucket (exhausted) is not used.
        self.assertEqual((await store.spend("k", limit)).remaining, 2)
        other = self.store()
        self.assertEqual((await other.spend("k", limit)).remaining, 1)

    async def test_killed_closed_policy(self) -> None:
        """
        With C{"closed"}, an outage refuses with L{ThrottleUnavailable}
        until Redis answers again.
        """
        store = self.store(on_failure="closed")
        self.assertTrue((await store.spend("k", HOURLY)).allowed)
        self.server.stop()
        for _ in range(3):
            with self.assertRaises(ThrottleUnavailable):
                await store.spend("k", HOURLY)
        self.assertFalse(store.available)
        self.server.start()
        await self.until(lambda: store.available)
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 9)

    async def stall(self, store: RedisRateStore, policy: Callable[[], Awaitable[None]]) -> float:
        """
        Pause Redis (C{SIGSTOP}), check that C{policy} applies and wait
        until the store has failed to reconnect to the stalled server
        twice, then resume Redis (C{SIGCONT}).

        @return: the seconds the store took to use Redis again.
        """
        self.server.pause()
        self.addCleanup(self.server.resume)
        await policy()
        await self.until(lambda: store.probes >= 2 and not store.available)
        self.server.resume()
        resumed = reactor.seconds()
        await self.until(lambda: store.available)
        return reactor.seconds() - resumed

    async def assertShared(self, store: RedisRateStore) -> None:
        """
        What C{store} spends, another store (another worker) sees.
        """
        mine = await store.spend("k", HOURLY)
        theirs = await self.store().spend("k", HOURLY)
        self.assertEqual(theirs.remaining, mine.remaining - 1)

    async def test_stalled_closed_policy(self) -> None:
        """
        With C{"closed"}, a stalled Redis refuses with
        L{ThrottleUnavailable}; once it runs again the store reconnects by
        itself, within seconds, and the shared state is used again.
        """
        store = self.store(on_failure="closed")
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 9)

        async def refused() -> None:
            with self.assertRaises(ThrottleUnavailable):
                await store.spend("k", HOURLY)

        self.assertLess(await self.stall(store, refused), 5.0)
        await self.assertShared(store)

    async def test_stalled_local_policy(self) -> None:
        """
        With C{"local"}, a stalled Redis falls back to per-process limits,
        and afterwards limits are shared between processes again.
        """
        store = self.store(on_failure="local")
        await store.spend("k", HOURLY)
        await store.spend("k", HOURLY)

        async def local() -> None:
            self.assertEqual((await store.spend("k", HOURLY)).remaining, 9)

        self.assertLess(await self.stall(store, local), 5.0)
        await self.assertShared(store)

    async def test_down_from_the_start(self) -> None:
        """
        No server at all: the first spend times out and the policy applies.
        """
        self.server.stop()
        store = self.store(on_failure="local")
        decision = await store.spend("k", HOURLY)
        self.assertEqual((decision.allowed, decision.remaining), (True, 9))
        self.assertFalse(store.available)
        self.server.start()
        await self.until(lambda: store.available)
        self.assertEqual((await store.spend("k", HOURLY)).remaining, 9)

    async def test_stop_during_outage(self) -> None:
        """
        Stopping while a probe is scheduled, or while one waits for Redis,
        leaves nothing behind (trial fails a test that leaves a pending
        call or connection).
        """
        scheduled, probing = self.store(), self.store()
        self.server.stop()
        await gatherResults([scheduled.spend("k", HOURLY), probing.spend("k", HOURLY)])
        self.assertFalse(scheduled.available or probing.available)
        await scheduled.stop()
        await deferLater(reactor, 0.1)
        await probing.stop()


class StoreOutageEndToEndTests(TestCase):
    """
    A running proxy with its Redis store stalled (C{SIGSTOP}) and resumed,
    and killed and restarted: C{/readyz}, C{ssp_throttle_store_up} and
    the answers to consumers, under both policies.
    """

    skip = redis.SKIP
    timeout = 120

    def setUp(self) -> None:
        self.server = redis.RedisServer.start_for(self)

    async def proxy(self, policy: str) -> tuple[Proxy, str]:
        admin = free_port()
        proxy = await Proxy(
            self, Provider(self),
            Concerns(directory=LDIFDirectory.from_file(DEMO_LDIF), audit=RecordingAuditSink()),
            throttle=ThrottleConfig(
                store="redis", redis_url=self.server.url, on_store_failure=policy,
                consumer=LimitSet(default=RateLimit(rate=1, period=3600.0, burst=100)),
            ),
            admin={"endpoint": f"tcp:{admin}:interface=127.0.0.1"},
        ).start()
        return proxy, f"http://127.0.0.1:{admin}"

    async def state(self, base: str) -> tuple[str, float]:
        """
        The C{/readyz} answer (status and text) and C{ssp_throttle_store_up}.
        """
        status, text = await deferToThread(_get, f"{base}/readyz")
        metrics = (await deferToThread(_get, f"{base}/metrics"))[1]
        up = [line for line in metrics.splitlines() if line.startswith("ssp_throttle_store_up ")]
        return f"{status} {text.strip()}", float(up[0].split()[1])

    async def until_state(self, base: str, wanted: tuple[str, float], within: float) -> float:
        """
        Poll until C{state} is C{wanted}; the seconds it took.
        """
        started = reactor.seconds()
        while (found := await self.state(base)) != wanted:
            self.assertLess(reactor.seconds() - started, within, f"still {found}")
            await deferLater(reactor, 0.05)
        return reactor.seconds() - started

    async def outage(self, policy: str, during: int, down: str,
                     fault: Callable[[], None], repair: Callable[[], None]) -> float:
        proxy, base = await self.proxy(policy)
        consumer = proxy.consumer()
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.assertEqual(await self.state(base), ("200 ready", 1.0))
        fault()
        reply = await consumer.get("metadata")
        self.assertEqual(reply.status, during)
        if during == 503:
            self.assertEqual(reply.token(), "THROTTLE_UNAVAILABLE")
        self.assertEqual(await self.state(base), (down, 0.0))
        # Long enough for several probes to fail, with growing back-off.
        store = proxy.service.throttle.store
        while store.probes < 3:
            await deferLater(reactor, 0.05)
        self.assertEqual(await self.state(base), (down, 0.0))
        repair()
        recovery = await self.until_state(base, ("200 ready", 1.0), 10.0)
        # Counted in Redis again: a fresh bucket there, not a local one.
        client = await Connection("127.0.0.1", self.server.port, reconnect=False)
        await client.execute_command("FLUSHALL")
        await client.disconnect()
        remaining = [(await consumer.get("metadata")).header("X-Rate-Limit-Remaining")
                     for _ in range(2)]
        self.assertEqual(remaining, ["99", "98"])
        return recovery

    def stall(self) -> None:
        self.server.pause()
        self.addCleanup(self.server.resume)

    async def test_stalled_closed(self) -> None:
        """
        C{"closed"}: 503 C{THROTTLE_UNAVAILABLE} and not ready while Redis is
        stalled; ready and forwarding within seconds of it answering again.
        """
        recovery = await self.outage("closed", 503, "503 not ready: throttle", self.stall,
                                     lambda: self.server.resume())
        self.assertLess(recovery, 5.0)

    async def test_stalled_local(self) -> None:
        """
        C{"local"}: forwarded under per-process limits and ready but
        degraded while Redis is stalled; shared limits again once it
        answers.
        """
        recovery = await self.outage("local", 200, "200 ready (degraded: throttle)", self.stall,
                                     lambda: self.server.resume())
        self.assertLess(recovery, 5.0)

    async def test_restarted_closed(self) -> None:
        """
        C{"closed"}: Redis killed and started again, empty.
        """
        recovery = await self.outage("closed", 503, "503 not ready: throttle", self.server.stop,
                                     self.server.start)
        self.assertLess(recovery, 5.0)

    async def test_restarted_local(self) -> None:
        recovery = await self.outage("local", 200, "200 ready (degraded: throttle)",
                                     self.server.stop, self.server.start)
        self.assertLess(recovery, 5.0)
