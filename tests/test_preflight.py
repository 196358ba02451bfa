"""
Tests for L{ssp.preflight} and C{--check-config}: every mistake an operator
can make in the file or the files it names is one line naming the file and
the key, at check, start and reload; a good file says C{configuration OK}.
"""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import config as ssp_config
from ssp import tap
from ssp.pki import Authority
from tests import redis, slapd
from tests.ports import free_port
from tests.support import ROOT

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def twistd(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        TWISTD + list(args), env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


class Files:
    """
    A configuration directory with a CA, the proxy's server and client
    identities, a CRL and the synthetic LDIF, all valid now.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True)
        self.ca = Authority.create("Preflight Test CA")
        (directory / "ca.pem").write_bytes(self.ca.issued.certificate_pem())
        self.ca.issue("localhost", ("localhost",), ("127.0.0.1",), client=False).write(
            directory, "server")
        self.ca.issue("ssp.test", ("ssp.test",), server=False).write(directory, "client")
        (directory / "ca.crl.pem").write_bytes(self.ca.crl())
        shutil.copy(slapd.SYNTHETIC_LDIF, directory / "sds.ldif")
        (directory / "audit.key").write_text(os.urandom(32).hex())

    def toml(self, **replace: str) -> str:
        """
        A configuration naming these files (relative paths), with lines
        starting C{key =} replaced by C{replace[key]} and extra text under
        the key C{extra}.
        """
        text = """\
[listen]
endpoint = "tcp:0:interface=127.0.0.1"
[tls]
certificate = "server.pem"
private_key = "server.key"
client_ca = "ca.pem"
crls = ["ca.crl.pem"]
[upstream]
certificate = "client.pem"
private_key = "client.key"
ca = "ca.pem"
[directory]
ldif = "sds.ldif"
kind = "ldif"
[admin]
endpoint = "tcp:0:interface=127.0.0.1"
[audit]
key_file = "audit.key"
"""
        lines = []
        for line in text.splitlines():
            key = line.split(" =", 1)[0]
            lines.append(replace.pop(key) if key in replace else line)
        return "\n".join(lines) + "\n" + replace.pop("extra", "") + "\n"

    def write(self, text: str) -> Path:
        path = self.directory / "ssp.toml"
        path.write_text(text)
        return path


class CheckConfigTests(unittest.SynchronousTestCase):
    """
    C{check_config}: exit status, the OK line, and one line per problem.
    """

    def setUp(self) -> None:
        self.files = Files(Path(self.mktemp()).resolve())

    def check(self, text: str, probe: bool = False) -> tuple[int, str, str]:
        path = self.files.write(text)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = tap.check_config(path, probe)
        return code, out.getvalue(), err.getvalue()

    def refused(self, text: str) -> str:
        """
        The one line C{--check-config} prints for C{text}; it starts with
        the file's name.
        """
        code, out, err = self.check(text)
        self.assertEqual((code, out), (1, ""), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertTrue(err.startswith(f"{self.files.directory / 'ssp.toml'}: "), err)
        return err.strip()

    def test_ok(self) -> None:
        code, out, err = self.check(self.files.toml())
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out, f"{self.files.directory / 'ssp.toml'}: configuration OK\n")

    def test_systemd_endpoint(self) -> None:
        """
        A C{systemd:} endpoint is checked for syntax and reported as
        provided at start (issue 19, defect 2: it printed C{'ssp-https'}).
        """
        code, out, err = self.check(self.files.toml(
            endpoint='endpoint = "systemd:domain=INET:name=ssp-https"'))
        self.assertEqual((code, err), (0, ""))
        self.assertIn("listen.endpoint: systemd:domain=INET:name=ssp-https: "
                      "provided by systemd at start\n", out)
        self.assertTrue(out.endswith("configuration OK\n"))
        self.assertIn("listen.endpoint: invalid endpoint 'systemd:domain=INET'", self.refused(
            self.files.toml(endpoint='endpoint = "systemd:domain=INET"')))

    def test_endpoint_mistakes(self) -> None:
        """
        A typo'd endpoint type, a port that is not a number and an C{ssl:}
        endpoint are one line each, naming the key.
        """
        self.assertIn("listen.endpoint: invalid endpoint 'tpc:8443': Unknown endpoint type",
                      self.refused(self.files.toml(endpoint='endpoint = "tpc:8443"')))
        self.assertIn("listen.endpoint: invalid endpoint 'tcp:84x3'",
                      self.refused(self.files.toml(endpoint='endpoint = "tcp:84x3"')))
        self.assertIn("listen.endpoint: invalid endpoint 'tcp:99999': port 99999 is not 0-65535",
                      self.refused(self.files.toml(endpoint='endpoint = "tcp:99999"')))
        self.assertIn("unexpected keyword argument 'bogus'", self.refused(
            self.files.toml(endpoint='endpoint = "tcp:8443:bogus=1"')))
        self.assertIn("listen.endpoint: ssl: endpoints cannot require client certificates",
                      self.refused(self.files.toml(endpoint='endpoint = "ssl:8443"')))

    def test_tls_settings(self) -> None:
        self.assertIn("tls.ciphers: OpenSSL knows no cipher in 'NOPE'",
                      self.refused(self.files.toml(crls='crls = []\nciphers = "NOPE"')))
        self.assertIn("tls.hsts: must be printable ASCII",
                      self.refused(self.files.toml(crls='crls = []\nhsts = "max-age=1\\r\\nX: y"')))

    def test_key_mismatch(self) -> None:
        """
        A private key that does not belong to the certificate names both
        keys and both files.
        """
        line = self.refused(self.files.toml(private_key='private_key = "client.key"'))
        self.assertIn(
            f"tls.certificate, tls.private_key: the private key {self.files.directory}/client.key"
            f" does not match the certificate {self.files.directory}/server.pem", line)

    def test_bad_crl(self) -> None:
        """
        A CRL that is not one, has expired, or comes from another CA is
        named with its key and file.
        """
        crl = self.files.directory / "ca.crl.pem"
        crl.write_text("-----BEGIN X509 CRL-----\nnot base64\n-----END X509 CRL-----\n")
        self.assertIn("tls.crls[0]: ", self.refused(self.files.toml()))
        crl.write_bytes(expired_crl(self.files.ca))
        self.assertIn(f"tls.crls[0]: {crl}: expired (nextUpdate ", self.refused(self.files.toml()))
        crl.write_bytes(Authority.create("Preflight Test CA").crl())
        self.assertIn(f"tls.crls[0]: {crl}: not signed by a CA in tls.client_ca",
                      self.refused(self.files.toml()))
        crl.unlink()
        self.assertIn(f"tls.crls[0]: {crl}: cannot read", self.refused(self.files.toml()))

    def test_ldif(self) -> None:
        """
        A file that is not an SDS LDIF, and an entry lacking an attribute
        the proxy reads, are refused (they used to pass).
        """
        ldif = self.files.directory / "sds.ldif"
        good = ldif.read_text()
        ldif.write_text("hello: world\n")
        self.assertIn(f"directory.ldif: {ldif}: not an SDS LDIF", self.refused(self.files.toml()))
        ldif.write_text(good.replace("nhsMhsSvcIA: urn:nhs:names:services:ssp-fixture:consumer\n",
                                     ""))
        self.assertIn(f"directory.ldif: {ldif}: entry 'uniqueIdentifier=SX00002-1,ou=Services,"
                      "o=nhs' lacks nhsMhsSvcIA", self.refused(self.files.toml()))
        ldif.write_bytes(b"dn: x\nobjectClass: nhsAs\n\xff\n")
        self.assertIn("not UTF-8", self.refused(self.files.toml()))

    def test_audit_key(self) -> None:
        short = self.files.directory / "short.key"
        short.write_text("too short")
        self.assertIn("at least 32 bytes",
                      self.refused(self.files.toml(key_file='key_file = "short.key"')))
        self.assertIn("audit.key_file: ",
                      self.refused(self.files.toml(key_file='key_file = "missing.key"')))

    def test_resolve_needs_host_and_port(self) -> None:
        for entry, side in (('"provider.test" = "127.0.0.1:8443"', "entry 'provider.test'"),
                            ('"provider.test:443" = "127.0.0.1"', "target '127.0.0.1'"),
                            ('"provider.test:443" = ":8443"', "target ':8443'"),
                            ('"provider.test:443" = "[::1]:99999"', "target '[::1]:99999'")):
            line = self.refused(self.files.toml(ca=f'ca = "ca.pem"\n[upstream.resolve]\n{entry}'))
            self.assertIn(f"upstream.resolve: {side} must be host:port", line)
        code, _, err = self.check(self.files.toml(
            ca='ca = "ca.pem"\n[upstream.resolve]\n"provider.test:443" = "[::1]:8443"'))
        self.assertEqual(code, 0, err)

    def test_url_schemes(self) -> None:
        line = self.refused(self.files.toml(
            kind='kind = "ldap"\nurls = ["ldaps://sds.test", "ldpa://sds.test"]', ldif=""))
        self.assertIn("directory.urls: 'ldpa://sds.test' is not a ldap://host or ldaps://host URL",
                      line)
        line = self.refused(self.files.toml(extra='[throttle]\nredis_url = "http://127.0.0.1"'))
        self.assertIn("throttle.redis_url: 'http://127.0.0.1' is not a redis://host URL", line)

    def test_cors_origins(self) -> None:
        """
        An origin a browser could never send (trailing slash, path, default
        port, upper case) is refused.
        """
        for origin in ("https://portal.test/", "https://portal.test/app", "https://portal.test:443",
                       "https://Portal.test", "portal.test", "ftp://portal.test"):
            line = self.refused(self.files.toml(extra=f'[cors]\norigins = ["{origin}"]'))
            self.assertIn(f"cors.origins: '{origin}' must be scheme://host[:port]", line)
        code, _, err = self.check(self.files.toml(
            extra='[cors]\norigins = ["https://portal.test", "http://localhost:3000"]'))
        self.assertEqual(code, 0, err)


class ProbeTests(unittest.TestCase):
    """
    C{--check-config --probe} reports SDS and Redis as they answer.
    """

    skip = slapd.SKIP or redis.SKIP

    def test_probe(self) -> None:
        files = Files(Path(self.mktemp()).resolve())
        sds = slapd.Slapd.shared([slapd.SYNTHETIC_LDIF])
        store = redis.RedisServer.start_for(self)
        dead = free_port()
        text = files.toml(kind=f'kind = "ldap"\nurls = ["{sds.url}"]\nbase = "o=nhs"', ldif="",
                          extra=f'[throttle]\nstore = "redis"\nredis_url = "{store.url}"')

        def run(text: str) -> tuple[int, str, str]:
            path = files.write(text)
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = tap.check_config(path, probe=True)
            return code, out.getvalue(), err.getvalue()

        code, out, err = run(text)
        self.assertEqual((code, err), (0, ""))
        self.assertIn(f"directory.urls[0]: {sds.url}: answers, base 'o=nhs' found", out)
        self.assertIn("throttle.redis_url: ", out)
        self.assertIn("answers PING", out)
        code, out, err = run(text.replace(str(store.port), str(dead)))
        self.assertEqual(code, 1)
        self.assertIn(f"throttle.redis_url: redis://127.0.0.1:{dead}/0: unreachable", err)
        self.assertNotIn("configuration OK", out)


class StartAndReloadTests(unittest.TestCase):
    """
    The same mistakes at start (C{twistd ssp}) end the process with one
    line, not a traceback; a reload keeps the running configuration.
    """

    def test_start_refused_in_one_line(self) -> None:
        files = Files(Path(self.mktemp()).resolve())
        cases = [
            (files.toml(private_key='private_key = "client.key"'),
             "tls.certificate, tls.private_key: the private key"),
            (files.toml(endpoint='endpoint = "ssl:8443"'), "listen.endpoint: ssl: endpoints"),
            (files.toml(endpoint='endpoint = "tpc:8443"'), "listen.endpoint: invalid endpoint"),
            (files.toml(endpoint='endpoint = "systemd:domain=INET:name=ssp-https"'),
             "listen.endpoint: systemd:domain=INET:name=ssp-https: systemd passed no such socket"),
        ]

        def run() -> list[tuple[str, subprocess.CompletedProcess[str]]]:
            results = []
            for text, expected in cases:
                path = files.write(text)
                results.append((expected, twistd("-n", "--pidfile=", "ssp", "--config", str(path),
                                                  cwd=files.directory)))
            return results

        def check(results: list[tuple[str, subprocess.CompletedProcess[str]]]) -> None:
            for expected, result in results:
                output = result.stdout + result.stderr
                self.assertNotEqual(result.returncode, 0)
                self.assertNotIn("Traceback", output)
                [line] = [line for line in output.splitlines() if "ssp.toml: " in line]
                self.assertIn(f"{files.directory / 'ssp.toml'}: {expected}", line)

        return deferToThread(run).addCallback(check)

    def test_busy_port_in_one_line(self) -> None:
        files = Files(Path(self.mktemp()).resolve())
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        path = files.write(files.toml(endpoint=f'endpoint = "tcp:{port}:interface=127.0.0.1"'))

        def run() -> list[subprocess.CompletedProcess[str]]:
            return [twistd("-n", "--pidfile=", "ssp", "--config", str(path), *workers,
                           cwd=files.directory)
                    for workers in ([], ["--workers", "2"])]

        def check(results: list[subprocess.CompletedProcess[str]]) -> None:
            for result in results:  # one process, then a master of two workers
                output = result.stdout + result.stderr
                self.assertNotEqual(result.returncode, 0)
                self.assertNotIn("Traceback", output)
                self.assertIn(f"{path}: listen.endpoint: cannot listen on tcp:{port}:"
                              "interface=127.0.0.1: Address already in use (set listen.endpoint,"
                              " or override it with --listen)", output)

        return deferToThread(run).addCallback(check)


class ReloadTests(unittest.TestCase):
    async def test_reload_refused_in_one_line(self) -> None:
        """
        A CRL that expired, written before SIGHUP, is one logged line and
        the running configuration stays.
        """
        from twisted.logger import formatEvent, globalLogPublisher

        from ssp.service import Concerns, SSPService
        from ssp.testing import RecordingAuditSink

        files = Files(Path(self.mktemp()).resolve())
        path = files.write(files.toml())
        service = SSPService(ssp_config.load(path), reactor, path,
                             concerns=Concerns(audit=RecordingAuditSink()))
        service.startService()
        self.addCleanup(service.stopService)
        await service.listening()
        events: list[dict] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        (files.directory / "ca.crl.pem").write_bytes(expired_crl(files.ca))
        self.assertFalse(service.reload())
        [line] = [formatEvent(e) for e in events if "Reload rejected" in formatEvent(e)]
        self.assertIn(f"{path}: tls.crls[0]: {files.directory}/ca.crl.pem: expired", line)
        self.assertNotIn("\n", line)


class ExampleConfigTests(unittest.TestCase):
    """
    C{etc/ssp.toml}, with real files where it expects them, passes
    C{--check-config}: step 3 of C{docs/systemd.md}.
    """

    def test_example_configuration_ok(self) -> None:
        files = Files(Path(self.mktemp()).resolve())
        tls = files.directory / "etc" / "ssp" / "tls"
        tls.mkdir(parents=True)
        credentials = files.directory / "credentials"
        credentials.mkdir()
        copies = {"ssp.example.nhs.uk.pem": "server.pem", "ssp-client.pem": "client.pem",
                  "spine-ca-bundle.pem": "ca.pem", "spine-sub-ca.crl.pem": "ca.crl.pem",
                  "spine-root-ca.crl.pem": "ca.crl.pem"}
        for name, source in copies.items():
            shutil.copy(files.directory / source, tls / name)
        shutil.copy(files.directory / "server.key", credentials / "ssp.key")
        shutil.copy(files.directory / "client.key", credentials / "ssp-client.key")
        shutil.copy(files.directory / "audit.key", credentials / "audit.key")
        example = (ROOT / "etc" / "ssp.toml").read_text()
        path = files.write(example.replace('"/etc/ssp/', f'"{files.directory}/etc/ssp/'))

        def check(result: subprocess.CompletedProcess[str]) -> None:
            self.assertEqual(result.returncode, 0, result.stderr)
            self.assertEqual(result.stderr, "")
            self.assertIn("listen.endpoint: systemd:domain=INET:name=ssp-https: "
                          "provided by systemd at start", result.stdout)
            self.assertTrue(result.stdout.endswith(f"{path}: configuration OK\n"))

        return deferToThread(
            twistd, "ssp", "--config", str(path), "--check-config",
            CREDENTIALS_DIRECTORY=str(credentials),
        ).addCallback(check)


class ValueTests(unittest.SynchronousTestCase):
    """
    Rules that hold for any way a configuration is built, so a mistake can
    never reach request handling.
    """

    def test_resolve_refused_at_construction(self) -> None:
        with self.assertRaises(ValueError):
            ssp_config.UpstreamConfig(Path("c"), Path("k"), Path("a"),
                                      resolve={"provider.test:443": "127.0.0.1"})

    def test_relative_default_follows_the_file(self) -> None:
        """
        The default C{audit.directory} (C{var/audit}) is relative to the
        configuration file's directory, not the working directory.
        """
        files = Files(Path(self.mktemp()).resolve())
        loaded = ssp_config.load(files.write(files.toml()))
        self.assertEqual(loaded.audit.directory, files.directory / "var" / "audit")
        self.assertEqual(loaded.directory.ldif, files.directory / "sds.ldif")


def expired_crl(authority: Authority) -> bytes:
    """
    A CRL from C{authority} whose C{nextUpdate} passed a day ago.
    """
    now = datetime.datetime.now(datetime.timezone.utc)
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(authority.issued.certificate.subject)
        .last_update(now - datetime.timedelta(days=8))
        .next_update(now - datetime.timedelta(days=1))
        .sign(authority.issued.key, hashes.SHA256())
    )
    return crl.public_bytes(serialization.Encoding.PEM)
