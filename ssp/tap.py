# -*- test-case-name: tests.test_tap -*-
"""
C{twistd ssp}: command-line options and service construction.

Without C{--config} the proxy runs the embedded demo (see L{ssp.demo}).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import attrs
from twisted.application.service import IService
from twisted.python import usage

from ssp import config as ssp_config


class Options(usage.Options):
    synopsis = "[--config FILE [--check-config]] [--listen ENDPOINT]"
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
    ]
    optFlags = [
        ["check-config", None, "Validate the configuration and exit."],
    ]

    def postOptions(self) -> None:
        if self["check-config"]:
            if not self["config"]:
                raise usage.UsageError("--check-config needs --config")
            raise SystemExit(check_config(Path(self["config"])))


def check_config(path: Path) -> int:
    """
    Load the configuration and everything it points at (certificates,
    keys, CRLs, the LDIF directory), printing the first problem.
    """
    from twisted.internet import reactor

    from ssp.service import SSPService

    try:
        SSPService(ssp_config.load(path), reactor, path).validate()
    except Exception as e:
        print(f"{e}", file=sys.stderr)
        return 1
    print(f"{path}: configuration OK")
    return 0


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from ssp.service import SSPService

    if options["config"]:
        path = Path(options["config"])
        try:
            loaded = ssp_config.load(path)
        except ssp_config.ConfigError as e:
            raise SystemExit(str(e))
        return SSPService(_overridden(loaded, options), reactor, path)
    return _demo_service(reactor, options)


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

    def announce(port: Any) -> None:
        line = demo.curl_line(pki, port.getHost().port)
        # Straight to the terminal, not through twistd's log, so it can be pasted.
        sys.__stdout__.write(f"\nSSP demo is listening. Try:\n\n{line}\n\n")
        sys.__stdout__.flush()

    reactor.callWhenRunning(lambda: service.listening().addCallback(announce))
    return service
