"""
What one SDS lookup costs the reactor thread in L{ssp.directory.CachingDirectory},
with the cache holding 1,000 and 100,000 answers.

    python bench/sds_cache.py            # this checkout
    PYTHONPATH=/path/to/other/checkout python bench/sds_cache.py   # another revision

Three kinds of lookup, each timed over a few thousand calls (the median of five
rounds):

  - hit: a cached, fresh answer;
  - miss: an ASID never seen, answered at once by the directory behind and
    stored, so a full cache drops one entry (the cost issue 17 found O(n));
  - unknown: as a miss, but the directory has no such system (a negative answer).

The directory behind answers synchronously, so only the cache's own work is
measured.  Figures are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from ssp.directory import CachingDirectory
from ssp.model import AccreditedSystem, MessageHandler


class _Instant:
    """
    A directory that knows every even ASID, and answers at once.
    """

    reachable = True

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        if int(asid) % 2:
            return succeed(None)
        return succeed(AccreditedSystem(asid, "X", f"P-{asid}", frozenset({"urn:i"})))

    def message_handlers(self, party_key: str, interaction: str | None
                         ) -> Deferred[tuple[MessageHandler, ...]]:
        return succeed(())

    def knows_interaction(self, interaction: str) -> bool:
        return False


def _per_call(calls: int, lookup: Any) -> float:
    started = time.perf_counter()
    for n in range(calls):
        lookup(n)
    return (time.perf_counter() - started) / calls


def measure(entries: int, calls: int) -> dict[str, float]:
    """
    Median seconds per lookup of each kind, with C{entries} answers cached.
    """
    cache = CachingDirectory(_Instant(), Clock(), ttl=300, negative_ttl=60, stale_limit=600,
                             max_entries=entries)
    for n in range(entries):
        cache.accredited_system(str(2 * n))
    fresh = 2 * entries
    rounds: dict[str, list[float]] = {"hit": [], "miss": [], "unknown": []}
    for _ in range(5):
        cached = fresh - 2 * entries  # the oldest even ASID still cached
        rounds["hit"].append(_per_call(calls, lambda n: cache.accredited_system(
            str(cached + 2 * (n * 7919 % entries)))))
        rounds["miss"].append(_per_call(calls, lambda n: cache.accredited_system(
            str(fresh + 2 * n))))
        rounds["unknown"].append(_per_call(calls, lambda n: cache.accredited_system(
            str(fresh + 2 * n + 1))))
        fresh += 2 * calls
    return {kind: statistics.median(times) for kind, times in rounds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="lookups per round and kind")
    args = parser.parse_args()
    print(f"{'entries':>8} {'hit µs':>8} {'miss µs':>9} {'unknown µs':>11}")
    for entries in (1_000, 100_000):
        figures = measure(entries, args.calls)
        print(f"{entries:>8} {figures['hit'] * 1e6:>8.1f} {figures['miss'] * 1e6:>9.1f} "
              f"{figures['unknown'] * 1e6:>11.1f}", flush=True)


if __name__ == "__main__":
    main()
