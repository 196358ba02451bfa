# -*- test-case-name: tests.test_directory -*-
"""
A real OpenLDAP C{slapd} on loopback, loaded with the SDS schema and LDIF
fixtures, for integration tests of the directory layer and end to end.

Only a real server applies SDS's matching rules (case-exact interaction
IDs, case-ignore party keys, no equality rule on C{nhsMhsFQDN}); ldap3's
mock strategies do not, so anything that depends on them runs here.

Typical use::

    class MyTests(TestCase):
        skip = slapd.SKIP

        def setUp(self):
            self.sds = slapd.Slapd.shared([slapd.DEMO_LDIF])
            # self.sds.url is ldap://127.0.0.1:PORT

Two ways to get one (trial has no C{setUpClass}):

  - C{Slapd.shared([ldif, ...])}: one server per process and data set,
    started on first use and killed at interpreter exit.  For tests that
    only read; never stop it.
  - C{Slapd.start_for(self, [ldif, ...])}: a server of the test's own,
    destroyed in its clean-up.  L{Slapd.stop} and L{Slapd.start} stop and
    restart it on the same port and data, to simulate an SDS outage.

Launching takes about 0.1 s.
"""

from __future__ import annotations

import atexit
import ctypes
import datetime
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import attrs

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO.parent / "shared" / "external-fixtures" / "sds"
SCHEMA = FIXTURES / "nhs-sds.schema"
ORANGE_LDIF = FIXTURES / "sds_gpconnect_orange.ldif"
DEMO_LDIF = REPO / "etc" / "demo-sds.ldif"
ADMIN_DN = "cn=admin,o=nhs"
ADMIN_PASSWORD = "secret"

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"

SKIP: str | None = None
if not (os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)):
    SKIP = "slapd/slapadd not installed (apt-get install slapd ldap-utils)"
elif not SCHEMA.exists():
    SKIP = f"SDS schema fixture missing: {SCHEMA}"

_BASE = (
    "dn: o=nhs\nobjectClass: organization\no: nhs\n\n"
    "dn: ou=Services,o=nhs\nobjectClass: organizationalUnit\nou: Services\n\n"
)

_CONF = """\
include /etc/ldap/schema/core.schema
include /etc/ldap/schema/cosine.schema
include {schema}
modulepath /usr/lib/ldap
moduleload back_mdb
pidfile {dir}/slapd.pid
loglevel none
{tls}
access to * by * read
database mdb
maxsize 104857600
suffix "o=nhs"
rootdn "{admin}"
rootpw {password}
directory {dir}/db
index objectClass,nhsIDCode,nhsAsSvcIA,nhsMhsSvcIA,nhsMHSPartyKey,uniqueIdentifier eq
"""


_shared: dict[tuple[str, ...], Slapd] = {}


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class ServerTLS:
    """
    A throw-away CA and a server certificate for C{localhost}/127.0.0.1, so
    LDAPS and StartTLS can be tested with real certificate validation.
    """

    ca: Path
    certificate: Path
    key: Path
    other_ca: Path
    client_certificate: Path
    client_key: Path

    @classmethod
    def create(cls, directory: Path) -> ServerTLS:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        now = datetime.datetime.now(datetime.timezone.utc)

        def name(cn: str) -> x509.Name:
            return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

        def ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(name(cn))
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True, content_commitment=False,
                        key_encipherment=False, data_encipherment=False,
                        key_agreement=False, key_cert_sign=True, crl_sign=True,
                        encipher_only=False, decipher_only=False,
                    ),
                    True,
                )
                .sign(key, hashes.SHA256())
            )
            return key, cert

        ca_key, ca_cert = ca("SSP test SDS CA")
        _, other_cert = ca("Some other CA")
        def leaf(
            cn: str, names: list[x509.GeneralName]
        ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = (
                x509.CertificateBuilder()
                .subject_name(name(cn))
                .issuer_name(ca_cert.subject)
                .public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(names), False)
                .sign(ca_key, hashes.SHA256())
            )
            return key, cert

        server_key, server_cert = leaf(
            "localhost",
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
        )
        client_key, client_cert = leaf("ssp.test", [x509.DNSName("ssp.test")])
        paths = cls(
            ca=directory / "ca.pem",
            certificate=directory / "server.pem",
            key=directory / "server.key",
            other_ca=directory / "other-ca.pem",
            client_certificate=directory / "client.pem",
            client_key=directory / "client.key",
        )
        pem = serialization.Encoding.PEM

        def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
            path.write_bytes(
                key.private_bytes(
                    pem,
                    serialization.PrivateFormat.TraditionalOpenSSL,
                    serialization.NoEncryption(),
                )
            )

        paths.ca.write_bytes(ca_cert.public_bytes(pem))
        paths.other_ca.write_bytes(other_cert.public_bytes(pem))
        paths.certificate.write_bytes(server_cert.public_bytes(pem))
        paths.client_certificate.write_bytes(client_cert.public_bytes(pem))
        write_key(paths.key, server_key)
        write_key(paths.client_key, client_key)
        return paths


