"""
The provider leg's own mechanisms: the response-head guard that checks
a head a read at a time (it must refuse exactly what a line-by-line
check refuses, however the head is split across reads), the Connection
field exposed from the raw head, the per-origin cache of pool keys and
endpoints (a reload with another C{[upstream.resolve]} must not meet
it), and the pooled connections (one the provider closed between
requests is not used again, nor one whose request was cancelled).
"""

from __future__ import annotations

import ast
import copy
import inspect
import socket
import time
import types
from pathlib import Path
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.interfaces import IConsumer
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.trial import unittest
from twisted.web._newclient import ParseError, Request, RequestNotSent
from twisted.web.http_headers import Headers

from ssp import forward
from ssp.config import UpstreamConfig
from ssp.interfaces import IExchange
from tests.support import Provider
from tests.test_hostile import client_context, head, send, wait_for
from tests.test_provider_faults import (
    FAULTS,
    OK_HEAD,
    answer,
    listen_scripted,
    proxy_to,
)
from tests.test_service import ConfigFile, start

LIMIT = 4096

VALID_HEADS = [
    OK_HEAD + b"Content-Length: 2\r\n\r\nok",
    b"HTTP/1.0 201\r\nX-Tab: a\tb\r\nX-Latin: caf\xe9\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 204 No Content\n\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    + OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    # Framing fields in a 1xx head do not count against the final head.
    b"HTTP/1.1 100 Continue\r\nContent-Length: 0\r\n\r\n"
    + OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    OK_HEAD + b"X-Long: " + b"a" * (LIMIT - 100) + b"\r\n\r\n",
]

