"""
Loopback ports for the test fixtures.
"""

import random
import socket
from pathlib import Path

# Fixture ports are drawn from here, below the kernel's ephemeral range.
LOWEST = 10000


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that was free a moment ago, for a server a
    fixture starts in another process (slapd, Redis, haproxy, twistd).

    It is chosen at random below the kernel's ephemeral range: a port the
    kernel handed out (to a bind to port 0) is soon handed out again as the
    source port of some other test's outgoing connection, which then holds
    it when the server tries to bind ("Address already in use").
    """
    top = _ephemeral_start()
    for _ in range(100 if top - LOWEST >= 1000 else 0):
        port = random.randrange(LOWEST, top)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
