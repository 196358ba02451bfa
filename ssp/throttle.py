# -*- test-case-name: tests.test_throttle -*-
"""
Rate limits per consumer and per provider ASID, by the generic cell rate
algorithm (GCRA), kept in process memory or shared through Redis.

GCRA is a token bucket stored as one number per key: the theoretical
arrival time (TAT) at which the bucket would be full again.  For a
L{RateLimit} of C{rate} requests per C{period} seconds with C{burst}:

    - emission interval  T   = period / rate
    - burst tolerance    tau = T * (burst - 1)
    - a request at C{now} is allowed iff  max(TAT, now) - tau <= now
    - when allowed, TAT becomes max(TAT, now) + T; a refusal changes nothing.

So C{burst} requests may be made at once, one more every T after that, and
at most C{burst + rate} in any window of C{period} seconds.  All times are
integer microseconds (T is rounded to the microsecond once, in Python), so
the Python function L{gcra} and its Lua mirror in L{RedisRateStore} agree
bit for bit; floats would drift by an ulp and flip C{remaining}.
"""

from __future__ import annotations

import hashlib
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from txredisapi import ConnectionHandler, RedisError, RedisFactory, ResponseError
from zope.interface import Attribute, Interface, implementer

from ssp.config import LimitSet, RateLimit, ThrottleConfig
from ssp.errors import ProviderBusy, Refusal, TooManyRequests
from ssp.interfaces import IThrottle
from ssp.model import RateDecision

log = Logger()

MICROS = 1_000_000


class ThrottleUnavailable(Refusal):
    """
    The shared rate store cannot be reached and the policy is to fail
    closed (503): no request is admitted that nobody could count.
    """

    status = 503
    issue_code = "transient"

    def __init__(self, token: str = "THROTTLE_UNAVAILABLE") -> None:
        super().__init__(token)


def emission_interval(limit: RateLimit) -> int:
    """
    T, the microseconds one request's worth of allowance takes to refill.
    """
    return max(1, round(limit.period * MICROS / limit.rate))


def gcra(tat: int | None, now: int, limit: RateLimit) -> tuple[int | None, RateDecision]:
    """
    Spend one request of C{limit} at C{now}.

    The decision reports C{limit=burst} (the most requests that can ever be
    made at once, so C{remaining <= limit} always holds and C{remaining}
    is back to C{limit} after C{reset_after}), C{remaining} as the requests
    still allowed at C{now}, C{reset_after} as the seconds until the bucket
    is full and, when refused, C{retry_after} as the seconds until one
    more request fits.

    @param tat: the stored theoretical arrival time, or L{None} for a key
        never seen or expired.
    @param now: the current time.  Both in integer microseconds.
    @return: the TAT to store (L{None} when refused: nothing changes) and
        the decision.
    """
    interval = emission_interval(limit)
    tolerance = interval * (limit.burst - 1)
    base = now if tat is None else max(tat, now)
    if base - tolerance > now:
        return None, RateDecision(
            allowed=False,
            limit=limit.burst,
            remaining=0,
            reset_after=(base - now) / MICROS,
            retry_after=(base - tolerance - now) / MICROS,
        )
    new = base + interval
    return new, RateDecision(
        allowed=True,
        limit=limit.burst,
        remaining=(now + tolerance - new) // interval + 1,
        reset_after=(new - now) / MICROS,
    )


def _micros(seconds: float) -> int:
    return round(seconds * MICROS)


# The state update of gcra(), run atomically inside Redis.  The decision
# itself is computed in Python by gcra() from the TAT this script read and
# the time it used, so only the allow/advance rule is duplicated here.
# KEYS[1]: the key.  ARGV[1]: T, ARGV[2]: tau (microseconds).  ARGV[3]:
# now in microseconds for tests, or '' to use Redis TIME so that every host
# shares one clock.  An injected now is fake time, so the key's real TTL
# gets a minute's slack there: slow test steps must not expire it early.
GCRA_LUA = """\
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local now
local slack = 0
if ARGV[3] == '' then
  local time = redis.call('TIME')
  now = tonumber(time[1]) * 1000000 + tonumber(time[2])
else
  now = tonumber(ARGV[3])
  slack = 60000
end
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then
  tat = math.max(tonumber(stored), now)
end
if tat - tolerance <= now then
  local new = tat + interval
  redis.call('SET', KEYS[1], string.format('%.0f', new),
             'PX', string.format('%.0f', math.ceil((new - now) / 1000) + slack))
end
return {stored, string.format('%.0f', now)}
"""
GCRA_SHA = hashlib.sha1(GCRA_LUA.encode("ascii")).hexdigest()


