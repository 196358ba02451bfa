"""
The first check over real TLS sockets: no consumer is forwarded unless the
certificate chain of its connection verifies now, against the CAs and CRLs
in force, whether the TLS session is new or resumed (TLS 1.2 session ID,
TLS 1.2 ticket, TLS 1.3 PSK), whatever form the request target takes, and
on every request of a keep-alive connection.
"""

from __future__ import annotations

import datetime
import http.client
import json
import socket
import ssl
import tempfile
import warnings
from pathlib import Path
from typing import Any

import attrs
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.error import ConnectionDone
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssp import demo
from ssp.config import ServerTLSConfig
from ssp.pki import Authority, DevelopmentPKI
from ssp.tls import ServerTLS, fresh_crls, handshake_failure_reason
from tests.ports import free_port
from tests.support import ENDPOINT, Provider, Proxy, pki, spine_headers
from tests.test_hostile import raw_exchange
from tests.test_metrics import _get, samples

# How a client asks to resume: (highest TLS version, offers tickets).
MECHANISMS = {
    "TLS 1.2 session ID": (ssl.TLSVersion.TLSv1_2, False),
    "TLS 1.2 ticket": (ssl.TLSVersion.TLSv1_2, True),
    "TLS 1.3 PSK": (ssl.TLSVersion.TLSv1_3, True),
}

# Certificates that must never be forwarded, and the reason each is refused.
BAD_CERTIFICATES = {
    "consumer-expired": "EXPIRED",
    "consumer-revoked": "REVOKED",
    "consumer-revoked-intermediate": "REVOKED",
    "consumer-untrusted": "UNTRUSTED",
    "consumer-self-signed": "UNTRUSTED",
    "proxy": "NOT_FOR_CLIENT_AUTH",  # a server-only certificate of the right CA
}


def client_context(cert: str | None, mechanism: str = "TLS 1.3 PSK",
                   ca: Path | None = None) -> ssl.SSLContext:
    """
    A consumer's TLS context: C{cert} (leaf and intermediates) and the
    resumption C{mechanism} it uses.
    """
    version, tickets = MECHANISMS[mechanism]
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(ca or pki().path(DevelopmentPKI.ca)))
    context.minimum_version = version
    context.maximum_version = version
    if not tickets:
        context.options |= ssl.OP_NO_TICKET
    if cert is not None:
        context.load_cert_chain(str(pki().path(f"{cert}.pem")), str(pki().path(f"{cert}.key")))
    return context


@attrs.frozen
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    session: ssl.SSLSession | None
    reused: bool

    def token(self) -> str:
        return json.loads(self.body)["issue"][0]["diagnostics"]


def metadata_request() -> bytes:
    return raw_request("GET", f"/{ENDPOINT}/metadata", spine_headers())


def raw_request(method: str, target: str, headers: dict[str, str] | None = None,
                host: str = "localhost") -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Client:
    """
    One consumer connection, blocking (run it in a thread).
    """

    def __init__(self, port: int, context: ssl.SSLContext,
                 session: ssl.SSLSession | None = None) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.sock = context.wrap_socket(raw, server_hostname="localhost", session=session)

    def send(self, request: bytes) -> Answer:
        self.sock.sendall(request)
        response = http.client.HTTPResponse(self.sock, method=request.split(b" ")[0].decode())
        response.begin()
        body = response.read()
        return Answer(response.status, response.headers, body, self.sock.session,
                      self.sock.session_reused)

    def close(self) -> None:
        self.sock.close()


def exchange(port: int, context: ssl.SSLContext, request: bytes,
             session: ssl.SSLSession | None = None) -> Answer:
    client = Client(port, context, session)
    try:
        return client.send(request)
    finally:
        client.close()


def first_and_resumed(port: int, context: ssl.SSLContext, request: bytes) -> list[Answer]:
    """
    A request on a new TLS session, then one on a connection resuming it.
    """
    first = exchange(port, context, request)
    return [first, exchange(port, context, request, first.session)]


async def until(condition: Any) -> None:
    """
    Wait (on the reactor) until C{condition()} holds.
    """
    for _ in range(1000):
        if condition():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError("condition never held")


