#!/usr/bin/env python3
"""
A/B: the proxy of a baseline revision against the working tree, run
alternately, reporting medians and ratios of the proxy's own CPU per
request (and per streamed body) side by side.

    python bench/ab.py [BASELINE] [--rounds 5] [--requests 1500] [--stream-mib 256]

BASELINE is a git revision (default HEAD), checked out into a throw-away
git worktree.  Each round runs C{bench/run.py} of the baseline and then of
the working tree (the order alternates between rounds), with the
keep-alive, new-handshake, latency and stream phases and neither nginx nor
the workers row.  CPU per request is steadier than req/s on a machine whose
other tenants come and go, and alternating spreads their load over both
sides; rounds in which either side saw outside load are counted and
named, and kept (on a shared machine few rounds are quiet: compare the
medians, not single rounds).  Not a test.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOREIGN_LIMIT = 0.2

# (label, phase, how to read one side's value from run.py's results)
METRICS = (
    ("keep-alive hop CPU ms/req", "keepalive", lambda r: r["cpu_ms_per_request"]["ssp"]),
    ("keep-alive req/s", "keepalive", lambda r: r["rps"]),
    ("handshake hop CPU ms/req", "handshake", lambda r: r["cpu_ms_per_request"]["ssp"]),
    ("latency p50 ms @rate", "latency", lambda r: r["p50_ms"]),
    ("latency hop CPU ms/req", "latency", lambda r: r["cpu_ms_per_request"]["ssp"]),
    ("stream hop CPU ms/MiB", "stream", lambda r: r["cpu_ms_per_request"]["ssp"] * (1 << 20)
     / r["bytes"]),
    ("stream MiB/s", "stream", lambda r: r["mib_per_s"]),
)


# The floor (bench/floor.py) measured in the same runs: each side's ssp/floor
# ratio of CPU per request, per round, so outside load cancels within a run.
FLOOR_METRICS = (
    ("keep-alive ssp/floor CPU", "keepalive"),
    ("handshake ssp/floor CPU", "handshake"),
)

LABELS = [m[0] for m in METRICS] + [m[0] for m in FLOOR_METRICS]


def _range(values: list[float]) -> str:
    return f"{min(values):.3f}-{max(values):.3f}"


def run_side(tree: Path, args: argparse.Namespace, out: Path) -> dict:
    command = [sys.executable, str(tree / "bench" / "run.py"), "--no-nginx", "--workers", "1",
               "--requests", str(args.requests), "--duration", str(args.duration),
               "--stream-bytes", str(args.stream_mib << 20), "--json", str(out)]
    subprocess.run(command, cwd=tree, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return json.loads(out.read_text())


def busy(results: dict) -> bool:
    return any(results[phase]["ssp"].get("foreign_cores", 0) > FOREIGN_LIMIT
               for phase in ("keepalive", "handshake", "latency", "stream") if phase in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", nargs="?", default="HEAD")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=1500)
    parser.add_argument("--duration", type=float, default=4.0,
                        help="seconds of the latency phase (default 4)")
    parser.add_argument("--stream-mib", type=int, default=256)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="ssp-ab-"))
    base_tree = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "-q", str(base_tree), args.baseline],
                   cwd=REPO, check=True)
    sides = {"baseline": base_tree, "tree": REPO}
    values: dict[str, dict[str, list[float]]] = {s: {label: [] for label in LABELS}
                                                  for s in sides}
    busy_rounds = 0
    try:
        for n in range(args.rounds):
            order = list(sides) if n % 2 == 0 else list(reversed(sides))
            round_results = {s: run_side(sides[s], args, work / f"{s}-{n}.json") for s in order}
            flagged = [s for s, r in round_results.items() if busy(r)]
            busy_rounds += bool(flagged)
            note = f" (outside load during: {', '.join(flagged)})" if flagged else ""
            print(f"round {n + 1}/{args.rounds}{note}", file=sys.stderr)
            for side, results in round_results.items():
                for label, phase, read in METRICS:
                    values[side][label].append(read(results[phase]["ssp"]))
                for label, phase in FLOOR_METRICS:
                    hops = results[phase]
                    values[side][label].append(hops["ssp"]["cpu_ms_per_request"]["ssp"]
                                               / hops["floor"]["cpu_ms_per_request"]["floor"])
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=REPO)
        shutil.rmtree(work, ignore_errors=True)

    print(f"baseline {args.baseline} vs working tree: medians of {args.rounds} rounds, "
          f"{busy_rounds} of them with outside load above {FOREIGN_LIMIT} cores")
    print(f"{'metric':30} {'baseline':>10} {'tree':>10} {'tree/base':>10}  "
          "ranges (baseline | tree)")
    for label in LABELS:
        a = statistics.median(values["baseline"][label])
        b = statistics.median(values["tree"][label])
        print(f"{label:30} {a:10.3f} {b:10.3f} {b / a:9.2f}x  "
              f"{_range(values['baseline'][label])} | {_range(values['tree'][label])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
