"""
Target abuse (SSRF) end to end: hostile targets sent through the real
proxy over mutual TLS must be refused with the documented status and
token, audited once, and must not make the proxy connect anywhere.

Every tempting destination is a counting listener on loopback: the
targets that name a port point straight at one, and the port-less ones are
mapped to one through C{[upstream.resolve]}, so a target that slipped
through would be seen connecting even for names no DNS would resolve.
"""

from __future__ import annotations

import http.client
import socket
from typing import Any
from urllib.parse import quote

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import demo
from tests.support import (
    ENDPOINT,
    Consumer,
    Provider,
    ProviderResource,
    Proxy,
    Reply,
    spine_headers,
    until,
)

HOST = demo.PROVIDER_HOST
PATH = "/B82617/STU3/1/gpconnect/fhir"
METADATA = f"{PATH}/metadata"
CPA = "S918999511007"
LEGACY_ASID = "918999198993"
LEGACY_ENDPOINT = f"https://{HOST}/gpconnect-demonstrator/v1/fhir"
LEGACY_CPA = "S918999411007"
TARGET_INVALID = "BAD_REQUEST: target URL "


class Trap(Factory):
    """
    A loopback listener that counts the connections it accepts and closes
    them at once.
    """

    def __init__(self, interface: str) -> None:
        self.accepted = 0
        self.port = reactor.listenTCP(0, self, interface=interface)

    def buildProtocol(self, addr: Any) -> Protocol:
        self.accepted += 1
        protocol = Protocol()
        protocol.connectionMade = lambda: protocol.transport.loseConnection()
        return protocol

    @property
    def number(self) -> int:
        return self.port.getHost().port


class Redirecting(ProviderResource):
    """
    The test provider, plus a resource that redirects to a trap.
    """

    location = b""

    def do_redirect(self, request: Any, args: dict, body: bytes) -> bytes:
        request.setResponseCode(307)
        request.setHeader(b"Location", self.location)
        return b""


def verdict(reply: Reply) -> tuple[int, str]:
    """
    Status and OperationOutcome token, or status and body when the answer
    is not an OperationOutcome.
    """
    try:
        return reply.status, reply.token()
    except ValueError:
        return reply.status, reply.body.decode("latin-1")


def raw_request(consumer: Consumer, request_line: bytes, headers: dict[str, str]) -> Reply:
    """
    Send one request whose request line is given as bytes (http.client
    refuses non-ASCII and absolute forms) and read the answer.
    """
    lines = [request_line, b"Host: localhost"]
    lines += [f"{k}: {v}".encode("ascii") for k, v in headers.items()]
    plain = socket.create_connection(("127.0.0.1", consumer.port), timeout=30)
    with consumer.context.wrap_socket(plain, server_hostname="localhost") as tls:
        tls.sendall(b"\r\n".join(lines) + b"\r\n\r\n")
        response = http.client.HTTPResponse(tls)
        response.begin()
        return Reply(response.status, response.reason, response.getheaders(), response.read())