class IdentityTestCase(unittest.TestCase):
    async def start(self, **overrides: Any) -> tuple[Provider, Proxy]:
        provider = Provider(self)
        proxy = await Proxy(self, provider, **overrides).start()
        return provider, proxy

    def assertAllRefused(self, answers: list[Answer], status: int, token: str,
                         provider: Provider, proxy: Proxy) -> None:
        """
        Each answer is C{status} with an OperationOutcome naming C{token}
        and HSTS; nothing reached the provider; each was audited once, as
        refused.
        """
        for answer in answers:
            self.assertEqual(answer.status, status, answer.body)
            self.assertEqual(answer.token(), token)
            self.assertEqual(answer.headers["Content-Type"], "application/fhir+json")
            self.assertIsNotNone(answer.headers["Strict-Transport-Security"])
        self.assertEqual(provider.seen, [])
        self.assertEqual([(r.status, r.decision, r.token) for r in proxy.audit.records],
                         [(status, "refused", token)] * len(answers))


class ResumptionTests(IdentityTestCase):
    """
    A bad certificate is refused on its resumed sessions as on its first;
    a good one really resumes and is forwarded.
    """

    async def test_bad_certificates_never_forwarded(self) -> None:
        provider, proxy = await self.start()
        for cert, reason in BAD_CERTIFICATES.items():
            for mechanism in MECHANISMS:
                proxy.audit.records.clear()
                answers = await deferToThread(first_and_resumed, proxy.port,
                                              client_context(cert, mechanism), metadata_request())
                with self.subTest(cert=cert, mechanism=mechanism):
                    self.assertAllRefused(answers, 495, f"CLIENT_CERTIFICATE_INVALID_{reason}",
                                          provider, proxy)

    async def test_good_certificates_resume(self) -> None:
        """
        Resumption is kept: a good certificate, also one sent with its
        intermediate, resumes by every mechanism a client offers (tickets
        fall back to the session ID) and is forwarded each time.
        """
        provider, proxy = await self.start()
        for cert in ("consumer-0", "consumer-chained"):
            for mechanism in MECHANISMS:
                first, resumed = await deferToThread(
                    first_and_resumed, proxy.port, client_context(cert, mechanism),
                    metadata_request())
                self.assertEqual((first.status, first.reused), (200, False), (cert, mechanism))
                self.assertEqual((resumed.status, resumed.reused), (200, True), (cert, mechanism))
        self.assertEqual(len(provider.seen), 2 * 2 * len(MECHANISMS))

    async def test_resumed_session_of_a_certificate_revoked_since(self) -> None:
        """
        A session established while a certificate was good is judged
        against the CRLs in force when it is resumed.
        """
        provider, proxy = await self.start()
        crls = CRLs(self)
        reload_crls(proxy, crls.write())
        context = client_context("consumer-chained", "TLS 1.2 session ID")
        first = await deferToThread(exchange, proxy.port, context, metadata_request())
        self.assertEqual(first.status, 200)
        reload_crls(proxy, crls.write(revoked=chained_leaf()))
        resumed = await deferToThread(exchange, proxy.port, context, metadata_request(),
                                      first.session)
        self.assertEqual(resumed.status, 495, resumed.body)
        self.assertEqual(resumed.token(), "CLIENT_CERTIFICATE_INVALID_REVOKED")
        self.assertEqual(len(provider.seen), 1)


