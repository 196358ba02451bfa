"""
C{ssp report --format html}: the page's numbers are the CSV's, it holds
no script and fetches nothing, hostile header values stay text, and it
renders in headless Chromium (a screenshot is kept for a human to look at).
"""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
from datetime import UTC, date, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import SynchronousTestCase, TestCase

from ssp.audit import FileAuditSink
from ssp.model import AuditRecord
from ssp.report import Row, main_report
from ssp.report_html import COUNTS, Extras, extras, write_html

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
NO_CHROMIUM = "chromium is not installed (Debian: apt-get install chromium)"

A, B, P, Q = "200000000359", "200000000360", "918999198738", "918999198739"
MD = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
HOSTILE = '<script>document.title="pwned"</script><img src=x onerror=alert(1)>'
DAY_1 = datetime(2024, 3, 1, 9, 0, tzinfo=UTC).timestamp()

# (day offset, sender, receiver, interaction, decision, status, token, total, upstream)
TRAFFIC = [
    (0, A, P, MD, "forwarded", 200, "", 0.010, 0.008),
    (0, A, P, MD, "forwarded", 200, "", 0.030, 0.020),
    (0, A, Q, MD, "refused", 403, "ASID_CHECK_FAILED_MESSAGESENDER_999", 0.001, None),
    (0, B, P, HOSTILE, "refused", 403, "ASID_CHECK_FAILED_MESSAGESENDER_998", 0.002, None),
    (1, A, P, MD, "failed", 502, "ERROR_COMMUNICATING_WITH_PROVIDER", 5.0, None),
    (1, "", "", "", "refused", 400, "ENDPOINT_https://a.test/fhir_CPAID_X_VARIES_FROM_TARGETURL_"
     "https://b.test/fhir", 0.0005, None),
    # day 2 has no traffic: the chart shows a gap, the tables nothing.
    (3, B, Q, MD, "forwarded", 404, "", 0.040, 0.035),
    (3, B, Q, MD, "abandoned", 499, "", 2.5, 2.4),
    (3, A, P, MD, "refused", 503, "SDS_UNAVAILABLE", 0.003, None),
]


async def write_audit(directory: Path) -> None:
    """
    The audit files of L{TRAFFIC}, written by the real audit sink.
    """
    clock = Clock()
    clock.advance(DAY_1)
    sink = FileAuditSink(directory, reactor, clock)
    await sink.start()
    for number, (offset, sender, receiver, interaction, decision, status, token, total,
                 upstream) in enumerate(TRAFFIC):
        clock.advance(DAY_1 + offset * 86400 + number - clock.seconds())
        await sink.append(AuditRecord(
            event="completed", request_id=f"req-{number}", time=clock.seconds(), sender=sender,
            receiver=receiver, interaction=interaction, decision=decision, status=status,
            token=token, bytes_in=10 * number, bytes_out=100 * number, total_latency=total,
            upstream_latency=upstream))
    await sink.stop()


def run_report(*argv: str) -> str:
    out = io.StringIO()
    code = main_report(list(argv), out)
    if code:
        raise AssertionError(f"ssp report {' '.join(argv)} exited {code}")
    return out.getvalue()


