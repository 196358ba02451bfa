"""
The configuration reference: every key documented, environment variables
in paths.
"""

from __future__ import annotations

import os
import re
import typing
from pathlib import Path

import attrs
from twisted.trial import unittest

from ssp import config
from tests.support import ROOT, certificates_toml


class ReferenceTests(unittest.TestCase):
    def test_every_key_documented(self) -> None:
        """
        C{docs/configuration.md} has a row for every key the loader accepts.
        """
        hints = typing.get_type_hints(config.Config)
        documented = (ROOT / "docs" / "configuration.md").read_text()
        missing = []
        for field in attrs.fields(config.Config):
            section = hints[field.name]
            names = ([f"{field.name}.{f.name}" for f in attrs.fields(section)]
                     if attrs.has(section) else [field.name])
            missing += [n for n in names if f"| `{n}` |" not in documented]
        self.assertEqual(missing, [])


class DocsTests(unittest.TestCase):
    def test_tables_render(self) -> None:
        """
        Every row of every table in C{docs/} has as many cells as its
        header (a bare C{|} inside a cell, as in C{Path | None}, split
        the columns).
        """
        broken = []
        for page in sorted((ROOT / "docs").glob("*.md")):
            columns = None
            for number, line in enumerate(page.read_text().splitlines(), 1):
                if not line.startswith("|"):
                    columns = None
                    continue
                cells = len(re.split(r"(?<!\\)\|", line.strip())) - 2
                if columns is None:
                    columns = cells
                elif cells != columns:
                    broken.append(f"{page.name}:{number}")
        self.assertEqual(broken, [])

    def test_logrotate_snippet(self) -> None:
        """
        The logrotate snippet rotates the example's access log and makes
        the proxy reopen it (SIGHUP), rather than copying and truncating.
        """
        snippet = (ROOT / "etc" / "logrotate.d" / "ssp").read_text()
        example = (ROOT / "etc" / "ssp.toml").read_text()
        [path] = re.findall(r'access_log_file = "([^"]+)"', example)
        self.assertIn(f"{path} {{", snippet)
        self.assertIn("systemctl reload ssp.service", snippet)
        self.assertNotIn("\n    copytruncate", snippet)


class PathTests(unittest.TestCase):
    def write(self, body: str) -> Path:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        return path

    def test_environment_variable(self) -> None:
        """
        C{$CREDENTIALS_DIRECTORY} (systemd C{LoadCredential}) is expanded in
        paths.
        """
        os.environ["SSP_TEST_CREDENTIALS"] = "/run/credentials/ssp.service"
        self.addCleanup(os.environ.pop, "SSP_TEST_CREDENTIALS")
        body = certificates_toml().replace(
            'private_key = "', 'private_key = "$SSP_TEST_CREDENTIALS/ignored', 1)
        loaded = config.load(self.write(body))
        self.assertEqual(str(loaded.tls.private_key).split("ignored")[0],
                         "/run/credentials/ssp.service/")

    def test_unset_variable(self) -> None:
        body = certificates_toml().replace('private_key = "', 'private_key = "$SSP_UNSET_X/', 1)
        with self.assertRaises(config.ConfigError) as caught:
            config.load(self.write(body))
        self.assertIn("tls.private_key: unset environment variable", str(caught.exception))


class ExampleTests(unittest.TestCase):
    def test_example_parses(self) -> None:
        """
        The commented example C{etc/ssp.toml} is a valid configuration once
        systemd provides C{$CREDENTIALS_DIRECTORY}.
        """
        if "CREDENTIALS_DIRECTORY" not in os.environ:
            os.environ["CREDENTIALS_DIRECTORY"] = "/run/credentials/ssp.service"
            self.addCleanup(os.environ.pop, "CREDENTIALS_DIRECTORY")
        loaded = config.load(ROOT / "etc" / "ssp.toml")
        self.assertEqual(loaded.tls.private_key.name, "ssp.key")


class AuditKeyTests(unittest.TestCase):
    """
    The chain key is required unless unkeyed mode is chosen explicitly,
    and nothing that protects the trail may live inside it.
    """

    def load(self, audit: str) -> config.Config:
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(certificates_toml(audit=False) + "[audit]\n" + audit)
        return config.load(path)

    def assertRejected(self, audit: str, message: str) -> None:
        with self.assertRaises(config.ConfigError) as caught:
            self.load(audit)
        self.assertIn(message, str(caught.exception))

    def test_key_required(self) -> None:
        self.assertRejected('directory = "/srv/audit"\n', "audit.key_file: is required")

    def test_unkeyed_is_an_explicit_choice(self) -> None:
        self.assertTrue(self.load("unkeyed = true\n").audit.unkeyed)
        self.assertRejected('unkeyed = true\nkey_file = "/k"\n',
                            "audit.unkeyed: contradicts audit.key_file")

    def test_nothing_protective_inside_the_trail(self) -> None:
        for key in ("key_file", "anchor_file", "signing_key"):
            self.assertRejected(
                f'directory = "/srv/audit"\nkey_file = "/k"\n{key} = "/srv/audit/x"\n'
                if key != "key_file" else 'directory = "/srv/audit"\nkey_file = "/srv/audit/k"\n',
                f"audit.{key}: must not be inside audit.directory")