class RequestFormTests(IdentityTestCase):
    """
    Every request-target form checks the certificate first, then gets an
    OperationOutcome: nothing reaches Twisted's default answers.
    """

    FORMS = (
        ("OPTIONS", "*", None),
        ("GET", "/", None),
        ("CONNECT", "orange.testlab.nhs.uk:443", "orange.testlab.nhs.uk:443"),
        ("GET", f"http://{demo.PROVIDER_HOST}/B82617/STU3/1/gpconnect/fhir/metadata", None),
        ("GET", f"{ENDPOINT}/metadata", None),
        ("POST", "*", None),
    )

    async def answers(self, cert: str | None) -> tuple[Provider, Proxy, list[Answer]]:
        provider, proxy = await self.start()
        context = client_context(cert)
        answers = []
        for method, target, host in self.FORMS:
            request = raw_request(method, target, spine_headers(), host or "localhost")
            answers.append(await deferToThread(exchange, proxy.port, context, request))
        return provider, proxy, answers

    async def test_without_certificate(self) -> None:
        provider, proxy, answers = await self.answers(None)
        self.assertAllRefused(answers, 496, "CLIENT_CERTIFICATE_REQUIRED", provider, proxy)

    async def test_with_bad_certificate(self) -> None:
        provider, proxy, answers = await self.answers("consumer-self-signed")
        self.assertAllRefused(answers, 495, "CLIENT_CERTIFICATE_INVALID_UNTRUSTED",
                              provider, proxy)

    async def test_with_good_certificate(self) -> None:
        provider, proxy, answers = await self.answers("consumer-0")
        self.assertEqual([a.status for a in answers], [400, 400, 405, 400, 400, 400])
        origin_form_only = "BAD_REQUEST: target URL must be /https://<provider>/<path>"
        self.assertEqual([a.token() for a in answers], [
            origin_form_only, "BAD_REQUEST: target URL must be an absolute https:// URL",
            "405: Method Not Allowed", origin_form_only, origin_form_only, origin_form_only])
        for answer in answers:
            self.assertIsNotNone(answer.headers["Strict-Transport-Security"])
            self.assertEqual(answer.headers["Content-Type"], "application/fhir+json")
        self.assertEqual(provider.seen, [])
        self.assertEqual([(r.status, r.decision, r.client_subject, r.method, r.target)
                          for r in proxy.audit.records],
                         [(a.status, "refused", "CN=gpc001.ssp-demo.test", method,
                           target.removeprefix("/"))
                          for a, (method, target, _) in zip(answers, self.FORMS)])


class ConnectionClosedTests(IdentityTestCase):
    """
    A connection whose certificate is missing or bad is closed after its
    first refusal: a keep-alive client cannot make the proxy verify a bad
    chain over and over (bad verdicts are not cached).
    """

    async def refused_once(self, cert: str | None, status: int, token: str) -> None:
        provider, proxy = await self.start()
        pipelined = metadata_request() * 3
        result = await deferToThread(raw_exchange, proxy.port, client_context(cert),
                                     [pipelined])
        self.assertEqual(result.statuses, (status,), result.leftover)
        self.assertTrue(result.closed)
        [response] = result.responses
        self.assertEqual(response.token(), token)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertIsNotNone(response.header(b"strict-transport-security"))
        await until(lambda: proxy.audit.records)
        self.assertEqual([(r.status, r.token) for r in proxy.audit.records], [(status, token)])
        self.assertEqual(provider.seen, [])

    async def test_without_certificate(self) -> None:
        await self.refused_once(None, 496, "CLIENT_CERTIFICATE_REQUIRED")

    async def test_with_bad_certificate(self) -> None:
        await self.refused_once("consumer-expired", 495, "CLIENT_CERTIFICATE_INVALID_EXPIRED")

    async def test_malformed_request_gets_the_certificate_refusal(self) -> None:
        """
        Step 1 comes first even for a request head the channel refuses
        (its framing, a repeated singleton, a missing C{Host}): without a
        good certificate the answer is 496/495, not the framing's 400.
        """
        provider, proxy = await self.start()
        heads = (metadata_request().replace(b"\r\n\r\n", b"\r\nAuthorization: x\r\n\r\n"),
                 b"GET / HTTP/1.1\r\n\r\n", b"GET / HTTP/1.1\r\nX: \x01\r\n\r\n",
                 b"GET / HTTP/9.9\r\n\r\n")
        for cert, status in ((None, 496), ("consumer-untrusted", 495)):
            for request in heads:
                result = await deferToThread(raw_exchange, proxy.port, client_context(cert),
                                             [request])
                self.assertEqual((result.statuses, result.closed), ((status,), True), request)
        await until(lambda: len(proxy.audit.records) == 2 * len(heads))
        self.assertEqual(sorted(r.status for r in proxy.audit.records),
                         [495] * len(heads) + [496] * len(heads))
        self.assertEqual(provider.seen, [])

    async def test_good_certificate_kept_alive(self) -> None:
        provider, proxy = await self.start()
        result = await deferToThread(raw_exchange, proxy.port, client_context("consumer-0"),
                                     [metadata_request() * 2], responses=2)
        self.assertEqual((result.statuses, result.closed), ((200, 200), False))