class IRateStore(Interface):
    """
    Where the TAT of every rate-limit key lives.
    """

    available = Attribute(
        "True while the store answers from its primary (shared) state."
    )

    def spend(key: str, limit: RateLimit) -> "Deferred[RateDecision]":
        """
        Spend one request of C{limit} under C{key}.  May fail with
        L{ThrottleUnavailable}.
        """

    def start() -> None:
        """
        Connect, if the store has anything to connect to.
        """

    def stop() -> "Deferred[None]":
        """
        Disconnect and cancel background work.
        """


@implementer(IRateStore)
@attrs.define
class MemoryRateStore:
    """
    TATs in a dict, for a single process.

    A key whose TAT has passed is the same as a missing key, so such keys
    are dropped by a sweep run at most every C{sweep_interval} seconds, from
    L{spend}: memory is bounded by the keys used within the last sweep
    interval plus their reset time.
    """

    clock: IReactorTime
    sweep_interval: float = 60.0
    _tats: dict[str, int] = attrs.field(factory=dict, init=False)
    _next_sweep: int = attrs.field(default=0, init=False)

    available = True

    def spend(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
        now = _micros(self.clock.seconds())
        self._sweep(now)
        tat, decision = gcra(self._tats.get(key), now, limit)
        if tat is not None:
            self._tats[key] = tat
        return succeed(decision)

    def __len__(self) -> int:
        """
        How many keys are held.
        """
        return len(self._tats)

    def _sweep(self, now: int) -> None:
        if now < self._next_sweep:
            return
        self._tats = {k: tat for k, tat in self._tats.items() if tat > now}
        self._next_sweep = now + _micros(self.sweep_interval)

    def start(self) -> None:
        pass

    def stop(self) -> Deferred[None]:
        return succeed(None)


@implementer(IRateStore)
@attrs.define
class RedisRateStore:
    """
    TATs in Redis, shared by every worker and host using the same server.

    Each spend is one atomic Lua script (L{GCRA_LUA}) sent by C{EVALSHA},
    or by C{EVAL} when Redis answers C{NOSCRIPT} (after a restart or
    C{SCRIPT FLUSH}; C{EVAL} caches it again, so no C{SCRIPT LOAD} round
    trip is needed).  Keys are C{<prefix><role>:<asid>} and expire once
    the bucket is full, so idle keys vanish.

    When a command fails or takes longer than C{timeout} (a closed
    connection, a restarted or stalled server), the store declares an
    outage (logged once) and, without asking Redis again, answers by
    C{on_failure}: C{"local"} spends from a per-process L{MemoryRateStore}
    instead, C{"closed"} fails with L{ThrottleUnavailable}.  Meanwhile a
    probe runs with exponential back-off from C{backoff_initial} to
    C{backoff_max} seconds: each one throws the old connection away and
    opens a new one (connect, C{AUTH}, C{SELECT}, C{PING}, all within
    C{4 * timeout}); the first answer ends the outage.  The store never
    relies on txredisapi to reconnect: txredisapi stops trying for good
    when C{SELECT} or C{AUTH} times out on a new connection, which is what
    a server stalled (C{SIGSTOP}, swapping) while reconnecting does.

    @ivar clock: test only: the time the script uses instead of Redis
        C{TIME}.  Production leaves it L{None} so all hosts share Redis's
        clock and no host's clock skew matters.
    @ivar probes: how many reconnection probes were made.
    """

    reactor: Any
    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    on_failure: str = attrs.field(
        default="local", validator=attrs.validators.in_(["local", "closed"])
    )
    timeout: float = 0.5
    backoff_initial: float = 0.25
    backoff_max: float = 2.0
    prefix: str = "ssp:rl:"
    clock: IReactorTime | None = None
    fallback: MemoryRateStore = attrs.field()
    available: bool = attrs.field(default=True, init=False)
    _factory: RedisFactory | None = attrs.field(default=None, init=False)
    _redis: ConnectionHandler | None = attrs.field(default=None, init=False)
    _delay: float = attrs.field(default=0.0, init=False)
    _probe_call: IDelayedCall | None = attrs.field(default=None, init=False)
    _probing: Deferred[Any] | None = attrs.field(default=None, init=False)
    _closing: list[Deferred[Any]] = attrs.field(factory=list, init=False)
    probes: int = attrs.field(default=0, init=False)

    @fallback.default
    def _local(self) -> MemoryRateStore:
        return MemoryRateStore(self.reactor)

    @classmethod
    def from_url(cls, reactor: Any, url: str, **kwargs: Any) -> RedisRateStore:
        """
        A store for C{redis://[[user]:password@]host[:port][/db]}.

        @raise ValueError: for any other URL.
        """
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            raise ValueError(f"not a redis://host URL: {url!r}")
        path = parts.path.strip("/")
        return cls(
            reactor,
            parts.hostname,
            parts.port or 6379,
            int(path) if path else 0,
            unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None,
            **kwargs,
        )

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        """
        Open a new connection, closing any previous one.
        """
        if self._factory is not None:
            closing = self._factory.disconnect()
            self._closing.append(closing)
            closing.addBoth(lambda _: self._closing.remove(closing))
        factory = RedisFactory(
            f"{self.host}:{self.port}",
            self.db,
            1,
            isLazy=True,
            handler=ConnectionHandler,
            password=self.password,
            username=self.username,
            replyTimeout=self.timeout,
            convertNumbers=False,
        )
        factory.initialDelay = self.backoff_initial
        factory.maxDelay = self.backoff_max
        # Fails when AUTH or SELECT does (txredisapi then stops trying): the
        # next probe opens a new connection.
        factory.deferred.addErrback(lambda failure: None)
        factory.startConnecting(
            HostnameEndpoint(self.reactor, self.host, self.port, timeout=self.timeout)
        )
        self._factory = factory
        self._redis = factory.handler

    def stop(self) -> Deferred[None]:
        if self._probe_call is not None:
            self._probe_call.cancel()
            self._probe_call = None
        if self._probing is not None:
            self._probing.cancel()
        factory, self._factory, self._redis = self._factory, None, None
        closing = [*self._closing] + ([factory.disconnect()] if factory is not None else [])
        return defer.gatherResults(closing, consumeErrors=True).addCallback(lambda _: None)

    def spend(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
        if self._redis is None:
            raise RuntimeError("RedisRateStore.spend() before start()")
        if not self.available:
            return self._degraded(key, limit)
        interval = emission_interval(limit)
        args = (
            interval,
            interval * (limit.burst - 1),
            "" if self.clock is None else _micros(self.clock.seconds()),
        )
        d = self._evalsha(self.prefix + key, args)
        d.addTimeout(self.timeout, self.reactor)

        def decide(reply: list[Any]) -> RateDecision:
            stored, now = reply
            return gcra(None if stored is None else int(stored), int(now), limit)[1]

        def failed(failure: Failure) -> Deferred[RateDecision]:
            failure.trap(RedisError, defer.TimeoutError)
            self._outage(failure)
            return self._degraded(key, limit)

        return d.addCallbacks(decide, failed)

    def _evalsha(self, key: str, args: tuple[Any, ...]) -> Deferred[Any]:
        assert self._redis is not None
        redis = self._redis

        def noscript(failure: Failure) -> Deferred[Any]:
            failure.trap(ResponseError)
            if not str(failure.value).startswith("NOSCRIPT"):
                return failure
            return redis.execute_command("EVAL", GCRA_LUA, 1, key, *args)

        d = redis.execute_command("EVALSHA", GCRA_SHA, 1, key, *args)
        return d.addErrback(noscript)

    def _degraded(self, key: str, limit: RateLimit) -> Deferred[RateDecision]:
        if self.on_failure == "local":
            return self.fallback.spend(key, limit)
        return fail(ThrottleUnavailable())

    def _outage(self, failure: Failure) -> None:
        if not self.available or self._redis is None:
            return
        self.available = False
        log.warn(
            "Redis rate store {host}:{port} unavailable ({why}); {policy} until it answers",
            host=self.host,
            port=self.port,
            why=f"no answer within {self.timeout} s"
            if failure.check(defer.TimeoutError)
            else failure.getErrorMessage(),
            policy="per-process limits"
            if self.on_failure == "local"
            else "refusing requests (503)",
        )
        self._delay = self.backoff_initial
        self._probe_call = self.reactor.callLater(self._delay, self._probe)

    def _probe(self) -> None:
        self._probe_call = None
        self.probes += 1
        self._connect()
        assert self._redis is not None
        d = self._redis.ping()
        d.addTimeout(4 * self.timeout, self.reactor)
        self._probing = d
        d.addCallbacks(self._recovered, self._still_down)

    def _recovered(self, _: object) -> None:
        self._probing = None
        self.available = True
        log.info("Redis rate store {host}:{port} answers again", host=self.host, port=self.port)

    def _still_down(self, failure: Failure) -> None:
        self._probing = None
        if failure.check(defer.CancelledError):
            return
        self._delay = min(self._delay * 2, self.backoff_max)
        self._probe_call = self.reactor.callLater(self._delay, self._probe)


@implementer(IThrottle)
@attrs.frozen
class Throttle:
    """
    The configured limits applied through a store.  An ASID with no limit
    (no default, no override) is never throttled and gets L{None} instead
    of a decision, so no C{X-Rate-Limit-*} headers are sent for it.
    """

    config: ThrottleConfig
    store: IRateStore

    def consume_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self._consume("consumer", self.config.consumer, asid)

    def consume_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self._consume("provider", self.config.provider, asid)

    @property
    def available(self) -> bool:
        return bool(self.store.available)

    def _consume(self, role: str, limits: LimitSet, asid: str) -> Deferred[RateDecision | None]:
        limit = limits.for_asid(asid)
        if limit is None:
            return succeed(None)
        return self.store.spend(f"{role}:{asid}", limit)

    def start(self) -> None:
        """
        Connect the store; call once the reactor runs.
        """
        self.store.start()

    def stop(self) -> Deferred[None]:
        """
        Disconnect the store.
        """
        return self.store.stop()


def throttle_from_config(config: ThrottleConfig, reactor: Any) -> Throttle:
    """
    The throttle the C{[throttle]} section describes; L{Throttle.start} it.
    With C{enabled = false} nothing is limited and no store is contacted.
    """
    if not config.enabled:
        return Throttle(attrs.evolve(config, consumer=LimitSet(), provider=LimitSet()),
                        MemoryRateStore(reactor))
    if config.store == "redis":
        store: IRateStore = RedisRateStore.from_url(
            reactor, config.redis_url, on_failure=config.on_store_failure
        )
    else:
        store = MemoryRateStore(reactor)
    return Throttle(config, store)


def retry_after(seconds: float) -> tuple[bytes, bytes]:
    """
    A C{Retry-After} header: whole seconds, rounded up, at least 1.
    """
    whole = int(seconds)
    return b"Retry-After", b"%d" % max(1, whole if whole == seconds else whole + 1)


async def check_consumer(throttle: IThrottle, asid: str) -> RateDecision | None:
    """
    Spend from the consumer's allowance.

    @return: the decision, whose C{headers()} go on the response, or
        L{None} when the ASID is unlimited.
    @raise TooManyRequests: over the limit, with the C{X-Rate-Limit-*}
        headers and C{Retry-After}.
    @raise ThrottleUnavailable: store down and the policy is C{"closed"}.
    """
    decision = await throttle.consume_consumer(asid)
    if decision is not None and not decision.allowed:
        raise TooManyRequests(
            f"RATE_LIMIT_EXCEEDED_MESSAGESENDER_{asid}",
            headers=(*decision.headers(), retry_after(decision.retry_after)),
        )
    return decision


async def check_provider(throttle: IThrottle, asid: str) -> None:
    """
    Spend from the provider's global allowance.

    @raise ProviderBusy: over the limit, with C{Retry-After} only: the
        provider's allowance is not the consumer's business.
    @raise ThrottleUnavailable: store down and the policy is C{"closed"}.
    """
    decision = await throttle.consume_provider(asid)
    if decision is not None and not decision.allowed:
        raise ProviderBusy(
            f"RATE_LIMIT_EXCEEDED_MESSAGERECEIVER_{asid}",
            headers=(retry_after(decision.retry_after),),
        )
