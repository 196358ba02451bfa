"""
Tests for L{ssp.explain}, the operator's "why was this refused?" command:
it runs the proxy's own pipeline, so its verdict is the proxy's.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import attrs
from cryptography import x509
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from ssp import demo
from ssp.config import Agreement, TokenConfig
from ssp.directory import parse_ldif
from ssp.explain import Explanation, Request, explain, format_explanation, run
from ssp.pipeline import Checks
from ssp.service import Concerns
from ssp.testing import MemoryDirectory, MemoryThrottle, RecordingAuditSink
from ssp.tls import identity_of
from tests import slapd
from tests.support import ROOT, Provider, Proxy, certificates_toml, pki, spine_headers

CONSUMER = demo.CONSUMER_ASID
OTHER_CONSUMER = "200000042019"
PROVIDER = demo.PROVIDER_ASID
METADATA = demo.METADATA_INTERACTION
READ_PATIENT = "urn:nhs:names:services:gpconnect:fhir:rest:read:patient-1"
LOCATION = "urn:nhs:names:services:gpconnect:fhir:rest:read:location-1"
ENDPOINT = demo.PROVIDER_ENDPOINT
METADATA_URL = ENDPOINT + "/metadata"


def request_headers(drop: tuple[str, ...] = (), add: tuple[tuple[str, str], ...] = (),
                    token: str | None = None, **values: str) -> tuple[tuple[str, str], ...]:
    """
    The headers of a valid request from the demo consumer, with some
    replaced (C{Ssp_From="..."}), dropped or added (repeats allowed).
    """
    headers = spine_headers(token)
    headers.update({name.replace("_", "-"): value for name, value in values.items()})
    return tuple((n, v) for n, v in headers.items() if n not in drop) + add


def pem(name: str) -> bytes:
    return pki().path(f"{name}.pem").read_bytes()


def unverified(certificate: bytes) -> Any:
    """
    Reads a certificate without verifying it: the unit tests' handshake.
    """
    return identity_of(x509.load_pem_x509_certificate(certificate))


class ExplainTests(TestCase):
    """
    Explain on fakes: the SDS and data-sharing detail behind each verdict.
    """

    def setUp(self) -> None:
        self.directory = MemoryDirectory(*parse_ldif(slapd.DEMO_LDIF.read_text()))
        self.throttle = MemoryThrottle(consumer_allowance=1, provider_allowance=1)
        self.agreements: tuple[Agreement, ...] = (Agreement(CONSUMER, PROVIDER),)

    async def explain(self, target: str = METADATA_URL, cert: bytes | None = None,
                      **headers: Any) -> Explanation:
        checks = Checks(identify=_never, directory=self.directory, throttle=self.throttle,
                        agreements=self.agreements, token=TokenConfig(), clock=reactor)
        request = Request(target, request_headers(**headers), cert or pem("consumer-0"))
        return await explain(checks, unverified, request)

    async def test_allowed(self) -> None:
        explained = await self.explain()
        self.assertIsNone(explained.refusal)
        text = format_explanation(explained)
        self.assertIn("lookup    nhsAs 200000000359: ODS GPC001, party key GPC001-0000359", text)
        self.assertIn(f"endpoint  CPA S918999511007: endpoint {ENDPOINT}", text)
        self.assertIn("lookup    rate consumer 200000000359: allowed, 0 of 1 left (nothing spent)",
                      text)
        self.assertTrue(text.endswith("result: ALLOWED (the proxy would forward this request)\n"))

    async def test_spends_nothing(self) -> None:
        """
        Explaining twice with an allowance of one: both allowed, nothing
        spent.
        """
        for _ in range(2):
            self.assertIsNone((await self.explain()).refusal)
        self.assertEqual(self.throttle.spent, 0)

    async def test_missing_trace_id(self) -> None:
        """
        The old explain supplied a missing C{Ssp-TraceID}; the proxy refuses.
        """
        explained = await self.explain(drop=("Ssp-TraceID",))
        self.assertEqual((explained.status, explained.token),
                         (400, "BAD_REQUEST: Ssp-TraceID header is missing"))

    async def test_bad_bearer_token(self) -> None:
        explained = await self.explain(Authorization="Bearer not-a-jwt")
        self.assertEqual(explained.status, 400)
        self.assertTrue(explained.token.startswith("BAD_REQUEST: "), explained.token)

    async def test_sds_unreachable_is_not_not_found(self) -> None:
        self.directory.available = False
        explained = await self.explain()
        self.assertEqual((explained.status, explained.token), (503, "SDS_UNAVAILABLE"))
        self.assertIn("SDS could not be reached", explained.why)
        self.assertNotIn("no nhsAs entry", format_explanation(explained))
        self.assertIn("lookup    nhsAs 200000000359: unreachable (SDS_UNAVAILABLE)",
                      format_explanation(explained))

    async def test_unknown_sender(self) -> None:
        explained = await self.explain(Ssp_From="999")
        self.assertEqual((explained.status, explained.token),
                         (403, "ASID_CHECK_FAILED_MESSAGESENDER_999"))
        self.assertEqual(explained.why, "SDS has no nhsAs entry with uniqueIdentifier=999")

    async def test_sender_interaction_near_miss(self) -> None:
        legacy = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
        explained = await self.explain(Ssp_InteractionID=legacy)
        self.assertEqual(explained.why,
                         f"nhsAsSvcIA of {CONSUMER} does not list {legacy}; it lists {METADATA}")

    async def test_certificate_not_registered(self) -> None:
        explained = await self.explain(cert=pem("consumer-1"))
        self.assertEqual((explained.status, explained.token),
                         (495, f"CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_{CONSUMER}"))
        self.assertEqual(explained.why,
                         "certificate DNS names: k81045.ssp-demo.test; "
                         "nhsMhsFQDN under party key GPC001-0000359: gpc001.ssp-demo.test")

    async def test_receiver_near_miss(self) -> None:
        legacy = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
        explained = await self.explain(cert=pem("consumer-1"), Ssp_From=OTHER_CONSUMER,
                                       Ssp_InteractionID=legacy)
        self.assertEqual(explained.status, 403)
        self.assertTrue(explained.why.endswith(f"serves {legacy}; it serves {METADATA}"),
                        explained.why)

    async def test_unknown_receiver(self) -> None:
        explained = await self.explain(Ssp_To="123")
        self.assertEqual(explained.why, "SDS has no nhsAs entry with uniqueIdentifier=123")

    async def test_outside_endpoint_hint(self) -> None:
        explained = await self.explain(METADATA_URL.replace("gpconnect", "GPConnect"))
        self.assertEqual(explained.status, 400)
        self.assertIn("no normalisation", explained.why)

    async def test_no_agreement(self) -> None:
        self.agreements = ()
        explained = await self.explain()
        self.assertEqual(explained.token,
                         f"FOT_CHECK_FAILED_MESSAGESENDER_{CONSUMER}_MESSAGERECEIVER_{PROVIDER}")
        self.assertIn("no [[agreements]] entry", explained.why)
        self.agreements = (Agreement(CONSUMER, PROVIDER, ("urn:other",)),)
        explained = await self.explain()
        self.assertEqual(explained.why, "the agreements for this pair cover only urn:other")

    async def test_rate_limit(self) -> None:
        self.throttle.consumer_allowance = 0
        explained = await self.explain()
        self.assertEqual(explained.status, 429)
        self.assertIn("one more request fits in", explained.why)

    async def test_without_certificate(self) -> None:
        checks = Checks(identify=_never, directory=self.directory, throttle=self.throttle,
                        agreements=self.agreements, token=TokenConfig(), clock=reactor)
        explained = await explain(checks, unverified, Request(METADATA_URL, request_headers(), None))
        self.assertEqual((explained.status, explained.token), (496, "CLIENT_CERTIFICATE_REQUIRED"))

    async def test_unreadable_certificate(self) -> None:
        with self.assertRaises(ValueError):
            await self.explain(cert=b"not a certificate")


def _never(connection: Any) -> Any:
    raise AssertionError("explain must replace identify")


@attrs.frozen
class Row:
    """
    One request of the agreement table, and the status the proxy answers
    (200: forwarded).
    """

    name: str
    status: int
    target: str = METADATA_URL
    method: str = "GET"
    cert: str | None = "consumer-0"
    headers: Callable[[], tuple[tuple[str, str], ...]] = request_headers
    setup: Callable[[Any], None] = lambda table: None


def expired_token() -> str:
    return demo.bearer_token(reactor.seconds() - 3600)


def patient_read_token(audience: str = ENDPOINT) -> str:
    """
    The demo token, asking for the scope patient interactions need.
    """
    header, payload, signature = demo.bearer_token(reactor.seconds(), audience).split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["requested_scope"] = "patient/*.read"
    encoded = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return ".".join((header, encoded, signature))


ROWS = [
    Row("allowed", 200),
    Row("allowed with query", 200, target=METADATA_URL + "?_format=json"),
    Row("allowed POST", 200, method="POST"),
    Row("allowed other interaction", 200, target=ENDPOINT + "/Patient/1",
        headers=lambda: request_headers(Ssp_InteractionID=READ_PATIENT,
                                        token=patient_read_token())),
    Row("allowed, aud the resource URL", 200,
        headers=lambda: request_headers(token=demo.bearer_token(reactor.seconds(), METADATA_URL))),
    Row("allowed, header names in another case", 200,
        headers=lambda: tuple((n.lower(), v) for n, v in request_headers())),
    Row("no client certificate", 496, cert=None),
    Row("expired certificate", 495, cert="consumer-expired"),
    Row("revoked certificate", 495, cert="consumer-revoked"),
    Row("untrusted certificate", 495, cert="consumer-untrusted"),
    Row("TRACE", 405, method="TRACE"),
    Row("unknown verb", 405, method="BREW"),
    Row("http target", 400, target=METADATA_URL.replace("https:", "http:")),
    Row("user info", 400, target=METADATA_URL.replace("https://", "https://u@")),
    Row("dot segment", 400, target=ENDPOINT + "/../../metadata"),
    Row("bad port", 400, target=METADATA_URL.replace(".uk/", ".uk:99999/")),
    Row("no path", 400, target="https://orange.testlab.nhs.uk"),
    Row("no Ssp-TraceID", 400, headers=lambda: request_headers(drop=("Ssp-TraceID",))),
    Row("no Ssp-From", 400, headers=lambda: request_headers(drop=("Ssp-From",))),
    Row("repeated Ssp-To", 400, headers=lambda: request_headers(add=(("Ssp-To", PROVIDER),))),
    Row("bad Ssp-TraceID", 400, headers=lambda: request_headers(Ssp_TraceID="not-a-uuid")),
    Row("no Authorization", 400, headers=lambda: request_headers(drop=("Authorization",))),
    Row("malformed bearer token", 400,
        headers=lambda: request_headers(Authorization="Bearer not-a-jwt")),
    Row("expired bearer token", 400, headers=lambda: request_headers(token=expired_token())),
    Row("aud elsewhere", 400, headers=lambda: request_headers(
        token=demo.bearer_token(reactor.seconds(), "https://elsewhere.test/fhir"))),
    Row("aud does not cover the target", 400, target=ENDPOINT + "/Patient/1",
        headers=lambda: request_headers(
            Ssp_InteractionID=READ_PATIENT, token=patient_read_token(METADATA_URL))),
    Row("unknown sender", 403, headers=lambda: request_headers(Ssp_From="999999999999")),
    Row("sender not allowed the interaction", 403, target=ENDPOINT + "/Location/1",
        headers=lambda: request_headers(Ssp_InteractionID=LOCATION)),
    Row("certificate of another system", 495, cert="consumer-1"),
    Row("unknown receiver", 403, headers=lambda: request_headers(Ssp_To="999999999998")),
    Row("receiver without the endpoint", 403,
        headers=lambda: request_headers(Ssp_To=OTHER_CONSUMER)),
    Row("explicit :443", 400, target=METADATA_URL.replace(".uk/", ".uk:443/")),
    Row("host case", 400, target=METADATA_URL.replace("orange", "ORANGE")),
    Row("other endpoint", 400, target=ENDPOINT + "X/metadata"),
    Row("no agreement", 403, cert="consumer-1",
        headers=lambda: request_headers(Ssp_From=OTHER_CONSUMER)),
    Row("consumer over its rate", 429,
        setup=lambda table: setattr(table.throttle, "consumer_allowance", 0)),
    Row("provider over its rate", 503,
        setup=lambda table: setattr(table.throttle, "provider_allowance", 0)),
    Row("SDS unreachable", 503,
        setup=lambda table: setattr(table.directory, "available", False)),
    Row("rate store unreachable", 503,
        setup=lambda table: setattr(table.throttle, "available", False)),
]


class ExplainAgreesWithProxyTests(TestCase):
    """
    Each request of L{ROWS} is explained, then sent to the running proxy
    over mutual TLS: explain's status and token must be the proxy's (and
    ALLOWED exactly when the provider received the request).
    """

    async def test_table(self) -> None:
        self.assertGreaterEqual(len(ROWS), 30)
        provider = Provider(self)
        self.directory = MemoryDirectory(*parse_ldif(slapd.DEMO_LDIF.read_text()))
        self.throttle = MemoryThrottle()
        proxy = await Proxy(self, provider, concerns=Concerns(
            directory=self.directory, throttle=self.throttle, audit=RecordingAuditSink())).start()
        service = proxy.service
        seen = 0
        for row in ROWS:
            self.directory.available = self.throttle.available = True
            self.throttle.consumer_allowance = self.throttle.provider_allowance = 1_000_000
            row.setup(self)
            headers = row.headers()
            assert service.proxy is not None
            explained = await explain(
                service.proxy.checks, service.server_tls.verify_pem,
                Request(row.target, headers, pem(row.cert) if row.cert else None, row.method),
            )
            status, token = await deferToThread(send, proxy.port, row, headers)
            forwarded = len(provider.seen) > seen
            seen = len(provider.seen)
            self.assertEqual(status, row.status, f"{row.name}: the proxy answered {token}")
            if status == 200:
                self.assertTrue(forwarded, row.name)
                self.assertIsNone(explained.refusal, f"{row.name}: {explained.token}")
            else:
                self.assertFalse(forwarded, row.name)
                self.assertEqual((explained.status, explained.token), (status, token), row.name)


def send(port: int, row: Row, headers: tuple[tuple[str, str], ...]) -> tuple[int, str]:
    """
    Send a row's request as a consumer would (headers exactly as given,
    repeats included): the status and, for a refusal, its token.
    """
    context = _consumer_context(row.cert)
    connection = http.client.HTTPSConnection("localhost", port, context=context, timeout=30)
    try:
        connection.putrequest(row.method, "/" + row.target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        connection.endheaders()
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status == 200:
        return 200, ""
    return response.status, json.loads(body)["issue"][0]["diagnostics"]


def _consumer_context(cert: str | None) -> Any:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(pki().path("spine-ca.pem")))
    if cert is not None:
        context.load_cert_chain(str(pki().path(f"{cert}.pem")), str(pki().path(f"{cert}.key")))
    return context


class CommandTests(TestCase):
    """
    The C{ssp explain} command line, with the run's development PKI.
    """

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.config = directory / "ssp.toml"
        self.config.write_text(certificates_toml() + f"""
