# -*- test-case-name: tests.test_preflight -*-
"""
Everything a running proxy needs from the files a configuration names,
checked before it is used: at C{--check-config}, at start and on reload.

Parsing (L{ssp.config}) catches mistakes in the TOML itself; this module
reads what the values point at: certificates and keys that belong
together, CRLs that parse, are signed by a client CA and are still fresh,
an LDIF the proxy can serve from.  Every problem is one L{ConfigError}
line, C{<file>: <key>: <problem>}, so an operator never reads a traceback
for a configuration mistake.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL

from ssp.anchor import load_signing_key
from ssp.chain import read_key
from ssp.config import INHERITED_ENDPOINTS, Config, ConfigError
from ssp.directory import ldif_problem
from ssp.tls import fresh_crls, read_certificates, read_pem, read_private_key

T = TypeVar("T")


def check(config: Config, source: Path, now: float) -> list[str]:
    """
    Check every file C{config} names.

    @param now: the current POSIX time (CRL freshness, certificate validity).
    @return: notes for the operator (endpoints systemd provides at start).
    @raise ConfigError: the first problem, naming file and key.
    """
    fail = _failer(source)
    notes = [
        f"{key}: {value}: provided by systemd at start"
        for key, value in (("listen.endpoint", config.listen.endpoint),
                           ("admin.endpoint", config.admin.endpoint))
        if value and value.split(":", 1)[0] in INHERITED_ENDPOINTS
    ]
    moment = datetime.fromtimestamp(now, timezone.utc)
    fail("tls.ciphers", _ciphers, config.tls.ciphers)
    _pair(fail, "tls", config.tls.certificate, config.tls.private_key, moment)
    _pair(fail, "upstream", config.upstream.certificate, config.upstream.private_key, moment)
    authorities = fail("tls.client_ca", read_certificates, config.tls.client_ca)
    fail("upstream.ca", read_certificates, config.upstream.ca)
    for index, path in enumerate(config.tls.crls):
        _crls(fail, f"tls.crls[{index}]", path, authorities, moment)
    _directory(fail, config)
    if config.audit.key_file is not None:
        fail("audit.key_file", read_key, config.audit.key_file)
    if config.audit.signing_key is not None:
        fail("audit.signing_key", load_signing_key, config.audit.signing_key)
    return notes


def _failer(source: Path) -> Callable[..., Any]:
    """
    C{fail(key, read, *args)}: C{read(*args)}, its error re-raised as one
    line naming C{source} and C{key}; C{fail(key, None, message)} raises.
    """
    def fail(key: str, read: Callable[..., T] | None, *args: Any) -> T:
        if read is None:
            raise ConfigError(f"{source}: {key}: {args[0]}")
        try:
            return read(*args)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{source}: {key}: {e}") from None
    return fail


def _pair(fail: Callable[..., Any], section: str, certificate_path: Path,
          key_path: Path, now: datetime) -> None:
    """
    The certificate and private key of one identity belong together, and
    the certificate is valid now.
    """
    leaf = fail(f"{section}.certificate", read_certificates, certificate_path)[0]
    key = fail(f"{section}.private_key", read_private_key, key_path)
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(*public) != key.to_cryptography_key().public_key(
    ).public_bytes(*public):
        fail(f"{section}.certificate, {section}.private_key", None,
             f"the private key {key_path} does not match the certificate {certificate_path}")
    if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
        fail(f"{section}.certificate", None,
             f"{certificate_path}: not valid now (valid {leaf.not_valid_before_utc:%Y-%m-%d} "
             f"to {leaf.not_valid_after_utc:%Y-%m-%d})")


def _crls(fail: Callable[..., Any], key: str, path: Path,
          authorities: list[x509.Certificate], now: datetime) -> None:
    """
    Each CRL in C{path} parses, is signed by one of the client CAs (one
    from any other issuer would revoke nothing) and has a future
    C{nextUpdate} (OpenSSL refuses every client with an expired CRL).
    """
    crls, _ = fail(key, fresh_crls, path, now.timestamp())
    for crl in crls:
        issuers = [a for a in authorities if a.subject == crl.issuer]
        if not any(crl.is_signature_valid(a.public_key()) for a in issuers):
            fail(key, None, f"{path}: not signed by a CA in tls.client_ca "
                            f"(issuer {crl.issuer.rfc4514_string()})")


def _directory(fail: Callable[..., Any], config: Config) -> None:
    directory = config.directory
    if directory.kind == "ldif":
        if directory.ldif is None:
            fail("directory.ldif", None, "required when kind = 'ldif'")
        text = fail("directory.ldif", _read_text, directory.ldif)
        problem = ldif_problem(text)
        if problem:
            fail("directory.ldif", None, f"{directory.ldif}: {problem}")
        return
    if not directory.urls:
        fail("directory.urls", None, "required when kind = 'ldap'")
    if directory.ca is not None:
        fail("directory.ca", read_certificates, directory.ca)
    if directory.password_file is not None:
        fail("directory.password_file", read_pem, directory.password_file)


def _ciphers(ciphers: str) -> None:
    try:
        SSL.Context(SSL.TLS_SERVER_METHOD).set_cipher_list(ciphers.encode("ascii"))
    except (SSL.Error, UnicodeEncodeError):
        raise ValueError(f"OpenSSL knows no cipher in {ciphers!r}") from None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason})") from e


def probe(config: Config) -> list[tuple[bool, str]]:
    """
    Connect to each SDS server and to Redis and say what answered, for
    C{--check-config --probe}.  Blocking, with the configured timeouts: it
    runs from the command line, before any reactor.

    @return: C{(ok, line)} per server.
    """
    results = []
    directory = config.directory
    if directory.kind == "ldap":
        for index, url in enumerate(directory.urls):
            results.append(_probe_ldap(config, f"directory.urls[{index}]", url))
    if config.throttle.enabled and config.throttle.store == "redis":
        results.append(_probe_redis(config.throttle.redis_url, config.directory.connect_timeout))
    return results


def _probe_ldap(config: Config, key: str, url: str) -> tuple[bool, str]:
    import ssl

    from ldap3 import BASE, Connection, Server, Tls
    from ldap3.core.exceptions import LDAPException

    directory = config.directory
    password = None
    if directory.password_file is not None:
        password = read_pem(directory.password_file).decode().strip()
    tls = Tls(validate=ssl.CERT_REQUIRED,
              ca_certs_file=str(directory.ca) if directory.ca else None,
              local_certificate_file=str(config.upstream.certificate),
              local_private_key_file=str(config.upstream.private_key))
    try:
        server = Server(url, connect_timeout=directory.connect_timeout, tls=tls)
        with Connection(server, user=directory.bind_dn, password=password,
                        receive_timeout=math.ceil(directory.receive_timeout)) as connection:
            if directory.start_tls:
                connection.start_tls()
            if directory.bind_dn:
                connection.bind()
            found = connection.search(directory.base, "(objectClass=*)", BASE,
                                      time_limit=directory.time_limit)
    except LDAPException as e:
        return False, f"{key}: {url}: unreachable: {e}"
    if not found:
        return False, f"{key}: {url}: answers, but base {directory.base!r} was not found"
    return True, f"{key}: {url}: answers, base {directory.base!r} found"


def _probe_redis(url: str, timeout: float) -> tuple[bool, str]:
    import socket
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    commands = []
    if parts.password:
        user = [unquote(parts.username)] if parts.username else []
        commands.append(["AUTH", *user, unquote(parts.password)])
    commands.append(["PING"])
    shown = parts._replace(netloc=f"{parts.hostname}:{parts.port or 6379}").geturl()
    try:
        with socket.create_connection((parts.hostname, parts.port or 6379), timeout) as s:
            for command in commands:
                s.sendall(b"".join(
                    [b"*%d\r\n" % len(command)]
                    + [b"$%d\r\n%s\r\n" % (len(a.encode()), a.encode()) for a in command]))
                reply = s.recv(512).split(b"\r\n", 1)[0].decode(errors="replace")
                if not reply.startswith("+"):
                    return False, f"throttle.redis_url: {shown}: refused {command[0]}: {reply}"
    except OSError as e:
        return False, f"throttle.redis_url: {shown}: unreachable: {e}"
    return True, f"throttle.redis_url: {shown}: answers PING"
