"""
Tests for L{ssp.directory}: LDIF parsing, the shared L{IDirectory} contract
(run against the in-memory fake, the LDIF directory and LDAP to a real
slapd), the LDAP transport options, and the cache.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from ssp.config import ConfigError, DirectoryConfig
from ssp.directory import (
    CachingDirectory,
    LDAPDirectory,
    LDIFDirectory,
    directory_from_config,
    parse_ldif,
)
from ssp.errors import DirectoryUnavailable
from ssp.interfaces import IDirectory
from ssp.model import AccreditedSystem, MessageHandler
from ssp.testing import MemoryDirectory
from tests import slapd

PROVIDER = "918999198738"
PROVIDER_PK = "B82617-9198738"
LEGACY_PROVIDER_PK = "A20047-9198993"
CONSUMER = "200000000359"
CONSUMER_PK = "GPC001-0000359"
METADATA = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
LEGACY_METADATA = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata"
ENDPOINT = "https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir"

HOSTILE = ["*", ")(uniqueIdentifier=*", "9189991987*", "\\2a", "(objectClass=*)", "\x00"]


class ParseLDIFTests(SynchronousTestCase):
    """
    L{parse_ldif} reads SDS exports.
    """

    def test_demo_fixture(self) -> None:
        """
        The demo data set has four systems and forty-two endpoints (forty
        provider ones, one per consumer).
        """
        systems, handlers = parse_ldif(slapd.DEMO_LDIF.read_text())
        self.assertEqual(
            sorted(s.asid for s in systems),
            ["200000000359", "200000042019", "918999198738", "918999198993"],
        )
        self.assertEqual(len(handlers), 42)

    def test_demo_adds_consumer_handlers(self) -> None:
        """
        The demo LDIF adds one MHS record per consumer, with its FQDN and
        no GP Connect interaction.
        """
        _, handlers = parse_ldif(slapd.DEMO_LDIF.read_text())
        consumers = {h.party_key: h for h in handlers if "ssp-demo" in h.fqdn}
        self.assertEqual(
            {pk: h.fqdn for pk, h in consumers.items()},
            {CONSUMER_PK: "gpc001.ssp-demo.test", "R3U6M-831547": "k81045.ssp-demo.test"},
        )
        self.assertFalse(any("gpconnect" in h.interaction for h in consumers.values()))

    def test_system_fields(self) -> None:
        """
        An C{nhsAs} entry becomes an L{AccreditedSystem}.
        """
        systems, _ = parse_ldif(slapd.DEMO_LDIF.read_text())
        k81045 = [s for s in systems if s.asid == "200000042019"][0]
        self.assertEqual(k81045.ods_code, "K81045")
        self.assertEqual(k81045.party_key, "R3U6M-831547")
        self.assertEqual(k81045.product_name, "Continuum Health GPC")
        self.assertIn(LEGACY_METADATA, k81045.interactions)
        self.assertEqual(len(k81045.interactions), 17)

    def test_handler_fields(self) -> None:
        """
        An C{nhsMhs} entry becomes a L{MessageHandler}.
        """
        _, handlers = parse_ldif(slapd.DEMO_LDIF.read_text())
        [handler] = [
            h for h in handlers if h.party_key == PROVIDER_PK and h.interaction == METADATA
        ]
        self.assertEqual(
            handler,
            MessageHandler(
                party_key=PROVIDER_PK,
                interaction=METADATA,
                endpoint=ENDPOINT,
                fqdn="orange.testlab.nhs.uk",
                cpa_id=handler.cpa_id,
                ods_code="B82617",
            ),
        )
        self.assertTrue(handler.cpa_id.startswith("S"))

    def test_names_case_insensitive(self) -> None:
        """
        Attribute names and object classes are matched ignoring case;
        values keep theirs.
        """
        text = (
            "dn: uniqueIdentifier=1,ou=Services,o=nhs\n"
            "OBJECTCLASS: NHSAS\n"
            "UNIQUEIDENTIFIER: 1\n"
            "nhsidcode: Ab1\n"
            "NHSMHSPARTYKEY: Ab1-1\n"
            "NhSaSsVcIa: urn:X\n"
            "\n"
            "dn: uniqueIdentifier=M,ou=Services,o=nhs\n"
            "objectclass: nhsmhs\n"
            "nhsmhspartykey: Ab1-1\n"
            "NHSMHSSVCIA: urn:X\n"
            "NHSMHSENDPOINT: https://Host/Path\n"
            "nhsmhsfqdn: host\n"
            "NHSMHSCPAID: C1\n"
        )
        systems, handlers = parse_ldif(text)
        self.assertEqual(
            systems, [AccreditedSystem("1", "Ab1", "Ab1-1", frozenset({"urn:X"}))]
        )
        self.assertEqual(
            handlers, [MessageHandler("Ab1-1", "urn:X", "https://Host/Path", "host", "C1")]
        )

    def test_ldif_syntax(self) -> None:
        """
        Comments (even inside a record) are skipped, folded lines joined,
        base64 values decoded, change records and other classes ignored.
        """
        text = (
            "version: 1\n"
            "# a comment\n"
            "dn: uniqueIdentifier=1,ou=Services,o=nhs\n"
            "objectClass: nhsAs\n"
            "# nhsAsSvcIA: urn:commented-out\n"
            "uniqueIdentifier: 1\n"
            "nhsMHSPartyKey: P-1\n"
            "nhsAsSvcIA: urn:nhs:names:services:gpconnect:fhir:rest:read:me\n"
            " tadata-1\n"
            "nhsProductName:: Q2Fmw6k=\n"
            "\n\n"
            "dn: ou=Services,o=nhs\n"
            "objectClass: organizationalUnit\n"
            "\n"
            "dn: uniqueIdentifier=2,ou=Services,o=nhs\n"
            "changetype: delete\n"
            "objectClass: nhsAs\n"
            "uniqueIdentifier: 2\n"
        )
        systems, handlers = parse_ldif(text)
        self.assertEqual(
            systems,
            [AccreditedSystem("1", "", "P-1", frozenset({METADATA}), product_name="Café")],
        )
        self.assertEqual(handlers, [])

    def test_handler_without_endpoint_skipped(self) -> None:
        """
        An C{nhsMhs} entry without an endpoint (or party key or
        interaction) describes nothing the proxy can use.
        """
        text = (
            "dn: a\nobjectClass: nhsMhs\nnhsMHSPartyKey: P\nnhsMhsSvcIA: urn:x\n\n"
            "dn: b\nobjectClass: nhsMhs\nnhsMhsSvcIA: urn:x\nnhsMHSEndPoint: https://h\n\n"
            "dn: c\nobjectClass: nhsMhs\nnhsMHSPartyKey: P\nnhsMHSEndPoint: https://h\n"
        )
        self.assertEqual(parse_ldif(text), ([], []))

    def test_several_endpoints(self) -> None:
        """
        A multi-valued C{nhsMhsEndPoint} gives one handler per value.
        """
        text = (
            "dn: a\nobjectClass: nhsMhs\nnhsMHSPartyKey: P\nnhsMhsSvcIA: urn:x\n"
            "nhsMHSEndPoint: https://a\nnhsMHSEndPoint: https://b\n"
        )
        _, handlers = parse_ldif(text)
        self.assertEqual([h.endpoint for h in handlers], ["https://a", "https://b"])


class DirectoryContractMixin:
    """
    What every L{IDirectory} must do, with SDS matching rules, over the data
    in C{etc/demo-sds.ldif}.  Subclasses set C{self.directory}.
    """

    directory: Any

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IDirectory, self.directory))

    async def test_known_system(self) -> None:
        """
        An ASID finds its C{nhsAs} entry.
        """
        system = await self.directory.accredited_system(PROVIDER)
        self.assertEqual(system.asid, PROVIDER)
        self.assertEqual(system.ods_code, "B82617")
        self.assertEqual(system.party_key, PROVIDER_PK)
        self.assertIn(METADATA, system.interactions)

    async def test_unknown_system(self) -> None:
        self.assertIsNone(await self.directory.accredited_system("999999999999"))

    async def test_asid_exact(self) -> None:
        """
        ASIDs match exactly: no padding, prefix or leading zero.
        """
        for asid in [" " + PROVIDER, PROVIDER + " ", "0" + PROVIDER, PROVIDER[:-1], ""]:
            self.assertIsNone(await self.directory.accredited_system(asid), asid)

    async def test_filter_values_escaped(self) -> None:
        """
        LDAP filter syntax in a request value matches nothing.
        """
        for value in HOSTILE:
            self.assertIsNone(await self.directory.accredited_system(value), value)
            self.assertEqual(await self.directory.message_handlers(value, None), (), value)
            self.assertEqual(
                await self.directory.message_handlers(PROVIDER_PK, value), (), value
            )

    async def test_handler_for_interaction(self) -> None:
        """
        A party key and interaction find the one endpoint registered.
        """
        [handler] = await self.directory.message_handlers(PROVIDER_PK, METADATA)
        self.assertEqual(handler.endpoint, ENDPOINT)
        self.assertEqual(handler.fqdn, "orange.testlab.nhs.uk")
        self.assertEqual(handler.interaction, METADATA)
        self.assertEqual(handler.ods_code, "B82617")
        self.assertTrue(handler.cpa_id)

    async def test_interaction_case_exact(self) -> None:
        """
        An interaction ID in another case matches nothing.
        """
        for interaction in [METADATA.upper(), METADATA.replace("gpconnect", "GPConnect")]:
            self.assertEqual(
                await self.directory.message_handlers(PROVIDER_PK, interaction), ()
            )

    async def test_party_key_ignores_case(self) -> None:
        """
        A party key in another case still matches.
        """
        expected = await self.directory.message_handlers(PROVIDER_PK, METADATA)
        self.assertEqual(
            await self.directory.message_handlers(PROVIDER_PK.lower(), METADATA), expected
        )

    async def test_all_handlers(self) -> None:
        """
        Without an interaction, all of a party key's endpoints.
        """
        handlers = await self.directory.message_handlers(PROVIDER_PK, None)
        self.assertEqual(len(handlers), 21)
        self.assertEqual({h.party_key for h in handlers}, {PROVIDER_PK})
        [consumer] = await self.directory.message_handlers(CONSUMER_PK, None)
        self.assertEqual(consumer.fqdn, "gpc001.ssp-demo.test")

    async def test_legacy_interaction(self) -> None:
        """
        Legacy un-versioned interaction IDs are distinct, registered values.
        """
        [legacy] = await self.directory.message_handlers(LEGACY_PROVIDER_PK, LEGACY_METADATA)
        [current] = await self.directory.message_handlers(LEGACY_PROVIDER_PK, METADATA)
        self.assertEqual(legacy.endpoint, "https://orange.testlab.nhs.uk/gpconnect-demonstrator/v0/fhir")
        self.assertEqual(current.endpoint, "https://orange.testlab.nhs.uk/gpconnect-demonstrator/v1/fhir")
        self.assertEqual(await self.directory.message_handlers(PROVIDER_PK, LEGACY_METADATA), ())

    async def test_unknown_party_key(self) -> None:
        self.assertEqual(await self.directory.message_handlers("X99999-0000000", None), ())
        self.assertEqual(await self.directory.message_handlers("", METADATA), ())

    async def test_empty_interaction(self) -> None:
        self.assertEqual(await self.directory.message_handlers(PROVIDER_PK, ""), ())


class MemoryDirectoryContractTests(DirectoryContractMixin, TestCase):
    def setUp(self) -> None:
        systems, handlers = parse_ldif(slapd.DEMO_LDIF.read_text())
        self.directory = MemoryDirectory(systems, handlers)


class LDIFDirectoryContractTests(DirectoryContractMixin, TestCase):
    def setUp(self) -> None:
        self.directory = LDIFDirectory.from_file(slapd.DEMO_LDIF)

    def test_first_system_wins(self) -> None:
        """
        Of two C{nhsAs} entries for one ASID, the first in the file counts.
        """
        directory = LDIFDirectory(
            [AccreditedSystem("1", "A", "P-A", frozenset()), AccreditedSystem("1", "B", "P-B", frozenset())],
            [],
        )
        self.assertEqual(self.successResultOf(directory.accredited_system("1")).ods_code, "A")


def ldap_config(*urls: str, **options: Any) -> DirectoryConfig:
    settings = dict(kind="ldap", urls=urls, connect_timeout=1.0, receive_timeout=1.0, time_limit=1)
    settings.update(options)
    return DirectoryConfig(**settings)


def started(test: TestCase, config: DirectoryConfig, **options: Any) -> LDAPDirectory:
    directory = LDAPDirectory(config, reactor, **options)
    directory.start()
    test.addCleanup(directory.stop)
    return directory


class LDAPDirectoryContractTests(DirectoryContractMixin, TestCase):
    skip = slapd.SKIP

    def setUp(self) -> None:
        self.sds = slapd.Slapd.shared([slapd.DEMO_LDIF])
        self.directory = started(self, ldap_config(self.sds.url))

    async def test_one_search_per_lookup(self) -> None:
        """
        Every lookup is one LDAP search (caching is another layer's job).
        """
        await self.directory.accredited_system(PROVIDER)
        await self.directory.message_handlers(PROVIDER_PK, METADATA)
        self.assertEqual(self.directory.searches, 2)


class SchemaFixtureTests(TestCase):
    """
    The repository's own SDS schema and synthetic LDIF behave like SDS in a
    real slapd: what the proxy reads is required, matching follows SDS.
    """

    skip = slapd.SKIP

    def setUp(self) -> None:
        self.sds = slapd.Slapd.shared([slapd.SYNTHETIC_LDIF])
        self.directory = started(self, ldap_config(self.sds.url))

    async def test_synthetic_lookup(self) -> None:
        """
        The provider's system and handler are found; the interaction ID
        matches case-exactly and the party key case-insensitively.
        """
        system = await self.directory.accredited_system("900000000001")
        self.assertEqual((system.ods_code, system.party_key), ("X00001", "X00001-0000001"))
        [handler] = await self.directory.message_handlers("x00001-0000001", METADATA)
        self.assertEqual(handler.fqdn, "provider.ssp-fixture.test")
        self.assertEqual(
            await self.directory.message_handlers("X00001-0000001", METADATA.upper()), ()
        )

    def test_required_attributes(self) -> None:
        """
        slapd refuses an nhsMhs entry without an attribute the proxy reads.
        """
        entry = slapd.SYNTHETIC_LDIF.read_text().split("\n\n")[2]
        self.assertIn("nhsMhsFQDN:", entry)
        broken = Path(self.mktemp())
        broken.write_text("\n".join(l for l in entry.splitlines() if "nhsMhsFQDN" not in l))
        error = self.assertRaises(RuntimeError, slapd.Slapd.launch, [broken])
        self.assertIn("nhsMhsFQDN", str(error))


class LDAPTransportTests(TestCase):
    """
    How L{LDAPDirectory} reaches SDS: failover, binding, TLS, limits.
    """

    skip = slapd.SKIP

    def setUp(self) -> None:
        self.sds = slapd.Slapd.shared([slapd.DEMO_LDIF])

    def dead_url(self) -> str:
        return f"ldap://127.0.0.1:{slapd.free_port()}"

    async def assertAnswers(self, directory: LDAPDirectory) -> None:
        system = await directory.accredited_system(CONSUMER)
        self.assertEqual(system.party_key, CONSUMER_PK)

    async def assertUnavailable(self, directory: LDAPDirectory) -> None:
        with self.assertRaises(DirectoryUnavailable):
            await directory.accredited_system(CONSUMER)

    async def test_failover(self) -> None:
        """
        With the first server down, the next one answers, in either pool
        strategy.
        """
        for strategy in ["first", "round_robin"]:
            config = ldap_config(self.dead_url(), self.sds.url, pool_strategy=strategy)
            directory = started(self, config)
            for _ in range(3):
                await self.assertAnswers(directory)

    async def test_all_servers_down(self) -> None:
        """
        With no server reachable, lookups fail with L{DirectoryUnavailable}.
        """
        directory = started(self, ldap_config(self.dead_url(), self.dead_url()))
        await self.assertUnavailable(directory)

    async def test_bind(self) -> None:
        """
        A bind DN authenticates with the password file's first line.
        """
        password = Path(self.mktemp())
        password.write_text(slapd.ADMIN_PASSWORD + "\n")
        config = ldap_config(self.sds.url, bind_dn=slapd.ADMIN_DN, password_file=password)
        await self.assertAnswers(started(self, config))

    async def test_bad_credentials(self) -> None:
        password = Path(self.mktemp())
        password.write_text("wrong\n")
        config = ldap_config(self.sds.url, bind_dn=slapd.ADMIN_DN, password_file=password)
        await self.assertUnavailable(started(self, config))

    async def test_receive_timeout(self) -> None:
        """
        A server that accepts connections but never answers costs at most
        the configured time-outs.
        """
        silent = socket.socket()
        self.addCleanup(silent.close)
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"ldap://127.0.0.1:{silent.getsockname()[1]}"
        directory = started(self, ldap_config(url, receive_timeout=0.3, connect_timeout=0.3))
        started_at = reactor.seconds()
        await self.assertUnavailable(directory)
        self.assertLess(reactor.seconds() - started_at, 3.0)

    def test_deadline(self) -> None:
        """
        The caller's wait is bounded by the sum of the time-outs even if no
        thread ever runs the search.
        """
        clock = Clock()
        config = ldap_config(self.sds.url, self.sds.url, connect_timeout=0.5, receive_timeout=1.5, time_limit=3)
        directory = LDAPDirectory(config, clock)  # pool never started
        d = directory.accredited_system(CONSUMER)
        clock.advance(2 * 0.5 * 2 + 2 + 3 - 0.01)
        self.assertNoResult(d)
        clock.advance(0.01)
        self.failureResultOf(d, DirectoryUnavailable)

    async def test_concurrent_lookups(self) -> None:
        """
        More concurrent lookups than connections all complete.
        """
        directory = started(self, ldap_config(self.sds.url, connections=2,
                                              max_queued_searches=18))
        results = await gatherResults(
            [directory.accredited_system(CONSUMER) for _ in range(10)]
            + [directory.message_handlers(PROVIDER_PK, METADATA) for _ in range(10)]
        )
        self.assertEqual({r.asid for r in results[:10]}, {CONSUMER})
        self.assertEqual({r[0].endpoint for r in results[10:]}, {ENDPOINT})


    async def test_saturated(self) -> None:
        """
        Beyond C{connections} running and C{max_queued_searches} waiting
        searches, a lookup fails at once; a queued search whose caller
        timed out is dropped, not run once a thread is free.
        """
        config = ldap_config(self.sds.url, connections=1, max_queued_searches=2,
                             connect_timeout=0.1, receive_timeout=0.1)
        directory = started(self, config)
        release = threading.Event()
        self.addCleanup(release.set)
        directory._threads.callInThread(release.wait)  # the only LDAP thread is stuck
        queued = [directory.accredited_system(CONSUMER) for _ in range(3)]
        self.failureResultOf(directory.accredited_system(CONSUMER), DirectoryUnavailable)
        self.assertEqual((directory.searches, directory.refused), (3, 1))
        for d in queued:
            with self.assertRaises(DirectoryUnavailable):
                await d
        release.set()
        deadline = reactor.seconds() + 10
        while directory.dropped < 3:
            self.assertLess(reactor.seconds(), deadline, "timed-out searches not dropped")
            await deferLater(reactor, 0.02)
        self.assertEqual((await directory.accredited_system(CONSUMER)).asid, CONSUMER)
        self.assertEqual(directory.dropped, 3)


class LDAPTLSTests(TestCase):
    """
    LDAPS and StartTLS validate SDS's certificate against the configured CA.
    """

    skip = slapd.SKIP

    def setUp(self) -> None:
        self.sds = slapd.Slapd.start_for(self, [slapd.DEMO_LDIF], tls=True)
        self.tls = self.sds.tls

    async def answers(self, config: DirectoryConfig, **options: Any) -> bool:
        directory = started(self, config, **options)
        try:
            await directory.accredited_system(CONSUMER)
        except DirectoryUnavailable:
            return False
        return True

    async def test_ldaps(self) -> None:
        self.assertTrue(await self.answers(ldap_config(self.sds.ldaps_url, ca=self.tls.ca)))

    async def test_ldaps_untrusted(self) -> None:
        self.assertFalse(await self.answers(ldap_config(self.sds.ldaps_url, ca=self.tls.other_ca)))

    async def test_start_tls(self) -> None:
        self.assertTrue(
            await self.answers(ldap_config(self.sds.url, ca=self.tls.ca, start_tls=True))
        )

    async def test_start_tls_untrusted(self) -> None:
        self.assertFalse(
            await self.answers(ldap_config(self.sds.url, ca=self.tls.other_ca, start_tls=True))
        )


class LDAPClientCertificateTests(TestCase):
    """
    SDS demanding TLS client authentication gets the proxy's certificate.
    """

    skip = slapd.SKIP

    async def test_client_certificate(self) -> None:
        sds = slapd.Slapd.start_for(
            self, [slapd.DEMO_LDIF], tls=True, require_client_certificate=True
        )
        config = ldap_config(sds.ldaps_url, ca=sds.tls.ca)
        without = started(self, config)
        with self.assertRaises(DirectoryUnavailable):
            await without.accredited_system(CONSUMER)
        with_cert = started(
            self, config, client_certificate=(sds.tls.client_certificate, sds.tls.client_key)
        )
        self.assertEqual((await with_cert.accredited_system(CONSUMER)).asid, CONSUMER)


@implementer(IDirectory)
class PendingDirectory:
    """
    A directory that answers only when the test says so.

    @ivar calls: C{(method, args, Deferred)} per lookup made.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...], Deferred[Any]]] = []

    def _call(self, method: str, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.calls.append((method, args, d))
        return d

    def accredited_system(self, asid: str) -> Deferred[Any]:
        return self._call("accredited_system", asid)

    def message_handlers(self, party_key: str, interaction: str | None) -> Deferred[Any]:
        return self._call("message_handlers", party_key, interaction)

    def knows_interaction(self, interaction: str) -> bool:
        return False


SYSTEM = AccreditedSystem(CONSUMER, "GPC001", CONSUMER_PK, frozenset({METADATA}))
HANDLER = MessageHandler(PROVIDER_PK, METADATA, ENDPOINT, "orange.testlab.nhs.uk", "S1")


class CachingDirectoryTests(SynchronousTestCase):
    """
    L{CachingDirectory}: TTL, negative caching, single-flight, stale-if-error.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.backend = MemoryDirectory([SYSTEM], [HANDLER])
        self.cache = CachingDirectory(
            self.backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600
        )

    def lookup(self, asid: str = CONSUMER) -> Any:
        return self.successResultOf(self.cache.accredited_system(asid))

    def test_provides_interface(self) -> None:
        self.assertTrue(verifyObject(IDirectory, self.cache))

    def test_fresh_for_ttl(self) -> None:
        """
        An answer is reused until C{ttl} seconds have passed.
        """
        self.assertEqual(self.lookup(), SYSTEM)
        self.clock.advance(299.9)
        self.assertEqual(self.lookup(), SYSTEM)
        self.assertEqual(self.backend.queries, 1)
        self.clock.advance(0.1)
        self.assertEqual(self.lookup(), SYSTEM)
        self.assertEqual(self.backend.queries, 2)
        self.assertEqual((self.cache.hits, self.cache.misses), (1, 2))

    def test_keys(self) -> None:
        """
        Different arguments are different entries.
        """
        self.lookup(CONSUMER)
        self.lookup(PROVIDER)
        self.successResultOf(self.cache.message_handlers(PROVIDER_PK, METADATA))
        self.successResultOf(self.cache.message_handlers(PROVIDER_PK, None))
        self.assertEqual(
            self.successResultOf(self.cache.message_handlers(PROVIDER_PK, METADATA)),
            (HANDLER,),
        )
        self.assertEqual(self.backend.queries, 4)

    def test_negative_ttl(self) -> None:
        """
        "Not there" is cached for C{negative_ttl}, not C{ttl}.
        """
        self.assertIsNone(self.lookup(PROVIDER))
        self.assertEqual(self.successResultOf(self.cache.message_handlers("X", None)), ())
        self.clock.advance(59)
        self.assertIsNone(self.lookup(PROVIDER))
        self.successResultOf(self.cache.message_handlers("X", None))
        self.assertEqual(self.backend.queries, 2)
        self.clock.advance(1)
        self.assertIsNone(self.lookup(PROVIDER))
        self.successResultOf(self.cache.message_handlers("X", None))
        self.assertEqual(self.backend.queries, 4)

    def test_zero_ttl(self) -> None:
        """
        C{ttl = 0} asks SDS every time.
        """
        cache = CachingDirectory(self.backend, self.clock, ttl=0, negative_ttl=0, stale_limit=600)
        self.successResultOf(cache.accredited_system(CONSUMER))
        self.successResultOf(cache.accredited_system(CONSUMER))
        self.assertEqual(self.backend.queries, 2)

    def test_stale_if_error(self) -> None:
        """
        While SDS is down, an answer is served up to C{stale_limit} seconds
        past its freshness; after that the lookup fails (fail closed).
        """
        self.lookup()
        self.backend.available = False
        self.clock.advance(300 + 600)
        self.assertEqual(self.lookup(), SYSTEM)
        self.assertEqual(self.cache.stale_served, 1)
        self.clock.advance(0.001)
        self.failureResultOf(self.cache.accredited_system(CONSUMER), DirectoryUnavailable)
        self.backend.available = True
        self.assertEqual(self.lookup(), SYSTEM)
        self.assertEqual(self.cache.stale_served, 1)

    def test_stale_negative(self) -> None:
        """
        A cached "not there" is served stale too, within its own horizon.
        """
        self.lookup(PROVIDER)
        self.backend.available = False
        self.clock.advance(60 + 600)
        self.assertIsNone(self.lookup(PROVIDER))
        self.clock.advance(1)
        self.failureResultOf(self.cache.accredited_system(PROVIDER), DirectoryUnavailable)

    def test_unavailable_without_entry(self) -> None:
        """
        Nothing cached and SDS down: L{DirectoryUnavailable}.
        """
        self.backend.available = False
        self.failureResultOf(self.cache.accredited_system(CONSUMER), DirectoryUnavailable)

    def test_other_errors_propagate(self) -> None:
        """
        Only L{DirectoryUnavailable} is masked by stale data; a bug is not.
        """
        backend = PendingDirectory()
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600)
        cache.accredited_system(CONSUMER)
        backend.calls[0][2].callback(SYSTEM)
        self.clock.advance(301)
        d = cache.accredited_system(CONSUMER)
        backend.calls[1][2].errback(ZeroDivisionError())
        self.failureResultOf(d, ZeroDivisionError)

    def test_single_flight(self) -> None:
        """
        Concurrent identical lookups share one query; each gets the answer.
        """
        backend = PendingDirectory()
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600)
        waiting = [cache.accredited_system(CONSUMER) for _ in range(50)]
        other = cache.accredited_system(PROVIDER)
        self.assertEqual([c[:2] for c in backend.calls], [("accredited_system", (CONSUMER,)), ("accredited_system", (PROVIDER,))])
        for d in waiting:
            self.assertNoResult(d)
        backend.calls[0][2].callback(SYSTEM)
        self.assertEqual({self.successResultOf(d) for d in waiting}, {SYSTEM})
        self.assertNoResult(other)
        self.assertEqual(self.successResultOf(cache.accredited_system(CONSUMER)), SYSTEM)
        self.assertEqual(len(backend.calls), 2)

    def test_cancel_one_waiter(self) -> None:
        """
        Cancelling one caller cancels neither the query nor the others.
        """
        backend = PendingDirectory()
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600)
        first, second = cache.accredited_system(CONSUMER), cache.accredited_system(CONSUMER)
        first.cancel()
        self.failureResultOf(first, CancelledError)
        query = backend.calls[0][2]
        self.assertFalse(query.called)
        query.callback(SYSTEM)
        self.assertEqual(self.successResultOf(second), SYSTEM)
        self.assertEqual(self.successResultOf(cache.accredited_system(CONSUMER)), SYSTEM)

    def test_all_cancelled_still_caches(self) -> None:
        """
        The answer to a query everyone stopped waiting for is still kept.
        """
        backend = PendingDirectory()
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600)
        d = cache.accredited_system(CONSUMER)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        backend.calls[0][2].callback(SYSTEM)
        self.assertEqual(self.successResultOf(cache.accredited_system(CONSUMER)), SYSTEM)
        self.assertEqual(len(backend.calls), 1)

    def test_failure_to_all_waiters(self) -> None:
        backend = PendingDirectory()
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600)
        waiting = [cache.accredited_system(CONSUMER) for _ in range(3)]
        backend.calls[0][2].errback(DirectoryUnavailable())
        for d in waiting:
            self.failureResultOf(d, DirectoryUnavailable)
        cache.accredited_system(CONSUMER)
        self.assertEqual(len(backend.calls), 2)

    def test_bounded(self) -> None:
        """
        At most C{max_entries} entries; the oldest go first.
        """
        systems = [AccreditedSystem(str(i), "X", f"P-{i}", frozenset()) for i in range(5)]
        backend = MemoryDirectory(systems, [])
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600, max_entries=3)
        for i in range(5):
            self.successResultOf(cache.accredited_system(str(i)))
        for i in (2, 3, 4):
            self.successResultOf(cache.accredited_system(str(i)))
        self.assertEqual(backend.queries, 5)
        self.successResultOf(cache.accredited_system("0"))
        self.assertEqual(backend.queries, 6)


    def test_least_recently_used_goes(self) -> None:
        """
        A cached answer that is read again stays; the least recently read
        one makes room.
        """
        systems = [AccreditedSystem(str(i), "X", f"P-{i}", frozenset()) for i in range(4)]
        backend = MemoryDirectory(systems, [])
        cache = CachingDirectory(backend, self.clock, ttl=300, negative_ttl=60, stale_limit=600,
                                 max_entries=3)
        for asid in ("0", "1", "2", "0", "3", "0", "2", "3"):
            self.successResultOf(cache.accredited_system(asid))
        self.assertEqual(backend.queries, 4)
        self.successResultOf(cache.accredited_system("1"))
        self.assertEqual(backend.queries, 5)

    def test_negative_answers_bounded_apart(self) -> None:
        """
        Unknown ASIDs fill a bounded negative cache of their own, and evict
        none of the systems in use.
        """
        cache = CachingDirectory(self.backend, self.clock, ttl=300, negative_ttl=60,
                                 stale_limit=600, max_entries=2, max_negative=5)
        self.successResultOf(cache.accredited_system(CONSUMER))
        self.successResultOf(cache.message_handlers(PROVIDER_PK, METADATA))
        for n in range(1000):
            self.assertIsNone(self.successResultOf(cache.accredited_system(f"9{n}")))
        self.assertEqual(cache.size, 2 + 5)
        queries = self.backend.queries
        self.successResultOf(cache.accredited_system(CONSUMER))
        self.successResultOf(cache.message_handlers(PROVIDER_PK, METADATA))
        self.assertEqual(self.backend.queries, queries)

    def test_knows_interactions_it_has_seen(self) -> None:
        """
        The interactions of cached answers are known (for metric labels);
        one only asked about is not.
        """
        cache = CachingDirectory(self.backend, self.clock, ttl=300, negative_ttl=60,
                                 stale_limit=600)
        self.successResultOf(cache.message_handlers(PROVIDER_PK, "urn:made:up"))
        self.assertFalse(cache.knows_interaction("urn:made:up"))
        self.successResultOf(cache.accredited_system(CONSUMER))
        self.assertTrue(cache.knows_interaction(METADATA))


class CachingOverSlapdTests(TestCase):
    """
    The cache in front of a real slapd: single-flight and an SDS outage.
    """

    skip = slapd.SKIP

    async def test_one_query_for_many_callers(self) -> None:
        """
        Fifty concurrent identical lookups make one LDAP search.
        """
        sds = slapd.Slapd.shared([slapd.DEMO_LDIF])
        ldap = started(self, ldap_config(sds.url))
        cache = CachingDirectory(ldap, Clock(), ttl=300, negative_ttl=60, stale_limit=600)
        results = await gatherResults([cache.message_handlers(PROVIDER_PK, METADATA) for _ in range(50)])
        self.assertEqual({r[0].endpoint for r in results}, {ENDPOINT})
        self.assertEqual(ldap.searches, 1)
        self.assertEqual(cache.misses, 50)

    async def test_outage(self) -> None:
        """
        slapd stopped mid-run: stale answers within the limit, then
        L{DirectoryUnavailable}; fresh answers again once it is back.
        """
        sds = slapd.Slapd.start_for(self, [slapd.DEMO_LDIF])
        ldap = started(self, ldap_config(sds.url))
        clock = Clock()
        cache = CachingDirectory(ldap, clock, ttl=300, negative_ttl=60, stale_limit=600)
        system = await cache.accredited_system(CONSUMER)
        handlers = await cache.message_handlers(PROVIDER_PK, METADATA)

        sds.stop()
        clock.advance(400)
        self.assertEqual(await cache.accredited_system(CONSUMER), system)
        self.assertEqual(await cache.message_handlers(PROVIDER_PK, METADATA), handlers)
        self.assertEqual(cache.stale_served, 2)
        with self.assertRaises(DirectoryUnavailable):
            await cache.accredited_system(PROVIDER)  # never cached

        clock.advance(501)
        with self.assertRaises(DirectoryUnavailable):
            await cache.accredited_system(CONSUMER)

        sds.start()
        self.assertEqual(await cache.accredited_system(CONSUMER), system)
        self.assertEqual((await cache.accredited_system(PROVIDER)).asid, PROVIDER)


class DirectoryFromConfigTests(TestCase):
    def test_ldif(self) -> None:
        directory, service = directory_from_config(
            DirectoryConfig(kind="ldif", ldif=slapd.DEMO_LDIF), Clock(), reactor
        )
        self.assertIsInstance(directory, LDIFDirectory)
        self.assertTrue(IService.providedBy(service))
        service.startService()
        service.stopService()
        self.assertEqual(
            self.successResultOf(directory.accredited_system(CONSUMER)).party_key, CONSUMER_PK
        )

    def test_ldif_required(self) -> None:
        with self.assertRaises(ConfigError) as e:
            directory_from_config(DirectoryConfig(kind="ldif"), Clock(), reactor)
        self.assertIn("directory.ldif", str(e.exception))

    def test_ldif_unreadable(self) -> None:
        with self.assertRaises(ConfigError) as e:
            directory_from_config(DirectoryConfig(kind="ldif", ldif=Path(self.mktemp())), Clock(), reactor)
        self.assertIn("directory.ldif", str(e.exception))

    def test_ldap_urls_required(self) -> None:
        with self.assertRaises(ConfigError) as e:
            directory_from_config(DirectoryConfig(kind="ldap"), Clock(), reactor)
        self.assertIn("directory.urls", str(e.exception))

    def test_ldap_files_missing(self) -> None:
        """
        Unreadable CA or password files are configuration errors naming the
        key.
        """
        missing = Path(self.mktemp())
        for key, options in [("directory.ca", {"ca": missing}), ("directory.password_file", {"password_file": missing})]:
            with self.assertRaises(ConfigError) as e:
                directory_from_config(ldap_config("ldaps://sds.invalid", **options), Clock(), reactor)
            self.assertIn(key, str(e.exception))

    async def test_ldap(self) -> None:
        """
        C{kind = "ldap"} is a cache over LDAP whose threads run with the
        service.
        """
        if slapd.SKIP:
            self.skipTest(slapd.SKIP)
        sds = slapd.Slapd.shared([slapd.DEMO_LDIF])
        directory, service = directory_from_config(
            ldap_config(sds.url, cache_ttl=30.0), Clock(), reactor
        )
        self.assertIsInstance(directory, CachingDirectory)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertEqual((await directory.accredited_system(CONSUMER)).asid, CONSUMER)
        await directory.accredited_system(CONSUMER)
        self.assertEqual(directory.hits, 1)
