"""
CPU per request of the audit sink alone, against a no-op sink, on a real
reactor kept busy as the proxy keeps it.

    python bench/audit_sink.py                     # this tree, 3 alternating rounds
    python bench/audit_sink.py --baseline DIR      # DIR holds another revision's ssp/:
    mkdir DIR && git archive REV ssp | tar -x -C DIR

Each of C{--concurrency} simulated exchanges spins C{--work} microseconds
of Python on the reactor thread (what the checks and relaying cost), awaits
its C{authorised} record, spins again, then appends its C{completed} record
without waiting for it, as the proxy does.  The figure is process CPU
(user + sys, all threads) per exchange; the audit path's cost is C{file}
minus C{null} from the same round.  Everything runs in a child process per
variant (fresh interpreter, its own temporary directory); a keyed chain
with C{durability = "always"} as in production.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]


def _child(repo: str, variant: str, exchanges: int, concurrency: int, work: float) -> None:
    sys.path.insert(0, repo)
    from twisted.internet import defer, reactor, task

    from ssp.audit import FileAuditSink
    from ssp.chain import KeyedSeal
    from ssp.model import Claims, audit_record

    class Peer:
        host, port = "127.0.0.1", 50000

    claims = Claims("10019", "https://p/fhir", ("G1",), "GPC001", "directcare",
                    "patient/*.read", True)
    fields = dict(method="GET", target="https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/"
                  "fhir/metadata", trace_id="06efbd0f-058f-43ec-aa4b-cd0dc76bd5b1",
                  sender="200000000359", receiver="918999198738",
                  interaction="urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1",
                  client_subject="CN=consumer-0", client_fingerprint="ab" * 32, claims=claims)

    class Null:
        def append(self, record: object) -> defer.Deferred[None]:
            return defer.succeed(None)

    directory = Path(tempfile.mkdtemp(prefix="audit-sink-bench-"))
    sink = (FileAuditSink(directory / "audit", reactor, seal=KeyedSeal(b"k" * 32))
            if variant == "file" else Null())

    def spin() -> None:
        # Python with a GIL-releasing system call every 50 us, as the
        # reactor's socket reads and writes release it.
        now = time.perf_counter()
        end = now + work / 2e6
        while now < end:
            pause = now + 50e-6
            while (now := time.perf_counter()) < pause:
                pass
            time.sleep(0)

    async def exchange(n: int) -> None:
        spin()
        started = reactor.seconds()
        await sink.append(audit_record("authorised", started, Peer(), f"r{n}", **fields))
        await task.deferLater(reactor, 0, spin)
        sink.append(audit_record("completed", started, Peer(), f"r{n}", decision="forwarded",
                                 status=200, bytes_out=180, upstream_latency=0.001,
                                 total_latency=0.002, **fields))

    async def lane(first: int, count: int) -> None:
        for n in range(first, first + count):
            await exchange(n)

    def threads() -> dict[str, float]:
        cpu: dict[str, float] = {}
        for tid in os.listdir("/proc/self/task"):
            stat = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            name = "reactor" if int(tid) == os.getpid() else "others"
            ticks = int(stat[11]) + int(stat[12])
            cpu[name] = cpu.get(name, 0.0) + ticks / os.sysconf("SC_CLK_TCK")
        return cpu

    async def main() -> None:
        if variant == "file":
            await sink.start()
        per_lane = exchanges // concurrency
        await defer.gatherResults([defer.Deferred.fromCoroutine(lane(i * 10**7, 200))
                                   for i in range(concurrency)])  # warm-up
        before, thread_before = os.times(), threads()
        await defer.gatherResults([defer.Deferred.fromCoroutine(lane(i * 10**7, per_lane))
                                   for i in range(concurrency)])
        after, thread_after = os.times(), threads()
        if variant == "file":
            await sink.stop()
        done = per_lane * concurrency
        cpu = (after.user - before.user) + (after.system - before.system)
        print(json.dumps({"ms": cpu * 1000 / done, "threads": {
            name: (thread_after[name] - thread_before.get(name, 0.0)) * 1000 / done
            for name in thread_after}}))

    def run() -> None:
        d = defer.Deferred.fromCoroutine(main())
        d.addErrback(lambda f: print(f.getTraceback(), file=sys.stderr))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--baseline", help="a directory holding another revision's ssp/")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--exchanges", type=int, default=6000)
    parser.add_argument("-c", "--concurrency", type=int, default=8)
    parser.add_argument("--work", type=float, default=600.0,
                        help="microseconds of Python per exchange on the reactor thread")
    args = parser.parse_args()
    trees = {"this": str(HERE)}
    if args.baseline:
        trees["baseline"] = args.baseline
    results: dict[str, list[float]] = {}
    splits: dict[str, list[dict[str, float]]] = {}
    for round_ in range(args.rounds):
        runs = [(tree, variant) for tree in trees for variant in ("file", "null")]
        for tree, variant in runs if round_ % 2 == 0 else reversed(runs):
            out = subprocess.run(
                [sys.executable, __file__, "_child", trees[tree], variant, str(args.exchanges),
                 str(args.concurrency), str(args.work)],
                check=True, capture_output=True, text=True).stdout
            result = json.loads(out)
            results.setdefault(f"{tree} {variant}", []).append(result["ms"])
            splits.setdefault(f"{tree} {variant}", []).append(result["threads"])
    for key, values in results.items():
        print(f"{key:14} {statistics.median(values):6.3f} ms/exchange "
              f"[{min(values):.3f}-{max(values):.3f}]")
    for tree in trees:
        audit = [f - n for f, n in zip(results[f"{tree} file"], results[f"{tree} null"])]
        print(f"{tree:14} audit path {statistics.median(audit):6.3f} ms/exchange "
              f"[{min(audit):.3f}-{max(audit):.3f}]")
        names = sorted({name for split in splits[f"{tree} file"] for name in split})
        print("    per thread: " + ", ".join(
            f"{name} {statistics.median(s.get(name, 0.0) for s in splits[f'{tree} file']):.3f}"
            for name in names))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6]))
    else:
        main()
