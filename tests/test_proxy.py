"""
End-to-end tests of the core proxy: real sockets, mutual TLS on both legs
with certificates generated for this run, the demo SDS.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import json
import socket
import ssl
import tempfile
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import demo
from ssp.pki import create_development_pki
from tests.support import (
    ENDPOINT,
    PATTERN,
    Provider,
    Proxy,
    pattern_sha256,
    pki,
    rss_bytes,
    spine_headers,
)


class ProxyTestCase(unittest.TestCase):
    async def setup(self, **overrides) -> tuple[Provider, Proxy]:
        provider = Provider(self)
        proxy = await Proxy(self, provider, **overrides).start()
        return provider, proxy

    def assertRefused(self, reply, status, token_start, provider, proxy):
        self.assertEqual(reply.status, status, reply.body)
        outcome = reply.outcome()
        self.assertEqual(outcome["resourceType"], "OperationOutcome")
        issue = outcome["issue"][0]
        self.assertEqual(issue["details"]["coding"][0]["code"], str(status))
        self.assertTrue(issue["diagnostics"].startswith(token_start), issue["diagnostics"])
        self.assertEqual(issue["details"]["coding"][0]["display"], issue["diagnostics"])
        self.assertIsNotNone(reply.header("Strict-Transport-Security"))
        self.assertEqual(provider.seen, [])
        completed = proxy.audit.completed()
        self.assertEqual([(r.status, r.decision) for r in completed], [(status, "refused")])
        self.assertEqual(completed[0].token, issue["diagnostics"])
        self.assertEqual([r for r in proxy.audit.records if r.event == "authorised"], [])


class ForwardingTests(ProxyTestCase):
    async def test_forwarded_and_audited(self):
        provider, proxy = await self.setup()
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 200)
        self.assertEqual(reply.body, b'{"resourceType": "CapabilityStatement"}')
        self.assertEqual(reply.header("Content-Type"), "application/fhir+json")
        self.assertEqual(reply.header("Strict-Transport-Security"),
                         "max-age=31536000; includeSubDomains")
        self.assertEqual(reply.header("X-Rate-Limit-Remaining"), "999999")
        self.assertEqual(len(provider.seen), 1)
        events = [(r.event, r.decision, r.status) for r in proxy.audit.records]
        self.assertEqual(events, [("authorised", "authorised", 0), ("completed", "forwarded", 200)])
        completed = proxy.audit.records[-1]
        self.assertEqual(completed.client_subject, "CN=gpc001.ssp-demo.test")
        self.assertEqual(completed.bytes_out, len(reply.body))
        self.assertEqual(completed.claims.organisation_ods, "GPC001")

    async def test_request_headers_and_query_forwarded_byte_for_byte(self):
        provider, proxy = await self.setup()
        query = "?identifier=https://fhir.nhs.uk/Id/nhs-number%7C9690937278&x=1&x=2&y=a|b&z=%7c+%20"
        headers = spine_headers(**{
            "X-Odd": "  value with  spaces\tand tab",
            "Accept": "application/fhir+json",
            "Forwarded": "for=192.0.2.1",
            "Connection": "X-Hop",
            "X-Hop": "must not pass",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
        })
        reply = await proxy.consumer().request("GET", f"/{ENDPOINT}/echo{query}", headers)
        self.assertEqual(reply.status, 200, reply.body)
        echoed = json.loads(reply.body)
        self.assertEqual(echoed["uri"], f"/B82617/STU3/1/gpconnect/fhir/echo{query}")
        received = {}
        for name, value in echoed["headers"]:
            received.setdefault(name.lower(), []).append(value)
        for name, value in headers.items():
            if name.lower() not in ("connection", "x-hop", "keep-alive", "te", "forwarded"):
                self.assertEqual(received[name.lower()], [value.strip()], name)
        for hop in ("connection", "x-hop", "keep-alive", "te", "transfer-encoding"):
            self.assertNotIn(hop, received)
        self.assertEqual(received["host"], ["orange.testlab.nhs.uk"])
        self.assertEqual(received["forwarded"][0], "for=192.0.2.1")
        self.assertEqual(received["forwarded"][1], "for=127.0.0.1;proto=https;by=127.0.0.1")
        self.assertEqual(received["accept-encoding"], ["identity"])

    async def test_wholly_percent_encoded_target(self):
        provider, proxy = await self.setup()
        encoded = "https%3A%2F%2Forange.testlab.nhs.uk%2FB82617%2FSTU3%2F1%2Fgpconnect%2Ffhir%2Fmetadata"
        reply = await proxy.consumer().request("GET", f"/{encoded}", spine_headers())
        self.assertEqual(reply.status, 200, reply.body)
        self.assertEqual(provider.seen[0].uri, b"/B82617/STU3/1/gpconnect/fhir/metadata")

    async def test_response_relayed_unchanged(self):
        provider, proxy = await self.setup()
        reply = await proxy.consumer().get("odd")
        self.assertEqual((reply.status, reply.reason), (299, "Odd But Fine"))
        self.assertEqual(reply.body, b"odd body")
        self.assertEqual(reply.header("X-Odd"), "spaced  value")
        self.assertEqual([v for k, v in reply.headers if k.lower() == "set-cookie"], ["a=1", "b=2"])
        self.assertEqual(reply.header("Content-Type"), "text/odd")
        self.assertIsNone(reply.header("Connection"))
        self.assertEqual(reply.header("X-Unicode").encode("latin-1"), "caf\u00e9".encode("utf-8"))

    async def test_response_framing_relayed(self):
        """
        A provider's C{Content-Length} reaches the consumer as it was sent;
        a chunked response stays chunked.
        """
        provider, proxy = await self.setup()
        consumer = proxy.consumer()
        sized = await consumer.get("big?n=5000")
        chunked = await consumer.get("big?n=5000&chunked=1")
        self.assertEqual((sized.header("Content-Length"), sized.header("Transfer-Encoding")),
                         ("5000", None))
        self.assertEqual((chunked.header("Content-Length"), chunked.header("Transfer-Encoding")),
                         (None, "chunked"))
        self.assertEqual((len(sized.body), len(chunked.body)), (5000, 5000))

    async def test_gzip_body_untouched(self):
        provider, proxy = await self.setup()
        headers = spine_headers(**{"Accept-Encoding": "gzip"})
        reply = await proxy.consumer().get("gzip", headers)
        self.assertEqual(reply.header("Content-Encoding"), "gzip")
        self.assertEqual(reply.body, gzip.compress(b'{"resourceType": "Bundle"}' * 100, mtime=0))

    async def test_provider_statuses_pass_through(self):
        provider, proxy = await self.setup()
        for code in (201, 400, 403, 404, 409, 422, 429, 500, 503):
            reply = await proxy.consumer().request(
                "GET", f"/{ENDPOINT}/status?code={code}", spine_headers())
            self.assertEqual(reply.status, code)
            self.assertEqual(json.loads(reply.body)["from"], "provider")
        self.assertEqual(len(provider.seen), 9)

    async def test_bodies_of_every_verb(self):
        provider, proxy = await self.setup()
        for method in ("POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
            body = method.encode() * 1000
            reply = await proxy.consumer().request(
                method, f"/{ENDPOINT}/echo", spine_headers(), body=body)
            echoed = json.loads(reply.body)
            self.assertEqual(echoed["method"], method)
            self.assertEqual(echoed["body_sha256"], hashlib.sha256(body).hexdigest())
        post_empty = await proxy.consumer().request(
            "POST", f"/{ENDPOINT}/echo", {**spine_headers(), "Content-Length": "0"}, body=b"")
        self.assertEqual(json.loads(post_empty.body)["body_length"], 0)

    async def test_chunked_upload(self):
        provider, proxy = await self.setup()
        chunks = [b"a" * 1000, b"b" * 70000, b"c"]
        reply = await proxy.consumer().request(
            "POST", f"/{ENDPOINT}/echo", spine_headers(), body=iter(chunks))
        echoed = json.loads(reply.body)
        self.assertEqual(echoed["body_sha256"], hashlib.sha256(b"".join(chunks)).hexdigest())
        received = {k.lower(): v for k, v in echoed["headers"]}
        self.assertEqual(received.get("transfer-encoding"), "chunked")

    async def test_large_response_streams_in_bounded_memory(self):
        provider, proxy = await self.setup()
        size = 100 * 1024 * 1024
        peak = _PeakRSS()

        def download():
            conn = proxy.consumer().connect()
            conn.request("GET", f"/{ENDPOINT}/big?n={size}", headers=spine_headers())
            response = conn.getresponse()
            digest, total = hashlib.sha256(), 0
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            conn.close()
            return response.status, total, digest.hexdigest()

        status, total, sha = await peak.during(deferToThread(download))
        self.assertEqual((status, total), (200, size))
        self.assertEqual(sha, pattern_sha256(size))
        self.assertLess(peak.growth, 48 * 1024 * 1024)
        self.assertEqual(proxy.audit.completed()[0].bytes_out, size)

    async def test_large_upload_streams_in_bounded_memory(self):
        provider, proxy = await self.setup()
        size = 10 * 1024 * 1024
        peak = _PeakRSS()

        def chunks():
            left = size
            while left:
                chunk = PATTERN[: min(left, len(PATTERN))]
                left -= len(chunk)
                yield chunk

        headers = {**spine_headers(), "Content-Length": str(size)}
        reply = await peak.during(proxy.consumer().request(
            "POST", f"/{ENDPOINT}/echo", headers, body=chunks()))
        self.assertEqual(json.loads(reply.body)["body_sha256"], pattern_sha256(size))
        self.assertEqual(provider.seen[0].body_length, size)
        self.assertLess(peak.growth, 24 * 1024 * 1024)
        self.assertEqual(proxy.audit.completed()[0].bytes_in, size)

    async def test_chunked_trickle_reaches_consumer_before_provider_finishes(self):
        provider, proxy = await self.setup()
        conn = proxy.consumer().connect()

        def first_chunk():
            conn.request("GET", f"/{ENDPOINT}/trickle", headers=spine_headers())
            response = conn.getresponse()
            return response, response.read1(100)

        response, first = await deferToThread(first_chunk)
        self.assertEqual(first, b"first-chunk;")
        self.assertFalse(provider.resource.trickling.finished)
        provider.resource.trickling.write(b"second")
        provider.resource.trickling.finish()
        rest = await deferToThread(response.read)
        conn.close()
        self.assertEqual(rest, b"second")

    async def test_keep_alive_on_both_legs(self):
        provider, proxy = await self.setup()
        consumer = proxy.consumer()
        conn = consumer.connect()
        first = await consumer.get("metadata", connection=conn)
        sock = conn.sock
        second = await consumer.get("metadata", connection=conn)
        self.assertIs(conn.sock, sock)
        self.assertEqual((first.status, second.status), (200, 200))
        self.assertEqual(provider.tracking.accepted, 1)
        conn.close()


class _PeakRSS:
    """
    Samples this process's resident memory while a transfer runs.
    """

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.peak = self.baseline

    @property
    def growth(self) -> int:
        return self.peak - self.baseline

    async def during(self, work: Deferred):
        from twisted.internet.task import LoopingCall

        sampler = LoopingCall(lambda: setattr(self, "peak", max(self.peak, rss_bytes())))
        sampler.start(0.02)
        try:
            return await work
        finally:
            sampler.stop()


class RefusalTests(ProxyTestCase):
    async def test_no_client_certificate(self):
        provider, proxy = await self.setup()
        reply = await proxy.consumer(cert=None).get("metadata")
        self.assertRefused(reply, 496, "CLIENT_CERTIFICATE_REQUIRED", provider, proxy)

    async def test_invalid_client_certificates(self):
        for cert, reason in (("consumer-untrusted", "UNTRUSTED"), ("consumer-expired", "EXPIRED"),
                             ("consumer-revoked", "REVOKED")):
            provider, proxy = await self.setup()
            reply = await proxy.consumer(cert=cert).get("metadata")
            self.assertRefused(reply, 495, f"CLIENT_CERTIFICATE_INVALID_{reason}", provider, proxy)

    async def test_methods_not_forwarded(self):
        for method in ("TRACE", "CONNECT", "HEAD", "get", "PROPFIND"):
            provider, proxy = await self.setup()
            reply = await proxy.consumer().request(method, f"/{ENDPOINT}/metadata", spine_headers())
            self.assertEqual(reply.status, 405, method)
            if method != "HEAD":
                self.assertRefused(reply, 405, "405: Method Not Allowed", provider, proxy)
            self.assertEqual(provider.seen, [])

    async def test_malformed_targets(self):
        bad = [
            "/http://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata",
            "/https://user@orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata",
            "/https:///B82617/STU3/1/gpconnect/fhir/metadata",
            "/B82617/STU3/1/gpconnect/fhir/metadata",
            "/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata#frag",
            "/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/%00/../x",
            "/https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/../../../admin",
            "/https://orange.testlab.nhs.uk:99999/B82617/STU3/1/gpconnect/fhir/metadata",
            "/https://orange.testlab.nhs.uk",
        ]
        for path in bad:
            provider, proxy = await self.setup()
            reply = await proxy.consumer().request("GET", path, spine_headers())
            self.assertRefused(reply, 400, "BAD_REQUEST: target URL", provider, proxy)

    async def test_missing_and_malformed_spine_headers(self):
        cases = [
            ("Ssp-TraceID", None, "missing"), ("Ssp-TraceID", "", "missing"),
            ("Ssp-TraceID", "not-a-uuid", "must be a UUID"),
            ("Ssp-From", "20000000035X", "must be an ASID"),
            ("Ssp-To", None, "missing"),
            ("Ssp-InteractionID", "urn:other:thing", "must be an interaction ID"),
        ]
        for name, value, words in cases:
            provider, proxy = await self.setup()
            headers = spine_headers()
            if value is None:
                del headers[name]
            else:
                headers[name] = value
            reply = await proxy.consumer().get("metadata", headers)
            self.assertRefused(reply, 400, f"BAD_REQUEST: {name} header", provider, proxy)
            self.assertIn(words, reply.token())

    async def test_missing_bearer_token(self):
        provider, proxy = await self.setup()
        headers = spine_headers()
        del headers["Authorization"]
        reply = await proxy.consumer().get("metadata", headers)
        self.assertRefused(reply, 400, "BAD_REQUEST: Authorization", provider, proxy)

    async def test_xml_outcome_when_asked(self):
        provider, proxy = await self.setup()
        headers = spine_headers(Accept="application/fhir+xml")
        del headers["Ssp-From"]
        reply = await proxy.consumer().get("metadata", headers)
        self.assertEqual(reply.status, 400)
        self.assertEqual(reply.header("Content-Type"), "application/fhir+xml")
        self.assertIn(b'<OperationOutcome xmlns="http://hl7.org/fhir">', reply.body)
        self.assertIn(b'<diagnostics value="BAD_REQUEST: Ssp-From header is missing"/>', reply.body)

    async def test_refused_upload_is_not_forwarded_and_connection_closes(self):
        provider, proxy = await self.setup()
        headers = spine_headers()
        del headers["Ssp-To"]
        headers["Content-Length"] = str(len(PATTERN) * 4)
        reply = await proxy.consumer().request(
            "POST", f"/{ENDPOINT}/echo", headers, body=PATTERN * 4)
        self.assertRefused(reply, 400, "BAD_REQUEST: Ssp-To", provider, proxy)

    async def test_audit_unwritable_fails_closed(self):
        provider, proxy = await self.setup()
        proxy.audit.writable = False
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 503)
        self.assertEqual(reply.token(), "AUDIT_UNAVAILABLE")
        self.assertEqual(provider.seen, [])
        proxy.audit.writable = True
        self.assertEqual((await proxy.consumer().get("metadata")).status, 200)

    async def test_plain_http_on_tls_port(self):
        provider, proxy = await self.setup()

        def plain():
            conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
            conn.request("GET", f"/{ENDPOINT}/metadata", headers=spine_headers())
            response = conn.getresponse()
            return response.status, response.read()

        status, body = await deferToThread(plain)
        self.assertEqual(status, 497)
        self.assertEqual(json.loads(body)["issue"][0]["diagnostics"],
                         "HTTP_REQUEST_SENT_TO_HTTPS_PORT")
        self.assertEqual(provider.seen, [])
        self.assertEqual(proxy.audit.completed(), [])
        proxy.service.connection_refusals.flush()
        self.assertEqual(
            [(r.event, r.status, r.decision, r.token, r.count, r.consumer_address)
             for r in proxy.audit.records],
            [("connection-refused", 497, "refused", "HTTP_REQUEST_SENT_TO_HTTPS_PORT", 1,
              "127.0.0.1")])


class _Garbage(Protocol):
    def dataReceived(self, data):
        self.transport.write(b"NOT HTTP AT ALL\r\n\r\n")
        self.transport.loseConnection()


class UpstreamFailureTests(ProxyTestCase):
    async def test_provider_unreachable(self):
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        closed = port.getHost().port
        await port.stopListening()
        provider = Provider(self)
        proxy = await Proxy(self, provider, upstream={
            "resolve": {"orange.testlab.nhs.uk:443": f"127.0.0.1:{closed}"}}).start()
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 502)
        self.assertEqual(reply.token(), f"ERROR_COMMUNICATING_TO_ENDPOINT_URL_{ENDPOINT}/metadata")
        completed = proxy.audit.completed()
        self.assertEqual([(r.status, r.decision) for r in completed], [(502, "failed")])

    async def _through_other_provider(self, listening):
        self.addCleanup(listening.stopListening)
        provider = Provider(self)
        proxy = await Proxy(self, provider, upstream={
            "resolve": {"orange.testlab.nhs.uk:443": f"127.0.0.1:{listening.getHost().port}"}}
        ).start()
        return await proxy.consumer().get("metadata"), proxy

    async def test_provider_certificate_for_another_host(self):
        wrong_name = demo.listen_provider(reactor, pki(), host_index=1)
        reply, proxy = await self._through_other_provider(wrong_name)
        self.assertEqual(reply.status, 502)
        self.assertEqual([r.status for r in proxy.audit.completed()], [502])

    async def test_provider_certificate_from_untrusted_ca(self):
        untrusted = demo.listen_provider(reactor, untrusted_pki())
        reply, proxy = await self._through_other_provider(untrusted)
        self.assertEqual(reply.status, 502)

    async def test_garbage_from_provider(self):
        garbage = reactor.listenTCP(0, Factory.forProtocol(_Garbage), interface="127.0.0.1")
        self.addCleanup(garbage.stopListening)
        provider = Provider(self)
        proxy = await Proxy(self, provider, upstream={
            "resolve": {"orange.testlab.nhs.uk:443": f"127.0.0.1:{garbage.getHost().port}"}}).start()
        reply = await proxy.consumer().get("metadata")
        self.assertEqual(reply.status, 502)

    async def test_first_byte_timeout(self):
        provider, proxy = await self.setup(upstream={"response_timeout": 0.3})
        reply = await proxy.consumer().get("stall")
        self.assertEqual(reply.status, 504)
        self.assertEqual(reply.token(), f"TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{ENDPOINT}/stall")
        await deferLater(reactor, 0.05)
        self.assertTrue(provider.resource.stalled._disconnected)

    async def test_idle_body_timeout_aborts_both_sides(self):
        provider, proxy = await self.setup(upstream={"idle_timeout": 0.3})
        with self.assertRaises(http.client.IncompleteRead):
            await proxy.consumer().get("stallbody")
        await deferLater(reactor, 0.05)
        self.assertTrue(provider.resource.stalled._disconnected)
        self.assertEqual([(r.status, r.decision) for r in proxy.audit.completed()], [(504, "failed")])

    async def test_reset_mid_body(self):
        provider, proxy = await self.setup()
        with self.assertRaises(http.client.IncompleteRead):
            await proxy.consumer().get("reset")
        self.assertEqual([(r.status, r.decision) for r in proxy.audit.completed()], [(502, "failed")])

    async def test_client_disconnect_cancels_upstream(self):
        provider, proxy = await self.setup()

        def send_and_leave():
            raw = socket.create_connection(("127.0.0.1", proxy.port))
            tls = proxy.consumer().context.wrap_socket(raw, server_hostname="localhost")
            lines = [f"GET /{ENDPOINT}/stall HTTP/1.1", "Host: localhost"]
            lines += [f"{k}: {v}" for k, v in spine_headers().items()]
            tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            return tls

        tls = await deferToThread(send_and_leave)
        while not provider.seen:
            await deferLater(reactor, 0.01)
        tls.close()
        while not proxy.audit.completed():
            await deferLater(reactor, 0.01)
        await deferLater(reactor, 0.05)
        self.assertTrue(provider.resource.stalled._disconnected)
        self.assertEqual([(r.status, r.decision) for r in proxy.audit.completed()],
                         [(499, "abandoned")])


_untrusted = []


def untrusted_pki():
    """
    A second PKI: its provider certificate names the right host but does
    not chain to the CA the proxy trusts.
    """
    if not _untrusted:
        _untrusted.append(create_development_pki(Path(tempfile.mkdtemp(prefix="ssp-other-"))))
    return _untrusted[0]


class TLSPolicyTests(ProxyTestCase):
    async def handshake(self, proxy, configure) -> str:
        def attempt():
            context = proxy.consumer().context
            configure(context)
            with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
                try:
                    with context.wrap_socket(raw, server_hostname="localhost") as tls:
                        return tls.version()
                except ssl.SSLError as e:
                    return f"refused: {e.reason}"

        return await deferToThread(attempt)

    async def test_tls_1_1_refused_and_audited(self):
        provider, proxy = await self.setup()

        def old(context):
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
            context.set_ciphers("ALL:@SECLEVEL=0")

        self.assertTrue((await self.handshake(proxy, old)).startswith("refused"))
        while not proxy.audit.records:
            proxy.service.connection_refusals.flush()
            await deferLater(reactor, 0.01)
        [record] = proxy.audit.records
        self.assertEqual((record.event, record.count), ("connection-refused", 1))
        self.assertTrue(record.token.startswith("TLS_HANDSHAKE_FAILED: "), record.token)

    async def test_non_pfs_and_cbc_suites_refused(self):
        provider, proxy = await self.setup()

        def weak(context):
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.set_ciphers("AES128-SHA:AES256-GCM-SHA384:ECDHE-RSA-AES128-SHA")

        self.assertTrue((await self.handshake(proxy, weak)).startswith("refused"))

    async def test_tls_1_2_gcm_and_1_3_accepted(self):
        provider, proxy = await self.setup()

        def tls12(context):
            context.maximum_version = ssl.TLSVersion.TLSv1_2

        self.assertEqual(await self.handshake(proxy, tls12), "TLSv1.2")
        self.assertEqual(await self.handshake(proxy, lambda context: None), "TLSv1.3")
