"""
The C{ssp} operator command dispatches to its subcommands.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

from twisted.internet import reactor
from twisted.trial import unittest

from ssp import cli
from ssp.audit import FileAuditSink
from ssp.config import AuditConfig
from ssp.model import AuditRecord
from ssp.tls import UpstreamTLS
from tests.support import ROOT, audit_key, pki


class CommandTests(unittest.TestCase):
    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = cli.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_usage(self) -> None:
        """
        Without a command the usage goes to stderr (exit 2); asked for,
        with C{--help}, to stdout (exit 0).
        """
        code, out, err = self.run_cli()
        self.assertEqual((code, out), (2, ""))
        self.assertIn("explain", err)
        for flag in ("--help", "-h"):
            code, out, err = self.run_cli(flag)
            self.assertEqual((code, err), (0, ""))
            self.assertIn("audit verify", out)

    def test_audit_help(self) -> None:
        """
        C{ssp audit --help} describes the audit commands, not the top level.
        """
        code, out, err = self.run_cli("audit", "--help")
        self.assertEqual((code, err), (0, ""))
        self.assertTrue(out.startswith("usage: ssp audit COMMAND"), out)
        self.assertIn("verify ", out)
        self.assertNotIn("explain", out)
        code, out, err = self.run_cli("audit")
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: ssp audit COMMAND", err)

    def test_version(self) -> None:
        from ssp import __version__

        self.assertEqual(self.run_cli("--version"), (0, f"ssp {__version__}\n", ""))

    async def test_audit_verify_and_report(self) -> None:
        directory = self.mktemp()
        sink = FileAuditSink.from_config(
            AuditConfig(directory=Path(directory), key_file=audit_key()), reactor)
        sink.start()
        await sink.append(AuditRecord("completed", "r1", 1_800_000_000.0, sender="1",
                                      receiver="2", interaction="i", status=200,
                                      decision="forwarded", total_latency=0.01))
        await sink.stop()
        code, out, _ = self.run_cli("audit", "verify", directory)
        self.assertEqual(code, 0, out)
        code, out, _ = self.run_cli("report", directory, "--format", "json")
        self.assertEqual(code, 0)
        [row] = [row for row in json.loads(out) if row["scope"] == "day"]
        self.assertEqual((row["sender"], row["requests"], row["forwarded"]), ("1", 1, 1))
        code, out, _ = self.run_cli("audit", "archive", directory, "--older-than", "1d")
        self.assertEqual((code, out), (0, ""))  # the only file is open: nothing to archive

    def test_console_script_declared(self) -> None:
        self.assertIn("ssp = ssp.cli:main", (ROOT / "setup.cfg").read_text())


class UpstreamCreatorTests(unittest.SynchronousTestCase):
    def test_one_creator_per_host(self) -> None:
        from ssp import demo

        config = demo.demo_config(ROOT, pki(), 1).upstream
        tls = UpstreamTLS(config)
        first = tls.creator_for("orange.testlab.nhs.uk")
        self.assertIs(tls.creator_for("orange.testlab.nhs.uk"), first)
        self.assertIsNot(tls.creator_for("elsewhere.test"), first)
