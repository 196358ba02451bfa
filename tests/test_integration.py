"""
The whole proxy as deployed: SDS over LDAP from a real slapd, throttling
shared through a real Redis, the audit trail in real files; consumers and
the provider over real mutual TLS.  Every refusal is checked for status,
token, "not forwarded" and its audit record.
"""

from __future__ import annotations

import time

import attrs
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from ssp import chain, demo
from ssp.verify import verify_files
from ssp.config import LimitSet, RateLimit, ThrottleConfig
from ssp.service import Concerns
from tests import redis, slapd
from tests.support import DEMO_LDIF, ENDPOINT, Provider, Proxy, spine_headers

HOST = "orange.testlab.nhs.uk"


class DeployedProxyTests(unittest.TestCase):
    skip = slapd.SKIP or redis.SKIP

    async def deploy(self, directory=None, throttle=None, agreements=None, sds=None):
        self.sds = sds or slapd.Slapd.shared([DEMO_LDIF])
        self.redis = redis.RedisServer.start_for(self)
        self.audit_dir = Path(self.mktemp()).resolve()
        provider = Provider(self)
        overrides = {
            "directory": {"kind": "ldap", "urls": (self.sds.url,), "ldif": None,
                          **(directory or {})},
            "throttle": attrs.evolve(throttle or ThrottleConfig(store="redis"), redis_url=self.redis.url),
            "audit": {"directory": self.audit_dir},
        }
        if agreements is not None:
            overrides["agreements"] = agreements
        proxy = await Proxy(self, provider, concerns=Concerns(), **overrides).start()
        return provider, proxy

    def records(self):
        return list(chain.read_records(chain.audit_files(self.audit_dir)))

    def completed(self):
        return [r for r in self.records() if r["event"] == "completed"]

    async def refused(self, proxy, provider, status, token, headers=None, path="metadata",
                      cert="consumer-0"):
        reply = await proxy.consumer(cert).get(path, headers if headers is not None else spine_headers())
        self.assertEqual(reply.status, status, reply.body)
        self.assertEqual(reply.token(), token)
        self.assertEqual(provider.seen, [])
        await proxy.service.stopService()
        [record] = self.completed()
        self.assertEqual((record["status"], record["decision"], record["token"]),
                         (status, "refused", token))
        self.assertTrue(verify_files(chain.audit_files(self.audit_dir)).ok)
        return reply

    async def test_admitted_request_is_forwarded_audited_and_rate_headed(self):
        provider, proxy = await self.deploy(throttle=ThrottleConfig(
            store="redis", consumer=LimitSet(RateLimit(10, 1.0, 5))))
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual((reply.header("X-Rate-Limit-Limit"), reply.header("X-Rate-Limit-Remaining")),
                         ("5", "4"))
        self.assertEqual(len(provider.seen), 1)
        await proxy.service.stopService()
        events = [(r["event"], r["status"]) for r in self.records()]
        self.assertEqual(events, [("authorised", 0), ("completed", 200)])
        self.assertTrue(verify_files(chain.audit_files(self.audit_dir)).ok)

    async def test_unknown_sender(self):
        provider, proxy = await self.deploy()
        await self.refused(proxy, provider, 403, "ASID_CHECK_FAILED_MESSAGESENDER_999999999999",
                           spine_headers(sender="999999999999"))

    async def test_sender_not_allowed_interaction_case_exact(self):
        provider, proxy = await self.deploy()
        upper = demo.METADATA_INTERACTION.upper().replace("URN:NHS:NAMES:SERVICES:",
                                                          "urn:nhs:names:services:")
        await self.refused(proxy, provider, 403,
                           f"ASID_CHECK_FAILED_MESSAGESENDER_{demo.CONSUMER_ASID}",
                           spine_headers(interaction=upper))

    async def test_certificate_fqdn_not_registered_for_sender(self):
        provider, proxy = await self.deploy()
        await self.refused(proxy, provider, 495,
                           f"CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_{demo.CONSUMER_ASID}",
                           cert="consumer-1")

    async def test_unknown_receiver(self):
        provider, proxy = await self.deploy()
        await self.refused(proxy, provider, 403,
                           "PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_111111111111",
                           spine_headers(receiver="111111111111"))

    async def test_target_outside_registered_endpoint(self):
        cpa = "S918999511007"
        for bad in (f"https://{HOST}/B82617/STU3/1/gpconnect/fhirX/metadata",
                    f"https://{HOST}:443/B82617/STU3/1/gpconnect/fhir/metadata",
                    "https://127.0.0.1/B82617/STU3/1/gpconnect/fhir/metadata",
                    f"https://{HOST.upper()}/B82617/STU3/1/gpconnect/fhir/metadata"):
            provider, proxy = await self.deploy()
            reply = await proxy.consumer().request("GET", f"/{bad}", spine_headers())
            self.assertEqual(reply.status, 400, bad)
            self.assertEqual(reply.token(),
                             f"ENDPOINT_{ENDPOINT}_CPAID_{cpa}_VARIES_FROM_TARGETURL_{bad}")
            self.assertEqual(provider.seen, [])

    async def test_no_data_sharing_agreement(self):
        provider, proxy = await self.deploy(agreements=())
        await self.refused(
            proxy, provider, 403,
            f"FOT_CHECK_FAILED_MESSAGESENDER_{demo.CONSUMER_ASID}_MESSAGERECEIVER_{demo.PROVIDER_ASID}")

    async def test_expired_token(self):
        provider, proxy = await self.deploy()
        token = demo.bearer_token(time.time() - 3600)
        reply = await proxy.consumer().get("metadata", spine_headers(token=token))
        self.assertEqual(reply.status, 400)
        self.assertIn("'exp'", reply.token())
        self.assertEqual(provider.seen, [])

    async def test_consumer_throttled_then_provider_throttled(self):
        hourly = RateLimit(rate=1, period=3600.0, burst=2)
        provider, proxy = await self.deploy(throttle=ThrottleConfig(
            store="redis", consumer=LimitSet(hourly)))
        statuses = []
        for _ in range(3):
            reply = await proxy.consumer().get("metadata")
            statuses.append(reply.status)
        self.assertEqual(statuses, [200, 200, 429])
        self.assertEqual(reply.token(), f"RATE_LIMIT_EXCEEDED_MESSAGESENDER_{demo.CONSUMER_ASID}")
        self.assertEqual(reply.header("X-Rate-Limit-Limit"), "2")
        self.assertEqual(reply.header("X-Rate-Limit-Remaining"), "0")
        self.assertGreater(int(reply.header("Retry-After")), 3000)
        self.assertEqual(len(provider.seen), 2)

    async def test_provider_global_limit(self):
        provider, proxy = await self.deploy(throttle=ThrottleConfig(
            store="redis", provider=LimitSet(RateLimit(rate=1, period=3600.0, burst=1))))
        first = await proxy.consumer().get("metadata")
        second = await proxy.consumer().get("metadata")
        self.assertEqual((first.status, second.status), (200, 503))
        self.assertEqual(second.token(), f"RATE_LIMIT_EXCEEDED_MESSAGERECEIVER_{demo.PROVIDER_ASID}")
        self.assertIsNotNone(second.header("Retry-After"))
        self.assertEqual(len(provider.seen), 1)

    async def test_sds_stopped_serves_stale_then_fails_closed(self):
        server = slapd.Slapd.start_for(self, [DEMO_LDIF])
        provider, proxy = await self.deploy(
            sds=server, directory={"cache_ttl": 0.2, "stale_limit": 1.0, "connect_timeout": 1.0,
                                   "receive_timeout": 1.0})
        self.assertEqual((await proxy.consumer().get("metadata")).status, 200)
        server.stop()
        await deferLater(reactor, 0.3)
        stale = await proxy.consumer().get("metadata")
        self.assertEqual(stale.status, 200)
        await deferLater(reactor, 1.2)
        closed = await proxy.consumer().get("metadata")
        self.assertEqual(closed.status, 503)
        self.assertEqual(closed.token(), "SDS_UNAVAILABLE")
        self.assertEqual(len(provider.seen), 2)
        server.start()
        recovered = await proxy.consumer().get("metadata")
        self.assertEqual(recovered.status, 200)
