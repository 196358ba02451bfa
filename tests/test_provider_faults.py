"""
Provider faults against the real proxy: a scripted provider behind mutual
TLS writes hand-crafted responses -- garbage status lines, malformed or
endless heads, bodies that break, stall, never end or overrun their
length -- and the consumer must get a defined status (502/504 with an
OperationOutcome before the status line went, an aborted connection
after), never a byte of the failed response beyond the failure, and one
audit record with the right status and token.
"""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path
from typing import Any, Callable

import attrs
from twisted.internet import reactor
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, TLSVersion
from twisted.internet.task import deferLater
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial import unittest
from zope.interface import implementer

from ssp import demo
from ssp.pki import DevelopmentPKI
from tests.support import ENDPOINT, Provider, Proxy, pki
from tests.test_hostile import (
    FIGURE_COLUMNS,
    FailureCounter,
    check_figures,
    client_context,
    head,
    send,
    wait_for,
)

UPSTREAM = {"response_timeout": 0.5, "idle_timeout": 0.5, "max_header_bytes": 4096}
FAILED = f"ERROR_COMMUNICATING_TO_ENDPOINT_URL_{ENDPOINT}/metadata"
TIMED_OUT = f"TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{ENDPOINT}/metadata"
POISON = b"EVIL"
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"



def kernel_buffers() -> int:
    """
    The most the kernel may hold between a stalled reader and a writer
    over two loopback hops (a receive and a send buffer each, as far as
    autotuning grows them): how much a stalled stream may have left the
    provider, however the machine's timing grew the buffers.
    """
    def maximum(name: str) -> int:
        try:
            return int(Path(f"/proc/sys/net/ipv4/{name}").read_text().split()[2])
        except (OSError, ValueError, IndexError):
            return 8 << 20
    return 2 * (maximum("tcp_rmem") + maximum("tcp_wmem"))

class Scripted(Protocol):
    """
    The provider's side of one connection: each request head received
    runs the factory's current script.
    """

    def __init__(self, factory: ScriptedFactory) -> None:
        self.factory = factory
        self.buffer = b""
        self.calls: list[Any] = []

    def connectionMade(self) -> None:
        self.factory.live.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            self.buffer = self.buffer.partition(b"\r\n\r\n")[2]
            self.factory.requests += 1
            self.factory.script(self)

    def write(self, data: bytes) -> None:
        self.factory.written += len(data)
        self.transport.write(data)

    def later(self, delay: float, action: Callable[..., None], *args: Any) -> None:
        self.calls.append(reactor.callLater(delay, action, *args))

    def connectionLost(self, reason: Any) -> None:
        for call in self.calls:
            if call.active():
                call.cancel()


@implementer(IPushProducer)
class Endless:
    """
    Writes C{piece} for ever, as fast as the connection takes it.
    """

    def __init__(self, protocol: Scripted, piece: bytes) -> None:
        self.protocol, self.piece, self.paused = protocol, piece, False
        protocol.transport.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self.paused = False
        for _ in range(256):
            if self.paused or not self.protocol.transport.connected:
                return
            self.protocol.write(self.piece)
        self.protocol.later(0, self.resumeProducing)

    def pauseProducing(self) -> None:
        self.paused = True

    def stopProducing(self) -> None:
        self.paused = True


class ScriptedFactory(Factory):
    def __init__(self) -> None:
        self.script: Callable[[Scripted], None] = lambda p: None
        self.live: list[Scripted] = []
        self.requests = 0
        self.written = 0

    def buildProtocol(self, addr: Any) -> Scripted:
        return Scripted(self)