[directory]
kind = "ldif"
ldif = "{slapd.DEMO_LDIF}"

[[agreements]]
sender = "{CONSUMER}"
receiver = "{PROVIDER}"
""")

    def argv(self, target: str = METADATA_URL, cert: str = "consumer-0") -> list[str]:
        argv = ["--config", str(self.config), "--target", target,
                "--cert", str(pki().path(f"{cert}.pem"))]
        for name, value in request_headers():
            argv += ["-H", f"{name}: {value}"]
        return argv

    async def run_command(self, argv: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await Deferred.fromCoroutine(run(reactor, argv, out, err))
        return code, out.getvalue(), err.getvalue()

    async def test_allowed(self) -> None:
        code, out, _ = await self.run_command(self.argv())
        self.assertEqual(code, 0, out)
        self.assertIn("result: ALLOWED", out)

    async def test_refused(self) -> None:
        code, out, _ = await self.run_command(self.argv(ENDPOINT + "X"))
        self.assertEqual(code, 1)
        self.assertIn("result: REFUSED 400 ENDPOINT_", out)

    async def test_certificate_checked_against_the_configured_ca(self) -> None:
        code, out, _ = await self.run_command(self.argv(cert="consumer-untrusted"))
        self.assertEqual(code, 1)
        self.assertIn("result: REFUSED 495 CLIENT_CERTIFICATE_INVALID_UNTRUSTED", out)

    async def test_bad_config(self) -> None:
        self.config.write_text("[directory]\nkind = 'nis'\n")
        code, out, err = await self.run_command(self.argv())
        self.assertEqual((code, out), (2, ""))
        self.assertIn("ssp explain: ", err)

    async def test_unreadable_certificate(self) -> None:
        bad = Path(self.mktemp())
        bad.write_bytes(b"not a certificate")
        argv = self.argv()
        argv[argv.index("--cert") + 1] = str(bad)
        code, _, err = await self.run_command(argv)
        self.assertEqual(code, 2)
        self.assertIn(str(bad), err)

    async def test_bad_header(self) -> None:
        code, _, err = await self.run_command(self.argv() + ["-H", "Ssp-TraceID"])
        self.assertEqual(code, 2)
        self.assertIn("not 'Name: value'", err)

    def test_main_exit_code(self) -> None:
        """
        C{main} runs the reactor and exits with the verdict.
        """
        for target, expected in [(METADATA_URL, 0), ("https://192.0.2.10/fhir", 1)]:
            result = subprocess.run(
                [sys.executable, "-c",
                 "import sys; from ssp.explain import main; main(sys.argv[1:])",
                 *self.argv(target)],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            self.assertEqual(result.returncode, expected, result.stderr)
            self.assertIn("result: ", result.stdout)

