"""
Contract tests: every fake in L{ssp.testing} and the real implementation
of the same interface pass the same tests, so a test that passes on a fake
says something about production.  (The directory contract lives in
L{tests.test_directory}.)
"""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock, Cooperator
from twisted.trial.unittest import TestCase
from twisted.web.client import FileBodyProducer, readBody
from twisted.web.http_headers import Headers
from zope.interface.verify import verifyObject

from ssp import demo
from ssp.audit import FileAuditSink
from ssp.chain import audit_files, read_records
from ssp.config import LimitSet, RateLimit, ThrottleConfig
from ssp.errors import AuditUnavailable, UpstreamFailed
from ssp.forward import Upstream
from ssp.interfaces import IAuditSink, IThrottle, IUpstream
from ssp.model import AuditRecord
from ssp.testing import MemoryThrottle, MemoryUpstream, RecordingAuditSink
from ssp.throttle import MemoryRateStore, RedisRateStore, Throttle
from ssp.tls import UpstreamTLS
from tests import redis
from tests.ports import free_port
from tests.support import ROOT, Provider, pki

CONSUMER, PROVIDER = "200000000359", "918999198738"
CONSUMER_ALLOWANCE, PROVIDER_ALLOWANCE, PERIOD = 3, 2, 6.0


class ThrottleContract:
    """
    An L{IThrottle} allowing C{CONSUMER_ALLOWANCE} requests at once per
    consumer and C{PROVIDER_ALLOWANCE} per provider, refilling evenly over
    C{PERIOD} seconds of C{self.clock}.  Subclasses set C{self.throttle}.
    """

    clock: Clock
    throttle: Any

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IThrottle, self.throttle))

    async def spend(self, times: int, asid: str = CONSUMER) -> list[Any]:
        return [await self.throttle.consume_consumer(asid) for _ in range(times)]

    async def test_allowance_then_refusal(self) -> None:
        decisions = await self.spend(CONSUMER_ALLOWANCE + 1)
        self.assertEqual(
            [(d.allowed, d.limit, d.remaining) for d in decisions],
            [(True, 3, 2), (True, 3, 1), (True, 3, 0), (False, 3, 0)],
        )
        self.assertTrue(0 < decisions[-1].retry_after <= PERIOD)

    async def test_refill_by_the_clock(self) -> None:
        """
        Time refills the allowance (a refusal spends nothing): one request
        after C{retry_after}, all of them after C{PERIOD}.
        """
        refused = (await self.spend(CONSUMER_ALLOWANCE + 1))[-1]
        self.clock.advance(refused.retry_after)
        self.assertEqual([d.allowed for d in await self.spend(2)], [True, False])
        self.clock.advance(PERIOD)
        self.assertEqual((await self.spend(1))[0].remaining, CONSUMER_ALLOWANCE - 1)

    async def test_peek_spends_nothing(self) -> None:
        """
        A peek answers what the next consume will, and changes nothing.
        """
        await self.spend(1)
        peeked = [await self.throttle.peek_consumer(CONSUMER) for _ in range(3)]
        self.assertEqual(peeked[0], peeked[2])
        self.assertEqual(peeked[0], (await self.spend(1))[0])
        await self.spend(CONSUMER_ALLOWANCE)
        self.assertFalse((await self.throttle.peek_consumer(CONSUMER)).allowed)

    async def test_roles_and_asids_independent(self) -> None:
        await self.spend(CONSUMER_ALLOWANCE + 1)
        self.assertTrue((await self.spend(1, "other"))[0].allowed)
        provider = [await self.throttle.consume_provider(PROVIDER) for _ in range(3)]
        self.assertEqual([d.allowed for d in provider], [True, True, False])
        self.assertEqual(provider[0].limit, PROVIDER_ALLOWANCE)
        self.assertFalse((await self.throttle.peek_provider(PROVIDER)).allowed)


def limits() -> ThrottleConfig:
    def per(allowance: int) -> LimitSet:
        return LimitSet(RateLimit(rate=allowance, period=PERIOD, burst=allowance))

    return ThrottleConfig(consumer=per(CONSUMER_ALLOWANCE), provider=per(PROVIDER_ALLOWANCE))


