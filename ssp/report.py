# -*- test-case-name: tests.test_report -*-
"""
The transaction log: per day, consumer, provider and interaction, how many
requests, how they ended, how many bytes and how fast — the volumetric and
performance report GP Connect asks of the proxy, and the basis for the
activity-based remuneration of provider suppliers.

It is computed from the audit files only (the C{"completed"} record of each
request), so anyone holding the files can reproduce it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import attrs

from ssp.chain import read_records

PERCENTILES = (50, 95, 99)
DECISIONS = ("forwarded", "refused", "failed", "abandoned")
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


@attrs.frozen
class Row:
    """
    One line of the report.  Latencies are milliseconds (nearest-rank
    percentiles), L{None} when no request of the group has one.

    @ivar forwarded: answered by the provider (whatever its status).
    @ivar refused: answered by the proxy itself (4xx/5xx OperationOutcome).
    @ivar failed: the provider could not be reached or timed out (502/504).
    @ivar abandoned: the consumer went away first (499).
    @ivar status_2xx: by the status the consumer got, proxy or provider.
    @ivar scope: C{"day"} for a row per day, sender, receiver and
        interaction; C{"sender"}, C{"receiver"}, C{"interaction"} for the
        totals per one of them over the whole range (the other key fields
        empty); C{"total"} for the grand total.
    """

    day: str
    sender: str
    receiver: str
    interaction: str
    requests: int
    forwarded: int
    refused: int
    failed: int
    abandoned: int
    status_2xx: int
    status_3xx: int
    status_4xx: int
    status_5xx: int
    bytes_in: int
    bytes_out: int
    latency_p50_ms: float | None
    latency_p95_ms: float | None
    latency_p99_ms: float | None
    upstream_p50_ms: float | None
    upstream_p95_ms: float | None
    upstream_p99_ms: float | None
    scope: str = "day"


TOTAL_SCOPES = ("sender", "receiver", "interaction", "total")
COLUMNS = tuple(f.name for f in attrs.fields(Row))


@attrs.define
class _Group:
    counts: dict[str, int] = attrs.Factory(dict)
    bytes_in: int = 0
    bytes_out: int = 0
    total: list[float] = attrs.Factory(list)
    upstream: list[float] = attrs.Factory(list)

    def add(self, record: dict[str, Any]) -> None:
        status = record.get("status") or 0
        names: tuple[Any, ...] = ("requests", record.get("decision"), f"status_{status // 100}xx")
        for name in names:
            self.counts[name] = self.counts.get(name, 0) + 1
        self.bytes_in += record.get("bytes_in") or 0
        self.bytes_out += record.get("bytes_out") or 0
        if record.get("total_latency") is not None:
            self.total.append(record["total_latency"])
        if record.get("upstream_latency") is not None:
            self.upstream.append(record["upstream_latency"])

    def row(self, key: tuple[str, str, str, str], scope: str = "day") -> Row:
        total = [percentile_ms(self.total, p) for p in PERCENTILES]
        upstream = [percentile_ms(self.upstream, p) for p in PERCENTILES]
        counts = [
            self.counts.get(name, 0)
            for name in (
                "requests",
                *DECISIONS,
                "status_2xx",
                "status_3xx",
                "status_4xx",
                "status_5xx",
            )
        ]
        values: tuple[Any, ...] = (*key, *counts, self.bytes_in, self.bytes_out, *total, *upstream,
                                   scope)
        return Row(*values)


@attrs.frozen
class Report:
    """
    The transaction log of a range of days.

    @ivar rows: per day, sender, receiver and interaction, sorted by them.
    @ivar totals: per sender, then per receiver, then per interaction
        (each sorted), then the grand total (always present, zero when
        there were no requests).
    """

    rows: list[Row]
    totals: list[Row]

    def all_rows(self) -> list[Row]:
        return self.rows + self.totals


def report(paths: Sequence[Path], since: str | None = None, until: str | None = None) -> Report:
    """
    Aggregate the C{"completed"} records of audit files: every chain found
    (the C{worker-K} directories of a C{--workers} proxy) is merged.

    @param paths: audit directories or files.
    @param since: first day (C{YYYY-MM-DD}, UTC) to include.
    @param until: last day to include.
    @raise ValueError: naming a line that is not an audit record, or an
        inverted range.
    """
    if since and until and since > until:
        raise ValueError(f"inverted range: --from {since} is after --to {until}")
    groups: dict[tuple[str, str, str, str], _Group] = {}
    totals: dict[tuple[str, tuple[str, str, str, str]], _Group] = {}
    for day, record in completed(paths, since, until):
        try:
            key = (day, record["sender"], record["receiver"], record["interaction"])
            groups.setdefault(key, _Group()).add(record)
            for total in _totals_keys(*key[1:]):
                totals.setdefault(total, _Group()).add(record)
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise _malformed(record, e) from None
    totals.setdefault(("total", ("", "", "", "")), _Group())
    ordered = sorted(totals, key=lambda k: (TOTAL_SCOPES.index(k[0]), k[1]))
    return Report([groups[key].row(key) for key in sorted(groups)],
                  [totals[(scope, key)].row(key, scope) for scope, key in ordered])


def _totals_keys(sender: str, receiver: str, interaction: str
                 ) -> tuple[tuple[str, tuple[str, str, str, str]], ...]:
    """
    The totals a request counts in: its sender's, receiver's,
    interaction's, and the grand total.
    """
    return (("sender", ("", sender, "", "")), ("receiver", ("", "", receiver, "")),
            ("interaction", ("", "", "", interaction)), ("total", ("", "", "", "")))


def completed(paths: Sequence[Path], since: str | None = None, until: str | None = None
              ) -> Iterator[tuple[str, dict[str, Any]]]:
    """
    The C{"completed"} records of audit files with their UTC day
    (C{YYYY-MM-DD}), those outside C{since}..C{until} left out: what every
    view of the transaction log is computed from.

    @raise ValueError: naming a record without a usable time.
    """
    for record in read_records(paths):
        if record.get("event") != "completed":
            continue
        try:
            day = datetime.fromtimestamp(record["time"], UTC).strftime("%Y-%m-%d")
        except (KeyError, TypeError, ValueError, OverflowError) as e:
            raise _malformed(record, e) from None
        if (since and day < since) or (until and day > until):
            continue
        yield day, record


def _malformed(record: dict[str, Any], error: Exception) -> ValueError:
    return ValueError(f"malformed completed record {record.get('request_id')!r}: {error!r}")


def percentile_ms(values: list[float], percentile: int) -> float | None:
    """
    Nearest-rank percentile: the smallest value with at least
    C{percentile}% of the values at or below it.
    """
    if not values:
        return None
    ordered = sorted(values)
    rank = -(-percentile * len(ordered) // 100)
    return round(ordered[max(rank, 1) - 1] * 1000, 3)


def write_csv(rows: Iterable[Row], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow("" if v is None else v for v in attrs.astuple(row))


def write_json(rows: Iterable[Row], out: TextIO) -> None:
    json.dump([attrs.asdict(row) for row in rows], out, indent=1)
    out.write("\n")


def _day(text: str) -> str:
    if not _DAY.match(text):
        raise argparse.ArgumentTypeError(f"not a day (YYYY-MM-DD): {text}")
    return text


def main_report(argv: list[str], out: TextIO | None = None) -> int:
    """
    C{ssp report DIR|FILE... [--format csv|json|html] [--from DAY] [--to DAY]
    [--allow-empty]}: print the transaction log; exit 1 if the files cannot
    be read or (without C{--allow-empty}) hold no request in the range, 2
    on bad arguments (an inverted range).
    """
    from ssp import report_html as html  # imports this module

    out = out if out is not None else sys.stdout
    parser = argparse.ArgumentParser(
        prog="ssp report",
        description="Transaction log per day, consumer, provider and interaction, "
        "from the audit files.",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="audit directories or files")
    parser.add_argument("--format", choices=("csv", "json", "html"), default="csv",
                        help="html: one self-contained page for people (default csv)")
    parser.add_argument("--from", dest="since", type=_day, help="first day (UTC), inclusive")
    parser.add_argument("--to", dest="until", type=_day, help="last day (UTC), inclusive")
    parser.add_argument("--allow-empty", action="store_true",
                        help="exit 0 when no completed request is found")
    try:
        options = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 2
    if options.since and options.until and options.since > options.until:
        print(f"ERROR: inverted range: --from {options.since} is after --to {options.until}",
              file=sys.stderr)
        return 2
    try:
        result = report(options.paths, options.since, options.until)
        extra = (html.extras(options.paths, options.since, options.until)
                 if options.format == "html" else None)
    except OSError as e:
        print(f"ERROR: {e.filename}: {e.strerror}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 1
    if extra is not None:
        html.write_html(result.rows, extra, out)
    else:
        (write_json if options.format == "json" else write_csv)(result.all_rows(), out)
    if not result.rows:
        print("WARNING: no completed requests found in " + " ".join(map(str, options.paths))
              + (f" between {options.since or 'the start'} and {options.until or 'the end'}"
                 if options.since or options.until else ""), file=sys.stderr)
        return 0 if options.allow_empty else 1
    return 0