def listen_scripted(case: unittest.TestCase, host_index: int = 0) -> tuple[ScriptedFactory, int]:
    """
    A scripted provider on loopback, behind mutual TLS with the provider
    certificate C{host_index} of this run's PKI.
    """
    certs = pki()
    options = PrivateCertificate.loadPEM(
        certs.path(f"provider-{host_index}.pem").read_bytes()
        + certs.path(f"provider-{host_index}.key").read_bytes()
    ).options(Certificate.loadPEM(certs.path(DevelopmentPKI.ca).read_bytes()))
    options.raiseMinimumTo = TLSVersion.TLSv1_2
    factory = ScriptedFactory()
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, factory),
                             interface="127.0.0.1")

    async def close() -> None:
        for protocol in factory.live:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
        await waitUntilAllDisconnected(reactor, list(factory.live))
        await port.stopListening()

    case.addCleanup(close)
    return factory, port.getHost().port


async def proxy_to(case: unittest.TestCase, port: int, **upstream: Any) -> Proxy:
    resolve = {"resolve": {f"{demo.PROVIDER_HOST}:443": f"127.0.0.1:{port}"}}
    return await Proxy(case, Provider(case), upstream={**UPSTREAM, **upstream, **resolve}).start()


def answer(data: bytes, then: str = "keep") -> Callable[[Scripted], None]:
    """
    A script writing C{data}, then keeping the connection, closing it
    cleanly (TLS close_notify) or resetting it.
    """
    def script(p: Scripted) -> None:
        p.write(data)
        if then == "close":
            p.transport.loseConnection()
        elif then == "reset":
            p.later(0.05, p.transport.abortConnection)
    return script


def trickle(pieces: list[bytes], gap: float) -> Callable[[Scripted], None]:
    def script(p: Scripted) -> None:
        for i, piece in enumerate(pieces):
            p.later(i * gap, p.write, piece)
    return script


def endless(first: bytes, piece: bytes) -> Callable[[Scripted], None]:
    def script(p: Scripted) -> None:
        p.write(first)
        Endless(p, piece)
    return script


def then_fresh(first: Callable[[Scripted], None]) -> Callable[[Scripted], None]:
    """
    C{first} for the first request, a clean small response afterwards.
    """
    calls = []

    def script(p: Scripted) -> None:
        calls.append(p)
        if len(calls) == 1:
            first(p)
        else:
            p.write(OK_HEAD + b"Content-Length: 5\r\n\r\nfresh")
    return script


@attrs.frozen
class Fault:
    """
    One provider fault.

    @ivar status: what the consumer sees: a status, or 0 when the
        connection must be aborted after a truncated response.
    @ivar audited: the status, token and decision of the audit record.
    @ivar body: the exact body expected when a response completes.
    """

    name: str
    script: Callable[[Scripted], None]
    status: int
    audited: tuple[int, str, str]
    body: bytes | None = None


def _failed(name: str, data: bytes, then: str = "keep") -> Fault:
    return Fault(name, answer(data, then), 502, (502, FAILED, "failed"))


def _cut(name: str, script: Callable[[Scripted], None], status: int = 502,
         token: str = FAILED) -> Fault:
    return Fault(name, script, 0, (status, token, "failed"))


