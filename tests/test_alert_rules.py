"""
The shipped Prometheus alert rules: promtool accepts them and their unit
tests pass, every alert has a firing and a quiet case, and every alert
carries a summary, a description and a runbook link to a section of
docs/operations.md that exists.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml
from twisted.trial import unittest

from tests import promql
from tests.support import ROOT

RULES = promql.RULES
RULE_TESTS = ROOT / "etc" / "prometheus" / "tests" / "ssp-alerts-test.yml"
OPERATIONS = ROOT / "docs" / "operations.md"
PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus)"


def alert_rules() -> list[dict[str, Any]]:
    """
    Every alerting rule of the shipped rules file.
    """
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def heading_anchors(markdown: str) -> set[str]:
    """
    The anchors GitHub gives the headings of a Markdown document.
    """
    anchors = set()
    for line in markdown.splitlines():
        match = re.match(r"#+ (.*)", line)
        if match:
            text = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower())
            anchors.add(text.replace(" ", "-"))
    return anchors


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=120)


class RuleFileTests(unittest.TestCase):
    def test_annotations_and_runbooks(self) -> None:
        """
        Each alert has a severity, a summary, a description and a
        runbook_url naming an existing section of docs/operations.md.
        """
        anchors = heading_anchors(OPERATIONS.read_text())
        rules = alert_rules()
        self.assertGreaterEqual(len(rules), 14)
        for rule in rules:
            annotations = rule["annotations"]
            self.assertIn(rule["labels"]["severity"], {"critical", "warning"}, rule["alert"])
            self.assertTrue(annotations["summary"].strip(), rule["alert"])
            self.assertTrue(annotations["description"].strip(), rule["alert"])
            document, _, anchor = annotations["runbook_url"].partition("#")
            self.assertEqual(document, "docs/operations.md", rule["alert"])
            self.assertIn(anchor, anchors, rule["alert"])

    def test_every_alert_fires_and_stays_quiet(self) -> None:
        """
        The promtool unit tests hold, for each alert, at least one case
        where it fires and one where it does not, and the quiet case is
        not vacuous: its input has series of a metric the alert reads.
        """
        metrics = {rule["alert"]: {s.metric for s in promql.parse(rule["expr"]).selectors}
                   for rule in alert_rules()}
        cases: dict[str, set[bool]] = {}
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
            given = {series["series"].split("{", 1)[0] for series in test["input_series"]}
            for case in test["alert_rule_test"]:
                name = case["alertname"]
                cases.setdefault(name, set()).add(bool(case["exp_alerts"]))
                self.assertTrue(given & metrics[name], f"{name}: no input series it reads")
        self.assertEqual({name: {True, False} for name in metrics}, cases)


class PromtoolTests(unittest.TestCase):
    if PROMTOOL is None:
        skip = NO_PROMTOOL

    def test_check_rules(self) -> None:
        """
        C{promtool check rules} accepts the file.
        """
        result = promtool("check", "rules", str(RULES))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_rule_unit_tests(self) -> None:
        """
        C{promtool test rules}: every firing and quiet case holds.
        """
        result = promtool("test", "rules", str(RULE_TESTS))
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_unit_tests_catch_an_alert_that_never_fires(self) -> None:
        """
        Replacing any one alert's expression with one that never fires
        makes the unit tests fail: each alert's firing case has teeth.
        """
        with tempfile.TemporaryDirectory() as scratch:
            directory = Path(scratch)
            (directory / "tests").mkdir()
            tests = directory / "tests" / RULE_TESTS.name
            tests.write_text(RULE_TESTS.read_text())
            for name in [rule["alert"] for rule in alert_rules()]:
                rules = yaml.safe_load(RULES.read_text())
                for group in rules["groups"]:
                    for rule in group["rules"]:
                        if rule.get("alert") == name:
                            rule["expr"] = "vector(0) > 1"
                (directory / RULES.name).write_text(yaml.safe_dump(rules))
                result = promtool("test", "rules", str(tests))
                self.assertNotEqual(result.returncode, 0, name)
                self.assertIn(f"alertname: {name},", result.stdout + result.stderr)
