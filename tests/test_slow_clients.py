"""
Slow clients and floods: slowloris heads and bodies, idle keep-alive,
silent and many idle TLS connections, the per-address and global
connection caps -- each proven against the real proxy over TLS while
another consumer keeps being served -- and the same time-outs driven by a
deterministic clock.
"""

from __future__ import annotations

import socket
import ssl
import time
from typing import Any, Awaitable, Callable

import attrs
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp.config import ListenConfig, TokenConfig
from ssp.model import ClientIdentity
from ssp.pipeline import Checks
from ssp.channel import ProxySite
from ssp.proxy import Proxy as ProxyHandler
from ssp.proxy import ProxyResource
from ssp.testing import MemoryDirectory, MemoryThrottle, RecordingAuditSink
from tests.support import ENDPOINT, Provider, Proxy, spine_headers
from tests.test_hostile import (
    ECHO,
    FIGURE_COLUMNS,
    FailureCounter,
    check_figures,
    client_context,
    head,
    send,
    wait_for,
)


@attrs.define
class Tally:
    """
    What one scenario found.

    @ivar forwarded: requests that reached the provider but must not have.
    @ivar audit_lost: refusals that reached HTTP but have no audit record.
    """

    problems: list[str] = attrs.Factory(list)
    forwarded: int = 0
    audit_lost: int = 0

    def expect(self, condition: bool, problem: str) -> None:
        if not condition:
            self.problems.append(problem)


def open_idle(port: int, context: ssl.SSLContext, source: str = "127.0.0.1",
              probe: float = 0.0, consumer: str | None = None) -> ssl.SSLSocket | None:
    """
    Blocking: a TLS connection that sends nothing, or L{None} when the
    proxy refuses it (the handshake fails, or the proxy closes it within
    C{probe} seconds).  With C{consumer}, it comes through a load balancer:
    a PROXY protocol v1 header names C{consumer} first.  A connection
    refused at accept may be reset before C{connect} even returns.
    """
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=5,
                                       source_address=(source, 0))
    except ConnectionResetError:
        return None
    try:
        if consumer is not None:
            raw.sendall(f"PROXY TCP4 {consumer} 127.0.0.1 40000 443\r\n".encode())
        tls = context.wrap_socket(raw, server_hostname="localhost")
        if probe:
            tls.settimeout(probe)
            try:
                if tls.recv(1) == b"":
                    tls.close()
                    return None
            except socket.timeout:
                tls.settimeout(5)
        return tls
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError, OSError):
        raw.close()
        return None


def closed_within(sockets: list[ssl.SSLSocket], seconds: float) -> int:
    """
    Blocking: how many of C{sockets} the proxy closes (EOF or reset, no
    data) within C{seconds}.
    """
    deadline, closed = time.monotonic() + seconds, 0
    for tls in sockets:
        tls.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            closed += tls.recv(1) == b""
        except (ConnectionResetError, ssl.SSLError):
            closed += 1
        except socket.timeout:
            pass
        finally:
            tls.close()
    return closed


