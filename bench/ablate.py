#!/usr/bin/env python3
"""
Where the proxy's CPU per request goes, by switching one part off at a
time: the floor and one proxy per variant, measured in alternating rounds
of the same run.

    python bench/ablate.py [VARIANT ...] [--rounds 4] [-n 1500] [-c 8] [--handshake]

Every variant is the benchmark's proxy (C{run.bench_config}: every check,
fsync before forwarding, the access log) with one difference:

    full       nothing switched off
    nofsync    audit durability "never" (records written, never fsynced)
    noaccess   no access log
    notoken    token validation off ([token] validate = false)
    nullaudit  the audit sink replaced by one that keeps nothing and answers at once
    bare       all four of the above

The difference between C{full} and a variant is what that part costs, in
CPU milliseconds per request of the proxy process (every thread, user and
system), next to the floor (C{bench/floor.py}) of the same rounds.  At the
end it prints each process's CPU by thread (reactor, audit writer, ...).
Exploration, not a test, and not a configuration anyone should run: the
no-op sink exists only in this file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]
import run  # noqa: E402  (bench/run.py, next to this file)

VARIANTS: dict[str, dict[str, Any]] = {
    "full": {},
    "nofsync": {"durability": "never"},
    "noaccess": {"access_log": False},
    "notoken": {"validate": False},
    "nullaudit": {"null_audit": True},
    "bare": {"durability": "never", "access_log": False, "validate": False, "null_audit": True},
}


def variant_config(root: Path, provider_port: int, variant: str) -> Any:
    import attrs

    change = VARIANTS[variant]
    config = run.bench_config(root, provider_port)
    if "durability" in change:
        config = attrs.evolve(config, audit=attrs.evolve(config.audit,
                                                         durability=change["durability"]))
    if "access_log" in change:
        config = attrs.evolve(config, log=attrs.evolve(config.log,
                                                       access_log=change["access_log"]))
    if "validate" in change:
        config = attrs.evolve(config, token=attrs.evolve(config.token,
                                                         validate=change["validate"]))
    return config


def proxy_main(root: Path, provider_port: int, fd: int, variant: str) -> None:
    """
    One variant's proxy on the inherited listening socket C{fd}
    (L{run.serve_proxy}).
    """
    run.serve_proxy(root, f"proxy-{variant}", fd,
                    lambda reactor: variant_service(root, provider_port, variant, reactor))


def variant_service(root: Path, provider_port: int, variant: str, reactor: Any) -> Any:
    from twisted.internet.defer import succeed
    from zope.interface import implementer

    from ssp.interfaces import IAuditSink
    from ssp.service import Concerns, SSPService

    @implementer(IAuditSink)
    class NoAudit:
        writable = True
        pending = 0

        def start(self) -> Any:
            return succeed(None)

        stop = start

        def append(self, record: Any) -> Any:
            return succeed(None)

    concerns = Concerns(audit=NoAudit()) if VARIANTS[variant].get("null_audit") else Concerns()
    return SSPService(variant_config(root, provider_port, variant), reactor, concerns=concerns)


def threads_cpu(pid: int) -> list[tuple[str, float]]:
    """
    CPU seconds (user + system) of each thread of C{pid}, by name.
    """
    out = []
    tick = os.sysconf("SC_CLK_TCK")
    for tid in sorted(os.listdir(f"/proc/{pid}/task"), key=int):
        task = Path(f"/proc/{pid}/task/{tid}")
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        name = "reactor" if tid == str(pid) else f"thread {tid}"
        out.append((name, (int(fields[11]) + int(fields[12])) / tick))
    return out


async def measure(args: argparse.Namespace, root: Path, procs: list[subprocess.Popen]) -> None:
    from ssp import demo

    (root / "etc").mkdir()
    demo.ensure_pki(root)
    provider, provider_port = run.spawn(["_provider", str(root)], root, script=BENCH / "run.py")
    procs.append(provider)
    floor, floor_port = run.spawn([str(root / "certs"), str(provider_port)], root,
                                  script=BENCH / "floor.py", name="floor")
    procs.append(floor)
    _, as_consumer = run.contexts(root / "certs")
    targets = [run.Target("floor", floor_port, "localhost", as_consumer,
                          run.requests_for(lambda: floor_port)[1], lambda: [floor.pid])]
    for variant in args.variants:
        proc, port = run.start_proxy(root, provider_port, Path(__file__), (variant,),
                                     f"proxy-{variant}")
        procs.append(proc)
        targets.append(run.Target(variant, port, "localhost", as_consumer,
                                  run.requests_for(lambda port=port: port)[1],
                                  lambda proc=proc: [proc.pid]))
    for target in targets:  # warm-up
        await run.closed_loop(target, max(100, args.c * 10), args.c, True, 10)
    cost: dict[str, list[float]] = {t.name: [] for t in targets}
    for n in range(args.rounds):
        for target in targets if n % 2 == 0 else list(reversed(targets)):
            before = sum(run.cpu_seconds(p) for p in target.pids())
            result = await run.closed_loop(target, args.n, args.c, not args.handshake, 30)
            after = sum(run.cpu_seconds(p) for p in target.pids())
            cost[target.name].append((after - before) * 1000 / max(result["requests"], 1))
        print(f"round {n + 1}/{args.rounds}", file=sys.stderr)
    floor_ms = statistics.median(cost["floor"])
    full_ms = statistics.median(cost["full"]) if "full" in cost else None
    kind = "new connection" if args.handshake else f"keep-alive, C={args.c}"
    print(f"CPU ms/request ({kind}), medians of {args.rounds} alternating rounds")
    print(f"{'variant':10} {'ms/req':>7} {'x floor':>8} {'full - it':>10}  range")
    for name, values in cost.items():
        median = statistics.median(values)
        saved = f"{full_ms - median:10.3f}" if full_ms is not None and name != "floor" else " " * 10
        print(f"{name:10} {median:7.3f} {median / floor_ms:8.2f} {saved}  "
              f"{min(values):.3f}-{max(values):.3f}")
    print("\nCPU seconds by thread over the whole run (warm-up included):")
    for target in targets:
        for pid in target.pids():
            split = ", ".join(f"{name} {seconds:.2f}" for name, seconds in threads_cpu(pid)
                              if seconds > 0)
            print(f"  {target.name:10} {split}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("variants", nargs="*", metavar="VARIANT",
                        help=f"any of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("-n", type=int, default=1500, help="requests per round and variant")
    parser.add_argument("-c", type=int, default=8, help="concurrent connections")
    parser.add_argument("--handshake", action="store_true",
                        help="a new TLS connection per request instead of keep-alive")
    args = parser.parse_args()
    args.variants = args.variants or list(VARIANTS)
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    root = Path(tempfile.mkdtemp(prefix="ssp-ablate-"))
    procs: list[subprocess.Popen] = []
    try:
        asyncio.run(measure(args, root, procs))
    finally:
        run.stop(procs)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["_proxy"]:
        proxy_main(Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        raise SystemExit(main())