class MemoryThrottleContractTests(ThrottleContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = MemoryThrottle(CONSUMER_ALLOWANCE, PROVIDER_ALLOWANCE, PERIOD, self.clock)


class MemoryStoreThrottleContractTests(ThrottleContract, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.throttle = Throttle(limits(), MemoryRateStore(self.clock))


class RedisStoreThrottleContractTests(ThrottleContract, TestCase):
    skip = redis.SKIP

    def setUp(self) -> None:
        server = redis.RedisServer.start_for(self)
        self.clock = Clock()
        store = RedisRateStore.from_url(reactor, server.url, clock=self.clock, timeout=10.0)
        store.start()
        self.addCleanup(store.stop)
        self.throttle = Throttle(limits(), store)


def record(n: int) -> AuditRecord:
    return AuditRecord(event="completed", request_id=f"req-{n}", time=1709337590.0 + n,
                       consumer_address="127.0.0.1:50000", method="GET",
                       target=demo.PROVIDER_ENDPOINT + "/metadata", decision="forwarded",
                       status=200)


class AuditSinkContract:
    """
    An L{IAuditSink}.  Subclasses set C{self.sink} and provide
    C{written()} (the request ids kept, in order), C{break_disk()} and
    C{repair_disk()}.
    """

    sink: Any

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IAuditSink, self.sink))

    async def test_append_is_asynchronous(self) -> None:
        """
        An append is not durable when it returns: its Deferred fires on a
        later turn, and until then the record counts as pending.
        """
        d = self.sink.append(record(1))
        self.assertFalse(d.called)
        self.assertEqual(self.sink.pending, 1)
        self.assertIsNone(await d)
        self.assertEqual(self.sink.pending, 0)
        self.assertEqual(self.written(), ["req-1"])

    async def test_cancelled_append_still_written(self) -> None:
        """
        The proxy cancels its work when a consumer disconnects; a record
        already appended is written all the same.
        """
        cancelled = self.sink.append(record(1))
        cancelled.cancel()
        await self.assertFailure(cancelled, CancelledError)
        await self.sink.append(record(2))
        self.assertEqual(self.written(), ["req-1", "req-2"])
        self.assertEqual(self.sink.pending, 0)

    async def test_order_kept(self) -> None:
        for n in range(5):
            await self.sink.append(record(n))
        self.assertEqual(self.written(), [f"req-{n}" for n in range(5)])

    async def test_fails_closed_then_recovers(self) -> None:
        """
        A broken disk fails the append with L{AuditUnavailable} and keeps
        nothing; C{writable} is false until an append succeeds again.
        """
        self.assertTrue(self.sink.writable)
        self.break_disk()
        await self.assertFailure(self.sink.append(record(1)), AuditUnavailable)
        self.assertFalse(self.sink.writable)
        self.repair_disk()
        await self.sink.append(record(2))
        self.assertTrue(self.sink.writable)
        self.assertEqual(self.written(), ["req-2"])


class RecordingAuditSinkContractTests(AuditSinkContract, TestCase):
    def setUp(self) -> None:
        self.sink = RecordingAuditSink()

    def written(self) -> list[str]:
        return [r.request_id for r in self.sink.records]

    def break_disk(self) -> None:
        self.sink.writable = False

    def repair_disk(self) -> None:
        self.sink.writable = True


class FileAuditSinkContractTests(AuditSinkContract, TestCase):
    async def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.full = False
        self.sink = FileAuditSink(self.directory, reactor, raw_write=self.write)
        self.addCleanup(self.sink.stop)
        await self.sink.start()

    def write(self, fd: int, data: memoryview) -> int:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    def written(self) -> list[str]:
        return [r["request_id"] for r in read_records(audit_files(self.directory))]

    def break_disk(self) -> None:
        self.full = True

    def repair_disk(self) -> None:
        self.full = False
        self.flushLoggedErrors(OSError)


class UpstreamContract:
    """
    An L{IUpstream} in front of a provider serving C{self.url}, which
    answers 200 with the body C{self.body}; C{self.unreachable} is a URL
    nothing serves.  Subclasses set them and C{self.upstream}.
    """

    upstream: Any
    url: bytes
    unreachable: bytes
    body: bytes

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IUpstream, self.upstream))

    async def test_response_relayed(self) -> None:
        response = await self.upstream.request(b"GET", self.url, Headers(), None)
        self.assertEqual(response.code, 200)
        self.assertEqual(await readBody(response), self.body)

    async def test_request_body_sent(self) -> None:
        """
        A body producer is consumed and sent; the response still arrives.
        """
        producer = FileBodyProducer(io.BytesIO(b"x" * 70_000), cooperator=_immediate())
        response = await self.upstream.request(b"POST", self.url, Headers(), producer)
        self.assertEqual(response.code, 200)
        await readBody(response)

    async def test_unreachable(self) -> None:
        failure = await self.assertFailure(
            self.upstream.request(b"GET", self.unreachable, Headers(), None), UpstreamFailed
        )
        self.assertEqual(
            failure.token, f"ERROR_COMMUNICATING_TO_ENDPOINT_URL_{self.unreachable.decode()}"
        )


def _immediate() -> Cooperator:
    return Cooperator(scheduler=lambda work: reactor.callLater(0, work))


METADATA_URL = (demo.PROVIDER_ENDPOINT + "/metadata").encode()
CAPABILITY = b'{"resourceType": "CapabilityStatement"}'


class MemoryUpstreamContractTests(UpstreamContract, TestCase):
    def setUp(self) -> None:
        self.url, self.body = METADATA_URL, CAPABILITY
        self.unreachable = f"https://127.0.0.1:{free_port()}/fhir/metadata".encode()
        self.upstream = MemoryUpstream({self.url: (200, self.body)})


class UpstreamContractTests(UpstreamContract, TestCase):
    """
    The real agent, over mutual TLS to the scriptable provider on loopback.
    """

    def setUp(self) -> None:
        provider = Provider(self)
        config = demo.demo_config(ROOT, pki(), provider.port.getHost().port).upstream
        self.upstream = Upstream(reactor, config, UpstreamTLS(config))
        self.addCleanup(self.upstream.pool.closeCachedConnections)
        self.url, self.body = METADATA_URL, CAPABILITY
        self.unreachable = f"https://127.0.0.1:{free_port()}/fhir/metadata".encode()
