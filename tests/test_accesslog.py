"""
Tests for L{ssp.accesslog}: buffering, flushing, rotation, failures, and
the service writing it for real requests.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

import attrs
from hypothesis import example, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.trial import unittest

from ssp.accesslog import AccessLogFile, iso_time, line_of
from ssp.model import AuditRecord
from tests.support import Provider, Proxy, spine_headers


def record(n: int, event: str = "completed") -> AuditRecord:
    return AuditRecord(event=event, request_id=f"r{n}", time=1_800_000_000.25 + n,
                       consumer_address="127.0.0.1:5000", method="GET",
                       target="https://provider.example/fhir/metadata", trace_id=f"t{n}",
                       sender="200000000359", receiver="918999198738", interaction="urn:x",
                       decision="forwarded", status=200, bytes_out=180,
                       upstream_latency=0.001, total_latency=0.002)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class AccessLogFileTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = Path(self.mktemp()) / "access.log"
        self.log = AccessLogFile(self.path, self.clock, flush_interval=1.0, buffer_bytes=4096)
        self.log.start()
        self.addCleanup(self.log.stop)

    def test_lines_wait_for_the_flush_interval(self) -> None:
        """
        Completed records are buffered and written together once the flush
        interval has passed since the first; other events are not logged.
        """
        self.log(record(1))
        self.log(record(2, event="authorised"))
        self.log(record(3))
        self.assertEqual(self.path.read_text(), "")
        self.clock.advance(0.999)
        self.assertEqual(self.path.read_text(), "")
        self.clock.advance(0.001)
        self.assertEqual([line["request_id"] for line in lines(self.path)], ["r1", "r3"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_full_buffer_is_written_at_once(self) -> None:
        """
        Reaching C{buffer_bytes} writes without waiting for the timer.
        """
        count = 4096 // len(line_of(record(0))) + 1
        for n in range(count):
            self.log(record(n))
        self.assertEqual(len(lines(self.path)), count)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop_writes_what_is_buffered(self) -> None:
        self.log(record(1))
        self.log.stop()
        self.assertEqual([line["request_id"] for line in lines(self.path)], ["r1"])

    def test_reopen_follows_rotation(self) -> None:
        """
        After the file is renamed away, L{AccessLogFile.reopen} writes what
        was buffered to the old file and new lines to a new one at C{path}.
        """
        self.log(record(1))
        rotated = self.path.with_name("access.log.1")
        self.path.rename(rotated)
        self.log.reopen()
        self.log(record(2))
        self.clock.advance(1.0)
        self.assertEqual([line["request_id"] for line in lines(rotated)], ["r1"])
        self.assertEqual([line["request_id"] for line in lines(self.path)], ["r2"])

    def test_line_fields(self) -> None:
        self.assertEqual(json.loads(line_of(record(1))), {
            "time": "2027-01-15T08:00:01.250+00:00", "request_id": "r1",
            "consumer": "127.0.0.1:5000", "method": "GET",
            "target": "https://provider.example/fhir/metadata", "status": 200,
            "decision": "forwarded", "token": "", "from": "200000000359", "to": "918999198738",
            "interaction": "urn:x", "trace": "t1", "bytes_in": 0, "bytes_out": 180,
            "upstream_s": 0.001, "total_s": 0.002,
        })

    def test_lone_surrogate_still_logged(self) -> None:
        """
        A string the fast serialiser refuses (a lone surrogate) still makes
        one valid JSON line, with the surrogate escaped.
        """
        line = line_of(attrs.evolve(record(1), target="https://p.example/\udcff"))
        self.assertTrue(line.endswith(b"\n"))
        self.assertEqual(line.count(b"\n"), 1)
        self.assertEqual(json.loads(line)["target"], "https://p.example/\udcff")

    def test_non_ascii_round_trips(self) -> None:
        """
        Non-ASCII text is written as UTF-8 and reads back unchanged.
        """
        line = line_of(attrs.evolve(record(1), client_subject="", trace_id="tr\u00e9\u2028"))
        self.assertEqual(json.loads(line.decode("utf-8"))["trace"], "tr\u00e9\u2028")

    def test_unwritable_file_drops_lines_and_logs_once(self) -> None:
        """
        A full disk (C{/dev/full}) drops the buffered lines, logs one error
        until a write succeeds again, and keeps nothing in memory.
        """
        full = AccessLogFile(Path("/dev/full"), self.clock)
        full.start()
        self.addCleanup(full.stop)
        with capturedLogs() as events:
            for n in range(3):
                full(record(n))
                full.flush()
        errors = [e for e in events if e["log_level"] == LogLevel.error]
        self.assertEqual(len(errors), 1)
        self.assertIn("/dev/full", errors[0]["path"])
        self.assertEqual(full._lines, [])


class ISOTimeTests(unittest.SynchronousTestCase):
    @settings(max_examples=1000, deadline=None)
    @given(st.lists(st.floats(0, 4_102_444_800), min_size=1, max_size=4))
    @example([1796322741.9999995, 1796322741.9995, 1796322741.0004995, 1796322742.0])
    def test_as_datetime_formats_it(self, times: list[float]) -> None:
        """
        The per-second cache writes what C{datetime} writes, rounding at
        the microsecond and millisecond edges included, in any order.
        """
        for seconds in [*times, *reversed(times)]:
            self.assertEqual(
                iso_time(seconds),
                datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds"))


class ServiceAccessLogTests(unittest.TestCase):
    async def test_requests_are_logged_to_the_file_and_sighup_reopens_it(self) -> None:
        """
        With C{log.access_log_file} the service writes one JSON line per
        request there (forwarded and refused alike), and a reload reopens
        the file after rotation.
        """
        path = Path(self.mktemp()).resolve() / "access.log"
        provider = Provider(self)
        proxy = await Proxy(self, provider, log={"access_log_file": path}).start()
        headers = spine_headers()
        ok = await proxy.consumer().get("metadata", headers)
        refused = await proxy.consumer().get("metadata", {**spine_headers(), "Ssp-From": "1"})
        self.assertEqual((ok.status, refused.status), (200, 403))
        proxy.service.access_log.flush()
        first = lines(path)
        self.assertEqual([(line["status"], line["decision"]) for line in first],
                         [(200, "forwarded"), (403, "refused")])
        self.assertEqual(first[0]["trace"], headers["Ssp-TraceID"])

        path.rename(path.with_name("access.log.1"))
        proxy.service.reload()
        await proxy.consumer().get("metadata")
        await proxy.service.stopService()
        self.assertEqual(len(lines(path.with_name("access.log.1"))), 2)
        self.assertEqual([line["status"] for line in lines(path)], [200])
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)
