"""
Several proxy hosts behind an L4 load balancer: a real haproxy in TCP mode
(TLS passes through, so client certificates still terminate at the proxy)
sends the PROXY protocol v2 to two proxy processes sharing one Redis.  The
consumer's own address must reach C{Forwarded}, the audit trail and the
combined throttle must hold across both.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import ssl
import subprocess
import time
from pathlib import Path

import attrs
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import chain
from tests import redis
from tests.ports import free_port
from tests.support import ENDPOINT, ROOT, Consumer, Provider, pki, spine_headers
from tests.test_crash import TWISTD, wait_listening, write_config

HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"
CONSUMER_HOST = "127.0.0.2"

SKIP: str | None = redis.SKIP
if not os.access(HAPROXY, os.X_OK):
    SKIP = "haproxy not installed (apt-get install haproxy)"


@attrs.define
class HAProxy:
    """
    haproxy in the foreground on a loopback port, round-robin over
    C{servers} with PROXY protocol v2, no health checks.
    """

    directory: Path
    servers: list[int]
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen | None = None

    def start(self, case: unittest.TestCase) -> None:
        config = self.directory / "haproxy.cfg"
        config.write_text(f"""
global
    maxconn 256
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend ssp
    bind 127.0.0.1:{self.port}
    default_backend proxies
backend proxies
    balance roundrobin
""" + "".join(f"    server ssp{n} 127.0.0.1:{port} send-proxy-v2\n"
              for n, port in enumerate(self.servers)))
        log = self.directory / "haproxy.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen([HAPROXY, "-db", "-f", str(config)],
                                            stdout=out, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL)
        case.addCleanup(self.stop)
        wait_listening(self.port, self.process, log)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def start_proxy(case: unittest.TestCase, workdir: Path, provider_port: int,
                redis_url: str) -> int:
    """
    A proxy process whose listener expects the PROXY protocol, sharing
    the consumer limit (burst 3) in Redis.
    """
    port = free_port()
    config = workdir / "ssp.toml"
    write_config(config, port, provider_port, workdir / "audit", extra=f"""
[throttle]
store = "redis"
redis_url = "{redis_url}"
[throttle.consumer.default]
rate = 1
period = 3600.0
burst = 3
""")
    text = config.read_text()
    config.write_text(text.replace("[listen]\n", "[listen]\nproxy_protocol = true\n", 1))
    log = workdir / "twistd.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(config)], cwd=workdir,
            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()

    case.addCleanup(stop)
    wait_listening(port, process, log)
    return port


def get_from(port: int, source: str) -> tuple[int, int]:
    """
    One request from C{source}, the consumer's own address; returns the
    status and the consumer's source port.
    """
    consumer = Consumer(port, pki(), "consumer-0")
    conn = http.client.HTTPSConnection("localhost", port, context=consumer.context, timeout=30,
                                       source_address=(source, 0))
    try:
        conn.connect()
        source_port = conn.sock.getsockname()[1]
        conn.request("GET", f"/{ENDPOINT}/metadata", headers=spine_headers())
        response = conn.getresponse()
        response.read()
        return response.status, source_port
    finally:
        conn.close()


def completed(audit_dirs: list[Path], expected: int) -> list[list[dict]]:
    """
    The completed records of each proxy, once there are C{expected} in
    all: a proxy writes them after the response has gone.
    """
    deadline = time.monotonic() + 5
    while True:
        found = [[r for r in chain.read_records(chain.audit_files(d)) if r["event"] == "completed"]
                 if d.exists() else [] for d in audit_dirs]
        if sum(map(len, found)) >= expected or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


class HAProxyTests(unittest.TestCase):
    skip = SKIP
    timeout = 120

    async def test_consumer_address_and_combined_limit_behind_haproxy(self):
        server = redis.RedisServer.start_for(self)
        provider = Provider(self)
        provider_port = provider.port.getHost().port
        workdirs = []
        for _ in range(2):
            workdir = Path(self.mktemp()).resolve()
            workdir.mkdir()
            workdirs.append(workdir)
        ports = [await deferToThread(start_proxy, self, w, provider_port, server.url)
                 for w in workdirs]
        balancer = HAProxy(Path(self.mktemp()).resolve(), ports)
        balancer.directory.mkdir()
        await deferToThread(balancer.start, self)

        sent = [await deferToThread(get_from, balancer.port, CONSUMER_HOST) for _ in range(6)]
        self.assertEqual([status for status, _ in sent], [200, 200, 200, 429, 429, 429])

        self.assertEqual(len(provider.seen), 3)
        for seen in provider.seen:
            forwarded = [v for k, v in seen.headers if k.lower() == b"forwarded"]
            self.assertEqual(len(forwarded), 1)
            self.assertTrue(forwarded[0].startswith(b"for=127.0.0.2;"), forwarded)

        records = await deferToThread(completed, [w / "audit" for w in workdirs], len(sent))
        self.assertTrue(all(records), "round robin should have used both proxies")
        addresses = sorted(r["consumer_address"] for rs in records for r in rs)
        self.assertEqual(addresses, sorted(f"{CONSUMER_HOST}:{p}" for _, p in sent))
        self.assertEqual(sorted(r["status"] for rs in records for r in rs),
                         [200, 200, 200, 429, 429, 429])

    async def test_connection_without_proxy_header_is_refused(self):
        """
        A consumer that bypasses the balancer is dropped before TLS: its
        first bytes are not a PROXY header.
        """
        server = redis.RedisServer.start_for(self)
        provider = Provider(self)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        port = await deferToThread(start_proxy, self, workdir, provider.port.getHost().port,
                                   server.url)

        def direct() -> Exception | None:
            try:
                get_from(port, "127.0.0.1")
            except (OSError, http.client.HTTPException) as e:
                return e
            return None

        def plain() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                return s.recv(100)

        error = await deferToThread(direct)
        self.assertIsInstance(error, (ssl.SSLError, ConnectionError, http.client.HTTPException))
        self.assertEqual(await deferToThread(plain), b"")
        self.assertEqual(provider.seen, [])
