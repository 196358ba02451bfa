"""
Tests for L{ssp.explain}, the operator's "why was this refused?" command.
"""

from __future__ import annotations

import datetime
import io
import os
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp.config import Agreement
from ssp.directory import parse_ldif
from ssp.explain import FAIL, PASS, SKIPPED, Step, client_identity, explain, format_steps, run
from ssp.testing import MemoryDirectory
from tests import slapd

CONSUMER = "200000000359"
PROVIDER = "918999198738"
METADATA = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
ENDPOINT = "https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir"
AGREEMENTS = (Agreement(CONSUMER, PROVIDER),)
NAMES = [
    "request",
    "sender known",
    "certificate FQDN",
    "sender interaction",
    "receiver endpoint",
    "target within endpoint",
    "data-sharing agreement",
]


def certificate(cn: str, *dns_names: str) -> bytes:
    """
    A self-signed PEM certificate with C{cn} and, if given, a SAN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


GPC001_PEM = certificate("gpc001", "gpc001.ssp-demo.test")


def headers(
    sender: str = CONSUMER, receiver: str = PROVIDER, interaction: str = METADATA
) -> dict[str, str]:
    return {"ssp-from": sender, "Ssp-To": receiver, "Ssp-InteractionID": interaction}


class ClientIdentityTests(SynchronousTestCase):
    def test_san(self) -> None:
        """
        DNS names come from the SAN when there is one (the CN is ignored).
        """
        ident = client_identity(certificate("cn.example", "a.example", "b.example"))
        self.assertEqual(ident.dns_names, ("a.example", "b.example"))
        self.assertEqual(ident.subject, "CN=cn.example")
        self.assertEqual(len(ident.fingerprint), 64)

    def test_cn(self) -> None:
        """
        Without a SAN, the CN.
        """
        self.assertEqual(client_identity(certificate("cn.example")).dns_names, ("cn.example",))


class ExplainTests(TestCase):
    def setUp(self) -> None:
        self.directory = MemoryDirectory(*parse_ldif(slapd.DEMO_LDIF.read_text()))

    async def explain(self, target: str = ENDPOINT + "/metadata", **options) -> list[Step]:
        steps = await explain(
            self.directory,
            options.get("agreements", AGREEMENTS),
            target,
            options.get("headers", headers()),
            options.get("pem", GPC001_PEM),
        )
        self.assertEqual([s.name for s in steps], NAMES)
        return steps

    def verdicts(self, steps: list[Step]) -> list[str]:
        return [s.verdict for s in steps]

    async def test_all_pass(self) -> None:
        steps = await self.explain()
        self.assertEqual(self.verdicts(steps), [PASS] * 7)
        details = "\n".join(s.detail for s in steps)
        self.assertIn("party key GPC001-0000359", details)
        self.assertIn("gpc001.ssp-demo.test", details)
        self.assertIn(f"endpoint {ENDPOINT}", details)
        self.assertIn("S918999511007", details)
        self.assertIn(f"agreement {CONSUMER} -> {PROVIDER} for all interactions", details)
        text = format_steps(steps)
        self.assertIn("PASS  target within endpoint  ", text)
        self.assertTrue(text.endswith("result: ALLOWED by the SDS and data-sharing checks\n"))

    async def test_without_certificate(self) -> None:
        steps = await self.explain(pem=None)
        self.assertEqual(self.verdicts(steps), [PASS, PASS, SKIPPED, PASS, PASS, PASS, PASS])
        self.assertIn("no client certificate given", steps[2].detail)

    async def test_target_outside(self) -> None:
        """
        A failure shows status, token and data; later checks are skipped.
        """
        target = ENDPOINT + "X/metadata"
        steps = await self.explain(target)
        self.assertEqual(self.verdicts(steps), [PASS] * 5 + [FAIL, SKIPPED])
        failed = steps[5]
        self.assertEqual(failed.status, 400)
        self.assertEqual(
            failed.token,
            f"ENDPOINT_{ENDPOINT}_CPAID_S918999511007_VARIES_FROM_TARGETURL_{target}",
        )
        self.assertIn(f"not within the registered endpoint {ENDPOINT}", failed.detail)
        text = format_steps(steps)
        self.assertIn(f"FAIL  target within endpoint  400 ENDPOINT_{ENDPOINT}", text)
        self.assertIn("SKIP  data-sharing agreement  not checked: an earlier check failed", text)
        self.assertIn("\n                              target ", text)
        self.assertTrue(text.endswith(f"result: REFUSED 400 {failed.token}\n"))

    async def test_normalisation_hint(self) -> None:
        steps = await self.explain("https://orange.testlab.nhs.uk/B82617/STU3/1/GPConnect/fhir/metadata")
        self.assertIn("no normalisation", steps[5].detail)

    async def test_unknown_sender(self) -> None:
        steps = await self.explain(headers=headers(sender="999"))
        self.assertEqual(self.verdicts(steps), [PASS, FAIL] + [SKIPPED] * 5)
        self.assertEqual((steps[1].status, steps[1].token), (403, "ASID_CHECK_FAILED_MESSAGESENDER_999"))
        self.assertIn("no nhsAs entry with uniqueIdentifier=999", steps[1].detail)

    async def test_wrong_certificate(self) -> None:
        steps = await self.explain(pem=certificate("x", "k81045.ssp-demo.test"))
        self.assertEqual(steps[2].verdict, FAIL)
        self.assertEqual(steps[2].status, 495)
        self.assertEqual(
            steps[2].detail,
            "certificate DNS names: k81045.ssp-demo.test; "
            "nhsMhsFQDN under party key GPC001-0000359: gpc001.ssp-demo.test",
        )

    async def test_unreadable_certificate(self) -> None:
        steps = await self.explain(pem=b"not a certificate")
        self.assertEqual((steps[2].status, steps[2].token), (495, "CERTIFICATE_UNREADABLE"))

    async def test_sender_interaction_near_miss(self) -> None:
        """
        An interaction the sender lacks shows the versions it has.
        """
        legacy = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
        steps = await self.explain(headers=headers(interaction=legacy))
        self.assertEqual(steps[3].verdict, FAIL)
        self.assertEqual(
            steps[3].detail,
            f"nhsAsSvcIA of {CONSUMER} does not list {legacy}; it lists {METADATA}",
        )

    async def test_receiver_without_endpoint(self) -> None:
        """
        A receiver without an endpoint for the interaction: a consumer.
        """
        steps = await self.explain(headers=headers(receiver=CONSUMER))
        self.assertEqual(steps[4].verdict, FAIL)
        self.assertEqual(steps[4].token, f"PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{CONSUMER}")
        self.assertIn(f"no nhsMhs entry under party key GPC001-0000359 serves {METADATA}", steps[4].detail)

    async def test_receiver_near_miss(self) -> None:
        """
        A legacy interaction the receiver does not serve shows the versions
        it does.
        """
        legacy = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
        steps = await self.explain(
            headers=headers(sender="200000042019", interaction=legacy),
            pem=certificate("k", "k81045.ssp-demo.test"),
        )
        self.assertEqual(self.verdicts(steps)[:5], [PASS] * 4 + [FAIL])
        self.assertTrue(steps[4].detail.endswith(f"serves {legacy}; it serves {METADATA}"))

    async def test_unknown_receiver(self) -> None:
        steps = await self.explain(headers=headers(receiver="123"))
        self.assertEqual(steps[4].verdict, FAIL)
        self.assertIn("no nhsAs entry with uniqueIdentifier=123", steps[4].detail)

    async def test_no_agreement(self) -> None:
        steps = await self.explain(agreements=())
        self.assertEqual(steps[6].verdict, FAIL)
        self.assertEqual(
            steps[6].token, f"FOT_CHECK_FAILED_MESSAGESENDER_{CONSUMER}_MESSAGERECEIVER_{PROVIDER}"
        )
        self.assertIn("no [[agreements]] entry", steps[6].detail)
        other = (Agreement(CONSUMER, PROVIDER, ("urn:other",)),)
        steps = await self.explain(agreements=other)
        self.assertEqual(steps[6].detail, "the agreements for this pair cover only urn:other")

    async def test_missing_header(self) -> None:
        steps = await self.explain(headers={"Ssp-From": CONSUMER, "Ssp-To": " "})
        self.assertEqual(self.verdicts(steps), [FAIL] + [SKIPPED] * 6)
        self.assertEqual(steps[0].status, 400)
        self.assertEqual(steps[0].token, "BAD_REQUEST: Ssp-To header is missing")

    async def test_encoded_target(self) -> None:
        """
        A wholly percent-encoded target is decoded once, as the proxy does.
        """
        steps = await self.explain("https%3A%2F%2Forange.testlab.nhs.uk%2FB82617%2FSTU3%2F1%2Fgpconnect%2Ffhir%2Fmetadata")
        self.assertEqual(self.verdicts(steps), [PASS] * 7)
        self.assertIn(f"target {ENDPOINT}/metadata;", steps[0].detail)

    async def test_not_https(self) -> None:
        steps = await self.explain("http://orange.testlab.nhs.uk/x")
        self.assertEqual(steps[0].status, 400)

    async def test_directory_unavailable(self) -> None:
        self.directory.available = False
        steps = await self.explain()
        self.assertEqual((steps[1].verdict, steps[1].status, steps[1].token), (FAIL, 503, "SDS_UNAVAILABLE"))


CONFIG = """\
[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"

[upstream]
certificate = "client.pem"
private_key = "client.key"
ca = "ca.pem"

[audit]
key_file = "audit.key"

[directory]
kind = "ldif"
ldif = "{ldif}"

[[agreements]]
sender = "200000000359"
receiver = "918999198738"
"""


class CommandTests(TestCase):
    """
    The C{ssp explain} command line.
    """

    def setUp(self) -> None:
        directory = Path(self.mktemp()).resolve()
        directory.mkdir()
        self.config = directory / "ssp.toml"
        self.config.write_text(CONFIG.format(ldif=slapd.DEMO_LDIF))
        self.cert = directory / "consumer.pem"
        self.cert.write_bytes(GPC001_PEM)

    def argv(self, target: str = ENDPOINT + "/metadata") -> list[str]:
        return [
            "--config", str(self.config), "--target", target,
            "-H", f"Ssp-From: {CONSUMER}", "-H", f"Ssp-To: {PROVIDER}",
            "-H", f"Ssp-InteractionID: {METADATA}", "--cert", str(self.cert),
        ]  # fmt: skip

    async def run_command(self, argv: list[str]) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await Deferred.fromCoroutine(run(reactor, argv, out, err))
        return code, out.getvalue(), err.getvalue()

    async def test_allowed(self) -> None:
        code, out, _ = await self.run_command(self.argv())
        self.assertEqual(code, 0)
        self.assertEqual(out.count("PASS  "), 7)

    async def test_refused(self) -> None:
        code, out, _ = await self.run_command(self.argv(ENDPOINT + "X"))
        self.assertEqual(code, 1)
        self.assertIn("result: REFUSED 400 ENDPOINT_", out)

    async def test_bad_config(self) -> None:
        self.config.write_text("[directory]\nkind = 'nis'\n")
        code, out, err = await self.run_command(self.argv())
        self.assertEqual((code, out), (2, ""))
        self.assertIn("ssp explain: ", err)

    async def test_bad_header(self) -> None:
        code, _, err = await self.run_command(self.argv() + ["-H", "Ssp-TraceID"])
        self.assertEqual(code, 2)
        self.assertIn("not 'Name: value'", err)

    def test_main_exit_code(self) -> None:
        """
        C{main} runs the reactor and exits with the verdict.
        """
        for target, expected in [(ENDPOINT + "/metadata", 0), ("https://192.0.2.10/fhir", 1)]:
            result = subprocess.run(
                [sys.executable, "-c", "import sys; from ssp.explain import main; main(sys.argv[1:])", *self.argv(target)],
                capture_output=True,
                text=True,
                timeout=30,
                env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
            )
            self.assertEqual(result.returncode, expected, result.stderr)
            self.assertIn("result: ", result.stdout)
