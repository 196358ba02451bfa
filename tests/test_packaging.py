"""
The README's commands work: the plugin is visible to twistd, the demo
prints a curl line that succeeds, --check-config names file and key, and
CI runs the README's test command verbatim.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.support import ROOT, certificates_toml, pki

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


class ReadmeTests(unittest.TestCase):
    def test_readme_opens_with_two_commands(self):
        commands = readme_commands()
        self.assertEqual(len(commands), 2)
        self.assertIn("twistd -n --pidfile= ssp", commands[0])
        self.assertIn("twisted.trial", commands[1])

    def test_ci_runs_the_readme_test_command(self):
        ci = (ROOT / ".ci" / "run").read_text()
        self.assertIn(readme_commands()[1], ci)

    def test_twistd_lists_the_plugin(self):
        result = subprocess.run(TWISTD + ["--help"], env=_env(), capture_output=True,
                                text=True, timeout=60, cwd=tempfile.gettempdir())
        self.assertIn("ssp", [line.split()[0] for line in result.stdout.splitlines()
                              if line.startswith("    ") and line.split()])


class DemoTests(unittest.TestCase):
    def test_demo_prints_a_curl_line_that_succeeds(self):
        if shutil.which("curl") is None:
            raise unittest.SkipTest("curl is not installed")
        # An empty directory: the demo needs nothing from the repository.
        workdir = Path(tempfile.mkdtemp(prefix="ssp-demo-"))

        def run_demo() -> tuple[str, int]:
            process = subprocess.Popen(
                TWISTD + ["-n", "--pidfile=", "ssp", "--listen", "tcp:0:interface=127.0.0.1",
                          "--admin", "tcp:0:interface=127.0.0.1"],
                cwd=workdir, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                line = ""
                for line in process.stdout:
                    if line.startswith("curl "):
                        break
                else:
                    raise AssertionError("the demo printed no curl line")
                result = subprocess.run(["bash", "-c", line], env=_env(), capture_output=True,
                                        text=True, timeout=30)
                return result.stdout, result.returncode
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
                process.stdout.close()

        def check(outcome: tuple[str, int]) -> None:
            output, code = outcome
            self.assertEqual(code, 0)
            self.assertIn('"resourceType": "CapabilityStatement"', output)
            self.assertIn("x-rate-limit-limit: 10", output.lower())
            self.assertIn("x-rate-limit-remaining: ", output.lower())
            audit = list((workdir / "var" / "audit").glob("audit-*.jsonl"))
            self.assertEqual(len(audit), 1)
            self.assertIn('"decision":"forwarded"', audit[0].read_text())

        return deferToThread(run_demo).addCallback(check)


class DemoBusyPortTests(unittest.TestCase):
    def test_busy_port_names_the_option(self):
        """
        A port in use gives one line naming C{--listen} or C{--admin}, not
        a traceback.
        """
        workdir = Path(tempfile.mkdtemp(prefix="ssp-demo-"))
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"tcp:{busy.getsockname()[1]}:interface=127.0.0.1"
        free = "tcp:0:interface=127.0.0.1"

        def run() -> list[str]:
            outputs = []
            for listen, admin in ((taken, free), (free, taken)):
                result = subprocess.run(
                    TWISTD + ["-n", "--pidfile=", "ssp", "--listen", listen, "--admin", admin],
                    cwd=workdir, env=_env(), capture_output=True, text=True, timeout=60)
                self.assertNotEqual(result.returncode, 0)
                outputs.append(result.stdout + result.stderr)
            return outputs

        def check(outputs: list[str]) -> None:
            for output, key in zip(outputs, ("listen", "admin")):
                self.assertNotIn("Traceback", output)
                self.assertIn(f"{key}.endpoint: cannot listen on {taken}: Address already in use "
                              f"(choose another with --{key})", output)

        return deferToThread(run).addCallback(check)


class PackageDataTests(unittest.SynchronousTestCase):
    def test_demo_ldif_is_package_data(self):
        """
        A non-editable install carries the demo LDIF (C{ssp demo} needs it
        outside the repository).
        """
        from setuptools.config.setupcfg import read_configuration

        from ssp import demo

        options = read_configuration(ROOT / "setup.cfg")["options"]
        self.assertIn("ssp", options["packages"])
        patterns = options["package_data"]["ssp"]
        relative = demo.DEMO_LDIF.relative_to(ROOT / "ssp")
        self.assertTrue(any(relative.match(p) for p in patterns), patterns)
        self.assertTrue(demo.DEMO_LDIF.is_file())


class CheckConfigTests(unittest.TestCase):
    def check(self, text: str) -> subprocess.CompletedProcess:
        path = Path(tempfile.mkdtemp()) / "ssp.toml"
        path.write_text(text)
        return subprocess.run(TWISTD + ["ssp", "--config", str(path), "--check-config"],
                              env=_env(), capture_output=True, text=True, timeout=60), path

    def test_valid_configuration(self):
        result, path = self.check(certificates_toml() + f"""
