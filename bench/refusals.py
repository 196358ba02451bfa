#!/usr/bin/env python3
"""
The cost of making a refusal's audit record durable before answering it
(issue 18): refused requests (a sender SDS does not know: 403) over
keep-alive connections against a real proxy process with durability
"always", the bench's configuration (L{run.bench_config}).

    python bench/refusals.py [--requests 4000] [--concurrency 8] [--rounds 3]

Prints refusals per second, latency percentiles and the proxy's CPU per
refusal.  To compare with another revision, run the same file from a
checkout of it (copy it there if it is older): the figures in
docs/audit.md were taken that way.  Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402

UNKNOWN_SENDER = "200000000999"


def refused_request(port: int, token: str) -> bytes:
    from ssp import demo

    return (f"GET /{demo.PROVIDER_ENDPOINT}/metadata HTTP/1.1\r\n"
            f"Host: localhost:{port}\r\nAccept: application/fhir+json\r\n"
            f"Ssp-From: {UNKNOWN_SENDER}\r\nSsp-To: {demo.PROVIDER_ASID}\r\n"
            f"Ssp-InteractionID: {demo.METADATA_INTERACTION}\r\n"
            f"Authorization: Bearer {token}\r\nSsp-TraceID: {uuid.uuid4()}\r\n\r\n").encode()


async def refuse(port: int, ctx: object, requests: int, concurrency: int) -> dict:
    """
    C{concurrency} keep-alive connections sending refused requests back
    to back; latency of each.
    """
    from ssp import demo

    token = demo.bearer_token(time.time())
    latencies: list[float] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost")
        while remaining > 0:
            remaining -= 1
            sent = time.perf_counter()
            writer.write(refused_request(port, token))
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            status = int(head.split()[1])
            length = int(head.lower().split("content-length:")[1].split("\r\n")[0])
            await reader.readexactly(length)
            if status != 403:
                raise SystemExit(f"expected 403, got {status}")
            latencies.append(time.perf_counter() - sent)
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"refusals": len(latencies), "per_second": len(latencies) / elapsed,
            "p50_ms": run.percentile(latencies, 50) * 1000,
            "p99_ms": run.percentile(latencies, 99) * 1000}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    from ssp import demo

    root = Path(tempfile.mkdtemp(prefix="ssp-refusals-"))
    procs = []
    try:
        (root / "etc").mkdir()
        shutil.copy(run.REPO / "etc" / "demo-sds.ldif", root / "etc" / "demo-sds.ldif")
        demo.ensure_pki(root)
        provider, provider_port = run.spawn(["_provider", str(root)], root)
        procs.append(provider)
        proxy, port = run.start_proxy(root, provider_port)
        procs.append(proxy)
        consumer = run.contexts(root / "certs")[1]
        rounds = []
        for _ in range(args.rounds):
            cpu = run.cpu_seconds(proxy.pid)
            result = asyncio.run(refuse(port, consumer, args.requests, args.concurrency))
            result["cpu_ms_per_refusal"] = (run.cpu_seconds(proxy.pid) - cpu) * 1000 / max(
                result["refusals"], 1)
            rounds.append(result)
        summary = {key: round(statistics.median(r[key] for r in rounds), 3)
                   for key in ("per_second", "p50_ms", "p99_ms", "cpu_ms_per_refusal")}
        print(json.dumps({"rounds": rounds, "median": summary}, indent=1))
    finally:
        run.stop(procs)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
