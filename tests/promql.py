"""
What the shipped alert rules and dashboard ask of the proxy's metrics: the
series each PromQL expression selects, with its label matchers, and the
labels it groups by.  Enough PromQL for our own expressions (selectors,
functions, aggregations, vector matching), not a general parser.
"""

from __future__ import annotations

import json
import re
from typing import Any

import attrs
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT

RULES = ROOT / "etc" / "prometheus" / "ssp-alerts.yml"
DASHBOARD = ROOT / "etc" / "grafana" / "ssp-dashboard.json"

# Grafana's variables, replaced by what they stand for in a query.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$instance": ".*"}

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
             "or", "unless", "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?")
_MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@attrs.frozen
class Matcher:
    label: str
    op: str
    value: str


@attrs.frozen
class Selector:
    """
    One vector selector: a metric name and its label matchers.
    """

    metric: str
    matchers: tuple[Matcher, ...]


@attrs.frozen
class Usage:
    """
    What one expression uses: its selectors and the labels it groups or
    matches on.
    """

    expr: str
    selectors: tuple[Selector, ...]
    grouping: frozenset[str]


def parse(expr: str) -> Usage:
    """
    The selectors and grouping labels of a PromQL expression.
    """
    text = expr
    for variable, value in GRAFANA_VARIABLES.items():
        text = text.replace(variable, value)
    grouping = frozenset(
        label.strip() for _, labels in _GROUPING.findall(text)
        for label in labels.split(",") if label.strip())
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations
    selectors = []
    for match in _SELECTOR.finditer(text):
        name, braces = match.group(1), match.group(2) or ""
        rest = text[match.end():].lstrip()
        if name.lower() in _KEYWORDS or (not braces and rest.startswith("(")):
            continue  # a keyword or a function call
        matchers = tuple(Matcher(*m) for m in _MATCHER.findall(braces))
        selectors.append(Selector(name, matchers))
    return Usage(expr, tuple(selectors), grouping)


def rule_expressions() -> list[tuple[str, str]]:
    """
    (alert name, expression) for every rule of the shipped rules file.
    """
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(rule.get("alert") or rule["record"], rule["expr"])
            for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    """
    Every panel, including those inside collapsed rows.
    """
    panels = []
    for panel in board["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions(board: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    """
    (panel title, expression) for every query of the dashboard, and its
    template variables' queries.
    """
    board = board if board is not None else dashboard()
    found = [(panel["title"], target["expr"])
             for panel in dashboard_panels(board) for target in panel.get("targets", [])]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and isinstance(query, dict):
            found.append((f"${variable['name']}", _label_values_selector(query["query"])))
    return found


def _label_values_selector(query: str) -> str:
    """
    The selector inside Grafana's C{label_values(selector, label)}.
    """
    match = re.fullmatch(r"label_values\((.*),\s*([a-zA-Z_]\w*)\)", query.strip())
    if match is None:
        raise ValueError(f"unsupported variable query: {query}")
    return f"count by ({match.group(2)}) ({match.group(1)})"


def every_expression() -> list[tuple[str, str]]:
    return rule_expressions() + dashboard_expressions()


def as_rule_file(expressions: list[tuple[str, str]]) -> str:
    """
    A recording-rule file of C{expressions} (Grafana variables replaced),
    so C{promtool check rules} can check their syntax.
    """
    rules = []
    for index, (_, expr) in enumerate(expressions):
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        rules.append({"record": f"ssp:check_{index}", "expr": expr})
    return yaml.safe_dump({"groups": [{"name": "syntax", "rules": rules}]})


# Labels Prometheus attaches to every scraped series (target labels), and
# series it makes up itself rather than scraping.
TARGET_LABELS = frozenset({"job", "instance"})
SYNTHETIC_METRICS = frozenset({"up"})


@attrs.frozen
class Exposed:
    """
    A scrape: each sample name with, per label, the values seen.
    """

    series: dict[str, dict[str, frozenset[str]]]

    @classmethod
    def parse(cls, exposition: str) -> Exposed:
        series: dict[str, dict[str, set[str]]] = {}
        for family in text_string_to_metric_families(exposition):
            for sample in family.samples:
                labels = series.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    labels.setdefault(label, set()).add(value)
        return cls({name: {label: frozenset(values) for label, values in labels.items()}
                    for name, labels in series.items()})


def problems(usage: Usage, exposed: Exposed) -> list[str]:
    """
    What an expression needs that the scrape lacks: a metric, a label it
    matches or groups on, or a value it matches exactly.
    """
    found = []
    available = set(TARGET_LABELS)
    for selector in usage.selectors:
        if selector.metric in SYNTHETIC_METRICS:
            labels: dict[str, frozenset[str]] = {}
        elif selector.metric in exposed.series:
            labels = exposed.series[selector.metric]
        else:
            found.append(f"{selector.metric}: not exported")
            continue
        available.update(labels)
        for matcher in selector.matchers:
            if matcher.label in TARGET_LABELS or selector.metric in SYNTHETIC_METRICS:
                continue
            if matcher.label not in labels:
                found.append(f"{selector.metric}: no label {matcher.label}")
            elif matcher.op == "=" and matcher.value not in labels[matcher.label]:
                found.append(f"{selector.metric}: {matcher.label}={matcher.value!r} never seen "
                             f"(seen: {sorted(labels[matcher.label])})")
    found.extend(f"grouping label {label}: on none of its metrics"
                 for label in sorted(usage.grouping - available))
    return found