FAULTS = (
    # Before the status line reaches the consumer: an OperationOutcome.
    _failed("not HTTP at all", b"NOT HTTP AT ALL\r\n\r\n"),
    _failed("status code of four digits", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("status code not a number", b"HTTP/1.1 abc OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("status code signed", b"HTTP/1.1 +200 OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("status code with underscore", b"HTTP/1.1 2_00 OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("status code below 100", b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n"),
    _failed("status code 600", b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n"),
    _failed("protocol not HTTP", b"FOO/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("HTTP/2.0 status line", b"HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
    _failed("NUL in the reason phrase", b"HTTP/1.1 200 O\x00K\r\nContent-Length: 0\r\n\r\n"),
    _failed("NUL in a header value", OK_HEAD + b"X-A: a\x00b\r\nContent-Length: 0\r\n\r\n"),
    _failed("folded header", OK_HEAD + b"X-A: a\r\n b\r\nContent-Length: 0\r\n\r\n"),
    _failed("header without colon", OK_HEAD + b"NoColon\r\nContent-Length: 0\r\n\r\n"),
    _failed("space before colon", OK_HEAD + b"Content-Length : 0\r\n\r\n"),
    _failed("Content-Length with Transfer-Encoding",
            OK_HEAD + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    _failed("conflicting Content-Length",
            OK_HEAD + b"Content-Length: 4\r\nContent-Length: 5\r\n\r\nfour"),
    _failed("Transfer-Encoding gzip", OK_HEAD + b"Transfer-Encoding: gzip\r\n\r\n" + POISON),
    _failed("closed before answering", b"", then="close"),
    _failed("head larger than max_header_bytes",
            OK_HEAD + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 100) for i in range(60)) + b"\r\n"),
    Fault("endless headers", endless(OK_HEAD, b"X-Again: " + b"a" * 1000 + b"\r\n"),
          502, (502, FAILED, "failed")),
    Fault("endless 100 Continue", endless(b"", b"HTTP/1.1 100 Continue\r\n\r\n"),
          502, (502, FAILED, "failed")),
    Fault("head trickled past response_timeout",
          trickle([OK_HEAD] + [b"X-Slow: 1\r\n"] * 20, 0.1), 504, (504, TIMED_OUT, "failed")),
    Fault("silent", lambda p: None, 504, (504, TIMED_OUT, "failed")),
    # After the status line: the consumer's connection is aborted.
    _cut("reset mid-body", answer(OK_HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10,
                                  "reset")),
    _cut("closed mid-body", answer(OK_HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10,
                                   "close")),
    _cut("close-delimited body cut by a reset", answer(OK_HEAD + b"\r\npartial", "reset")),
    _cut("bad chunk size mid-body", answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n" + POISON)),
    _cut("chunked body closed before the last chunk", answer(
        OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", "close")),
    _cut("body stalls past idle_timeout", answer(
        OK_HEAD + b"Content-Length: 100\r\n\r\n" + b"x" * 10), 504, TIMED_OUT),
    # Odd but complete: relayed exactly, nothing more.
    Fault("close-delimited body closed cleanly", answer(OK_HEAD + b"\r\nwhole", "close"),
          200, (200, "", "forwarded"), b"whole"),
    Fault("body overruns Content-Length", then_fresh(answer(
        OK_HEAD + b"Content-Length: 5\r\n\r\nhello" + b"HTTP/1.1 200 OK\r\nContent-Length: 4"
        b"\r\n\r\n" + POISON)), 200, (200, "", "forwarded"), b"hello"),
    Fault("body trickled within idle_timeout", trickle(
        [OK_HEAD + b"Content-Length: 3\r\n\r\n", b"a", b"b", b"c"], 0.05),
        200, (200, "", "forwarded"), b"abc"),
)


class ProviderFaultTests(unittest.TestCase):
    async def run_fault(self, proxy: Proxy, provider: ScriptedFactory, fault: Fault,
                        figures: dict[str, int]) -> list[str]:
        provider.script = fault.script
        records = len(proxy.audit.completed())
        result = await send(proxy, head(), responses=1 if fault.status else None)
        wrong = []
        received = b"".join(r.body for r in result.responses) + result.leftover
        if POISON in received:
            wrong.append("poison relayed")
            figures["forwarded"] += 1
        if fault.status:
            if result.statuses != (fault.status,):
                wrong.append(f"statuses {result.statuses}, rest {result.leftover[:60]!r}")
            elif fault.body is not None and result.responses[0].body != fault.body:
                wrong.append(f"body {result.responses[0].body!r}")
            elif fault.status >= 500 and result.responses[0].token() != fault.audited[1]:
                wrong.append(f"token {result.responses[0].token()!r}")
        else:
            # The status line may or may not have left before the abort;
            # what matters is that no response completes.
            if result.responses or not result.closed:
                wrong.append(f"truncated response not aborted: {result}")
                figures["forwarded"] += bool(result.responses)
            if not b"HTTP/1.1 200 OK\r\n".startswith(result.leftover[:17]):
                wrong.append(f"unexpected bytes: {result.leftover[:60]!r}")
        if not await wait_for(lambda: len(proxy.audit.completed()) > records):
            figures["audit_lost"] += 1
        new = [(r.status, r.token, r.decision) for r in proxy.audit.completed()[records:]]
        if new != [fault.audited]:
            wrong.append(f"audited {new}")
        # A refused provider must be cut off, not read on and on (a clean
        # TLS close would wait for its close_notify while it keeps sending).
        written = provider.written
        await deferLater(reactor, 0.05, lambda: None)
        if provider.written - written > 1 << 20:
            wrong.append("the provider is still streaming into the proxy")
        return wrong

    async def test_catalogue(self):
        crashes = FailureCounter(self)
        provider, port = listen_scripted(self)
        proxy = await proxy_to(self, port)
        figures = dict.fromkeys(FIGURE_COLUMNS, 0)
        problems = []
        for fault in FAULTS:
            wrong = await self.run_fault(proxy, provider, fault, figures)
            figures["cases"] += 1
            figures["as_expected"] += not wrong
            problems += [f"{fault.name}: {w}" for w in wrong]
        for name, check in (("wrong certificate", self.wrong_certificate),
                            ("endless chunked body", self.endless_body)):
            wrong = await check()
            figures["cases"] += 1
            figures["as_expected"] += not wrong
            problems += [f"{name}: {w}" for w in wrong]
        figures["crashes"] = crashes.count
        self.assertEqual(problems, [], "\n".join(problems))
        self.assertEqual((figures["forwarded"], figures["crashes"], figures["audit_lost"]),
                         (0, 0, 0))
        check_figures(self, "provider-faults", figures)

    async def wrong_certificate(self) -> list[str]:
        provider, port = listen_scripted(self, host_index=1)
        provider.script = answer(OK_HEAD + b"Content-Length: 4\r\n\r\n" + POISON)
        proxy = await proxy_to(self, port)
        result = await send(proxy, head(), responses=1)
        wrong = []
        if result.statuses != (502,) or result.responses[0].token() != FAILED:
            wrong.append(f"got {result}")
        if provider.requests:
            wrong.append("a request was sent to a provider with the wrong certificate")
        await wait_for(lambda: bool(proxy.audit.completed()))
        if [(r.status, r.decision) for r in proxy.audit.completed()] != [(502, "failed")]:
            wrong.append("not audited as 502")
        return wrong

    async def endless_body(self) -> list[str]:
        provider, port = listen_scripted(self)
        provider.script = endless(OK_HEAD + b"Transfer-Encoding: chunked\r\n\r\n",
                                  b"4000\r\n" + b"z" * 0x4000 + b"\r\n")
        proxy = await proxy_to(self, port, idle_timeout=5.0)
        context = client_context(proxy)

        def read_pause_leave() -> tuple[int, int, bool]:
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(head())
            received = 0
            while received < 4 << 20:
                chunk = tls.recv(1 << 16)
                if not chunk:
                    break
                received += len(chunk)
            # A consumer that stops reading: the buffers between the three
            # parties fill, then the provider must stall.  Wait until its
            # byte count settles (however loaded the machine), then judge
            # how much it wrote beyond what the consumer read.
            last, still, deadline = -1, 0, time.monotonic() + 60
            while still < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
                if provider.written == last:
                    still += 1
                else:
                    last, still = provider.written, 0
            written = provider.written
            tls.close()
            return received, written, still >= 5

        received, written, stalled = await deferToThread(read_pause_leave)
        wrong = [] if received >= 4 << 20 else [f"stream ended after {received} bytes"]
        if not stalled or written - received > kernel_buffers() + (1 << 20):
            wrong.append(f"provider wrote {written} bytes (stalled: {stalled}) while the "
                         f"consumer read {received}")
        if not await wait_for(lambda: all(not p.transport.connected for p in provider.live)):
            wrong.append("provider connection left open after the consumer left")
        await wait_for(lambda: bool(proxy.audit.completed()))
        record = proxy.audit.completed()[0] if proxy.audit.completed() else None
        if record is None or (record.status, record.decision) != (499, "abandoned"):
            wrong.append(f"audited {record}")
        elif not received <= record.bytes_out <= provider.written:
            wrong.append(f"bytes_out {record.bytes_out} outside {received}..{provider.written}")
        return wrong

    async def test_provider_not_reading_an_upload_is_its_timeout(self):
        """
        A provider that stops reading a streamed upload makes the proxy
        stop reading the consumer; the consumer is then silent through no
        fault of its own, so C{listen.idle_timeout} must not answer 408:
        C{upstream.response_timeout} answers 504, audited as the provider's.
        """
        provider, port = listen_scripted(self)
        provider.script = lambda p: p.transport.pauseProducing()
        resolve = {"resolve": {f"{demo.PROVIDER_HOST}:443": f"127.0.0.1:{port}"}}
        proxy = await Proxy(self, Provider(self), listen={"idle_timeout": 0.3},
                            upstream={**UPSTREAM, "response_timeout": 1.0, **resolve}).start()
        context = client_context(proxy)

        def upload_until_answered() -> bytes:
            raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            tls = context.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(head(b"POST", f"/{ENDPOINT}/metadata".encode(),
                             lines=[b"Content-Length: %d" % (64 << 20)]))
            tls.settimeout(0.05)
            chunk, answer, deadline = b"u" * (1 << 16), b"", time.monotonic() + 20
            while b"\r\n\r\n" not in answer and time.monotonic() < deadline:
                try:
                    tls.send(chunk)
                    continue
                except (TimeoutError, ssl.SSLWantWriteError):
                    pass
                except OSError:
                    break
                try:
                    answer += tls.recv(1 << 16)
                except (TimeoutError, ssl.SSLWantReadError):
                    pass
            try:
                tls.settimeout(5)
                while True:
                    more = tls.recv(1 << 16)
                    if not more:
                        break
                    answer += more
            except OSError:
                pass
            tls.close()
            return answer

        answer = await deferToThread(upload_until_answered)
        self.assertTrue(answer.startswith(b"HTTP/1.1 504 "), answer[:200])
        self.assertIn(TIMED_OUT.encode(), answer)
        self.assertTrue(await wait_for(lambda: bool(proxy.audit.completed())))
        record = proxy.audit.completed()[0]
        self.assertEqual((record.status, record.token, record.decision),
                         (504, TIMED_OUT, "failed"))
        self.assertEqual(provider.requests, 1)

    async def test_stray_bytes_close_the_pooled_connection(self):
        provider, port = listen_scripted(self)
        provider.script = then_fresh(answer(OK_HEAD + b"Content-Length: 5\r\n\r\nhelloJUNK"))
        proxy = await proxy_to(self, port)
        first = await send(proxy, head(), responses=1)
        second = await send(proxy, head(), responses=1)
        self.assertEqual([r.body for r in first.responses + second.responses],
                         [b"hello", b"fresh"])
        self.assertEqual(len(provider.live), 2)

    async def test_clean_responses_reuse_the_pooled_connection(self):
        provider, port = listen_scripted(self)
        provider.script = answer(OK_HEAD + b"Content-Length: 5\r\n\r\nhello")
        proxy = await proxy_to(self, port)
        for _ in range(3):
            result = await send(proxy, head(), responses=1)
            self.assertEqual(result.responses[0].body, b"hello")
        self.assertEqual(len(provider.live), 1)

    async def test_odd_but_valid_heads_relayed(self):
        provider, port = listen_scripted(self)
        provider.script = answer(b"HTTP/1.0 201\r\nX-Tab: a\tb\r\nX-Latin: caf\xe9\r\n"
                                 b"Content-Length: 2\r\n\r\nok")
        proxy = await proxy_to(self, port)
        result = await send(proxy, head(), responses=1)
        response = result.responses[0]
        self.assertEqual((response.status, response.body), (201, b"ok"))
        self.assertEqual(response.header(b"x-tab"), b"a\tb")
        self.assertEqual(response.header(b"x-latin"), b"caf\xe9")

