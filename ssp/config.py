# -*- test-case-name: tests.test_config -*-
"""
Configuration: one TOML file read into one immutable attrs tree.

Every section is a frozen attrs class whose fields, types and defaults are
the reference documentation (C{docs/configuration.md} mirrors them).  Errors
name the file and the dotted key, so an operator never has to guess.
Relative paths are resolved against the directory holding the file, after
expanding environment variables (C{$CREDENTIALS_DIRECTORY/ssp.key} under
systemd's C{LoadCredential}).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from attrs.validators import deep_iterable, ge, gt, in_
from twisted.internet.endpoints import _parseServer, serverFromString

DEFAULT_CIPHERS = "ECDHE+AESGCM:DHE+AESGCM"


class ConfigError(Exception):
    """
    The configuration is unusable; the message names the file and key.
    """


# --- Value rules -----------------------------------------------------------
# Each raises ValueError("'<field>' <problem>"), which the loader turns into
# "<file>: <section>.<field>: <problem>", so a mistake is caught when the
# file is read (check, start and reload alike), never while serving.

#: Endpoint types whose socket is handed over when the process starts.
INHERITED_ENDPOINTS = ("systemd", "ssp-inherit")


def endpoint_problem(description: str) -> str | None:
    """
    What is wrong with a Twisted server endpoint string, or L{None}.  The
    endpoint is built but not bound; a C{systemd:} or inherited socket
    exists only at start, so only its syntax is checked.
    """
    kind = description.split(":", 1)[0]
    if kind == "ssl":
        return "ssl: endpoints cannot require client certificates; use tcp: (the proxy does TLS)"
    try:
        if kind not in INHERITED_ENDPOINTS:
            endpoint = serverFromString(None, description)
            port = getattr(endpoint, "_port", getattr(endpoint, "port", None))
            if isinstance(port, int) and not 0 <= port <= 65535:
                return f"invalid endpoint {description!r}: port {port} is not 0-65535"
            return None
        _, _, options = _parseServer(description, None)
    except Exception as e:  # Twisted raises whatever its parser or the endpoint meets
        return f"invalid endpoint {description!r}: {e}"
    if kind == "systemd":
        if options.get("domain") not in ("INET", "INET6", "UNIX"):
            return f"invalid endpoint {description!r}: domain must be INET, INET6 or UNIX"
        if not (options.get("name") or str(options.get("index", "")).isdigit()):
            return f"invalid endpoint {description!r}: needs name=<FileDescriptorName> or index=N"
    elif not str(options.get("fd", "")).isdigit():
        return f"invalid endpoint {description!r}: needs fd=N"
    return None


def _endpoint(instance: Any, attribute: Any, value: str) -> None:
    problem = endpoint_problem(value)
    if problem:
        raise ValueError(f"'{attribute.name}' {problem}")


def _optional_endpoint(instance: Any, attribute: Any, value: str | None) -> None:
    if value:  # None or "" turns the listener off
        _endpoint(instance, attribute, value)


def _header_value(instance: Any, attribute: Any, value: str) -> None:
    if not re.fullmatch(r"[\x20-\x7e]*", value):
        raise ValueError(f"'{attribute.name}' must be printable ASCII (it is sent as a header)")


def _host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    if host.startswith("["):
        host = host[1:-1] if host.endswith("]") else ""
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def _resolve(instance: Any, attribute: Any, value: dict[str, str]) -> None:
    for name, target in value.items():
        for side, text in (("entry", name), ("target", target)):
            if not _host_port(text):
                raise ValueError(
                    f"'{attribute.name}' {side} {text!r} must be host:port ({name!r} = {target!r})")


def _url(*schemes: str) -> Callable[[Any, Any, str], None]:
    def check(instance: Any, attribute: Any, value: str) -> None:
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises for a port that is not a number
        except ValueError as e:
            raise ValueError(f"'{attribute.name}' invalid URL {value!r}: {e}") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"'{attribute.name}' {value!r} is not a "
                             + " or ".join(f"{s}://host" for s in schemes) + " URL")
    return check


def _origin(instance: Any, attribute: Any, value: str) -> None:
    """
    A browser's C{Origin} is the serialised scheme, host and non-default
    port (RFC 6454): anything else in the list could never match.
    """
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        parts, port = None, None
    default = {"http": 80, "https": 443}
    if (parts is None or parts.scheme not in default or not parts.hostname
            or parts.path or parts.query or parts.fragment or "@" in parts.netloc
            or port == default[parts.scheme] or value != value.lower()):
        raise ValueError(f"'{attribute.name}' {value!r} must be scheme://host[:port] "
                         "(lower case, no path or trailing slash, no default port)")


@attrs.frozen
class ListenConfig:
    endpoint: str = attrs.field(default="tcp:8443:interface=127.0.0.1", validator=_endpoint)
    proxy_protocol: bool = False
    drain_timeout: float = attrs.field(default=30.0, validator=ge(0))
    idle_timeout: float = attrs.field(default=60.0, validator=gt(0))
    header_timeout: float = attrs.field(default=10.0, validator=gt(0))
    max_request_line: int = attrs.field(default=8192, validator=ge(64))
    max_header_bytes: int = attrs.field(default=32768, validator=ge(1024))
    max_headers: int = attrs.field(default=100, validator=ge(8))
    max_body_bytes: int = attrs.field(default=100 * 1024 * 1024, validator=ge(0))
    max_connections: int = attrs.field(default=10000, validator=ge(1))
    max_connections_per_address: int = attrs.field(default=256, validator=ge(1))
    workers: int = attrs.field(default=1, validator=ge(1))
    reuse_port: bool = False


@attrs.frozen
class ServerTLSConfig:
    certificate: Path
    private_key: Path
    client_ca: Path
    crls: tuple[Path, ...] = ()
    crl_expiry_margin: float = attrs.field(default=3600.0, validator=ge(0))
    ciphers: str = DEFAULT_CIPHERS
    hsts: str = attrs.field(default="max-age=31536000; includeSubDomains", validator=_header_value)


@attrs.frozen
class UpstreamConfig:
    certificate: Path
    private_key: Path
    ca: Path
    connect_timeout: float = attrs.field(default=10.0, validator=gt(0))
    response_timeout: float = attrs.field(default=60.0, validator=gt(0))
    idle_timeout: float = attrs.field(default=60.0, validator=gt(0))
    max_persistent_per_host: int = attrs.field(default=64, validator=ge(1))
    cached_connection_timeout: float = attrs.field(default=240.0, validator=gt(0))
    max_header_bytes: int = attrs.field(default=65536, validator=ge(1024))
    resolve: dict[str, str] = attrs.field(factory=dict, validator=_resolve)


@attrs.frozen
class DirectoryConfig:
    kind: str = attrs.field(default="ldif", validator=in_(["ldif", "ldap"]))
    ldif: Path | None = None
    urls: tuple[str, ...] = attrs.field(
        default=(), validator=deep_iterable(_url("ldap", "ldaps")))
    base: str = "ou=services,o=nhs"
    bind_dn: str | None = None
    password_file: Path | None = None
    ca: Path | None = None
    start_tls: bool = False
    pool_strategy: str = attrs.field(default="first", validator=in_(["first", "round_robin"]))
    connections: int = attrs.field(default=4, validator=ge(1))
    max_queued_searches: int = attrs.field(default=16, validator=ge(0))
    connect_timeout: float = attrs.field(default=3.0, validator=gt(0))
    receive_timeout: float = attrs.field(default=5.0, validator=gt(0))
    time_limit: int = attrs.field(default=5, validator=ge(1))
    cache_ttl: float = attrs.field(default=300.0, validator=ge(0))
    negative_ttl: float = attrs.field(default=60.0, validator=ge(0))
    stale_limit: float = attrs.field(default=3600.0, validator=ge(0))
    cache_entries: int = attrs.field(default=100_000, validator=ge(1))
    negative_entries: int = attrs.field(default=10_000, validator=ge(1))


@attrs.frozen
class TokenConfig:
    validate: bool = True
    clock_skew: float = attrs.field(default=60.0, validator=ge(0))


@attrs.frozen
class AuditConfig:
    """
    C{key_file} (or an explicit C{unkeyed = true}) is required in a file;
    C{anchor_file} must lie outside C{directory} (L{parse} checks both).
    """

    directory: Path = Path("var/audit")
    durability: str = attrs.field(default="always", validator=in_(["always", "batch", "never"]))
    rotate_bytes: int = attrs.field(default=256 * 1024 * 1024, validator=ge(4096))
    rotate_daily: bool = True
    key_file: Path | None = None
    unkeyed: bool = False
    anchor_file: Path | None = None
    signing_key: Path | None = None
    checkpoint_interval: float = attrs.field(default=60.0, validator=gt(0))
    max_pending: int = attrs.field(default=10000, validator=ge(1))
    connection_interval: float = attrs.field(default=10.0, validator=gt(0))


@attrs.frozen
class RateLimit:
    """
    C{rate} requests per C{period} seconds, with bursts of up to C{burst}.
    """

    rate: int = attrs.field(validator=ge(1))
    period: float = attrs.field(default=1.0, validator=gt(0))
    burst: int = attrs.field(default=1, validator=ge(1))


@attrs.frozen
class LimitSet:
    default: RateLimit | None = None
    overrides: dict[str, RateLimit] = attrs.field(factory=dict)

    def for_asid(self, asid: str) -> RateLimit | None:
        return self.overrides.get(asid, self.default)


@attrs.frozen
class ThrottleConfig:
    enabled: bool = True
    store: str = attrs.field(default="memory", validator=in_(["memory", "redis"]))
    redis_url: str = attrs.field(default="redis://127.0.0.1:6379/0", validator=_url("redis"))
    on_store_failure: str = attrs.field(default="local", validator=in_(["local", "closed"]))
    consumer: LimitSet = attrs.field(factory=LimitSet)
    provider: LimitSet = attrs.field(factory=LimitSet)


@attrs.frozen
class Agreement:
    """
    A data-sharing agreement: C{sender} may call C{receiver}, for the
    listed interactions or, when none are listed, for any.
    """

    sender: str
    receiver: str
    interactions: tuple[str, ...] = ()


@attrs.frozen
class AdminConfig:
    endpoint: str | None = attrs.field(default="tcp:8081:interface=127.0.0.1",
                                       validator=_optional_endpoint)


@attrs.frozen
class CorsConfig:
    """
    Browser consumers: origins whose CORS preflight the proxy answers itself.
    """

    origins: tuple[str, ...] = attrs.field(default=(), validator=deep_iterable(_origin))
    max_age: int = attrs.field(default=600, validator=ge(0))


@attrs.frozen
class LogConfig:
    access_log: bool = True
    access_log_file: Path | None = None


@attrs.frozen
class Config:
    tls: ServerTLSConfig
    upstream: UpstreamConfig
    listen: ListenConfig = attrs.field(factory=ListenConfig)
    directory: DirectoryConfig = attrs.field(factory=DirectoryConfig)
    token: TokenConfig = attrs.field(factory=TokenConfig)
    audit: AuditConfig = attrs.field(factory=AuditConfig)
    throttle: ThrottleConfig = attrs.field(factory=ThrottleConfig)
    agreements: tuple[Agreement, ...] = ()
    admin: AdminConfig = attrs.field(factory=AdminConfig)
    log: LogConfig = attrs.field(factory=LogConfig)
    cors: CorsConfig = attrs.field(factory=CorsConfig)


def load(path: Path | str) -> Config:
    """
    Read and validate a configuration file.

    @raise ConfigError: naming the file and the offending key.
    """
    path = Path(path)
    try:
        with path.open("rb") as f:
            table = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: invalid TOML: {e}") from e
    return parse(table, path)


def parse(table: dict[str, Any], source: Path) -> Config:
    """
    Build a L{Config} from an already-parsed TOML table read from C{source}.
    """
    builder = _Builder(source)
    config: Config = builder.build(Config, table, "")
    _check_audit(config.audit, builder)
    return config


def _check_audit(audit: AuditConfig, builder: _Builder) -> None:
    """
    The keys of C{[audit]} that depend on each other.
    """
    if audit.key_file is None and not audit.unkeyed:
        raise builder.fail("audit.key_file", "is required (or set audit.unkeyed = true to "
                           "accept a chain anyone who can write the directory can rewrite)")
    if audit.key_file is not None and audit.unkeyed:
        raise builder.fail("audit.unkeyed", "contradicts audit.key_file")
    for name in ("key_file", "anchor_file", "signing_key"):
        path = getattr(audit, name)
        if path is not None and path.is_relative_to(audit.directory):
            raise builder.fail(f"audit.{name}", "must not be inside audit.directory (whoever "
                               "can rewrite the trail could rewrite it too)")


@attrs.frozen
class _Builder:
    source: Path

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {key or '(top level)'}: {message}")

    def build(self, cls: type, table: Any, prefix: str) -> Any:
        if not isinstance(table, dict):
            return self._raise(prefix, "expected a table")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in attrs.fields(cls)}
        for key in table:
            if key not in fields:
                raise self.fail(_join(prefix, key), "unknown key")
        values = {}
        for name, field in fields.items():
            key = _join(prefix, name)
            if name in table:
                values[name] = self.convert(hints[name], table[name], key)
            elif field.default is attrs.NOTHING:
                raise self.fail(key, "is required")
            elif attrs.has(hints[name]):
                # Build absent sections too, so their defaults are resolved.
                values[name] = self.build(hints[name], {}, key)
            elif isinstance(field.default, Path):
                # A relative default is relative to the file too.
                values[name] = self.convert(hints[name], str(field.default), key)
        try:
            return cls(**values)
        except ValueError as e:
            message = str(e.args[0])
            named = re.match(r"'(\w+)' (.*)", message)
            if named:
                raise self.fail(_join(prefix, named[1]), named[2]) from e
            raise self.fail(prefix, message) from e

    def convert(self, hint: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(hint)
        args = typing.get_args(hint)
        if origin in (typing.Union, types.UnionType):
            (inner,) = [a for a in args if a is not type(None)]
            return self.convert(inner, value, key)
        if origin is tuple:
            if not isinstance(value, list):
                return self._raise(key, "expected an array")
            return tuple(
                self.convert(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)
            )
        if origin is dict:
            if not isinstance(value, dict):
                return self._raise(key, "expected a table")
            return {
                str(k): self.convert(args[1], v, _join(key, str(k))) for k, v in value.items()
            }
        if attrs.has(hint):
            return self.build(hint, value, key)
        if hint is Path:
            if not isinstance(value, str):
                return self._raise(key, "expected a path string")
            expanded = os.path.expandvars(value)
            if "$" in expanded:
                return self._raise(key, f"unset environment variable in {value!r}")
            return (self.source.parent / expanded).resolve()
        if hint is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if hint in (str, int, float, bool) and type(value) is hint:
            return value
        return self._raise(key, f"expected {hint.__name__}, got {type(value).__name__}")

    def _raise(self, key: str, message: str) -> typing.NoReturn:
        raise self.fail(key, message)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
