"""
Loopback ports for the test fixtures.
"""

import random
import socket
from pathlib import Path

_LOWEST = 10000


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, chosen below the
    kernel's ephemeral range: a port from that range can meanwhile become
    the local port of any outgoing connection on the machine (the suite and
    its neighbours open thousands), and the fixture binding it would fail
    with EADDRINUSE.
    """
    ephemeral = _ephemeral_start()
    while True:
        port = random.randrange(_LOWEST, ephemeral) if ephemeral > _LOWEST + 1000 else 0
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768
