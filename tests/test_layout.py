"""
Rules about where code lives, checked on the source so that a misplacement
fails a test instead of waiting for a reader to notice.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parent.parent
MODULES = sorted((ROOT / "ssp").glob("*.py"))


def imports(path: Path) -> set[str]:
    """
    Every module a source file imports, as dotted names (C{from a import b}
    gives both C{a} and C{a.b}).
    """
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


class LayoutTests(SynchronousTestCase):
    def test_no_test_helpers_in_production(self) -> None:
        for path in MODULES:
            self.assertNotIn("twisted.internet.testing", imports(path), path.name)

    def test_metrics_sees_interfaces_only(self) -> None:
        self.assertFalse({"ssp.directory", "ssp.directory.CachingDirectory"}
                         & imports(ROOT / "ssp" / "metrics.py"))

    def test_refusals_live_in_errors(self) -> None:
        """
        Every L{Refusal} subclass is defined in C{ssp/errors.py}.
        """
        for path in MODULES:
            if path.name == "errors.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef):
                    bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                    self.assertFalse(bases & {"Refusal", "BadRequest"},
                                     f"{path.name}: {node.name}")

    def test_test_case_names_exist(self) -> None:
        """
        Each C{test-case-name} header names test modules that exist.
        """
        for path in [*MODULES, *sorted((ROOT / "tests").glob("*.py"))]:
            header = re.search(r"test-case-name: ([\w.,]+)", path.read_text())
            for module in header[1].split(",") if header else ():
                self.assertTrue((ROOT / (module.replace(".", "/") + ".py")).exists(),
                                f"{path.name} names {module}")
