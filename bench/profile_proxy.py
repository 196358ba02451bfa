#!/usr/bin/env python3
"""
Profile one proxy process under the benchmark's keep-alive (or
new-handshake) load and print where its reactor thread spends its time.

    python bench/profile_proxy.py [--seconds 10] [--handshake | --rate R] [--cprofile] [--raw FILE]

It starts the provider and one proxy exactly as C{bench/run.py} does,
warms up, then samples the proxy with py-spy (C{pip install py-spy}) for
C{--seconds} while the load runs; without py-spy, or with C{--cprofile},
the proxy runs under cProfile instead (slower, and it distorts small
functions, but needs nothing installed).  Not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import pstats
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
import run  # noqa: E402  (bench/run.py, next to this file)


def summarise_raw(path: Path, top: int) -> str:
    """
    Self and inclusive shares of the reactor thread's samples, from
    py-spy's C{raw} (collapsed stacks) output.
    """
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "proxy_main" not in stack:  # the reactor thread only
            continue
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    out = [f"reactor-thread samples: {total}", "", "self:"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in own.most_common(top)]
    # py-spy names files under the working directory relative to it: (tls.py:206).
    ours = {f"({p.name}:" for p in (run.REPO / "ssp").glob("*.py")}
    out += ["", "inclusive (ssp and PyJWT frames):"]
    out += [f"  {100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common()
            if any(o in f for o in ours) or "/jwt/" in f][:top]
    return "\n".join(out)


async def load(target: run.Target, seconds: float, keepalive: bool, rate: float | None,
               sampler: list[str] | None) -> dict:
    await run.closed_loop(target, 400, 8, True, 10)
    spy = subprocess.Popen(sampler) if sampler else None
    try:
        if rate is not None:
            result = await run.open_loop(target, rate, seconds, 8)
            return {**result, "rps": result["requests"] / seconds}
        return await run.closed_loop(target, 10**7, 8, keepalive, seconds)
    finally:
        if spy is not None:
            spy.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--handshake", action="store_true",
                        help="a new TLS connection per request instead of keep-alive")
    parser.add_argument("--rate", type=float, default=None,
                        help="an open loop at this many req/s (the latency phase) instead")
    parser.add_argument("--cprofile", action="store_true", help="use cProfile, not py-spy")
    parser.add_argument("--raw", type=Path, default=None,
                        help="keep py-spy's raw collapsed stacks in this file")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    py_spy = None if args.cprofile else shutil.which("py-spy")
    root = Path(tempfile.mkdtemp(prefix="ssp-profile-"))
    bench = run.Bench(argparse.Namespace(nginx=False), root)
    stats_file = root / "proxy.cprofile"
    if py_spy is None:
        os.environ["SSP_BENCH_CPROFILE"] = str(stats_file)
    raw = args.raw or root / "py-spy.raw"
    try:
        bench.start()
        proxy = bench.targets[-1]
        sampler = None
        if py_spy is not None:
            sampler = [py_spy, "record", "--pid", str(bench.proxies[0].pid), "--format", "raw",
                       "--output", str(raw), "--duration", str(int(args.seconds)),
                       "--rate", "250", "--nonblocking"]
        result = asyncio.run(load(proxy, args.seconds, not args.handshake, args.rate, sampler))
        print(f"{result['requests']} requests, {result['rps']:.0f} req/s, "
              f"{result['errors']} errors", file=sys.stderr)
        if py_spy is not None:
            print(summarise_raw(raw, args.top))
    finally:
        run.stop(bench.procs)
        if py_spy is None and stats_file.exists():
            pstats.Stats(str(stats_file)).sort_stats("tottime").print_stats(args.top)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