def csv_totals(text: str) -> dict[str, dict[str, dict[str, int]]]:
    """
    From the CSV: per sender, receiver and interaction (and C{"="} for the
    grand total under each), the sum of every count column.
    """
    totals: dict[str, dict[str, dict[str, int]]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        if row.get("scope", "day") != "day":
            continue  # the CSV's own totals rows, where it has them
        for scope in ("sender", "receiver", "interaction"):
            for key in (row[scope], "="):
                group = totals.setdefault(scope, {}).setdefault(key, dict.fromkeys(COUNTS, 0))
                for column in COUNTS:
                    group[column] += int(row[column])
    return totals


class _Tables(HTMLParser):
    """
    The totals tables of a page (scope -> row key -> column -> the number
    shown; a grand total row is keyed C{"="}), and every element and
    attribute name in it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.totals: dict[str, dict[str, dict[str, int]]] = {}
        self.elements: set[str] = set()
        self.attributes: set[str] = set()
        self._scope: str | None = None
        self._key: str | None = None
        self._column: str | None = None
        self._foot = False

    def handle_starttag(self, tag: str, attributes: list[tuple[str, str | None]]) -> None:
        attrs = dict(attributes)
        self.elements.add(tag)
        self.attributes.update(attrs)
        if tag == "table":
            self._scope = attrs.get("data-scope")
        elif tag == "tfoot":
            self._foot = True
        elif tag == "tr" and self._scope and "data-key" in attrs:
            key = "=" if self._foot else (attrs["data-key"] or "")
            self._key = key
            self.totals.setdefault(self._scope, {})[key] = {}
        elif tag == "td" and self._key is not None:
            self._column = attrs.get("data-column")

    def handle_endtag(self, tag: str) -> None:
        if tag == "table":
            self._scope, self._foot = None, False
        elif tag == "tr":
            self._key = None
        elif tag == "td":
            self._column = None

    def handle_data(self, data: str) -> None:
        if self._scope and self._key is not None and self._column:
            self.totals[self._scope][self._key][self._column] = int(data.replace(",", ""))


LOADING_ELEMENTS = {"script", "img", "link", "iframe", "object", "embed", "image", "use",
                    "audio", "video", "source", "frame", "base", "form"}


def assert_inert(case: TestCase, page: str) -> None:
    """
    The page runs nothing and loads nothing: no such element, no source,
    link or event-handler attribute, no URL in its styles.
    """
    found = tables(page)
    case.assertEqual(found.elements & LOADING_ELEMENTS, set())
    case.assertEqual({a for a in found.attributes if a.startswith("on") or a in {
        "src", "href", "xlink:href", "srcset", "action", "background", "poster"}}, set())
    style = page.split("<style>", 1)[1].split("</style>", 1)[0]
    for forbidden in ("url(", "@import", "http"):
        case.assertNotIn(forbidden, style)


def tables(page: str) -> _Tables:
    parser = _Tables()
    parser.feed(page)
    parser.close()
    return parser


class HtmlReportTests(TestCase):
    async def setUp(self) -> None:
        self.audit = Path(self.mktemp())
        await write_audit(self.audit)
        self.page = run_report(str(self.audit), "--format", "html")

    def test_totals_equal_the_csv(self) -> None:
        """
        Every count per consumer, provider and interaction, and the grand
        totals, are those of the CSV report of the same files.
        """
        expected = csv_totals(run_report(str(self.audit)))
        self.assertEqual(tables(self.page).totals, expected)
        self.assertEqual(expected["sender"]["="]["requests"], len(TRAFFIC))

    def test_refusals_and_latency(self) -> None:
        """
        Refusals are grouped by the fixed part of their token, most
        frequent first; latency percentiles are over the whole range.
        """
        extra = extras([self.audit])
        self.assertEqual(extra.refusals, (("ASID_CHECK_FAILED", 403, 2),
                                          ("ENDPOINT", 400, 1),
                                          ("SDS_UNAVAILABLE", 503, 1)))
        everything = extra.latency[0]
        self.assertEqual((everything.group, everything.requests), ("all requests", 9))
        self.assertEqual(everything.total_ms, (10.0, 5000.0, 5000.0))
        self.assertEqual(everything.upstream_ms, (20.0, 2400.0, 2400.0))
        self.assertEqual([item.group for item in extra.latency[1:]], ["", HOSTILE, MD])
        for text in ("ASID_CHECK_FAILED", "5,000", "2,400"):
            self.assertIn(text, self.page)

    def test_self_contained_and_inert(self) -> None:
        """
        No script, no element or attribute that loads anything, a policy
        that forbids both, and a hostile interaction ID shown as text.
        """
        self.assertIn("<meta http-equiv=\"Content-Security-Policy\" content=\"default-src "
                      "'none'; style-src 'unsafe-inline'\">", self.page)
        assert_inert(self, self.page)
        self.assertIn("&lt;script&gt;document.title=&quot;pwned&quot;", self.page)

    def test_volume_chart(self) -> None:
        """
        One bar segment per day and decision with requests, labelled for
        a tooltip; the day without traffic still has its place.
        """
        segments = {(offset, decision) for offset, _, _, _, decision, *_ in TRAFFIC}
        self.assertEqual(self.page.count("<rect "), len(segments))
        self.assertIn("<title>2024-03-01 forwarded: 2</title>", self.page)
        for day in ("2024-03-01", "2024-03-02", "2024-03-03", "2024-03-04"):
            self.assertIn(f">{day}</text>", self.page)

    def test_empty_range(self) -> None:
        """
        A range without requests is a page that says so.
        """
        out = io.StringIO()
        write_html([], extras([self.audit], since="2030-01-01"), out)
        self.assertIn("No completed requests in this range.", out.getvalue())
        self.assertNotIn("<svg", out.getvalue())

    def test_malformed_audit(self) -> None:
        """
        A file that is not an audit trail is an error naming it, not a page.
        """
        bad = Path(self.mktemp())
        bad.write_text('{"event": "completed", "time": "soon"}\n')
        out = io.StringIO()
        self.assertEqual(main_report([str(bad), "--format", "html"], out), 1)
        self.assertEqual(out.getvalue(), "")


# Chromium's own background requests (component updates, its clock, the
# account service) come whatever the page and flags: Google's service
# domains, except the hosts pages load fonts and libraries from.
CHROMIUM_OWN_DOMAINS = (".google.com", ".googleapis.com", ".gvt1.com")
PAGE_CDN_HOSTS = {"fonts.googleapis.com", "ajax.googleapis.com", "storage.googleapis.com"}


def page_fetch(host: str) -> bool:
    """
    Whether a request Chromium made can have come from the page.
    """
    return host in PAGE_CDN_HOSTS or not ("." + host).endswith(CHROMIUM_OWN_DOMAINS)


class _RecordingProxy(Protocol):
    """
    An HTTP proxy that answers nothing: it notes the host of each request
    (C{CONNECT host:port} or C{GET http://host/...}) and hangs up.
    """

    def dataReceived(self, data: bytes) -> None:
        target = data.split(b"\r\n", 1)[0].split(b" ")[1:2]
        host = target[0].decode("ascii", "replace") if target else "?"
        host = host.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        self.factory.hosts.append(host)  # type: ignore[attr-defined]
        self.transport.loseConnection()


class ChromiumTests(TestCase):
    """
    The page in a real browser: headless Chromium, its proxy pointed at a
    loopback listener that records what is asked of it, so any fetch shows.
    """

    timeout = 180
    if CHROMIUM is None:
        skip = NO_CHROMIUM

    async def setUp(self) -> None:
        self.work = Path(self.mktemp()).resolve()
        self.work.mkdir()
        audit = self.work / "audit"
        await write_audit(audit)
        self.page = self.work / "report.html"
        self.page.write_text(run_report(str(audit), "--format", "html"))
        self.expected = csv_totals(run_report(str(audit)))
        self.fetches = Factory.forProtocol(_RecordingProxy)
        self.fetches.hosts = []  # type: ignore[attr-defined]
        port = reactor.listenTCP(0, self.fetches, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.proxy = f"http://127.0.0.1:{port.getHost().port}"

    async def chromium(self, *args: str) -> subprocess.CompletedProcess[str]:
        assert CHROMIUM is not None
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                   "--disable-background-networking", "--disable-component-update",
                   "--no-first-run", f"--user-data-dir={self.work / 'profile'}",
                   f"--proxy-server={self.proxy}", "--proxy-bypass-list=<-loopback>",
                   *args, self.page.as_uri()]
        result: subprocess.CompletedProcess[str] = await deferToThread(
            subprocess.run, command, capture_output=True, text=True, timeout=150,
            env={**os.environ, "HOME": str(self.work)})
        self.assertEqual(result.returncode, 0, result.stderr[-2000:])
        return result

    def fetched(self) -> set[str]:
        """
        The hosts Chromium asked the proxy for, other than its own services.
        """
        hosts: list[str] = self.fetches.hosts  # type: ignore[attr-defined]
        return {host for host in hosts if page_fetch(host)}

    async def test_renders_with_the_csv_totals(self) -> None:
        """
        The DOM Chromium builds holds the CSV's totals, no script, and the
        chart; nothing was fetched.
        """
        dom = (await self.chromium("--dump-dom")).stdout
        self.assertEqual(tables(dom).totals, self.expected)
        assert_inert(self, dom)
        self.assertIn('<svg id="volume"', dom)
        self.assertIn("<title>SSP transaction report, 2024-03-01 to 2024-03-04</title>", dom)
        self.assertEqual(self.fetched(), set())

    async def test_screenshot(self) -> None:
        """
        Chromium draws the page: a PNG of the full width, not blank.
        """
        shot = self.work / "report.png"
        await self.chromium(f"--screenshot={shot}", "--window-size=1200,1800",
                            "--hide-scrollbars")
        data = shot.read_bytes()
        self.assertEqual(data[:8], b"\x89PNG\r\n\x1a\n")
        width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        self.assertEqual((width, height), (1200, 1800))
        self.assertGreater(len(data), 20_000)  # a blank page compresses to a few KiB
        self.assertEqual(self.fetched(), set())

    async def test_fetches_would_be_seen(self) -> None:
        """
        The recording proxy works: a page with an external image is caught.
        """
        self.page.write_text('<!DOCTYPE html><img src="http://provider.invalid/x.png">'
                             '<link rel="stylesheet" href="https://fonts.googleapis.com/css">')
        await self.chromium("--dump-dom")
        self.assertEqual(self.fetched(), {"provider.invalid", "fonts.googleapis.com"})


class ChartScaleTests(SynchronousTestCase):
    def test_a_year(self) -> None:
        """
        A year of days keeps about a dozen date labels and a round top
        tick at or above the busiest day.
        """
        first = date(2024, 1, 1)
        rows = [Row((first + timedelta(n)).isoformat(), A, P, MD, 1234 + n, 1234 + n, 0, 0, 0,
                    1234 + n, 0, 0, 0, 0, 0, None, None, None, None, None, None)
                for n in range(366)]
        out = io.StringIO()
        write_html(rows, Extras((), ()), out)
        chart = out.getvalue().split('<svg id="volume"', 1)[1].split("</svg>", 1)[0]
        self.assertEqual(chart.count("<rect "), 366)
        self.assertLessEqual(chart.count('text-anchor="middle"'), 13)
        self.assertIn('text-anchor="end">2,000</text>', chart)
        self.assertNotIn(">4,000<", chart)
