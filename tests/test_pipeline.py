"""
Unit tests of the check order, with in-memory fakes: when a request is
wrong in several ways, the first check in the documented order answers.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial import unittest
from twisted.web.http_headers import Headers

from ssp import demo, tls
from ssp.config import Agreement, ServerTLSConfig, TokenConfig
from ssp.errors import (
    BadRequest,
    CertificateInvalid,
    CertificateRequired,
    EndpointMismatch,
    Forbidden,
    MethodNotAllowed,
    ProviderBusy,
    Refusal,
    TooManyRequests,
)
from ssp.model import AccreditedSystem, ClientIdentity, MessageHandler
from ssp.pipeline import Checks, Findings, Inbound, admit
from ssp.testing import MemoryDirectory, MemoryThrottle
from ssp.tls import ServerTLS
from tests.support import pki

CONSUMER, PROVIDER = demo.CONSUMER_ASID, demo.PROVIDER_ASID
INTERACTION = demo.METADATA_INTERACTION
ENDPOINT = demo.PROVIDER_ENDPOINT
CLIENT = ClientIdentity("CN=gpc001.ssp-demo.test", "ab" * 32, ("gpc001.ssp-demo.test",))


def directory() -> MemoryDirectory:
    return MemoryDirectory(
        systems=[
            AccreditedSystem(CONSUMER, "GPC001", "GPC001-0000359", frozenset({INTERACTION})),
            AccreditedSystem(PROVIDER, "B82617", "B82617-9198738", frozenset({INTERACTION})),
        ],
        handlers=[
            MessageHandler("GPC001-0000359", "urn:other", "https://gpc001.ssp-demo.test/",
                           "gpc001.ssp-demo.test", "C1"),
            MessageHandler("B82617-9198738", INTERACTION, ENDPOINT, "orange.testlab.nhs.uk",
                           "S918999511007"),
        ],
    )


class AdmitTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.directory = directory()
        self.throttle = MemoryThrottle()
        self.identity: ClientIdentity | Refusal = CLIENT
        self.agreements = (Agreement(CONSUMER, PROVIDER),)

    def identify(self, connection: object) -> ClientIdentity:
        if isinstance(self.identity, Refusal):
            raise self.identity
        return self.identity

    def headers(self, **changes: str | None) -> Headers:
        values = {
            "Ssp-TraceID": "5f0b2a4e-1c1d-4f7e-9a55-0c1e2d3f4a5b",
            "Ssp-From": CONSUMER,
            "Ssp-To": PROVIDER,
            "Ssp-InteractionID": INTERACTION,
            "Authorization": "Bearer " + demo.bearer_token(self.clock.seconds()),
        }
        values.update(changes)
        return Headers({k: [v] for k, v in values.items() if v is not None})

    def admit(self, method: bytes, uri: bytes | None, **headers: str | None) -> Deferred[Findings]:
        checks = Checks(self.identify, self.directory, self.throttle, self.agreements,
                        TokenConfig(), self.clock)
        inbound = Inbound(method, uri or f"/{ENDPOINT}/metadata".encode(),
                          self.headers(**headers), None)
        return Deferred.fromCoroutine(admit(inbound, checks, Findings()))

    def refusal(self, method: bytes = b"GET", uri: bytes | None = None, **headers) -> Refusal:
        return self.failureResultOf(self.admit(method, uri, **headers), Refusal).value

    def test_admitted(self) -> None:
        found = self.successResultOf(self.admit(b"GET", None))
        self.assertEqual(found.handler.cpa_id, "S918999511007")
        self.assertEqual(found.spine.sender, CONSUMER)
        self.assertEqual(found.rate.remaining, 999_999)

    def test_certificate_before_everything(self) -> None:
        self.identity = CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        refused = self.refusal(method=b"TRACE", uri=b"/nonsense", **{"Ssp-From": None})
        self.assertIsInstance(refused, CertificateRequired)
        self.identity = CertificateInvalid("CLIENT_CERTIFICATE_INVALID_EXPIRED")
        self.assertIsInstance(self.refusal(method=b"TRACE"), CertificateInvalid)

    def test_method_before_target(self) -> None:
        self.assertIsInstance(self.refusal(method=b"TRACE", uri=b"/nonsense"), MethodNotAllowed)

    def test_target_before_headers(self) -> None:
        refused = self.refusal(uri=b"/http://x/y", **{"Ssp-From": None})
        self.assertIn("target URL", refused.token)

    def test_headers_before_token(self) -> None:
        refused = self.refusal(**{"Ssp-From": "abc", "Authorization": None})
        self.assertIn("Ssp-From", refused.token)

    def test_token_before_directory(self) -> None:
        self.directory.available = False
        refused = self.refusal(Authorization="Bearer not.a.token")
        self.assertIsInstance(refused, BadRequest)
        self.assertEqual(self.directory.queries, 0)

    def test_sender_before_receiver(self) -> None:
        refused = self.refusal(**{"Ssp-From": "1", "Ssp-To": "2"})
        self.assertEqual(refused.token, "ASID_CHECK_FAILED_MESSAGESENDER_1")

    def test_receiver_before_target_binding(self) -> None:
        refused = self.refusal(uri=f"/{ENDPOINT}X/metadata".encode(), **{"Ssp-To": "2"})
        self.assertEqual(refused.token, "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_2")

    def test_target_binding_before_agreement(self) -> None:
        self.agreements = ()
        refused = self.refusal(uri=f"/{ENDPOINT}X/metadata".encode())
        self.assertIsInstance(refused, EndpointMismatch)

    def test_agreement_before_throttle(self) -> None:
        self.agreements = ()
        self.throttle.consumer_allowance = 0
        refused = self.refusal()
        self.assertEqual(refused.token, f"FOT_CHECK_FAILED_MESSAGESENDER_{CONSUMER}_MESSAGERECEIVER_{PROVIDER}")
        self.assertIsInstance(refused, Forbidden)
        self.assertEqual(self.throttle.spent, {})

    def test_consumer_throttle_before_provider_throttle(self) -> None:
        self.throttle.consumer_allowance = 0
        self.throttle.provider_allowance = 0
        self.assertIsInstance(self.refusal(), TooManyRequests)
        self.throttle.consumer_allowance = 10
        self.assertIsInstance(self.refusal(), ProviderBusy)


def handshake(server_tls: ServerTLS, client_name: str) -> SSL.Connection:
    """
    A server-side connection of C{server_tls} after an in-memory TLS
    handshake with a client presenting the test PKI's C{client_name}.
    """
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.use_certificate_file(str(pki().path(f"{client_name}.pem")))
    context.use_privatekey_file(str(pki().path(f"{client_name}.key")))
    client = SSL.Connection(context, None)
    client.set_connect_state()
    for _ in range(8):
        for sender, receiver in ((client, server), (server, client)):
            try:
                sender.do_handshake()
            except SSL.WantReadError:
                pass
            try:
                receiver.bio_write(sender.bio_read(65536))
            except SSL.WantReadError:
                pass
    assert server.get_peer_finished() is not None, "handshake did not complete"
    return server


class IdentifyTests(unittest.SynchronousTestCase):
    """
    The first check, L{ServerTLS.client_identity}: a certificate chain is
    verified and parsed once, however often its holder reconnects, and only
    a good verdict is remembered.
    """

    def setUp(self) -> None:
        self.parsed: list[object] = []
        parse = tls.identity_of
        self.patch(tls, "identity_of", lambda c: self.parsed.append(c) or parse(c))
        self.server_tls = ServerTLS(ServerTLSConfig(
            certificate=pki().path("proxy.pem"), private_key=pki().path("proxy.key"),
            client_ca=pki().path(pki().ca), crls=(pki().path(pki().crl),),
        ), reactor)

    def identity(self, name: str) -> ClientIdentity:
        return self.server_tls.client_identity(handshake(self.server_tls, name))

    def test_parsed_once_per_certificate(self) -> None:
        first = self.identity("consumer-0")
        self.assertEqual(first.dns_names, ("gpc001.ssp-demo.test",))
        self.assertEqual(self.identity("consumer-0"), first)
        self.assertEqual(len(self.parsed), 1)
        other = self.identity("consumer-1")
        self.assertEqual(other.dns_names, ("k81045.ssp-demo.test",))
        self.assertEqual(len(self.parsed), 2)

    def test_bounded(self) -> None:
        self.patch(tls, "VERDICT_CACHE_SIZE", 1)
        for name in ("consumer-0", "consumer-1", "consumer-0"):
            self.identity(name)
        self.assertEqual(len(self.parsed), 3)

    def test_verdict_first(self) -> None:
        for _ in range(2):
            error = self.assertRaises(CertificateInvalid, self.identity, "consumer-revoked")
            self.assertEqual(error.token, "CLIENT_CERTIFICATE_INVALID_REVOKED")
        self.assertEqual(self.parsed, [])
