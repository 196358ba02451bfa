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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python import usage

from ssp import config as ssp_config
from ssp import workers

if TYPE_CHECKING:
    from ssp.pki import DevelopmentPKI


class Options(usage.Options):
    synopsis = "[--config FILE [--check-config]] [--listen ENDPOINT] [--workers N]"
    longdesc = (
        "Run the Spine Security Proxy. Without --config, run the embedded demo: "
        "a development PKI in ./certs, the demo SDS in ./etc/demo-sds.ldif and a "
        "demo provider on loopback."
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
        ["check-config", None, "Validate the configuration and exit."],
    ]

    def postOptions(self) -> None:
        if self["check-config"]:
            if not self["config"]:
                raise usage.UsageError("--check-config needs --config")
            raise SystemExit(check_config(Path(self["config"])))
        if self["workers"] is not None and self["workers"] < 1:
            raise usage.UsageError("--workers must be at least 1")


def check_config(path: Path) -> int:
    """
    Load the configuration and everything it points at (certificates,
    keys, CRLs, the LDIF directory), printing the first problem.
    """
    from twisted.internet import reactor

    from ssp.service import SSPService

    try:
        loaded = ssp_config.load(path)
        for k in range(1, loaded.listen.workers):
            workers.worker_config(loaded, k)
        if loaded.listen.workers > 1:
            workers.master_endpoint(reactor, loaded)
        SSPService(loaded, reactor, path).validate()
    except Exception as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print(f"{path}: configuration OK")
    return 0


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ssp.service import SSPService

    path = Path(options["config"]) if options["config"] else None
    config = None
    if path is not None:
        try:
            config = _overridden(ssp_config.load(path), options)
        except ssp_config.ConfigError as e:
            raise SystemExit(str(e)) from None
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
    try:
        config = workers.worker_config(config, options["worker"])
    except ssp_config.ConfigError as e:
        raise SystemExit(str(e)) from None
    proxy = SSPService(config, reactor, path, adjust=lambda loaded: workers.worker_config(
        _overridden(loaded, options), options["worker"]))
    return workers.worker_service(proxy, proxy.listening, reactor)


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
    try:
        for k in range(1, count):
            workers.worker_config(config, k)
        endpoint = workers.master_endpoint(reactor, config)
    except ssp_config.ConfigError as e:
        raise SystemExit(str(e)) from None
    workers.per_worker_warning(config, count)
    master = workers.Master(
        reactor, endpoint, count,
        lambda listen: [*passed, f"--listen={listen}"], config.listen.drain_timeout,
        notifier=SystemdNotifier(reactor, os.environ),
    )
    reactor.addSystemEventTrigger("during", "startup", master.install_sighup)
    if pki is not None:
        _announce(reactor, pki, master.listening)
    return master


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
    if options["listen"]:
        loaded = attrs.evolve(loaded, listen=attrs.evolve(loaded.listen, endpoint=options["listen"]))
    if options["admin"]:
        loaded = attrs.evolve(loaded, admin=attrs.evolve(loaded.admin, endpoint=options["admin"]))
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
        sys.__stdout__.write(f"\nSSP demo is listening. Try:\n\n{line}\n\n")
        sys.__stdout__.flush()

    reactor.callWhenRunning(lambda: listening().addCallback(announce))
