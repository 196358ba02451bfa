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

from tests.ports import free_port

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "sds"
SCHEMA = FIXTURES / "ssp-sds.schema"
SYNTHETIC_LDIF = FIXTURES / "synthetic.ldif"
DEMO_LDIF = REPO / "ssp" / "data" / "demo-sds.ldif"
ADMIN_DN = "cn=admin,o=nhs"
ADMIN_PASSWORD = "secret"

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SLAPADD = shutil.which("slapadd") or "/usr/sbin/slapadd"

SKIP: str | None = None
if not (os.access(SLAPD, os.X_OK) and os.access(SLAPADD, os.X_OK)):
    SKIP = "slapd/slapadd not installed (apt-get install slapd ldap-utils)"

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
        from ssp.pki import Authority

        authority = Authority.create("SSP test SDS CA")
        other = Authority.create("Some other CA")
        certificate, key = authority.issue(
            "localhost", ("localhost",), ("127.0.0.1",), client=False
        ).write(directory, "server")
        client_certificate, client_key = authority.issue(
            "ssp.test", ("ssp.test",), server=False
        ).write(directory, "client")
        (directory / "ca.pem").write_bytes(authority.issued.certificate_pem())
        (directory / "other-ca.pem").write_bytes(other.issued.certificate_pem())
        return cls(
            ca=directory / "ca.pem",
            certificate=certificate,
            key=key,
            other_ca=directory / "other-ca.pem",
            client_certificate=client_certificate,
            client_key=client_key,
        )


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
                loaded = subprocess.run(
                    [SLAPADD, "-q", "-f", str(directory / "slapd.conf"), "-l", str(ldif)],
                    capture_output=True,
                )
                if loaded.returncode:
                    raise RuntimeError(f"slapadd {ldif}: {loaded.stderr.decode(errors='replace')}")
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