REFUSED_HEADS = [
    b"\r\n\r\n",
    b"\n\nHTTP/1.1 200 OK\r\n\r\n",
    b"HTTP/1.1 200 OK\r\r\n\r\n",
    OK_HEAD + b"X-A: a\rb\r\n\r\n",
    OK_HEAD + b"Content-Length: 0\r\n\r\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 2000 OK\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nX: \x01\r\n\r\n" + OK_HEAD + b"\r\n",
    OK_HEAD + b"X-Long: " + b"a" * LIMIT + b"\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" * (LIMIT // 25 + 1) + OK_HEAD + b"\r\n",
    OK_HEAD + b"transfer-encoding: chunked\r\nCONTENT-LENGTH: 1\r\n\r\n",
]


def guard_verdict(pieces: list[bytes]) -> tuple[str, bytes]:
    """
    Feed C{pieces} to a guard: C{("refused", b"")}, or C{("passed", what
    the parser would get)}, or C{("waiting", what it got so far)}.
    """
    guard = forward._HeadGuard(LIMIT)
    released = b""
    for index, piece in enumerate(pieces):
        try:
            interim, final = guard.receive(piece)
        except ParseError:
            return "refused", b""
        released += b"".join(interim)
        if final is not None:
            return "passed", released + final + b"".join(pieces[index + 1:])
    return "waiting", released


def splits(data: bytes) -> list[list[bytes]]:
    """
    C{data} whole, byte by byte, and cut in two at every point.
    """
    return [[data], [data[i:i + 1] for i in range(len(data))]] + [
        [data[:i], data[i:]] for i in range(1, len(data))]


def catalogue_heads() -> list[bytes]:
    """
    What the provider-fault catalogue's one-shot scripts send.
    """
    class Recorder:
        def __init__(self) -> None:
            self.sent = b""

        def write(self, data: bytes) -> None:
            self.sent += data

        def later(self, *args: Any) -> None:
            pass

        transport = type("T", (), {"loseConnection": lambda self: None,
                                   "abortConnection": lambda self: None})()

    heads = []
    for fault in FAULTS:
        recorder = Recorder()
        try:
            stateless_copy(fault.script)(recorder)
        except (AttributeError, TypeError):
            continue
        if recorder.sent:
            heads.append(recorder.sent)
    return heads


def stateless_copy(script: Callable[..., None]) -> Callable[..., None]:
    """
    C{script} with its own copy of the state it closes over: the
    catalogue's scripts count their calls (C{then_fresh}), and the
    catalogue itself must still see a first call.
    """
    cells = tuple(types.CellType(copy.copy(cell.cell_contents))
                  for cell in script.__closure__ or ())
    return types.FunctionType(script.__code__, script.__globals__, script.__name__,
                              script.__defaults__, cells or None)


class HeadGuardTests(unittest.SynchronousTestCase):
    def test_valid_heads_pass_whole_however_split(self) -> None:
        for data in VALID_HEADS:
            for pieces in splits(data):
                self.assertEqual(guard_verdict(pieces), ("passed", data), (data, pieces))

    def test_refused_heads_refused_however_split(self) -> None:
        for data in REFUSED_HEADS:
            for pieces in splits(data):
                self.assertEqual(guard_verdict(pieces)[0], "refused", (data, pieces))

    def test_catalogue_verdicts_do_not_depend_on_the_reads(self) -> None:
        heads = catalogue_heads()
        self.assertGreater(len(heads), 15)
        for data in heads:
            whole = guard_verdict([data])
            for pieces in splits(data):
                self.assertEqual(guard_verdict(pieces), whole, (data, pieces))

    def test_bad_line_refused_before_the_head_ends(self) -> None:
        """
        As a line-by-line check did, a complete bad line is refused at
        once: a provider cannot hold the connection by never ending it.
        """
        for partial in (b"NOT HTTP\r\n", OK_HEAD + b"X: a\x00\r\n", OK_HEAD + b" folded\r\n",
                        OK_HEAD + b"Content-Length: 1\r\nTransfer-Encoding: chunked\r\n",
                        OK_HEAD + b"X: " + b"a" * LIMIT):
            self.assertEqual(guard_verdict([partial])[0], "refused", partial)

    def test_refusal_names_the_line(self) -> None:
        guard = forward._HeadGuard(LIMIT)
        with self.assertRaises(ParseError) as caught:
            guard.receive(OK_HEAD + b"Good: 1\r\nBad Name: 2\r\n\r\n")
        self.assertEqual(caught.exception.args, ("malformed header line", b"Bad Name: 2"))

    def test_connection_values_of_the_final_head(self) -> None:
        guard = forward._HeadGuard(LIMIT)
        interim, final = guard.receive(
            b"HTTP/1.1 100 Continue\r\nConnection: x-early\r\n\r\n"
            + OK_HEAD + b"connection: \tx-one ,x-two \r\nCONNECTION: x-three\r\n\r\n")
        self.assertEqual(len(interim), 1)
        self.assertIsNotNone(final)
        self.assertEqual(guard.connection, [b"x-one ,x-two", b"x-three"])


class ProviderLegTests(unittest.TestCase):
    async def test_connection_naming_fields_as_the_last_line(self) -> None:
        """
        The fields a provider's C{Connection} names are hop-by-hop, also
        when C{Connection} is the last field of the head (the line-by-line
        guard copied it before Twisted had stored that field).
        """
        provider, port = listen_scripted(self)
        provider.script = answer(OK_HEAD + b"X-Private: secret\r\nX-Kept: k\r\n"
                                 b"Content-Length: 2\r\nConnection: X-Private\r\n\r\nok")
        proxy = await proxy_to(self, port)
        response = (await send(proxy, head(), responses=1)).responses[0]
        relayed = {name for name, _ in response.headers} & {b"x-private", b"connection", b"x-kept"}
        self.assertEqual((response.status, response.body, relayed), (200, b"ok", {b"x-kept"}))

    async def test_interim_heads_in_separate_reads(self) -> None:
        provider, port = listen_scripted(self)

        def script(p: Any) -> None:
            p.write(b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>\r\n")
            p.later(0.02, p.write, b"\r\nHTTP/1.1 200 OK\r\nContent-")
            p.later(0.04, p.write, b"Length: 5\r\nX-Final: yes\r\n\r\nhel")
            p.later(0.06, p.write, b"lo")

        provider.script = script
        proxy = await proxy_to(self, port)
        result = await send(proxy, head(), responses=1)
        response = result.responses[0]
        self.assertEqual((response.status, response.body), (200, b"hello"))
        self.assertEqual(response.header(b"x-final"), b"yes")
        self.assertIsNone(response.header(b"link"))

    async def test_malformed_line_refused_before_the_head_ends(self) -> None:
        """
        A provider that sends a bad header line and then nothing gets 502
        at once, not the 504 of its response time-out.
        """
        provider, port = listen_scripted(self)
        provider.script = answer(OK_HEAD + b"Bad Line\r\n")
        proxy = await proxy_to(self, port, response_timeout=30.0)
        result = await send(proxy, head(), responses=1, timeout=20)
        self.assertEqual(result.statuses, (502,))

    async def test_pooled_connection_closed_by_the_provider(self) -> None:
        """
        A provider that closes an idle keep-alive connection: the next
        request goes out on a new connection and is answered.
        """
        provider, port = listen_scripted(self)
        provider.script = answer(OK_HEAD + b"Content-Length: 5\r\n\r\nfirst")
        proxy = await proxy_to(self, port)
        first = await send(proxy, head(), responses=1)
        self.assertEqual(first.responses[0].body, b"first")
        provider.live[0].transport.loseConnection()
        self.assertTrue(await wait_for(lambda: not provider.live[0].transport.connected))
        provider.script = answer(OK_HEAD + b"Content-Length: 6\r\n\r\nsecond")
        second = await send(proxy, head(), responses=1)
        self.assertEqual((second.statuses, second.responses[0].body), ((200,), b"second"))
        self.assertEqual(len(provider.live), 2)

    async def test_cancelled_request_connection_not_reused(self) -> None:
        """
        A consumer that leaves before the provider answers cancels the
        upstream request: that connection is closed, not pooled, so its
        late answer can never reach the next consumer.
        """
        provider, port = listen_scripted(self)
        provider.script = lambda p: None
        proxy = await proxy_to(self, port, response_timeout=30.0)
        context = client_context(proxy)

        def ask_and_leave() -> None:
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(head())
            deadline = time.monotonic() + 10
            while not provider.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            tls.close()

        await deferToThread(ask_and_leave)
        self.assertEqual(provider.requests, 1)
        self.assertTrue(await wait_for(lambda: not provider.live[0].transport.connected, 10))
        self.assertTrue(await wait_for(lambda: bool(proxy.audit.completed()), 10))
        self.assertEqual(proxy.audit.completed()[0].decision, "abandoned")
        late = provider.live[0]
        provider.script = answer(OK_HEAD + b"Content-Length: 5\r\n\r\nfresh")
        result = await send(proxy, head(), responses=1)
        self.assertEqual((result.statuses, result.responses[0].body), ((200,), b"fresh"))
        self.assertEqual(len(provider.live), 2)
        self.assertIsNot(provider.live[1], late)


class OriginCacheTests(unittest.TestCase):
    timeout = 60

    async def test_reload_with_another_resolve_reaches_the_new_address(self) -> None:
        old, new = Provider(self), Provider(self)
        config = ConfigFile(self, old)
        config.write()
        service, consumer = await start(self, config)
        self.assertEqual((await consumer.get("metadata")).status, 200)
        config.provider_port = new.port.getHost().port
        config.write()
        self.assertTrue(service.reload())
        self.assertEqual((await consumer.get("metadata")).status, 200)
        self.assertEqual((len(old.seen), len(new.seen)), (1, 1))

    def test_one_origin_entry_per_host_and_port(self) -> None:
        upstream = forward.Upstream(reactor, _upstream_config(), _NoTLS())
        for url in (b"https://a.example/x", b"https://a.example/y?z=1",
                    b"https://a.example:8443/x", b"https://[::1]/x"):
            upstream._origin(url[:url.index(b"/", 8)])
        origins = upstream._origins
        self.assertEqual(sorted(origins), [b"https://[::1]", b"https://a.example",
                                           b"https://a.example:8443"])
        self.assertEqual(origins[b"https://a.example"].key, (b"https", b"a.example", 443))
        self.assertEqual(origins[b"https://a.example:8443"].host, b"a.example:8443")
        self.assertEqual(origins[b"https://[::1]"].key, (b"https", b"::1", 443))


class _NoTLS:
    def creator_for(self, hostname: str) -> None:
        return None


def _upstream_config() -> UpstreamConfig:
    return UpstreamConfig(certificate=Path("unused"), private_key=Path("unused"),
                          ca=Path("unused"))


class ProviderProtocolTests(unittest.SynchronousTestCase):
    def test_a_second_request_leaves_the_guard_of_the_first(self) -> None:
        """
        A request on a connection still reading a response is refused by
        Twisted; the head being read is still checked as a whole.
        """
        protocol = forward._ProviderProtocol(lambda p: None, LIMIT)
        protocol.makeConnection(StringTransport())
        headers = Headers({b"Host": [b"provider.example"]})
        first = protocol.request(Request(b"GET", b"/a", headers, None))
        protocol.dataReceived(OK_HEAD)
        self.failureResultOf(protocol.request(Request(b"GET", b"/b", headers, None)),
                             RequestNotSent)
        # A head of its own, but a malformed line of the head begun above.
        protocol.dataReceived(b"HTTP/1.1 200 OK\r\n\r\n")
        reasons = self.failureResultOf(first).value.reasons
        self.assertEqual(reasons[0].value.args, ("malformed header line", b"HTTP/1.1 200 OK"))
        self.assertTrue(protocol.transport.disconnecting)


class RelayBoundaryTests(unittest.SynchronousTestCase):
    def test_relay_uses_the_request_only_as_an_exchange(self) -> None:
        """
        The relay reads nothing of the consumer's request that
        L{IExchange} (and C{IConsumer}, for back-pressure) does not offer:
        no C{_disconnected}, no C{channel}.
        """
        tree = ast.parse(inspect.getsource(forward._Relay))
        used = {node.attr for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "_request"}
        self.assertIn("transport", used, "no request attributes parsed: the check would be vacuous")
        offered = set(IExchange.names(all=True)) | set(IConsumer.names(all=True))
        self.assertEqual(used - offered, set())
