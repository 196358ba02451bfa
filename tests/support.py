"""
End-to-end fixtures: a development PKI generated once per test run, a
scriptable provider behind mutual TLS on loopback, the proxy on a real
socket, and a consumer that speaks TLS with a client certificate from a
thread (plain C{ssl} + C{http.client}, independent of Twisted).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import os
import ssl
import tempfile
import uuid
from pathlib import Path
from typing import Any

import attrs

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory
from twisted.internet.testing import waitUntilAllDisconnected
from twisted.internet.threads import deferToThread
from twisted.protocols.policies import WrappingFactory
from twisted.web import server
from twisted.web.resource import Resource
from zope.interface import implementer

from ssp import demo
from ssp.directory import LDIFDirectory
from ssp.pki import DevelopmentPKI, create_development_pki
from ssp.service import Concerns, SSPService
from ssp.testing import MemoryThrottle, RecordingAuditSink
from tests.slapd import DEMO_LDIF

ROOT = Path(__file__).resolve().parent.parent
ENDPOINT = demo.PROVIDER_ENDPOINT
METADATA = demo.METADATA_INTERACTION

_pki: DevelopmentPKI | None = None


def pki() -> DevelopmentPKI:
    """
    The development PKI of this test run, generated on first use.
    """
    global _pki
    if _pki is None:
        _pki = create_development_pki(
            Path(tempfile.mkdtemp(prefix="ssp-pki-")),
            consumers=("gpc001.ssp-demo.test", "k81045.ssp-demo.test"),
            providers=("orange.testlab.nhs.uk", "elsewhere.test"),
        )
    return _pki


def spine_headers(token: str | None = None, interaction: str = METADATA,
                  sender: str = demo.CONSUMER_ASID, receiver: str = demo.PROVIDER_ASID,
                  **extra: str) -> dict[str, str]:
    """
    The headers of a valid request from the demo consumer.
    """
    headers = {
        "Ssp-TraceID": str(uuid.uuid4()),
        "Ssp-From": sender,
        "Ssp-To": receiver,
        "Ssp-InteractionID": interaction,
        "Authorization": f"Bearer {token or demo.bearer_token(reactor.seconds())}",
    }
    headers.update(extra)
    return headers


@attrs.define
class Seen:
    method: bytes
    uri: bytes
    headers: list[tuple[bytes, bytes]]
    body_sha256: str
    body_length: int


PATTERN = bytes(range(256)) * 256  # 64 KiB


@implementer(IPushProducer)
class _PatternProducer:
    """
    Writes C{total} bytes of L{PATTERN} with back-pressure.
    """

    def __init__(self, request: Any, total: int) -> None:
        self._request, self._left, self._paused = request, total, False
        request.registerProducer(self, True)
        self.resumeProducing()

    def resumeProducing(self) -> None:
        self._paused = False
        while not self._paused and self._left > 0 and not self._request._disconnected:
            chunk = PATTERN[: min(self._left, len(PATTERN))]
            self._left -= len(chunk)
            self._request.write(chunk)
        if self._left == 0 and not self._request.finished:
            self._request.unregisterProducer()
            self._request.finish()

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._left = 0


def pattern_sha256(total: int) -> str:
    digest = hashlib.sha256()
    while total > 0:
        chunk = PATTERN[: min(total, len(PATTERN))]
        digest.update(chunk)
        total -= len(chunk)
    return digest.hexdigest()


class ProviderResource(Resource):
    """
    A scriptable provider.  The last path segment picks the behaviour; every
    request it receives is recorded in C{seen} so tests can assert that a
    refused request was never forwarded.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Seen] = []

    def render(self, request: Any) -> Any:
        body = request.content.read()
        self.seen.append(Seen(request.method, request.uri,
                              list(_raw_headers(request.requestHeaders)),
                              hashlib.sha256(body).hexdigest(), len(body)))
        action = request.path.rsplit(b"/", 1)[-1].decode()
        args = {k.decode(): v[0].decode() for k, v in request.args.items()}
        return getattr(self, f"do_{action}", self.do_echo)(request, args, body)

    def do_metadata(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", b"application/fhir+json")
        return b'{"resourceType": "CapabilityStatement"}'

    def do_echo(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        seen = self.seen[-1]
        return json.dumps({
            "method": seen.method.decode(),
            "uri": seen.uri.decode("latin-1"),
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in seen.headers],
            "body_sha256": seen.body_sha256,
            "body_length": seen.body_length,
        }).encode()

    def do_odd(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setResponseCode(299, b"Odd But Fine")
        request.responseHeaders.addRawHeader(b"X-Odd", b"  spaced  value ")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"a=1")
        request.responseHeaders.addRawHeader(b"Set-Cookie", b"b=2")
        request.responseHeaders.addRawHeader(b"X-Unicode", "caf\u00e9".encode("utf-8"))
        request.setHeader(b"Connection", b"X-Private")
        request.setHeader(b"X-Private", b"hop-by-hop")
        request.setHeader(b"Content-Type", b"text/odd")
        return b"odd body"

    def do_gzip(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setHeader(b"Content-Encoding", b"gzip")
        request.setHeader(b"Content-Type", b"application/fhir+json")
        return gzip.compress(b'{"resourceType": "Bundle"}' * 100, mtime=0)

    def do_status(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setResponseCode(int(args["code"]))
        request.setHeader(b"Content-Type", b"application/fhir+json")
        return b'{"resourceType": "OperationOutcome", "from": "provider"}'

    def do_big(self, request: Any, args: dict, body: bytes) -> int:
        total = int(args["n"])
        if args.get("chunked") != "1":
            request.setHeader(b"Content-Length", b"%d" % total)
        _PatternProducer(request, total)
        return server.NOT_DONE_YET

    def do_trickle(self, request: Any, args: dict, body: bytes) -> int:
        request.write(b"first-chunk;")
        self.trickling = request
        return server.NOT_DONE_YET

    def do_stall(self, request: Any, args: dict, body: bytes) -> int:
        self.stalled = request
        return server.NOT_DONE_YET

    def do_stallbody(self, request: Any, args: dict, body: bytes) -> int:
        request.setHeader(b"Content-Length", b"100")
        request.write(b"x" * 10)
        self.stalled = request
        return server.NOT_DONE_YET

    def do_reset(self, request: Any, args: dict, body: bytes) -> int:
        request.setHeader(b"Content-Length", b"100")
        request.write(b"x" * 10)
        reactor.callLater(0.05, request.channel.transport.abortConnection)
        return server.NOT_DONE_YET


def _raw_headers(headers: Any):
    for name, values in headers.getAllRawHeaders():
        for value in values:
            yield name, value


class _Tracking(WrappingFactory):
    """
    Counts connections and remembers live protocols for a clean shutdown.
    """

    def __init__(self, wrapped: Factory) -> None:
        super().__init__(wrapped)
        self.accepted = 0
        self.live: list[Any] = []

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        protocol = super().buildProtocol(addr)
        self.live.append(protocol)
        return protocol


class Provider:
    """
    The scriptable provider on a loopback port behind mutual TLS.
    """

    def __init__(self, case: Any, resource: Resource | None = None) -> None:
        self.resource = resource or ProviderResource()
        port = demo.listen_provider(reactor, pki(), self.resource)
        self.port = port
        self.tracking = _Tracking(port.factory)
        port.factory = self.tracking
        case.addCleanup(self.close)

    @property
    def seen(self) -> list[Seen]:
        return self.resource.seen

    def close(self) -> Deferred[None]:
        for protocol in self.tracking.live:
            if protocol.transport is not None and protocol.transport.connected:
                protocol.transport.abortConnection()
        d = waitUntilAllDisconnected(reactor, list(self.tracking.live))
        return d.addCallback(lambda _: self.port.stopListening())


class Proxy:
    """
    The proxy service on an ephemeral loopback port, with the demo SDS and
    in-memory throttle and audit fakes unless told otherwise.
    """

    def __init__(self, case: Any, provider: Provider, concerns: Concerns | None = None,
                 **overrides: Any) -> None:
        self.pki = pki()
        config = demo.demo_config(ROOT, self.pki, provider.port.getHost().port,
                                  listen="tcp:0:interface=127.0.0.1", admin=None)
        for section, values in overrides.items():
            current = getattr(config, section)
            replacement = attrs.evolve(current, **values) if isinstance(values, dict) else values
            config = attrs.evolve(config, **{section: replacement})
        self.config = config
        self.audit = RecordingAuditSink()
        self.throttle = MemoryThrottle()
        self.concerns = concerns or Concerns(
            directory=LDIFDirectory.from_file(DEMO_LDIF), throttle=self.throttle, audit=self.audit
        )
        self.service = SSPService(config, reactor, concerns=self.concerns)
        self.service.startService()
        case.addCleanup(self.close)

    async def start(self) -> Proxy:
        port = await self.service.listening()
        self.port = port.getHost().port
        return self

    def consumer(self, cert: str | None = "consumer-0") -> Consumer:
        return Consumer(self.port, self.pki, cert)

    async def close(self) -> None:
        await self.service.stopService()
        await self.service.proxy.upstream.pool.closeCachedConnections()


@attrs.frozen
class Reply:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def outcome(self) -> dict[str, Any]:
        return json.loads(self.body)

    def token(self) -> str:
        return self.outcome()["issue"][0]["diagnostics"]


class Consumer:
    """
    A consumer system: blocking TLS with a client certificate, run in a
    thread so the reactor keeps serving the proxy and the provider.
    """

    def __init__(self, port: int, pki: DevelopmentPKI, cert: str | None) -> None:
        self.port = port
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(str(pki.path(DevelopmentPKI.ca)))
        if cert is not None:
            context.load_cert_chain(str(pki.path(f"{cert}.pem")), str(pki.path(f"{cert}.key")))
        self.context = context

    def connect(self) -> http.client.HTTPSConnection:
        return http.client.HTTPSConnection("localhost", self.port, context=self.context,
                                           timeout=30)

    def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                body: Any = None, connection: http.client.HTTPSConnection | None = None,
                ) -> Deferred[Reply]:
        def call() -> Reply:
            conn = connection or self.connect()
            try:
                conn.request(method, path, body=body, headers=headers or {})
                response = conn.getresponse()
                data = response.read()
                return Reply(response.status, response.reason, response.getheaders(), data)
            finally:
                if connection is None:
                    conn.close()

        return deferToThread(call)

    def get(self, resource: str, headers: dict[str, str] | None = None, **kw: Any
            ) -> Deferred[Reply]:
        return self.request("GET", f"/{ENDPOINT}/{resource}",
                            headers if headers is not None else spine_headers(), **kw)




def audit_key() -> Path:
    """
    This run's audit chain key, beside the development PKI (never in an
    audit directory).
    """
    return demo.audit_key(pki().directory)


def certificates_toml(audit: bool = True) -> str:
    """
    The C{[tls]} and C{[upstream]} sections of a configuration file using
    this run's development PKI, and an C{[audit]} section with this run's
    key unless C{audit} is false.
    """
    certs = pki().directory
    section = f'[audit]\nkey_file = "{audit_key()}"\n' if audit else ""
    return section + f"""
[tls]
certificate = "{certs}/proxy.pem"
private_key = "{certs}/proxy.key"
client_ca = "{certs}/spine-ca.pem"
[upstream]
certificate = "{certs}/proxy-client.pem"
private_key = "{certs}/proxy-client.key"
ca = "{certs}/spine-ca.pem"
"""


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


