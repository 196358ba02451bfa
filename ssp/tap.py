# -*- test-case-name: tests.test_service -*-
"""
C{twistd ssp}: command-line options and service construction.

Without C{--config} the proxy runs the embedded demo (see L{ssp.demo}).
With more than one worker (C{--workers} or C{[listen] workers}) this
process is the master of L{ssp.workers}; C{--worker} is how the master
starts each worker.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python import usage

from ssp import __version__, preflight, runtime, workers
from ssp import config as ssp_config

if TYPE_CHECKING:
    from ssp.pki import DevelopmentPKI


class Options(usage.Options):
    synopsis = "[--config FILE [--check-config]] [--listen ENDPOINT] [--workers N]"
    longdesc = (
        "Run the Spine Security Proxy. Without --config, run the embedded demo: "
        "a development PKI in ./certs, the audit trail in ./var/audit, the demo SDS "
        "shipped with the package and a demo provider on loopback."
    )
    optParameters = [
        ["config", "c", None, "The TOML configuration file."],
        ["listen", "l", None, "Override [listen] endpoint, e.g. tcp:8443 or "
                              "systemd:domain=INET:name=ssp-https."],
        ["admin", None, None, "Override [admin] endpoint (health and metrics)."],
        ["workers", "w", None, "Override [listen] workers: processes sharing the listening "
                               "socket (1 serves in this process).", int],
        ["worker", None, None, "Internal: serve as worker K of a --workers master.", int],
        ["demo-provider-port", None, None, "Internal: a demo worker's provider port.", int],
    ]
    optFlags = [
        ["check-config", None, "Validate the configuration and everything it names, and exit."],
        ["probe", None, "With --check-config: also connect to SDS and Redis and report."],
    ]

    def opt_version(self) -> None:
        """
        Print the SSP version and exit.
        """
        print(f"ssp {__version__}")
        raise SystemExit(0)

    def postOptions(self) -> None:
        if self["probe"] and not self["check-config"]:
            raise usage.UsageError("--probe goes with --check-config")
        if self["check-config"]:
            if not self["config"]:
                raise usage.UsageError("--check-config needs --config")
            raise SystemExit(check_config(Path(self["config"]), self["probe"]))
        if self["workers"] is not None and self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")


def check_config(path: Path, probe: bool = False) -> int:
    """
    Load the configuration and check everything it points at
    (L{ssp.preflight}), printing the first problem as one line.

    @param probe: also connect to SDS and Redis and report what answers.
    """
    from twisted.internet import reactor

    try:
        loaded = load_checked(path, reactor)
        notes = preflight.check(loaded, path, reactor.seconds())
    except ssp_config.ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    for note in notes:
        print(f"{path}: {note}")
    if probe:
        failed = False
        for ok, line in preflight.probe(loaded):
            print(f"{path}: {line}", file=sys.stdout if ok else sys.stderr)
            failed |= not ok
        if failed:
            return 1
    print(f"{path}: configuration OK")
    return 0


def load_checked(path: Path, reactor: Any) -> ssp_config.Config:
    """
    L{ssp_config.load} plus what the workers would derive from it.

    @raise ssp_config.ConfigError: one line naming the file and the key.
    """
    loaded = ssp_config.load(path)
    try:
        for k in range(1, loaded.listen.workers):
            workers.worker_config(loaded, k)
        inherited = loaded.listen.endpoint.split(":", 1)[0] in ssp_config.INHERITED_ENDPOINTS
        if loaded.listen.workers > 1 and (loaded.listen.reuse_port or not inherited):
            # An inherited socket exists only at start; reuse_port is refused for it.
            workers.master_endpoint(reactor, loaded)
    except ssp_config.ConfigError as e:
        raise ssp_config.ConfigError(f"{path}: {e}") from None
    return loaded


def makeService(options: Options) -> IService:
    """
    The proxy, its workers' master, a worker or the demo, as C{options}
    say.  A configuration mistake ends the process with one line.
    """
    from twisted.internet import reactor

    try:
        service = _make_service(options)
    except ssp_config.ConfigError as e:
        raise SystemExit(str(e)) from None
    reactor.callWhenRunning(runtime.settle_heap)
    return service


def _make_service(options: Options) -> IService:
    from twisted.internet import reactor

    from ssp.service import SSPService

    path = Path(options["config"]) if options["config"] else None
    config = None
    if path is not None:
        config = _overridden(load_checked(path, reactor), options)
        preflight.check(config, path, reactor.seconds())
    if options["worker"] is not None:
        return _worker_service(reactor, options, config, path)
    count = options["workers"] or (config.listen.workers if config is not None else 1)
    if count > 1:
        return _master_service(reactor, options, config, count)
    if config is None:
        return _demo_service(reactor, options)
    return SSPService(config, reactor, path, adjust=lambda loaded: _overridden(loaded, options))


def _worker_service(reactor: Any, options: Options, config: ssp_config.Config | None,
                    path: Path | None) -> IService:
    from ssp import demo
    from ssp.pki import DevelopmentPKI
    from ssp.service import SSPService

    if config is None:
        root = Path.cwd()
        pki = DevelopmentPKI(root / "certs")
        config = _overridden(demo.demo_config(root, pki, options["demo-provider-port"]), options)
    config = workers.worker_config(config, options["worker"])
    proxy = SSPService(config, reactor, path, adjust=lambda loaded: workers.worker_config(
        _overridden(loaded, options), options["worker"]))
    return workers.worker_service(proxy, proxy.listening, reactor, config.audit.directory)


def _master_service(reactor: Any, options: Options, config: ssp_config.Config | None,
                    count: int) -> IService:
    """
    The C{--workers} master: binds the listen endpoint (unless each worker
    binds its own, with C{listen.reuse_port}) and runs C{count} workers
    with the same options.
    """
    from ssp.systemd import SystemdNotifier

    passed = [f"--{name}={options[name]}" for name in ("config", "admin") if options[name]]
    pki = None
    if config is None:
        config, pki, provider_port = _demo_master(reactor, options)
        passed.append(f"--demo-provider-port={provider_port}")
    for k in range(1, count):
        workers.worker_config(config, k)
    endpoint = workers.master_endpoint(reactor, config)
    workers.per_worker_warning(config, count)
    master = _Master(
        reactor, endpoint, count,
        lambda listen: [*passed, f"--listen={listen}"], config.listen.drain_timeout,
        notifier=SystemdNotifier(reactor, os.environ),
    )
    reactor.addSystemEventTrigger("during", "startup", master.install_sighup)
    master.config_path = Path(options["config"]) if options["config"] else None
    master.listen_endpoint = config.listen.endpoint
    if pki is not None:
        _announce(reactor, pki, master.listening)
    return master


class _Master(workers.Master):
    """
    The workers' master, whose failure to bind the listening socket ends
    the process with one line, as in a single process.
    """

    config_path: Path | None = None
    listen_endpoint = ""

    def privilegedStartService(self) -> None:
        with self._one_line():
            super().privilegedStartService()

    def startService(self) -> None:
        with self._one_line():
            super().startService()

    @contextmanager
    def _one_line(self) -> Iterator[None]:
        from twisted.internet.error import CannotListenError

        from ssp.service import cannot_listen

        try:
            yield
        except CannotListenError as e:
            raise SystemExit(cannot_listen(
                self.config_path, "listen.endpoint", self.listen_endpoint, e)) from None


def _demo_master(reactor: Any, options: Options
                 ) -> tuple[ssp_config.Config, DevelopmentPKI, int]:
    """
    The demo under a master: the PKI and the demo provider live in the
    master (the provider is the demo's stand-in for the outside world);
    the workers proxy to it.
    """
    from ssp import demo

    root = Path.cwd()
    pki = demo.ensure_pki(root)
    port = demo.listen_provider(reactor, pki).getHost().port
    return _overridden(demo.demo_config(root, pki, port), options), pki, port


def _overridden(loaded: ssp_config.Config, options: Options) -> ssp_config.Config:
    """
    C{loaded} with the C{--listen} and C{--admin} overrides applied.

    @raise ssp_config.ConfigError: naming the option whose value is wrong.
    """
    for option, section in (("listen", "listen"), ("admin", "admin")):
        if options[option]:
            problem = ssp_config.endpoint_problem(options[option])
            if problem:
                raise ssp_config.ConfigError(f"--{option}: {problem}")
            table = attrs.evolve(getattr(loaded, section), endpoint=options[option])
            loaded = attrs.evolve(loaded, **{section: table})
    return loaded


def _demo_service(reactor: Any, options: Options) -> IService:
    from ssp import demo
    from ssp.service import SSPService

    root = Path.cwd()
    pki = demo.ensure_pki(root)
    provider = demo.listen_provider(reactor, pki)
    config = _overridden(demo.demo_config(root, pki, provider.getHost().port), options)
    service = SSPService(config, reactor)
    _announce(reactor, pki, service.listening)
    return service


def _announce(reactor: Any, pki: DevelopmentPKI, listening: Callable[[], Deferred[Any]]
              ) -> None:
    from ssp import demo

    def announce(port: Any) -> None:
        line = demo.curl_line(pki, port.getHost().port)
        # Straight to the terminal, not through twistd's log, so it can be pasted.
        print(f"\nSSP demo is listening. Try:\n\n{line}\n", file=sys.__stdout__, flush=True)

    reactor.callWhenRunning(lambda: listening().addCallback(announce))