class RevocationTests(IdentityTestCase):
    """
    CRLs over the whole chain, refused when stale, and applied to open
    connections as soon as they are reloaded.
    """

    async def test_keep_alive_refused_after_crl_reload(self) -> None:
        provider, proxy = await self.start()
        crls = CRLs(self)
        reload_crls(proxy, crls.write())
        client = await deferToThread(Client, proxy.port, client_context("consumer-chained"))
        self.addCleanup(client.close)
        self.assertEqual((await deferToThread(client.send, metadata_request())).status, 200)
        reload_crls(proxy, crls.write(revoked=chained_leaf()))
        answer = await deferToThread(client.send, metadata_request())
        self.assertEqual(answer.status, 495, answer.body)
        self.assertEqual(answer.token(), "CLIENT_CERTIFICATE_INVALID_REVOKED")
        self.assertEqual(len(provider.seen), 1)

    def test_stale_crl_refused_at_load_and_reload(self) -> None:
        crls = CRLs(self)
        stale = crls.write(next_update=_now() - datetime.timedelta(minutes=1))
        config = tls_config(stale)
        error = self.assertRaises(ValueError, ServerTLS, config, reactor)
        self.assertIn(str(stale), str(error))
        self.assertIn("expired", str(error))
        self.assertNotIn("\n", str(error))
        server_tls = ServerTLS(tls_config(crls.write(name="good.pem")), reactor)
        trust = server_tls.trust
        self.assertRaises(ValueError, server_tls.reload, config)
        self.assertIs(server_tls.trust, trust)

    async def test_crl_expiring_while_running(self) -> None:
        """
        A CRL that passes its nextUpdate while the proxy runs refuses
        every consumer (CRL_EXPIRED), open connections included.
        """
        clock = _Clock()
        provider, proxy = await self.start()
        crls = CRLs(self)
        server_tls = proxy.service.server_tls
        self.patch(server_tls, "_clock", clock)
        reload_crls(proxy, crls.write(next_update=_now() + datetime.timedelta(hours=1)))
        client = await deferToThread(Client, proxy.port, client_context("consumer-0"))
        self.addCleanup(client.close)
        self.assertEqual((await deferToThread(client.send, metadata_request())).status, 200)
        clock.offset = 2 * 3600
        answer = await deferToThread(client.send, metadata_request())
        self.assertEqual(answer.status, 495, answer.body)
        self.assertEqual(answer.token(), "CLIENT_CERTIFICATE_INVALID_CRL_EXPIRED")


class ExpiryMonitoringTests(IdentityTestCase):
    """
    Operators see a CRL or certificate expiring before consumers do.
    """

    async def test_readiness_and_metrics(self) -> None:
        admin = free_port()
        crls = CRLs(self)
        soon = crls.write(next_update=_now() + datetime.timedelta(minutes=30))
        provider, proxy = await self.start(
            admin={"endpoint": f"tcp:{admin}:interface=127.0.0.1"},
            tls={"crls": (soon,), "crl_expiry_margin": 3600.0})
        base = f"http://127.0.0.1:{admin}"
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"), (503, "not ready: crl\n"))
        status, text = await deferToThread(_get, f"{base}/metrics")
        found = samples(text.encode())
        crl = x509.load_pem_x509_crl(soon.read_bytes())
        self.assertEqual(found[("ssp_crl_next_update_timestamp_seconds", (("file", str(soon)),))],
                         crl.next_update_utc.timestamp())
        for role, name in (("server", "proxy"), ("upstream_client", "proxy-client")):
            certificate = x509.load_pem_x509_certificate(pki().path(f"{name}.pem").read_bytes())
            self.assertEqual(
                found[("ssp_certificate_expiry_timestamp_seconds", (("role", role),))],
                certificate.not_valid_after_utc.timestamp())
        fresh = crls.write()
        reload_crls(proxy, fresh)
        self.assertEqual(await deferToThread(_get, f"{base}/readyz"), (200, "ready\n"))
        status, text = await deferToThread(_get, f"{base}/metrics")
        self.assertEqual([key for key in samples(text.encode())
                          if key[0] == "ssp_crl_next_update_timestamp_seconds"],
                         [("ssp_crl_next_update_timestamp_seconds", (("file", str(fresh)),))])