@attrs.define
class Slapd:
    """
    One slapd process and its database directory.

    @ivar url: C{ldap://127.0.0.1:PORT} (plain, StartTLS-capable when
        C{tls} is set).
    @ivar ldaps_url: C{ldaps://localhost:PORT} when C{tls} is set.
    """

    directory: Path
    port: int
    tls: ServerTLS | None = None
    ldaps_port: int | None = None
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        assert self.ldaps_port is not None, "launched without tls=True"
        return f"ldaps://localhost:{self.ldaps_port}"

    @classmethod
    def launch(
        cls,
        ldif_paths: Sequence[Path | str],
        tls: bool = False,
        require_client_certificate: bool = False,
        attempts: int = 3,
    ) -> Slapd:
        """
        Create a database from the schema and C{ldif_paths}, start slapd on
        a free loopback port and wait until it answers.

        @param tls: also serve LDAPS and StartTLS with a fresh test CA.
        @param require_client_certificate: TLS clients must present a
            certificate from that CA (C{TLSVerifyClient demand}).
        """
        if SKIP:
            raise RuntimeError(SKIP)
        directory = Path(tempfile.mkdtemp(prefix="ssp-slapd-"))
        try:
            (directory / "db").mkdir()
            server_tls = ServerTLS.create(directory) if tls else None
            tls_lines = ""
            if server_tls:
                tls_lines = (
                    f"TLSCACertificateFile {server_tls.ca}\n"
                    f"TLSCertificateFile {server_tls.certificate}\n"
                    f"TLSCertificateKeyFile {server_tls.key}\n"
                )
                if require_client_certificate:
                    tls_lines += "TLSVerifyClient demand\n"
            (directory / "slapd.conf").write_text(
                _CONF.format(
                    schema=SCHEMA,
                    dir=directory,
                    tls=tls_lines,
                    admin=ADMIN_DN,
                    password=ADMIN_PASSWORD,
                )
            )
            (directory / "base.ldif").write_text(_BASE)
            for ldif in [directory / "base.ldif", *ldif_paths]:
                subprocess.run(
                    [SLAPADD, "-q", "-f", str(directory / "slapd.conf"), "-l", str(ldif)],
                    check=True,
                    capture_output=True,
                )
            for attempt in range(attempts):
                server = cls(
                    directory, free_port(), server_tls, free_port() if tls else None
                )
                try:
                    server.start()
                except RuntimeError:
                    if attempt == attempts - 1:
                        raise
                else:
                    return server
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        raise AssertionError("unreachable")

    @classmethod
    def shared(cls, ldif_paths: Sequence[Path | str]) -> Slapd:
        """
        A plain-LDAP server for C{ldif_paths} shared by every caller in this
        process, launched on first use and destroyed at exit.  Read only:
        do not stop it.
        """
        key = tuple(str(p) for p in ldif_paths)
        server = _shared.get(key)
        if server is None or server.process is None:
            server = _shared[key] = cls.launch(ldif_paths)
            atexit.register(server.destroy)
        return server

    @classmethod
    def start_for(cls, test_case: Any, ldif_paths: Sequence[Path | str], **options: Any) -> Slapd:
        """
        L{launch} a server for one test, destroyed in its clean-up.
        """
        server = cls.launch(ldif_paths, **options)
        test_case.addCleanup(server.destroy)
        return server

    def start(self, timeout: float = 10.0) -> None:
        """
        Start slapd on this database and port; wait until it accepts
        connections.

        @raise RuntimeError: if it exits or does not listen in time.
        """
        urls = self.url + "/"
        if self.ldaps_port is not None:
            urls += f" ldaps://127.0.0.1:{self.ldaps_port}/"
        log = (self.directory / "slapd.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [SLAPD, "-f", str(self.directory / "slapd.conf"), "-h", urls, "-d", "0"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                self.process = None
                raise RuntimeError(
                    "slapd exited: " + (self.directory / "slapd.log").read_text()[-2000:]
                )
            if _listening(self.port) and (
                self.ldaps_port is None or _listening(self.ldaps_port)
            ):
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("slapd did not start listening in time")
            time.sleep(0.02)

    def stop(self) -> None:
        """
        Kill slapd abruptly (as a crash or network loss would look to the
        proxy); the database stays for L{start}.
        """
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def destroy(self) -> None:
        """
        Stop slapd and delete its database.
        """
        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def _die_with_parent() -> None:
    """
    On Linux, have the kernel kill slapd if the test process dies without
    cleaning up (PR_SET_PDEATHSIG), so no server outlives a killed run.
    """
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False
