# -*- test-case-name: tests.test_report_html -*-
"""
C{ssp report --format html}: the transaction log as one page a service
manager can open, print or mail.

The page is self-contained: styles inline, the daily volume chart drawn as
inline SVG, no script and nothing fetched (its Content-Security-Policy
forbids both, so a copy opened from a mail client stays inert).  Sender,
receiver and interaction come from request headers, that is from anyone
holding a certificate, so every value is escaped.  The same files give the
same bytes: nothing in the page depends on when it was made.

The counts are the report's own rows (L{ssp.report.report}), summed;
refusal reasons and latency percentiles over the whole range cannot be
summed from rows, so L{extras} reads them from the same records.
"""

from __future__ import annotations

import html
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta
from pathlib import Path
from typing import TextIO

import attrs

from ssp.metrics import refusal_kind
from ssp.report import DECISIONS, PERCENTILES, Row, completed, percentile_ms

COUNTS = ("requests", *DECISIONS, "status_2xx", "status_3xx", "status_4xx", "status_5xx",
          "bytes_in", "bytes_out")
_COLOURS = {"forwarded": "#2e7d32", "refused": "#c62828", "failed": "#ef6c00",
            "abandoned": "#757575"}
_CSP = "default-src 'none'; style-src 'unsafe-inline'"
_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}th,td{padding:.2em .6em;border-bottom:1px solid #eee}
th{text-align:left;background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
tfoot td{font-weight:bold;border-top:2px solid #999}svg{max-width:100%;height:auto}
.key{font-family:monospace;min-width:13ch;max-width:24em;overflow-wrap:anywhere}
.legend span{display:inline-block;margin-right:1.2em}.legend i{display:inline-block;width:.9em;
height:.9em;margin-right:.3em;vertical-align:-.1em}
@media print{body{margin:0}}
"""


@attrs.frozen
class Latency:
    """
    Nearest-rank latency percentiles (ms, L{ssp.report.PERCENTILES}) of one
    group over the whole range; L{None} where no request had one.
    """

    group: str
    requests: int
    total_ms: tuple[float | None, ...]
    upstream_ms: tuple[float | None, ...]


@attrs.frozen
class Extras:
    """
    What the report's rows cannot carry.

    @ivar refusals: C{(reason, status, count)}, the most frequent first;
        the reason is the fixed part of the token, as in the metrics.
    @ivar latency: all requests first, then each interaction.
    """

    refusals: tuple[tuple[str, int, int], ...]
    latency: tuple[Latency, ...]


@attrs.define
class _Samples:
    requests: int = 0
    total: list[float] = attrs.Factory(list)
    upstream: list[float] = attrs.Factory(list)

    def add(self, total: float | None, upstream: float | None) -> None:
        self.requests += 1
        if total is not None:
            self.total.append(total)
        if upstream is not None:
            self.upstream.append(upstream)

    def latency(self, group: str) -> Latency:
        return Latency(group, self.requests,
                       tuple(percentile_ms(self.total, p) for p in PERCENTILES),
                       tuple(percentile_ms(self.upstream, p) for p in PERCENTILES))


def extras(paths: Sequence[Path], since: str | None = None, until: str | None = None) -> Extras:
    """
    Refusals by reason and latency percentiles of the C{"completed"}
    records L{ssp.report.report} counts.

    @raise ValueError: naming a record that is not an audit record.
    """
    refusals: Counter[tuple[str, int]] = Counter()
    everything = _Samples()
    by_interaction: dict[str, _Samples] = {}
    for _, record in completed(paths, since, until):
        if record.get("decision") == "refused":
            refusals[(refusal_kind(str(record.get("token") or "")),
                      int(record.get("status") or 0))] += 1
        latencies = (record.get("total_latency"), record.get("upstream_latency"))
        everything.add(*latencies)
        by_interaction.setdefault(str(record.get("interaction") or ""), _Samples()).add(
            *latencies)
    return Extras(
        tuple((reason, status, count) for (reason, status), count in
              sorted(refusals.items(), key=lambda item: (-item[1], item[0]))),
        (everything.latency("all requests"),
         *(by_interaction[name].latency(name) for name in sorted(by_interaction))),
    )


def write_html(rows: Sequence[Row], extra: Extras, out: TextIO) -> None:
    """
    The page for the report's rows (one per day, sender, receiver and
    interaction) and the L{extras} of the same range.
    """
    days = sorted({row.day for row in rows})
    period = f"{days[0]} to {days[-1]}" if days else "no requests"
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<title>SSP transaction report, {_e(period)}</title><style>{_STYLE}</style></head><body>",
        f"<h1>Spine Security Proxy transaction report</h1><p>{_e(period)} (UTC days), "
        "from the audit trail's completed requests.</p>",
    ]
    if not rows:
        parts.append("<p id=\"empty\">No completed requests in this range.</p>")
    else:
        parts += [
            "<h2>Daily volume</h2>", _volume_chart(rows, days),
            _totals_table("Per consumer (sender ASID)", "sender", rows, lambda r: r.sender),
            _totals_table("Per provider (receiver ASID)", "receiver", rows, lambda r: r.receiver),
            _totals_table("Per interaction", "interaction", rows, lambda r: r.interaction),
            _refusals_table(extra.refusals),
            _latency_table(extra.latency),
        ]
    parts.append("</body></html>\n")
    out.write("\n".join(parts))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}".rstrip("0").rstrip(".")


def _sums(rows: Iterable[Row]) -> dict[str, int]:
    sums = dict.fromkeys(COUNTS, 0)
    for row in rows:
        for column in COUNTS:
            sums[column] += getattr(row, column)
    return sums


def _cells(sums: dict[str, int]) -> str:
    return "".join(f'<td class="n" data-column="{c}">{_number(sums[c])}</td>' for c in COUNTS)


def _totals_table(title: str, scope: str, rows: Sequence[Row], key: Callable[[Row], str]) -> str:
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row), []).append(row)
    header = "".join(f"<th>{_e(c.replace('_', ' '))}</th>" for c in COUNTS)
    body = "".join(
        f'<tr data-key="{_e(name)}"><td class="key">{_e(name) or "<i>(none)</i>"}</td>'
        f"{_cells(_sums(groups[name]))}</tr>"
        for name in sorted(groups))
    return (f'<h2>{_e(title)}</h2><table class="totals" data-scope="{scope}">'
            f"<thead><tr><th>{_e(scope)}</th>{header}</tr></thead><tbody>{body}</tbody>"
            f'<tfoot><tr data-key=""><td>total</td>{_cells(_sums(rows))}</tr></tfoot></table>')


def _refusals_table(refusals: Sequence[tuple[str, int, int]]) -> str:
    if not refusals:
        return "<h2>Refusals by reason</h2><p>No request was refused.</p>"
    total = sum(count for _, _, count in refusals)
    body = "".join(
        f'<tr><td class="key">{_e(reason) or "<i>(none)</i>"}</td><td class="n">{status}</td>'
        f'<td class="n" data-column="refused">{count:,}</td>'
        f'<td class="n">{100 * count / total:.1f}%</td></tr>'
        for reason, status, count in refusals)
    return ('<h2>Refusals by reason</h2><table id="refusals"><thead><tr><th>reason</th>'
            "<th>status</th><th>refused</th><th>share</th></tr></thead>"
            f"<tbody>{body}</tbody><tfoot><tr><td>total</td><td></td>"
            f'<td class="n" data-column="refused">{total:,}</td><td></td></tr></tfoot></table>')


def _latency_table(latency: Sequence[Latency]) -> str:
    header = "".join(f"<th>{kind} p{p} (ms)</th>" for kind in ("total", "upstream")
                     for p in PERCENTILES)
    body = "".join(
        f'<tr><td class="key">{_e(item.group) or "<i>(none)</i>"}</td>'
        f'<td class="n">{item.requests:,}</td>'
        + "".join(f'<td class="n">{_number(v)}</td>' for v in item.total_ms + item.upstream_ms)
        + "</tr>"
        for item in latency)
    return ("<h2>Latency percentiles</h2><p>Nearest-rank percentiles over the whole range; "
            "total is request start to completion, upstream is forwarding to the provider's "
            "response headers, so total minus upstream is what the proxy added.</p>"
            f'<table id="latency"><thead><tr><th>interaction</th><th>requests</th>{header}'
            f"</tr></thead><tbody>{body}</tbody></table>")


def _volume_chart(rows: Sequence[Row], days: Sequence[str]) -> str:
    """
    Requests per day stacked by decision, every day of the range drawn
    (days without requests as gaps), at most about a dozen date labels.
    """
    first, last = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    every_day = [(first + timedelta(n)).isoformat() for n in range((last - first).days + 1)]
    per_day = {day: dict.fromkeys(DECISIONS, 0) for day in every_day}
    for row in rows:
        for decision in DECISIONS:
            per_day[row.day][decision] += getattr(row, decision)
    top = _nice_ceiling(max(sum(counts.values()) for counts in per_day.values()))
    width, height, left, bottom = 900, 260, 60, 40
    plot_w, plot_h = width - 2 * left, height - bottom - 10  # room for the last date label
    slot = plot_w / len(every_day)
    shapes = []
    for tick in range(5):
        value = top * tick // 4
        y = 10 + plot_h - plot_h * value / top
        shapes.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                      f'stroke="#ddd"/><text x="{left - 6}" y="{y + 4:.1f}" '
                      f'text-anchor="end">{value:,}</text>')
    label_every = max(1, -(-len(every_day) // 12))
    for index, day in enumerate(every_day):
        x = left + index * slot
        y = 10 + plot_h
        for decision in DECISIONS:
            count = per_day[day][decision]
            if count:
                h = plot_h * count / top
                y -= h
                shapes.append(
                    f'<rect x="{x + slot * 0.1:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" '
                    f'height="{h:.1f}" fill="{_COLOURS[decision]}"><title>{day} {decision}: '
                    f"{count:,}</title></rect>")
        if index % label_every == 0:
            shapes.append(f'<text x="{x + slot / 2:.1f}" y="{height - bottom + 18}" '
                          f'text-anchor="middle">{day}</text>')
    legend = "".join(f'<span><i style="background:{_COLOURS[d]}"></i>{d}</span>'
                     for d in DECISIONS)
    return (f'<svg id="volume" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" font-size="11" '
            f'aria-label="Requests per day by decision">{"".join(shapes)}</svg>'
            f'<p class="legend">{legend}</p>')


def _nice_ceiling(value: int) -> int:
    """
    The chart's top: the smallest 4, 8 or 20 times a power of ten at or
    above C{value}, so the quarter ticks are round numbers.
    """
    step = 1
    while True:
        for factor in (1, 2, 5):
            if 4 * step * factor >= max(value, 1):
                return 4 * step * factor
        step *= 10
