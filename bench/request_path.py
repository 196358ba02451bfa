"""
CPU per request of the consumer leg and the orchestration, in memory.

    python bench/request_path.py [-n 20000] [--rounds 5] [--cprofile]

The benchmark's proxy (every check on: LDIF directory, token validation,
in-memory throttle, metrics, access log) with everything outside this
process's Python replaced: no TLS, no sockets, a provider that answers at
once and an audit sink that is durable at once.  Requests are fed to one
keep-alive channel over a string transport and the responses read back.
What is left is our code and Twisted's HTTP on the consumer side: the part
this measures is the part a change to the channel, the pipeline or the
proxy moves, without the noise of the shared machine's network and disk.
Not a test; nothing under C{tests/} imports it.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import run  # noqa: E402  (bench/run.py, next to this file)

PAYLOAD = b'{"resourceType":"CapabilityStatement","status":"active"}' * 3


def build(root: Path) -> tuple[object, bytes]:
    """
    The benchmark's proxy service, built but not listening, with an
    instant provider and audit; and the request the load generator sends.
    """
    from twisted.internet import reactor
    from twisted.internet.defer import succeed
    from twisted.web.http_headers import Headers
    from zope.interface import implementer

    from ssp.interfaces import IAuditSink
    from ssp.service import Concerns, SSPService
    from ssp.testing import _Response

    @implementer(IAuditSink)
    class InstantAudit:
        pending = 0

        def append(self, record: object) -> object:
            return succeed(None)

    class InstantProvider:
        def request(self, method: bytes, url: bytes, headers: Headers, body: object) -> object:
            response = _Response(200, PAYLOAD, headers=Headers({
                b"Content-Type": [b"application/fhir+json"],
                b"Date": [b"Thu, 03 Dec 2026 18:00:00 GMT"],
                b"Server": [b"TwistedWeb/26.10.0"],
            }))
            return succeed(response)

    config = run.bench_config(root, 1, listen="tcp:0:interface=127.0.0.1")
    service = SSPService(config, reactor, concerns=Concerns(audit=InstantAudit()))
    service._build()
    service.access_log.start()
    proxy = service.proxy
    proxy.upstream = InstantProvider()
    _, proxied = run.requests_for(lambda: 443)
    request = proxied("/B82617/STU3/1/gpconnect/fhir/metadata")
    return service, request


def identify_as_sender(service: object) -> None:
    """
    The demo consumer's certificate names the FQDN SDS registers for its
    ASID; use that name so that the certificate check admits.
    """
    import attrs

    from ssp import demo
    from ssp.model import ClientIdentity

    systems = service.proxy.checks.directory  # type: ignore[attr-defined]
    system = systems.accredited_system(demo.CONSUMER_ASID).result
    handlers = systems.message_handlers(system.party_key, None).result
    identity = ClientIdentity("CN=consumer", "00" * 32, tuple(h.fqdn for h in handlers))
    service.proxy.checks = attrs.evolve(  # type: ignore[attr-defined]
        service.proxy.checks, identify=lambda connection: identity)


def serve(service: object, request: bytes, count: int) -> float:
    """
    Feed C{count} requests to one keep-alive channel; CPU seconds spent.
    """
    from twisted.internet import reactor
    from twisted.internet.address import IPv4Address
    from twisted.internet.testing import StringTransport

    transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000),
                                hostAddress=IPv4Address("TCP", "127.0.0.1", 443))
    channel = service.site.buildProtocol(transport.getPeer())  # type: ignore[attr-defined]
    channel.makeConnection(transport)
    started = time.process_time()
    for _ in range(count):
        channel.dataReceived(request)
        answer = transport.value()
        transport.clear()
        reactor.runUntilCurrent()  # timers set and cancelled, as each reactor turn
        if not answer.startswith(b"HTTP/1.1 200 "):
            raise SystemExit(f"unexpected answer:\n{answer.decode('latin-1')}")
    spent = time.process_time() - started
    channel.connectionLost(None)
    return spent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cprofile", action="store_true", help="print call counts per request")
    parser.add_argument("--sort", default="tottime", help="cProfile sort key")
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ssp-path-") as root:
        service, request = build(Path(root))
        identify_as_sender(service)
        serve(service, request, 500)  # warm-up: caches, imports
        if args.cprofile:
            profile = cProfile.Profile()
            profile.runcall(serve, service, request, args.n)
            stats = pstats.Stats(profile)
            stats.sort_stats(args.sort).print_stats(args.top)
            return 0
        rounds = [serve(service, request, args.n) * 1e6 / args.n for _ in range(args.rounds)]
        print(f"consumer leg + orchestration: {statistics.median(rounds):.1f} us/request "
              f"(median of {args.rounds} x {args.n}; {min(rounds):.1f}-{max(rounds):.1f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
