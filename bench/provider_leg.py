"""
CPU per request of the provider leg, in memory, beside the floor's.

    python bench/provider_leg.py [-n 5000] [--rounds 5]

One keep-alive cycle: C{ssp.forward.Upstream.request} (pool, request
written), a six-field response head parsed and guarded, a 170-byte body
relayed to a stand-in consumer, the connection back in the pool.  No TLS
and no sockets: the connection is a string transport.  The floor's cycle
(C{bench/floor.py}: C{Agent} + C{HTTPConnectionPool} and its plain relay)
runs in the same process, alternating, so the ratio holds on a loaded
host.  Not a test; nothing under C{tests/} imports it.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]

import floor  # noqa: E402  (bench/floor.py, next to this file)
from twisted.internet.task import Clock  # noqa: E402
from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory  # noqa: E402
from twisted.web.http_headers import Headers  # noqa: E402

from ssp import forward  # noqa: E402
from ssp.config import UpstreamConfig  # noqa: E402

BODY = b'{"resourceType":"CapabilityStatement","status":"active","kind":"instance",' + b" " * 96 + b"}"
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: TwistedWeb/26.10.0\r\n"
            b"Date: Thu, 03 Dec 2026 18:00:00 GMT\r\nContent-Type: application/fhir+json\r\n"
            b"X-Request-Id: 1234\r\nContent-Length: %d\r\n\r\n" % len(BODY)) + BODY
URL = b"https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata"
KEY = (b"https", b"orange.testlab.nhs.uk", 443)
HEADERS = Headers({
    b"Host": [b"orange.testlab.nhs.uk"], b"Accept": [b"application/fhir+json"],
    b"Ssp-TraceID": [b"5f0b2a4e-1c1d-4f7e-9a55-0c1e2d3f4a5b"], b"Ssp-From": [b"200000000359"],
    b"Ssp-To": [b"918999198993"],
    b"Ssp-InteractionID": [b"urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"],
    b"Authorization": [b"Bearer " + b"x" * 600],
    b"Forwarded": [b"for=127.0.0.1;proto=https;by=127.0.0.1"]})


class _Consumer:
    """
    What the relays write to: a request that keeps nothing.
    """

    gone = _disconnected = False
    transport = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        pass

    def unregisterProducer(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def finish(self) -> None:
        pass


class _NoTLS:
    def creator_for(self, hostname: str) -> None:
        return None


def _pooled(pool: HTTPConnectionPool, factory: Any) -> Any:
    """
    One connection over a string transport, idle in C{pool}.
    """
    protocol = factory(lambda p: pool._putConnection(KEY, p), "bench").buildProtocol(None)
    protocol.makeConnection(StringTransport())
    pool._putConnection(KEY, protocol)
    return protocol


def ssp_cycle() -> Callable[[], None]:
    clock = Clock()
    config = UpstreamConfig(certificate=Path("-"), private_key=Path("-"), ca=Path("-"))
    upstream = forward.Upstream(clock, config, _NoTLS())  # type: ignore[arg-type]
    connection = _pooled(upstream.pool, upstream.pool._factory)

    def cycle() -> None:
        responses: list[Any] = []
        upstream.request(b"GET", URL, HEADERS, None).addCallback(responses.append)
        connection.transport.clear()
        connection.dataReceived(RESPONSE)
        done, _ = forward.relay(responses[0], _Consumer(), clock, 60.0, "bench")
        done.addCallback(lambda sent: None)
    return cycle


def floor_cycle() -> Callable[[], None]:
    clock = Clock()
    pool = HTTPConnectionPool(clock)
    agent = Agent.usingEndpointFactory(clock, floor.Loopback(1, None, None), pool)  # type: ignore[arg-type]
    connection = _pooled(pool, _HTTP11ClientFactory)

    def cycle() -> None:
        responses: list[Any] = []
        agent.request(b"GET", URL, HEADERS, None).addCallback(responses.append)
        connection.transport.clear()
        connection.dataReceived(RESPONSE)
        responses[0].deliverBody(floor.Relay(_Consumer()))
    return cycle


def per_cycle(cycle: Callable[[], None], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        cycle()
    return (time.process_time() - started) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    cycles = {"ssp": ssp_cycle(), "floor": floor_cycle()}
    for cycle in cycles.values():
        per_cycle(cycle, 500)
    gc.collect()
    times: dict[str, list[float]] = {name: [] for name in cycles}
    for round_ in range(args.rounds):
        for name in sorted(cycles, reverse=bool(round_ % 2)):
            times[name].append(per_cycle(cycles[name], args.n))
    for name, values in times.items():
        print(f"{name:6} {min(values):6.1f} us/cycle (min; median {statistics.median(values):.1f})")
    print(f"ssp/floor {min(times['ssp']) / min(times['floor']):.2f}")


if __name__ == "__main__":
    main()