class TargetAbuseTests(unittest.TestCase):
    async def test_hostile_targets_connect_nowhere(self) -> None:
        traps = [Trap("127.0.0.1"), Trap("::1")]
        for trap in traps:
            self.addCleanup(trap.port.stopListening)
        v4, v6 = traps[0].number, traps[1].number
        resource = Redirecting()
        resource.location = f"https://127.0.0.1:{v4}/".encode()
        provider = Provider(self, resource)
        real_port = provider.port.getHost().port
        tempting = [
            "127.0.0.1", "localhost", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001",
            "127.1", "::1", "::ffff:127.0.0.1", "ORANGE.testlab.nhs.uk", f"{HOST}.",
            "xn--range-jua.testlab.nhs.uk", "evil.test", "b",
        ]
        resolve = {f"{name}:443": f"127.0.0.1:{v4}" for name in tempting}
        resolve.update({f"{HOST}:8443": f"127.0.0.1:{v4}", f"{HOST}:{real_port}": f"127.0.0.1:{v4}",
                        f"{HOST}:443": f"127.0.0.1:{real_port}"})
        proxy = Proxy(self, provider, upstream={"resolve": resolve})
        await proxy.start()
        consumer = proxy.consumer()

        def varies(target: str, endpoint: str = ENDPOINT, cpa: str = CPA) -> tuple[int, str]:
            return 400, f"ENDPOINT_{endpoint}_CPAID_{cpa}_VARIES_FROM_TARGETURL_{target}"

        def invalid(reason: str) -> tuple[int, str]:
            return 400, TARGET_INVALID + reason

        https_only = invalid("must be an absolute https:// URL")
        userinfo = invalid("must not contain user information")
        bad_host = invalid("has a missing or malformed host")
        forbidden = invalid("contains a control, space, non-ASCII, backslash or fragment character")
        dots = invalid("must not contain dot segments")
        encoded = invalid("must not contain an encoded slash, backslash or control character")

        refused: list[tuple[bytes, tuple[int, str]]] = []

        def case(target: str | bytes, expected: tuple[int, str] | None = None) -> None:
            raw = target if isinstance(target, bytes) else target.encode("ascii")
            if expected is None:
                expected = varies(raw.decode("ascii"))
            refused.append((b"/" + raw, expected))

        # Schemes and case.
        case(f"http://{HOST}{METADATA}", https_only)
        case(f"HTTPS://{HOST}{METADATA}", https_only)
        case(f"//127.0.0.1:{v4}{METADATA}", https_only)
        case(f"https:/127.0.0.1:{v4}{METADATA}", https_only)
        case(f"https://ORANGE.testlab.nhs.uk{METADATA}")
        case(f"https://{HOST}/b82617/STU3/1/gpconnect/fhir/metadata")
        # IP literals in every spelling, with and without the trap's port.
        for host in ("127.0.0.1", "2130706433", "0177.0.0.1", "0x7f.0.0.1", "0x7f000001",
                     "127.1", "localhost", "[::1]", "[::ffff:127.0.0.1]", "evil.test"):
            case(f"https://{host}{METADATA}")
        for authority in (f"127.0.0.1:{v4}", f"2130706433:{v4}", f"localhost:{v4}", f"[::1]:{v6}",
                          f"127.0.0.1:{real_port}"):
            case(f"https://{authority}{METADATA}")
        # Ports other than the registered one.
        for port in ("443", "8443", "0443", str(real_port)):
            case(f"https://{HOST}:{port}{METADATA}")
        case(f"https://{HOST}:{METADATA}", invalid("has an empty port"))
        case(f"https://{HOST}:99999{METADATA}", invalid("has a malformed port"))
        # User information.
        case(f"https://a@{HOST}{METADATA}", userinfo)
        case(f"https://{HOST}@127.0.0.1:{v4}{METADATA}", userinfo)
        case(f"https://{HOST}:443@127.0.0.1{METADATA}", userinfo)
        case(f"https://{HOST}%40127.0.0.1{METADATA}", bad_host)
        # Trailing dots, unicode and punycode hosts.
        case(f"https://{HOST}.{METADATA}", bad_host)
        case(quote(f"https://\u00f6range.testlab.nhs.uk{METADATA}", safe=""), forbidden)
        case(quote(f"https://orange\u3002testlab.nhs.uk{METADATA}", safe=""), forbidden)
        case(f"https://xn--range-jua.testlab.nhs.uk{METADATA}")
        case(f"https://orange%2Etestlab.nhs.uk{METADATA}", bad_host)
        # Backslashes and fragments that other URL parsers read as authority ends.
        case(f"https://{HOST}\\@127.0.0.1:{v4}{METADATA}", forbidden)
        case(f"https://127.0.0.1:{v4}\\{HOST}{METADATA}", forbidden)
        case(f"https://127.0.0.1:{v4}#{HOST}{METADATA}", forbidden)
        case(f"https://{HOST}{METADATA}#@127.0.0.1:{v4}", forbidden)
        case(f"https://127.0.0.1:{v4}?{HOST}{METADATA}", invalid("must have a path"))
        # Dot segments, encoded separators, double encoding, path parameters.
        case(f"https://{HOST}{PATH}/../../../admin", dots)
        case(f"https://{HOST}{PATH}/%2e%2e/%2E%2E/admin", dots)
        case(f"https://{HOST}{PATH}/%252e%252e/%252e%252e/admin", dots)
        case(f"https://{HOST}{PATH}/%25%32%65%25%32%65/admin", dots)
        case(f"https://{HOST}{PATH}/..;/..;/admin", dots)
        case(f"https://{HOST}{PATH}/..%3B/admin", dots)
        case(f"https://{HOST}{PATH}/..%2F..%2F..%2Fadmin", encoded)
        case(f"https://{HOST}{PATH}%2F..%2F..%2Fother", encoded)
        case(f"https://{HOST}{PATH}/%252F..%252Fadmin", encoded)
        case(f"https://{HOST}{PATH}/%5C..%5Cadmin", encoded)
        case(f"https://{HOST}{PATH}/metadata%00.json", encoded)
        case(f"https://{HOST}{PATH}/%zz/metadata", invalid("has malformed percent-encoding"))
        # The wholly percent-encoded form is decoded once, then held to the same rules.
        case(quote(f"https://127.0.0.1:{v4}{METADATA}", safe=""),
             varies(f"https://127.0.0.1:{v4}{METADATA}"))
        case(quote(f"https://{HOST}{PATH}/%2e%2e/admin", safe=""), dots)
        case(quote(quote(f"https://{HOST}{METADATA}", safe=""), safe=""), https_only)

        # Raw non-ASCII in the request line is refused by the HTTP parser itself.
        for host in ("\u00f6range.testlab.nhs.uk", "orange\u3002testlab.nhs.uk"):
            line = f"GET /https://{host}{METADATA} HTTP/1.1".encode()
            reply = await deferToThread(raw_request, consumer, line, spine_headers())
            self.assertEqual(reply.status, 400)

        forms: list[tuple[bytes, tuple[int, str]]] = [
            (b"GET https://127.0.0.1:%d%s HTTP/1.1" % (v4, METADATA.encode()),
             invalid("must be /https://<provider>/<path>")),
            (b"GET 127.0.0.1:%d HTTP/1.1" % v4, invalid("must be /https://<provider>/<path>")),
            (b"CONNECT 127.0.0.1:%d HTTP/1.1" % v4, (405, "405: Method Not Allowed")),
        ]
        sent: list[tuple[str, tuple[int, str]]] = []
        for uri, expected in refused:
            headers = spine_headers()
            reply = await deferToThread(raw_request, consumer, b"GET %s HTTP/1.1" % uri, headers)
            self.assertEqual(verdict(reply), expected, uri)
            sent.append((headers["Ssp-TraceID"], expected))
        for line, expected in forms:
            headers = spine_headers()
            reply = await deferToThread(raw_request, consumer, line, headers)
            self.assertEqual(verdict(reply), expected, line)
            sent.append((headers["Ssp-TraceID"], expected))
        other = spine_headers(receiver=LEGACY_ASID)
        target = f"https://{HOST}{METADATA}"
        reply = await consumer.request("GET", f"/{target}", other)
        expected = varies(target, LEGACY_ENDPOINT, LEGACY_CPA)
        self.assertEqual(verdict(reply), expected)
        sent.append((other["Ssp-TraceID"], expected))

        # Within the registered endpoint: forwarded to the registered provider only.
        allowed = []
        for path, headers in ((f"/https://{HOST}{PATH}?@127.0.0.1:{v4}/", spine_headers()),
                              (f"/https://{HOST}{METADATA}",
                               spine_headers(Host=f"127.0.0.1:{v4}")),
                              (f"/https://{HOST}{PATH}/redirect", spine_headers())):
            reply = await consumer.request("GET", path, headers)
            allowed.append((headers["Ssp-TraceID"], reply.status))
        self.assertEqual([status for _, status in allowed], [200, 200, 307])
        self.assertEqual(reply.header("Location"), resource.location.decode())
        self.assertEqual([dict(s.headers)[b"Host"] for s in provider.seen], [HOST.encode()] * 3)
        self.assertEqual([dict(s.headers)[b"Ssp-Traceid"].decode() for s in provider.seen],
                         [trace for trace, _ in allowed])

        self.assertEqual([trap.accepted for trap in traps], [0, 0])
        audited = {trace for trace, _ in sent + allowed}
        await until(proxy.settled)
        completed = [r for r in proxy.audit.completed() if r.trace_id in audited]
        self.assertEqual([(r.trace_id, (r.status, r.token)) for r in completed[: len(sent)]], sent)
        self.assertEqual({r.decision for r in completed[: len(sent)]}, {"refused"})
        self.assertEqual(len(completed), len(audited))
        authorised = [r.trace_id for r in proxy.audit.records if r.event == "authorised"]
        self.assertEqual(authorised, [trace for trace, _ in allowed])

        # The traps do count: a connection made to them is seen.
        await deferToThread(lambda: socket.create_connection(("127.0.0.1", v4)).close())
        for _ in range(500):
            if traps[0].accepted:
                break
            await deferLater(reactor, 0.01)
        self.assertEqual(traps[0].accepted, 1)