class SlowClientScenarios(unittest.TestCase):
    """
    Each scenario gets its own proxy (its own limits) and returns a
    L{Tally}; the test runs them all and computes the figures.
    """

    async def proxy(self, upstream: dict[str, Any] | None = None,
                    **listen: Any) -> tuple[Provider, Proxy]:
        provider = Provider(self)
        proxy = await Proxy(self, provider, upstream=upstream or {},
                            listen={"idle_timeout": 5.0, "header_timeout": 5.0, **listen}).start()
        return provider, proxy

    async def refused_and_audited(self, tally: Tally, proxy: Proxy, provider: Provider,
                                  result: Any, status: int, token: str, decision: str) -> None:
        tally.expect(result.statuses == (status,), f"statuses {result.statuses}")
        tally.expect(result.closed, "connection not closed")
        if result.responses:
            tally.expect(result.responses[-1].token() == token,
                         f"token {result.responses[-1].token()!r}")
        def refusals() -> list[tuple[int, str, str]]:
            return [(r.status, r.token, r.decision) for r in proxy.audit.completed()
                    if r.status != 200]

        if not await wait_for(lambda: bool(refusals())):
            tally.audit_lost += 1
        tally.expect(refusals() == [(status, token, decision)], f"audited {refusals()}")
        await deferLater(reactor, 0.05)
        tally.forwarded += len(provider.seen)

    async def good_request(self, tally: Tally, proxy: Proxy, source: str = "127.0.0.1") -> None:
        result = await send(proxy, head(), responses=1, source=source)
        tally.expect(result.statuses == (200,), f"another consumer got {result.statuses}")

    async def slowloris_headers(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(header_timeout=0.3)
        pieces = [b"GET /" + ENDPOINT.encode() + b"/metadata HTTP/1.1\r\nHost: localhost\r\n"]
        pieces += [b"X-Slow-%d: 1\r\n" % i for i in range(30)]
        started = time.monotonic()
        slow = send(proxy, pieces, gap=0.1)
        await self.good_request(tally, proxy)
        result = await slow
        tally.expect(time.monotonic() - started < 1.5, "head not cut at header_timeout")
        await self.refused_and_audited(tally, proxy, provider, result, 408, "REQUEST_TIMEOUT",
                                       "refused")
        tally.forwarded -= 1  # the good request
        return tally

    async def slowloris_request_line(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(header_timeout=0.3)
        line = b"GET /" + ENDPOINT.encode() + b"/metadata"
        result = await send(proxy, [line[i:i + 4] for i in range(0, len(line), 4)], gap=0.1)
        await self.refused_and_audited(tally, proxy, provider, result, 408, "REQUEST_TIMEOUT",
                                       "refused")
        record = proxy.audit.completed()[0]
        tally.expect(record.method == "GET", f"audited method {record.method!r}")
        return tally

    async def silent_connection(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(header_timeout=0.3)
        started = time.monotonic()
        result = await send(proxy, [])
        tally.expect(result.closed and not result.responses, f"silent connection: {result}")
        tally.expect(time.monotonic() - started < 1.5, "silent connection not closed in time")
        tally.expect(proxy.audit.completed() == [], "a silent connection was audited")
        return tally

    async def stalled_body(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(idle_timeout=0.3)
        payload = head(b"POST", ECHO, lines=[b"Content-Length: 100"]) + b"x" * 10
        slow = send(proxy, payload)
        await self.good_request(tally, proxy)
        result = await slow
        await self.refused_and_audited(tally, proxy, provider, result, 408, "REQUEST_TIMEOUT",
                                       "failed")
        tally.forwarded -= 1
        await proxy.service.proxy.upstream.pool.closeCachedConnections()
        tally.expect(await wait_for(lambda: all(not p.transport.connected
                                                for p in provider.tracking.live)),
                     "upstream connection of the stalled upload left open")
        return tally

    async def stalled_body_with_shorter_response_timeout(self) -> Tally:
        """
        A consumer stalling mid-body is the consumer's failure (408 at
        idle_timeout), even when the provider's response_timeout is
        shorter: the provider cannot answer a request it has not had whole.
        The upstream request is cancelled with it.
        """
        tally = Tally()
        provider, proxy = await self.proxy(idle_timeout=1.5, upstream={"response_timeout": 0.1})
        result = await send(proxy, head(b"POST", ECHO, lines=[b"Content-Length: 10"]) + b"x")
        await self.refused_and_audited(tally, proxy, provider, result, 408, "REQUEST_TIMEOUT",
                                       "failed")
        tally.expect(provider.tracking.accepted == 1, "the request never went upstream")
        tally.expect(await wait_for(lambda: all(not p.transport.connected
                                                for p in provider.tracking.live)),
                     "upstream connection of the stalled upload left open")
        return tally

    async def trickled_body_within_idle_timeout(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(idle_timeout=0.6)
        pieces = [head(b"POST", ECHO, lines=[b"Content-Length: 5"])] + [b"a"] * 5
        result = await send(proxy, pieces, gap=0.1, responses=1)
        tally.expect(result.statuses == (200,), f"trickled body got {result.statuses}")
        tally.expect([s.body_length for s in provider.seen] == [5], "body not forwarded whole")
        return tally

    async def slow_provider_outlives_header_timeout(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(upstream={"response_timeout": 0.6},
                                           header_timeout=0.2)
        result = await send(proxy, head(target=f"/{ENDPOINT}/stall".encode()), responses=1)
        tally.expect(result.statuses == (504,), f"header deadline hit a waiting request: "
                                                f"{result.statuses}")
        return tally

    async def idle_keep_alive(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(idle_timeout=0.3)
        started = time.monotonic()
        result = await send(proxy, head())
        tally.expect(result.statuses == (200,) and result.closed and not result.leftover,
                     f"keep-alive: {result}")
        tally.expect(time.monotonic() - started < 1.5, "idle keep-alive not closed in time")
        return tally

    async def many_idle_connections(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(header_timeout=0.5)
        context = client_context(proxy)

        def flood() -> int:
            sockets = [open_idle(proxy.port, context, "127.0.0.1") for _ in range(40)]
            return closed_within([s for s in sockets if s is not None], 2.0)

        flooding = deferToThread(flood)
        await self.good_request(tally, proxy, source="127.0.0.2")
        closed = await flooding
        tally.expect(closed == 40, f"{closed} of 40 idle connections closed")
        tally.expect(await wait_for(lambda: not proxy.service.site.channels),
                     "idle channels left open")
        return tally

    async def per_address_cap(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(max_connections_per_address=3)
        context = client_context(proxy)
        idle = [await deferToThread(open_idle, proxy.port, context, "127.0.0.1")
                for _ in range(3)]
        tally.expect(None not in idle, "a connection under the cap was refused")
        excess = await deferToThread(open_idle, proxy.port, context, "127.0.0.1", 0.2)
        tally.expect(excess is None, "connection over the per-address cap accepted")
        await self.good_request(tally, proxy, source="127.0.0.2")
        await deferToThread(closed_within, [s for s in idle[:1] if s is not None], 0.01)
        await wait_for(lambda: len(proxy.service.site.channels) < 3)
        await self.good_request(tally, proxy, source="127.0.0.1")
        tally.expect(proxy.service.site.caps.refused_connections == 1,
                     f"refused {proxy.service.site.caps.refused_connections}")
        proxy.service.connection_refusals.flush()
        failed = [r for r in proxy.audit.records if r.event == "connection-refused"]
        tally.expect([(r.token, r.count) for r in failed] == [("CONNECTION_LIMIT_EXCEEDED", 1)],
                     f"refused connection audited as {failed}")
        await deferToThread(closed_within, [s for s in idle[1:] if s is not None], 0.01)
        return tally

    async def per_address_cap_behind_proxy_protocol(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(proxy_protocol=True, max_connections_per_address=1)
        context = client_context(proxy)
        def through_balancer(consumer: str) -> Any:
            return deferToThread(open_idle, proxy.port, context, probe=0.2, consumer=consumer)

        first = await through_balancer("203.0.113.7")
        second = await through_balancer("203.0.113.7")
        other = await through_balancer("203.0.113.8")
        tally.expect(first is not None and other is not None,
                     "consumers under the cap refused behind the load balancer")
        tally.expect(second is None, "second connection of one consumer accepted")
        tally.expect(sorted(c.address for c in proxy.service.site.channels)
                     == ["203.0.113.7", "203.0.113.8"], "connections not counted per consumer")
        await deferToThread(closed_within, [s for s in (first, other) if s is not None], 0.01)
        return tally

    async def global_cap(self) -> Tally:
        tally = Tally()
        provider, proxy = await self.proxy(max_connections=3)
        consumer = proxy.consumer()
        connection = consumer.connect()
        first = await consumer.get("metadata", connection=connection)
        context = client_context(proxy)
        idle = [await deferToThread(open_idle, proxy.port, context, source)
                for source in ("127.0.0.2", "127.0.0.3")]
        excess = await deferToThread(open_idle, proxy.port, context, "127.0.0.4", 0.2)
        tally.expect(None not in idle, "a connection under the cap was refused")
        tally.expect(excess is None, "connection over max_connections accepted")
        second = await consumer.get("metadata", connection=connection)
        tally.expect((first.status, second.status) == (200, 200),
                     f"existing consumer got {first.status}, {second.status}")
        connection.close()
        await deferToThread(closed_within, [s for s in idle if s is not None], 0.01)
        await wait_for(lambda: not proxy.service.site.channels)
        await self.good_request(tally, proxy, source="127.0.0.4")
        return tally

    async def test_scenarios(self):
        crashes = FailureCounter(self)
        scenarios: list[Callable[[], Awaitable[Tally]]] = [
            self.slowloris_headers, self.slowloris_request_line, self.silent_connection,
            self.stalled_body, self.stalled_body_with_shorter_response_timeout,
            self.trickled_body_within_idle_timeout,
            self.slow_provider_outlives_header_timeout, self.idle_keep_alive,
            self.many_idle_connections, self.per_address_cap,
            self.per_address_cap_behind_proxy_protocol, self.global_cap,
        ]
        figures = dict.fromkeys(FIGURE_COLUMNS, 0)
        problems = []
        for scenario in scenarios:
            tally = await scenario()
            figures["cases"] += 1
            figures["as_expected"] += not tally.problems
            figures["forwarded"] += tally.forwarded
            figures["audit_lost"] += tally.audit_lost
            problems += [f"{scenario.__name__}: {p}" for p in tally.problems]
        figures["crashes"] = crashes.count
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertEqual((figures["forwarded"], figures["crashes"], figures["audit_lost"]),
                         (0, 0, 0))
        check_figures(self, "slow-clients", figures)


def _verified(connection: object) -> ClientIdentity:
    """
    Every connection's certificate is good: the requests these tests send
    are refused by later checks (400), which keep the connection open.
    """
    return ClientIdentity("CN=consumer.test", "00", ("consumer.test",))


class _Unreachable:
    def request(self, *args: Any) -> Any:
        raise AssertionError("nothing may be forwarded")


def consumer_from(consumer: Any, source: str) -> Any:
    """
    A request from C{consumer}, sent from the local address C{source}.
    """
    def call() -> int:
        connection = consumer.connect()
        connection.source_address = (source, 0)
        try:
            connection.request("GET", f"/{ENDPOINT}/metadata", headers=spine_headers())
            return connection.getresponse()
        finally:
            connection.close()

    return deferToThread(call)


class ClockedTimeouts(unittest.SynchronousTestCase):
    """
    The channel's time-outs and caps against a L{Clock} and a
    L{StringTransport}: exact, and independent of machine speed.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.audit = RecordingAuditSink()
        checks = Checks(identify=_verified, directory=MemoryDirectory(),
                        throttle=MemoryThrottle(), agreements=(), token=TokenConfig(),
                        clock=self.clock)
        handler = ProxyHandler(checks, _Unreachable(), self.audit, self.clock, 60.0, b"max-age=1")
        limits = ListenConfig(header_timeout=10.0, idle_timeout=30.0,
                              max_connections=4, max_connections_per_address=2)
        self.site = ProxySite(ProxyResource(handler), self.clock, limits, handler.refuse_early)

    def connect(self, host: str = "192.0.2.1") -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", host, 40000))
        transport = StringTransport()
        channel.makeConnection(transport)
        return channel, transport

    def test_header_deadline_is_not_extended_by_trickling(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\n")
        for _ in range(9):
            self.clock.advance(1.0)
            channel.dataReceived(b"X-Slow: 1\r\n")
        self.clock.advance(0.99)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.01)
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 408 Request Timeout\r\n"))
        self.assertIn(b"REQUEST_TIMEOUT", transport.value())
        self.assertTrue(transport.disconnecting)
        self.assertEqual([(r.status, r.token) for r in self.audit.completed()],
                         [(408, "REQUEST_TIMEOUT")])

    def test_silent_connection_closed_without_answer(self):
        channel, transport = self.connect()
        self.clock.advance(10.0)
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.audit.records, [])

    def test_idle_keep_alive_closed_after_idle_timeout(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertIn(b" 400 ", transport.value())
        transport.clear()
        self.clock.advance(29.9)
        self.assertFalse(transport.disconnecting)
        self.clock.advance(0.1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")

    def test_next_request_head_has_its_own_deadline(self):
        channel, transport = self.connect()
        channel.dataReceived(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
        self.clock.advance(20.0)
        channel.dataReceived(b"GET /y HTTP/1.1\r\n")
        transport.clear()
        self.clock.advance(9.9)
        self.assertEqual(transport.value(), b"")
        self.clock.advance(0.1)
        self.assertIn(b" 408 ", transport.value())

    def test_connection_caps(self):
        caps = self.site.caps
        self.assertEqual([caps.open("192.0.2.1") for _ in range(3)], [True, True, False])
        self.assertEqual([caps.open(h) for h in ("192.0.2.2", "192.0.2.3", "192.0.2.4")],
                         [True, True, False])
        self.assertEqual((caps.open_connections, caps.refused_connections), (4, 2))
        caps.close("192.0.2.1")
        self.assertTrue(caps.open("192.0.2.1"))
        self.assertEqual(caps.open_connections, 4)

    def test_connection_caps_address_known_later(self):
        """
        Behind the PROXY protocol a connection counts in the total from
        accept, and against its consumer's cap once the header names it.
        """
        caps = self.site.caps
        self.assertEqual([caps.open(None) for _ in range(5)], [True] * 4 + [False])
        self.assertEqual([caps.identify("192.0.2.1") for _ in range(3)], [True, True, False])
        caps.close(None)
        caps.close("192.0.2.1")
        self.assertTrue(caps.identify("192.0.2.1"))
        self.assertEqual((caps.open_connections, caps.refused_connections), (2, 2))


class SilentTCPTests(unittest.TestCase):
    timeout = 30

    async def test_silent_connections_count_against_caps(self):
        """
        Connections count against the caps from the moment they are
        accepted: with the per-address cap taken by TCP connections that
        have sent nothing, the next connection from that address is
        refused at once, before its handshake; another address is served;
        once they are cut off, the address is served again.
        """
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen={
            "header_timeout": 1.0, "max_connections_per_address": 3}).start()
        consumer = proxy.consumer()
        context = client_context(proxy)

        def silent() -> socket.socket:
            return socket.create_connection(("127.0.0.1", proxy.port), timeout=5)

        quiet = [await deferToThread(silent) for _ in range(3)]
        self.addCleanup(lambda: [s.close() for s in quiet])
        caps = proxy.service.site.caps
        self.assertTrue(await wait_for(lambda: caps.open_connections == 3, 10.0))
        refused = await deferToThread(open_idle, proxy.port, context, "127.0.0.1", 0.5)
        self.assertIsNone(refused)
        self.assertEqual(caps.refused_connections, 1)
        proxy.service.connection_refusals.flush()
        self.assertEqual([(r.token, r.count) for r in proxy.audit.records],
                         [("CONNECTION_LIMIT_EXCEEDED", 1)])
        self.assertEqual((await consumer_from(consumer, "127.0.0.2")).status, 200)
        self.assertTrue(await wait_for(lambda: caps.open_connections == 0, 10.0))
        self.assertEqual((await consumer.get("metadata")).status, 200)

    async def test_silent_tcp_connection_cut_off(self):
        """
        A TCP connection that never sends its first byte (no TLS handshake,
        so the site never sees it) is aborted after C{header_timeout}.
        """
        provider = Provider(self)
        proxy = await Proxy(self, provider, listen={"header_timeout": 0.3}).start()

        def wait_for_close() -> float:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
                started = time.monotonic()
                try:
                    raw.recv(1)
                except ConnectionResetError:
                    pass
                return time.monotonic() - started

        self.assertLess(await deferToThread(wait_for_close), 2.0)
        self.assertEqual(proxy.audit.records, [])
