"""
Tests for L{ssp.report}: the transaction log computed from audit files,
checked against a known traffic mix whose numbers are worked out by hand.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp.audit import FileAuditSink
from ssp.model import AuditRecord, Claims
from ssp.report import COLUMNS, Row, main_report, percentile_ms, report

A, B, P = "200000000359", "200000000360", "918999198738"
MD = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
SR = "urn:nhs:names:services:gpconnect:fhir:operation:gpc.getstructuredrecord-1"
DAY_1 = datetime(2024, 3, 1, 10, 0, tzinfo=UTC).timestamp()
DAY_2 = datetime(2024, 3, 2, 0, 0, 5, tzinfo=UTC).timestamp()

# (sender, receiver, interaction, decision, status, bytes_in, bytes_out, total, upstream)
TRAFFIC_DAY_1 = [
    (A, P, MD, "forwarded", 200, 0, 1000, 0.010, 0.008),
    (A, P, MD, "forwarded", 200, 0, 2000, 0.020, 0.018),
    (A, P, MD, "forwarded", 200, 0, 3000, 0.030, 0.028),
    (A, P, MD, "forwarded", 404, 0, 500, 0.040, 0.038),
    (A, P, MD, "refused", 403, 0, 700, 0.001, None),
    (A, P, SR, "failed", 502, 150, 300, 5.0, None),
    (A, P, SR, "abandoned", 499, 150, 0, 2.5, 2.4),
    (B, P, MD, "forwarded", 304, 0, 0, 0.012, 0.011),
]
TRAFFIC_DAY_2 = [
    ("", "", "", "refused", 400, 0, 600, 0.0005, None),
    (A, P, MD, "forwarded", 500, 0, 100, 0.050, 0.049),
]

# fmt: off
EXPECTED = [
    # day, sender, receiver, interaction, requests, forwarded, refused, failed, abandoned,
    # 2xx, 3xx, 4xx, 5xx, bytes in, bytes out, total p50/p95/p99, upstream p50/p95/p99 (ms)
    Row("2024-03-01", A, P, SR, 2, 0, 0, 1, 1, 0, 0, 1, 1, 300, 300,
        2500.0, 5000.0, 5000.0, 2400.0, 2400.0, 2400.0),
    Row("2024-03-01", A, P, MD, 5, 4, 1, 0, 0, 3, 0, 2, 0, 0, 7200,
        20.0, 40.0, 40.0, 18.0, 38.0, 38.0),
    Row("2024-03-01", B, P, MD, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 0,
        12.0, 12.0, 12.0, 11.0, 11.0, 11.0),
    Row("2024-03-02", "", "", "", 1, 0, 1, 0, 0, 0, 0, 1, 0, 0, 600,
        0.5, 0.5, 0.5, None, None, None),
    Row("2024-03-02", A, P, MD, 1, 1, 0, 0, 0, 0, 0, 0, 1, 0, 100,
        50.0, 50.0, 50.0, 49.0, 49.0, 49.0),
]
# fmt: on


class PercentileTests(SynchronousTestCase):
    def test_nearest_rank(self) -> None:
        values = [n / 1000 for n in range(100, 0, -1)]
        self.assertEqual([percentile_ms(values, p) for p in (50, 95, 99)], [50.0, 95.0, 99.0])
        self.assertEqual(percentile_ms([0.003], 99), 3.0)
        self.assertIsNone(percentile_ms([], 50))

    def test_rank_exact(self) -> None:
        """
        The rank is computed in integers: 7% of 100 values is the 7th,
        not the 8th as 0.07 * 100 in floating point would suggest.
        """
        values = [n / 1000 for n in range(1, 101)]
        self.assertEqual(percentile_ms(values, 7), 7.0)


class ReportTests(TestCase):
    async def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        clock = Clock()
        clock.advance(DAY_1)
        sink = FileAuditSink(self.directory, reactor, clock, rotate_bytes=4096)
        self.addCleanup(sink.stop)
        await sink.start()
        count = 0
        for day, traffic in ((DAY_1, TRAFFIC_DAY_1), (DAY_2, TRAFFIC_DAY_2)):
            clock.advance(day - clock.seconds())
            for (
                sender,
                receiver,
                interaction,
                decision,
                status,
                bytes_in,
                bytes_out,
                total,
                upstream,
            ) in traffic:
                count += 1
                common: dict[str, Any] = {
                    "request_id": f"req-{count}",
                    "time": clock.seconds(),
                    "sender": sender,
                    "receiver": receiver,
                    "interaction": interaction,
                    "claims": Claims(subject="10019"),
                }
                if decision == "forwarded":
                    await sink.append(
                        AuditRecord(event="authorised", decision="forwarded", **common)
                    )
                await sink.append(
                    AuditRecord(
                        event="completed",
                        decision=decision,
                        status=status,
                        bytes_in=bytes_in,
                        bytes_out=bytes_out,
                        total_latency=total,
                        upstream_latency=upstream,
                        **common,
                    )
                )
                clock.advance(1)
            await sink.append(
                AuditRecord(event="tls-failed", request_id="tls", time=clock.seconds())
            )
        await sink.stop()

    def test_rows(self) -> None:
        """
        Only C{completed} records count, grouped by UTC day, sender,
        receiver and interaction, across rotated files.
        """
        self.assertGreater(len(list(self.directory.iterdir())), 1)
        self.assertEqual(report([self.directory]).rows, EXPECTED)

    def test_totals(self) -> None:
        """
        Totals per sender, receiver and interaction, then the grand total,
        recomputed from the records (percentiles are not averages of rows).
        """
        totals = {(row.scope, row.sender, row.receiver, row.interaction): row
                  for row in report([self.directory]).totals}
        self.assertEqual([row.scope for row in report([self.directory]).totals],
                         ["sender"] * 3 + ["receiver"] * 2 + ["interaction"] * 3 + ["total"])
        total = totals[("total", "", "", "")]
        self.assertEqual((total.requests, total.forwarded, total.refused, total.failed,
                          total.abandoned, total.bytes_out), (10, 6, 2, 1, 1, 8200))
        self.assertEqual(total.latency_p50_ms, 20.0)
        self.assertEqual(totals[("sender", A, "", "")].requests, 8)
        self.assertEqual(totals[("receiver", "", P, "")].requests, 9)
        self.assertEqual(totals[("interaction", "", "", MD)].requests, 7)
        self.assertEqual(totals[("interaction", "", "", SR)].upstream_p50_ms, 2400.0)

    def test_day_range(self) -> None:
        self.assertEqual(report([self.directory], since="2024-03-02").rows, EXPECTED[3:])
        self.assertEqual(report([self.directory], until="2024-03-01").rows, EXPECTED[:3])
        self.assertEqual(
            report([self.directory], since="2024-03-02", until="2024-03-02").rows, EXPECTED[3:]
        )
        empty = report([self.directory], since="2024-03-03")
        self.assertEqual(empty.rows, [])
        self.assertEqual([(r.scope, r.requests) for r in empty.totals], [("total", 0)])

    def test_empty_is_an_error_unless_allowed(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        out = io.StringIO()
        self.assertEqual(main_report([str(self.directory), "--from", "2024-03-03"], out), 1)
        self.assertIn("WARNING: no completed requests", sys.stderr.getvalue())
        self.assertEqual(
            main_report([str(self.directory), "--from", "2024-03-03", "--allow-empty"], out), 0)

    def test_inverted_range(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main_report(
            [str(self.directory), "--from", "2024-03-02", "--to", "2024-03-01"], io.StringIO()), 2)
        self.assertIn("inverted range", sys.stderr.getvalue())
        with self.assertRaises(ValueError):
            report([self.directory], since="2024-03-02", until="2024-03-01")

    def test_workers_layout_merged(self) -> None:
        """
        C{DIR/worker-K} chains (C{--workers}) are found and merged.
        """
        parent = Path(self.mktemp())
        for k in range(2):
            shutil.copytree(self.directory, parent / f"worker-{k}")
        merged = report([parent])
        self.assertEqual([r.requests for r in merged.rows], [2 * r.requests for r in EXPECTED])

    def test_csv(self) -> None:
        out = io.StringIO()
        self.assertEqual(main_report([str(self.directory)], out), 0)
        table = list(csv.reader(io.StringIO(out.getvalue())))
        self.assertEqual(tuple(table[0]), COLUMNS)
        self.assertEqual(len(table), 15)
        self.assertEqual(table[-1][0:5] + table[-1][-1:], ["", "", "", "", "10", "total"])
        self.assertEqual(
            table[2],
            [
                "2024-03-01",
                A,
                P,
                MD,
                "5",
                "4",
                "1",
                "0",
                "0",
                "3",
                "0",
                "2",
                "0",
                "0",
                "7200",
                "20.0",
                "40.0",
                "40.0",
                "18.0",
                "38.0",
                "38.0",
                "day",
            ],
        )
        self.assertEqual(table[4][-4:], ["", "", "", "day"])

    def test_json(self) -> None:
        out = io.StringIO()
        self.assertEqual(
            main_report([str(self.directory), "--format", "json", "--from", "2024-03-02"], out), 0
        )
        rows = json.loads(out.getvalue())
        self.assertEqual([Row(**row) for row in rows if row["scope"] == "day"], EXPECTED[3:])
        self.assertIsNone(rows[0]["upstream_p50_ms"])

    def test_unreadable(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main_report([str(self.directory / "missing.jsonl")], io.StringIO()), 1)
        bad = self.directory / "audit-20240303-0001.jsonl"
        bad.write_text("garbage\n")
        self.assertEqual(main_report([str(self.directory)], io.StringIO()), 1)
        self.assertIn(f"{bad}:1: not a JSON audit record", sys.stderr.getvalue())

    def test_usage(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        self.assertEqual(main_report([str(self.directory), "--from", "1 March"], io.StringIO()), 2)
        self.assertEqual(main_report([], io.StringIO()), 2)
