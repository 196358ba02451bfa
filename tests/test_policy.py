"""
Tests for L{ssp.policy}: every authorisation check and token, over the demo
SDS data, against the in-memory fake and against a real slapd.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp.config import Agreement, DirectoryConfig
from ssp.directory import LDAPDirectory, parse_ldif
from ssp.errors import CertificateInvalid, EndpointMismatch, Forbidden, Refusal
from ssp.model import ClientIdentity, MessageHandler, SpineHeaders
from ssp.policy import (
    check_agreement,
    check_receiver,
    check_sender,
    check_target,
    choose_handler,
    within_endpoint,
)
from ssp.testing import MemoryDirectory
from tests import slapd

CONSUMER = "200000000359"
LEGACY_CONSUMER = "200000042019"
PROVIDER = "918999198738"
LEGACY_PROVIDER = "918999198993"
METADATA = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
LEGACY_METADATA = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
STRUCTURED = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1"
CARE_RECORD = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getcarerecord"
ENDPOINT = "https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir"
STRUCTURED_ENDPOINT = "https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/structured/fhir"
LEGACY_ENDPOINT = "https://orange.testlab.nhs.uk/gpconnect-demonstrator/v0/fhir"
TRACE = "0f7b9a2e-2b8d-4d0a-9c3f-6f1b3b0a1d5e"


def spine(
    sender: str = CONSUMER, receiver: str = PROVIDER, interaction: str = METADATA
) -> SpineHeaders:
    return SpineHeaders(TRACE, sender, receiver, interaction)


def identity(*names: str) -> ClientIdentity:
    return ClientIdentity(f"CN={names[0] if names else 'x'}", "00", names)


GPC001_CERT = identity("gpc001.ssp-demo.test")


class PolicyDirectoryMixin:
    """
    The SDS checks over the data of C{etc/demo-sds.ldif}.  Subclasses set
    C{self.directory}.
    """

    directory: Any

    async def assertRefused(self, coroutine: Any, kind: type[Refusal], token: str) -> Refusal:
        with self.assertRaises(kind) as caught:
            await coroutine
        self.assertEqual(caught.exception.token, token)
        return caught.exception

    # check_sender

    async def test_sender_allowed(self) -> None:
        """
        A known sender, with a certificate for its registered FQDN, sending
        an interaction its C{nhsAsSvcIA} lists.
        """
        system = await check_sender(self.directory, spine(), GPC001_CERT)
        self.assertEqual(system.asid, CONSUMER)
        self.assertEqual(system.party_key, "GPC001-0000359")

    async def test_sender_unknown(self) -> None:
        """
        An ASID SDS does not know is 403, before any certificate check.
        """
        refusal = await self.assertRefused(
            check_sender(self.directory, spine(sender="999999999999"), identity("nowhere.test")),
            Forbidden,
            "ASID_CHECK_FAILED_MESSAGESENDER_999999999999",
        )
        self.assertEqual(refusal.status, 403)

    async def test_certificate_not_registered(self) -> None:
        """
        A certificate naming no FQDN registered for the sender is 495.
        """
        refusal = await self.assertRefused(
            check_sender(self.directory, spine(), identity("elsewhere.example")),
            CertificateInvalid,
            "CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_200000000359",
        )
        self.assertEqual(refusal.status, 495)

    async def test_certificate_of_another_system(self) -> None:
        """
        One system's certificate cannot speak for another system's ASID.
        """
        await self.assertRefused(
            check_sender(self.directory, spine(), identity("k81045.ssp-demo.test")),
            CertificateInvalid,
            "CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_200000000359",
        )
        system = await check_sender(
            self.directory, spine(sender=LEGACY_CONSUMER), identity("k81045.ssp-demo.test")
        )
        self.assertEqual(system.asid, LEGACY_CONSUMER)

    async def test_certificate_any_name(self) -> None:
        """
        Any of the certificate's DNS names may be the registered one; DNS
        names compare ignoring case.
        """
        await check_sender(
            self.directory, spine(), identity("www.example", "GPC001.SSP-Demo.test")
        )

    async def test_certificate_wildcard(self) -> None:
        """
        A wildcard name is not expanded.
        """
        await self.assertRefused(
            check_sender(self.directory, spine(), identity("*.ssp-demo.test")),
            CertificateInvalid,
            "CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_200000000359",
        )

    async def test_certificate_before_interaction(self) -> None:
        """
        The certificate binding is checked before the interaction.
        """
        await self.assertRefused(
            check_sender(self.directory, spine(interaction=CARE_RECORD), identity("x.example")),
            CertificateInvalid,
            "CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_200000000359",
        )

    async def test_no_certificate_skips_binding(self) -> None:
        """
        Without a client identity the binding is not checked (the pipeline
        refuses a missing certificate before).
        """
        system = await check_sender(self.directory, spine(sender=PROVIDER), None)
        self.assertEqual(system.asid, PROVIDER)

    async def test_sender_interaction_not_allowed(self) -> None:
        await self.assertRefused(
            check_sender(self.directory, spine(interaction=CARE_RECORD), GPC001_CERT),
            Forbidden,
            "ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
        )

    async def test_sender_interaction_case_exact(self) -> None:
        await self.assertRefused(
            check_sender(self.directory, spine(interaction=METADATA.upper()), GPC001_CERT),
            Forbidden,
            "ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
        )

    async def test_sender_legacy_interaction(self) -> None:
        """
        A legacy un-versioned interaction ID is allowed where the sender's AS
        registers it, and only there.
        """
        k81045 = identity("k81045.ssp-demo.test")
        await check_sender(self.directory, spine(LEGACY_CONSUMER, interaction=LEGACY_METADATA), k81045)
        await self.assertRefused(
            check_sender(self.directory, spine(interaction=LEGACY_METADATA), GPC001_CERT),
            Forbidden,
            "ASID_CHECK_FAILED_MESSAGESENDER_200000000359",
        )

    # check_receiver

    async def test_receiver_endpoint(self) -> None:
        handler = await check_receiver(self.directory, spine())
        self.assertEqual(handler.endpoint, ENDPOINT)
        self.assertEqual(handler.fqdn, "orange.testlab.nhs.uk")
        self.assertTrue(handler.cpa_id)

    async def test_receiver_capability_endpoint(self) -> None:
        """
        Each capability has its own endpoint.
        """
        handler = await check_receiver(self.directory, spine(interaction=STRUCTURED))
        self.assertEqual(handler.endpoint, STRUCTURED_ENDPOINT)

    async def test_receiver_unknown(self) -> None:
        refusal = await self.assertRefused(
            check_receiver(self.directory, spine(receiver="999999999999")),
            Forbidden,
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_999999999999",
        )
        self.assertEqual(refusal.status, 403)

    async def test_receiver_without_endpoint(self) -> None:
        """
        A known receiver with no MHS record for the interaction.
        """
        await self.assertRefused(
            check_receiver(self.directory, spine(interaction=CARE_RECORD)),
            Forbidden,
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198738",
        )

    async def test_receiver_interaction_case_exact(self) -> None:
        await self.assertRefused(
            check_receiver(self.directory, spine(interaction=METADATA.upper())),
            Forbidden,
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_918999198738",
        )

    async def test_receiver_legacy_interaction(self) -> None:
        """
        A legacy un-versioned interaction ID reaches the endpoint registered
        for it.
        """
        handler = await check_receiver(
            self.directory, spine(LEGACY_CONSUMER, LEGACY_PROVIDER, LEGACY_METADATA)
        )
        self.assertEqual(handler.endpoint, LEGACY_ENDPOINT)
        check_target(handler, LEGACY_ENDPOINT + "/metadata")

    async def test_consumer_is_no_receiver(self) -> None:
        """
        A consumer's MHS record carries no GP Connect interaction, so it
        cannot be called with one.
        """
        await self.assertRefused(
            check_receiver(self.directory, spine(sender=PROVIDER, receiver=CONSUMER)),
            Forbidden,
            "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_200000000359",
        )


class MemoryPolicyTests(PolicyDirectoryMixin, TestCase):
    def setUp(self) -> None:
        self.directory = MemoryDirectory(*parse_ldif(slapd.DEMO_LDIF.read_text()))

    async def test_several_handlers(self) -> None:
        """
        Of several MHS records for one party key and interaction, the one
        with the lowest CPA ID is used, whatever the order SDS returns.
        """
        a = MessageHandler("P-1", METADATA, "https://a.example/fhir", "a.example", "S2")
        b = MessageHandler("P-1", METADATA, "https://b.example/fhir", "b.example", "S1")
        systems, _ = parse_ldif(slapd.DEMO_LDIF.read_text())
        receiver = [s for s in systems if s.asid == PROVIDER][0]
        system = attrs.evolve(receiver, party_key="P-1")
        for handlers in ([a, b], [b, a]):
            directory = MemoryDirectory([system], handlers)
            self.assertEqual(await check_receiver(directory, spine()), b)
        self.assertEqual(choose_handler((a,)), a)


class LDAPPolicyTests(PolicyDirectoryMixin, TestCase):
    skip = slapd.SKIP

    def setUp(self) -> None:
        sds = slapd.Slapd.shared([slapd.DEMO_LDIF])
        self.directory = LDAPDirectory(
            DirectoryConfig(kind="ldap", urls=(sds.url,), connections=2), reactor
        )
        self.directory.start()
        self.addCleanup(self.directory.stop)


HANDLER = MessageHandler("B82617-9198738", METADATA, ENDPOINT, "orange.testlab.nhs.uk", "S918999511007")


class TargetTests(SynchronousTestCase):
    """
    L{check_target}: within the endpoint, on a segment boundary, exactly.
    """

    def assertAllowed(self, target: str, handler: MessageHandler = HANDLER) -> None:
        check_target(handler, target)

    def assertRefused(self, target: str, handler: MessageHandler = HANDLER) -> None:
        with self.assertRaises(EndpointMismatch) as caught:
            check_target(handler, target)
        self.assertEqual(caught.exception.status, 400)
        self.assertEqual(
            caught.exception.token,
            f"ENDPOINT_{handler.endpoint}_CPAID_{handler.cpa_id}_VARIES_FROM_TARGETURL_{target}",
        )

    def test_within(self) -> None:
        for target in [
            ENDPOINT,
            ENDPOINT + "/metadata",
            ENDPOINT + "/metadata?_format=json",
            ENDPOINT + "?_format=json",
            ENDPOINT + "/Patient/$gpc.getstructuredrecord",
            ENDPOINT + "/Slot?start=ge2024-01-01&status=free|x%7Cy",
            ENDPOINT + "/Binary/a..b",
        ]:
            self.assertAllowed(target)

    def test_endpoint_with_trailing_slash(self) -> None:
        """
        An endpoint registered as C{.../fhir/} contains what starts with it
        exactly; C{.../fhir} (and its query) does not start with it.
        """
        slashed = attrs.evolve(HANDLER, endpoint=ENDPOINT + "/")
        for target in (ENDPOINT + "/", ENDPOINT + "/metadata", ENDPOINT + "/?_format=json"):
            self.assertAllowed(target, slashed)
        for target in (ENDPOINT, ENDPOINT + "?_format=json", ENDPOINT + "/../metadata"):
            self.assertRefused(target, slashed)

    def test_empty_endpoint(self) -> None:
        self.assertFalse(within_endpoint("", "/metadata"))

    def test_segment_boundary(self) -> None:
        """
        C{.../fhirX} is not within C{.../fhir}.
        """
        self.assertRefused(ENDPOINT + "X/metadata")
        self.assertRefused(ENDPOINT + "X")
        self.assertRefused(ENDPOINT + ".evil/metadata")

    def test_ip_for_host(self) -> None:
        self.assertRefused("https://192.0.2.10/B82617/STU3/1/gpconnect/fhir/metadata")

    def test_explicit_port(self) -> None:
        self.assertRefused("https://orange.testlab.nhs.uk:443/B82617/STU3/1/gpconnect/fhir/metadata")

    def test_case(self) -> None:
        self.assertRefused("https://ORANGE.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata")
        self.assertRefused("https://orange.testlab.nhs.uk/B82617/STU3/1/GPConnect/fhir/metadata")
        self.assertRefused("HTTPS://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata")

    def test_other_scheme(self) -> None:
        self.assertRefused("http://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata")

    def test_other_capability(self) -> None:
        """
        The structured record's endpoint is not the metadata endpoint.
        """
        self.assertRefused(STRUCTURED_ENDPOINT + "/Patient/$gpc.getstructuredrecord")

    def test_other_host(self) -> None:
        self.assertRefused("https://orange.testlab.nhs.uk.evil.example/B82617/STU3/1/gpconnect/fhir/metadata")
        self.assertRefused("https://orange.testlab.nhs.uk@evil.example/B82617/STU3/1/gpconnect/fhir")
        self.assertRefused("https://evil.example/" + ENDPOINT)

    def test_dot_segments(self) -> None:
        """
        Dot segments after the endpoint would leave it once resolved.
        """
        for rest in ["/../../A20047/x", "/./metadata", "/%2e%2e/x", "/%2E./x", "/..", "/..\\x", "/a/..?x=1"]:
            self.assertRefused(ENDPOINT + rest)

    def test_trailing_slash_endpoint(self) -> None:
        """
        An endpoint registered with a trailing C{/} (OpenTest style, with an
        explicit port) is its own boundary.
        """
        handler = MessageHandler(
            "P", METADATA, "https://messagingportal.opentest.hscic.gov.uk:19192/B82617/STU3/1/gpconnect/", "h", "C"
        )
        self.assertAllowed(handler.endpoint + "fhir/metadata", handler)
        self.assertAllowed(handler.endpoint, handler)
        self.assertRefused("https://messagingportal.opentest.hscic.gov.uk:19192/B82617/STU3/1/gpconnect", handler)
        self.assertRefused("https://messagingportal.opentest.hscic.gov.uk/B82617/STU3/1/gpconnect/fhir", handler)
        self.assertRefused(handler.endpoint + "../x", handler)


class AgreementTests(SynchronousTestCase):
    """
    L{check_agreement}: the data-sharing allow-list.
    """

    def assertRefused(self, agreements: tuple[Agreement, ...], headers: SpineHeaders) -> None:
        with self.assertRaises(Forbidden) as caught:
            check_agreement(agreements, headers)
        self.assertEqual(
            caught.exception.token,
            f"FOT_CHECK_FAILED_MESSAGESENDER_{headers.sender}_MESSAGERECEIVER_{headers.receiver}",
        )

    def test_pair_present(self) -> None:
        check_agreement((Agreement(CONSUMER, PROVIDER),), spine())

    def test_absent(self) -> None:
        self.assertRefused((), spine())
        self.assertRefused((Agreement(LEGACY_CONSUMER, PROVIDER),), spine())

    def test_direction(self) -> None:
        """
        An agreement is one-way.
        """
        self.assertRefused((Agreement(PROVIDER, CONSUMER),), spine())

    def test_per_interaction(self) -> None:
        agreements = (Agreement(CONSUMER, PROVIDER, (METADATA,)),)
        check_agreement(agreements, spine())
        self.assertRefused(agreements, spine(interaction=STRUCTURED))

    def test_any_matching(self) -> None:
        """
        Several agreements for one pair add up.
        """
        agreements = (
            Agreement(CONSUMER, PROVIDER, (METADATA,)),
            Agreement(CONSUMER, PROVIDER, (STRUCTURED,)),
        )
        check_agreement(agreements, spine(interaction=STRUCTURED))


class OrderTests(TestCase):
    """
    Run in the pipeline's order, the first failing check decides.
    """

    async def authorise(self, headers: SpineHeaders, target: str, client: ClientIdentity | None) -> None:
        directory = MemoryDirectory(*parse_ldif(slapd.DEMO_LDIF.read_text()))
        await check_sender(directory, headers, client)
        handler = await check_receiver(directory, headers)
        check_target(handler, target)
        check_agreement((), headers)

    async def test_order(self) -> None:
        bad_target = "https://192.0.2.10/fhir"
        cases = [
            (spine(sender="1", receiver="2"), identity("x"), "ASID_CHECK_FAILED_MESSAGESENDER_1"),
            (spine(receiver="2", interaction=CARE_RECORD), identity("x"), "CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_200000000359"),
            (spine(receiver="2", interaction=CARE_RECORD), GPC001_CERT, "ASID_CHECK_FAILED_MESSAGESENDER_200000000359"),
            (spine(receiver="2"), GPC001_CERT, "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_2"),
            (spine(), GPC001_CERT, f"ENDPOINT_{ENDPOINT}_CPAID_{HANDLER.cpa_id}_VARIES_FROM_TARGETURL_{bad_target}"),
        ]
        for headers, client, token in cases:
            with self.assertRaises(Refusal) as caught:
                await self.authorise(headers, bad_target, client)
            self.assertEqual(caught.exception.token, token)
        with self.assertRaises(Forbidden) as caught:
            await self.authorise(spine(), ENDPOINT + "/metadata", GPC001_CERT)
        self.assertEqual(
            caught.exception.token,
            "FOT_CHECK_FAILED_MESSAGESENDER_200000000359_MESSAGERECEIVER_918999198738",
        )
