"""
CORS preflight answers and response headers (SPEC §9.5).
"""

from __future__ import annotations

from twisted.trial import unittest
from twisted.web.http_headers import Headers

from ssp import cors
from ssp.config import CorsConfig
from ssp.errors import Forbidden
from tests.support import ENDPOINT, Provider, Proxy, spine_headers

CONFIG = CorsConfig(origins=("https://portal.example",), max_age=120)


def preflight_headers(origin: str = "https://portal.example", method: str = "GET",
                      **extra: str) -> Headers:
    headers = Headers({"Origin": [origin], "Access-Control-Request-Method": [method]})
    for name, value in extra.items():
        headers.addRawHeader(name.replace("_", "-"), value)
    return headers


class PreflightTests(unittest.TestCase):
    def test_detection(self) -> None:
        """
        Only C{OPTIONS} with both C{Origin} and
        C{Access-Control-Request-Method} is a preflight.
        """
        self.assertTrue(cors.is_preflight(b"OPTIONS", preflight_headers()))
        self.assertFalse(cors.is_preflight(b"GET", preflight_headers()))
        self.assertFalse(cors.is_preflight(b"OPTIONS", Headers({"Origin": ["https://x"]})))

    def test_configured_origin(self) -> None:
        answer = dict(cors.preflight(CONFIG, preflight_headers(
            Access_Control_Request_Headers="ssp-traceid, authorization")))
        self.assertEqual(answer[b"Access-Control-Allow-Origin"], b"https://portal.example")
        self.assertEqual(answer[b"Access-Control-Max-Age"], b"120")
        self.assertEqual(answer[b"Access-Control-Allow-Headers"], b"ssp-traceid, authorization")
        self.assertIn(b"PATCH", answer[b"Access-Control-Allow-Methods"])
        self.assertEqual(answer[b"Vary"], b"Origin")

    def test_refused(self) -> None:
        """
        An unconfigured origin, a verb the proxy does not forward, and a
        repeated C{Origin} are refused with 403.
        """
        doubled = preflight_headers()
        doubled.addRawHeader(b"Origin", b"https://evil.example")
        for headers in (preflight_headers(origin="https://evil.example"),
                        preflight_headers(method="TRACE"), doubled):
            with self.assertRaises(Forbidden) as caught:
                cors.preflight(CONFIG, headers)
            self.assertTrue(caught.exception.token.startswith("CORS_PREFLIGHT_REFUSED_"))
        self.assertRaises(Forbidden, cors.preflight, CorsConfig(), preflight_headers())


class ResponseHeaderTests(unittest.TestCase):
    def test_configured_origin(self) -> None:
        answer = dict(cors.response_headers(CONFIG, Headers({"Origin": ["https://portal.example"]})))
        self.assertEqual(answer[b"Access-Control-Allow-Origin"], b"https://portal.example")
        self.assertIn(b"X-Rate-Limit-Remaining", answer[b"Access-Control-Expose-Headers"])

    def test_other_or_no_origin(self) -> None:
        self.assertEqual(cors.response_headers(CONFIG, Headers({"Origin": ["https://x"]})), [])
        self.assertEqual(cors.response_headers(CONFIG, Headers()), [])


class EndToEndTests(unittest.TestCase):
    """
    Through the real proxy: preflights are answered and never forwarded,
    other C{OPTIONS} requests are, and responses carry the CORS headers.
    """

    timeout = 60

    async def setUp(self) -> None:
        self.provider = Provider(self)
        self.proxy = await Proxy(self, self.provider,
                                 cors={"origins": ("https://portal.example",)}).start()

    async def test_preflight_answered(self) -> None:
        reply = await self.proxy.consumer().request(
            "OPTIONS", f"/{ENDPOINT}/Patient", {
                "Origin": "https://portal.example",
                "Access-Control-Request-Method": "GET",
                "Access-Control-Request-Headers": "ssp-traceid, ssp-from, authorization"})
        self.assertEqual(reply.status, 204)
        self.assertEqual(reply.header("Access-Control-Allow-Origin"), "https://portal.example")
        self.assertEqual(reply.header("Access-Control-Allow-Headers"),
                         "ssp-traceid, ssp-from, authorization")
        self.assertIsNotNone(reply.header("Strict-Transport-Security"))
        self.assertEqual(self.provider.seen, [])
        (record,) = self.proxy.audit.completed()
        self.assertEqual((record.decision, record.status), ("answered", 204))

    async def test_preflight_refused(self) -> None:
        """
        An unconfigured origin gets 403 (audited, not forwarded); without a
        client certificate a preflight gets 496 like any request.
        """
        preflight = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
        reply = await self.proxy.consumer().request("OPTIONS", f"/{ENDPOINT}/Patient", preflight)
        self.assertEqual((reply.status, reply.token()),
                         (403, "CORS_PREFLIGHT_REFUSED_https://evil.example"))
        self.assertIsNone(reply.header("Access-Control-Allow-Origin"))
        preflight["Origin"] = "https://portal.example"
        anonymous = await self.proxy.consumer(cert=None).request(
            "OPTIONS", f"/{ENDPOINT}/Patient", preflight)
        self.assertEqual(anonymous.status, 496)
        self.assertEqual(self.provider.seen, [])
        self.assertEqual([r.status for r in self.proxy.audit.completed()], [403, 496])

    async def test_plain_options_forwarded(self) -> None:
        """
        C{OPTIONS} without the preflight headers is proxied like any verb,
        with every check applied.
        """
        reply = await self.proxy.consumer().request(
            "OPTIONS", f"/{ENDPOINT}/metadata", spine_headers())
        self.assertEqual(reply.status, 200)
        self.assertEqual([s.method for s in self.provider.seen], [b"OPTIONS"])

    async def test_response_headers(self) -> None:
        """
        Relayed and refused responses to a configured origin carry
        C{Access-Control-Allow-Origin}, so the page can read them.
        """
        consumer = self.proxy.consumer()
        ok = await consumer.get("metadata", spine_headers(Origin="https://portal.example"))
        refused = await consumer.get("metadata", spine_headers(
            sender="999999999999", Origin="https://portal.example"))
        other = await consumer.get("metadata", spine_headers(Origin="https://evil.example"))
        self.assertEqual([(r.status, r.header("Access-Control-Allow-Origin"))
                          for r in (ok, refused, other)],
                         [(200, "https://portal.example"), (403, "https://portal.example"),
                          (200, None)])