class HandshakeFailureTests(IdentityTestCase):
    """
    A failed handshake is audited with OpenSSL's reason.
    """

    async def failure(self, context: ssl.SSLContext) -> str:
        provider, proxy = await self.start()

        def connect() -> None:
            with self.assertRaises(ssl.SSLError):
                exchange(proxy.port, context, metadata_request())

        await deferToThread(connect)
        await until(lambda: proxy.service.connection_refusals.counted)
        proxy.service.connection_refusals.flush()
        [record] = proxy.audit.records
        self.assertEqual((record.event, record.decision), ("connection-refused", "refused"))
        return record.token

    async def test_no_shared_cipher(self) -> None:
        context = client_context("consumer-0", "TLS 1.2 session ID")
        context.set_ciphers("ECDHE-ECDSA-CHACHA20-POLY1305")
        self.assertEqual(await self.failure(context), "TLS_HANDSHAKE_FAILED: no shared cipher")

    async def test_protocol_too_old(self) -> None:
        context = client_context("consumer-0", "TLS 1.2 session ID")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.assertEqual(await self.failure(context),
                         "TLS_HANDSHAKE_FAILED: unsupported protocol")

    async def test_consumer_rejects_proxy_certificate(self) -> None:
        other = Authority.create("Some other CA")
        directory = Path(tempfile.mkdtemp(prefix="ssp-other-ca-"))
        other.issued.write(directory, "other-ca")
        context = client_context("consumer-0", "TLS 1.2 session ID",
                                 ca=directory / "other-ca.pem")
        token = await self.failure(context)
        self.assertTrue(token.startswith("TLS_HANDSHAKE_FAILED: "), token)
        self.assertIn("unknown ca", token)


class LoadTests(unittest.SynchronousTestCase):
    """
    What is refused when CRLs are loaded, and how an unfinished handshake
    is described.
    """

    def test_crl_not_yet_valid(self) -> None:
        crls = CRLs(self)
        path = crls.write_raw(crls.root.crl(last_update=_now() + datetime.timedelta(hours=1)))
        error = self.assertRaises(ValueError, fresh_crls, path, reactor.seconds())
        self.assertIn(f"{path}: not yet valid (lastUpdate ", str(error))

    def test_not_a_crl(self) -> None:
        path = CRLs(self).write_raw(b"")
        error = self.assertRaises(ValueError, fresh_crls, path, reactor.seconds())
        self.assertEqual(str(error), f"{path}: no CRL found")

    def test_handshake_incomplete(self) -> None:
        self.assertEqual(handshake_failure_reason(Failure(ConnectionDone())),
                         "TLS_HANDSHAKE_INCOMPLETE: Connection was closed cleanly.")


class CRLs:
    """
    CRL files the tests write: the root's and the sub CA's, as the
    development PKI's but with what each test needs.
    """

    def __init__(self, case: unittest.SynchronousTestCase) -> None:
        self.directory = Path(case.mktemp())
        self.directory.mkdir(parents=True)
        self.root = Authority.load(pki().path("spine-ca.pem"), pki().path("spine-ca.key"))
        self.sub = Authority.load(pki().path("spine-sub-ca.pem"), pki().path("spine-sub-ca.key"))
        self.written = 0

    def write_raw(self, data: bytes) -> Path:
        self.written += 1
        path = self.directory / f"crl-{self.written}.pem"
        path.write_bytes(data)
        return path

    def write(self, revoked: tuple[x509.Certificate, ...] = (),
              next_update: datetime.datetime | None = None, name: str | None = None) -> Path:
        data = (self.root.crl(next_update=next_update)
                + self.sub.crl(revoked, next_update=next_update))
        if name is None:
            return self.write_raw(data)
        (self.directory / name).write_bytes(data)
        return self.directory / name


def chained_leaf() -> tuple[x509.Certificate, ...]:
    return (x509.load_pem_x509_certificates(pki().path("consumer-chained.pem").read_bytes())[0],)


def tls_config(crl: Path) -> ServerTLSConfig:
    return ServerTLSConfig(certificate=pki().path("proxy.pem"),
                           private_key=pki().path("proxy.key"),
                           client_ca=pki().path(DevelopmentPKI.ca), crls=(crl,))


def reload_crls(proxy: Proxy, crl: Path) -> None:
    proxy.service.server_tls.reload(attrs.evolve(proxy.config.tls, crls=(crl,)))


class _Clock:
    """
    The reactor's time, moved on by C{offset} seconds.
    """

    offset = 0.0

    def seconds(self) -> float:
        return reactor.seconds() + self.offset


def _now() -> datetime.datetime:
    return datetime.datetime.fromtimestamp(reactor.seconds(), datetime.timezone.utc)