[directory]
ldif = "{ROOT}/ssp/data/demo-sds.ldif"
""")
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("configuration OK", result.stdout)

    def test_error_names_file_and_key(self):
        result, path = self.check('[tls]\ncertificate = "a"\nprivate_key = "b"\nclient_ca = "c"\n'
                                  '[upstream]\ncertificate = "a"\nprivate_key = "b"\nca = "c"\n'
                                  'connect_timeout = -1\n')
        self.assertEqual(result.returncode, 1)
        self.assertIn(f"{path}: upstream.connect_timeout: must be > 0", result.stderr)

    def test_missing_certificate_file_is_reported(self):
        result, path = self.check('[tls]\ncertificate = "nope.pem"\nprivate_key = "b"\n'
                                  'client_ca = "c"\n[upstream]\ncertificate = "a"\n'
                                  'private_key = "b"\nca = "c"\n[audit]\nunkeyed = true\n')
        self.assertEqual(result.returncode, 1)
        self.assertIn("nope.pem", result.stderr)

    def test_unreadable_private_key_is_named(self):
        """
        A key that is missing or not a key is reported with its path, not
        as a bare OpenSSL error.
        """
        certs = pki().directory
        for key, problem in ((f"{certs}/missing.key", "cannot read"),
                             (f"{certs}/proxy.pem", "not an unencrypted PEM private key")):
            result, path = self.check(certificates_toml().replace(
                f'private_key = "{certs}/proxy.key"', f'private_key = "{key}"') + f"""
[directory]
ldif = "{ROOT}/ssp/data/demo-sds.ldif"
""")
            self.assertEqual(result.returncode, 1)
            self.assertIn(f"{key}: {problem}", result.stderr)


class SelfContainedTests(unittest.SynchronousTestCase):
    """
    A clone tests itself: nothing in the repository reaches outside it for
    fixtures (the suite once read C{../shared/...} and skipped without it).
    """

    def test_no_reference_outside_the_repository(self):
        tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True,
                                 text=True, check=False).stdout.split()
        if not tracked:
            raise unittest.SkipTest("not a git checkout")
        outside = [
            name for name in tracked
            if (ROOT / name).is_file() and not (ROOT / name).is_symlink()
            and name != "tests/test_packaging.py"
            and any(word in (ROOT / name).read_text(errors="replace")
                    for word in ("external-fixtures", "../shared", "parents[2]"))
        ]
        self.assertEqual(outside, [])

    def test_certs_folder(self):
        """
        C{certs/} exists with its README; generated keys there are ignored.
        """
        self.assertIn("LoadCredential", (ROOT / "certs" / "README.md").read_text())
        ignored = subprocess.run(["git", "check-ignore", "certs/proxy.key", "certs/README.md"],
                                 cwd=ROOT, capture_output=True, text=True, check=False).stdout
        self.assertEqual(ignored.split(), ["certs/proxy.key"])

    def test_fixtures_present(self):
        from tests import slapd

        for fixture in (slapd.SCHEMA, slapd.DEMO_LDIF, slapd.SYNTHETIC_LDIF):
            self.assertTrue(fixture.is_file(), fixture)
        self.assertTrue(list((ROOT / "tests" / "fixtures" / "jwt").glob("*.jwt")))
