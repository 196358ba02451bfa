"""
Crash safety of the audit trail: the proxy runs as its own process under
load and is killed with SIGKILL; every request the provider received has a
durable "authorised" record, and after a restart the chain still verifies.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from ssp import chain, demo
from ssp.verify import verify_files
from tests.ports import free_port
from tests.support import (
    audit_key,
    DEMO_LDIF,
    ROOT,
    Consumer,
    Provider,
    certificates_toml,
    pki,
    spine_headers,
)

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def write_config(path: Path, port: int, provider_port: int, audit_dir: Path,
                 extra: str = "") -> None:
    """
    A configuration for a proxy process in front of the test provider.
    """
    path.write_text(certificates_toml(audit=False) + extra + f"""
[listen]
endpoint = "tcp:{port}:interface=127.0.0.1"
[upstream.resolve]
"{demo.PROVIDER_HOST}:443" = "127.0.0.1:{provider_port}"
[directory]
ldif = "{DEMO_LDIF}"
[audit]
directory = "{audit_dir}"
durability = "always"
key_file = "{audit_key()}"
anchor_file = "{audit_dir.parent / 'audit-anchor.jsonl'}"
[admin]
endpoint = ""
[log]
access_log = false
[[agreements]]
sender = "{demo.CONSUMER_ASID}"
receiver = "{demo.PROVIDER_ASID}"
""")


def wait_listening(port: int, process: subprocess.Popen, log: Path,
                    timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"proxy exited with {process.returncode}:\n"
                                 + log.read_text()[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("proxy did not listen")


class CrashTests(unittest.TestCase):
    timeout = 120

    def start_proxy(self, provider: Provider) -> Any:
        """
        A proxy process in front of C{provider}; fires with a function that
        starts it (again) and returns the process.
        """
        self.workdir = Path(self.mktemp()).resolve()
        self.workdir.mkdir()
        self.audit_dir = self.workdir / "audit"
        self.port = free_port()
        config = self.workdir / "ssp.toml"
        write_config(config, self.port, provider.port.getHost().port, self.audit_dir)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(config)]

        def start() -> subprocess.Popen:
            with (self.workdir / "twistd.log").open("ab") as log:
                process = subprocess.Popen(command, cwd=self.workdir, env=env,
                                           stdout=log, stderr=subprocess.STDOUT)
            self.addCleanup(lambda: process.poll() is None and process.kill())
            wait_listening(self.port, process, self.workdir / "twistd.log")
            return process

        return start

    async def kill_under_load(self, process: subprocess.Popen, send: Any,
                              enough: Any) -> None:
        """
        Six threads call C{send} in a loop until C{enough()}, then the
        proxy gets SIGKILL.
        """
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    send()
                except OSError:
                    pass

        workers = [threading.Thread(target=load) for _ in range(6)]
        for worker in workers:
            worker.start()
        try:
            while not enough():
                await deferLater(reactor, 0.01)
            process.send_signal(signal.SIGKILL)
            await deferToThread(process.wait)
        finally:
            stop.set()
            await deferToThread(lambda: [w.join() for w in workers])

    async def test_kill_9_under_load_loses_no_authorised_record(self):
        provider = Provider(self)
        start = self.start_proxy(provider)
        audit_dir = self.audit_dir
        process = await deferToThread(start)
        consumer = Consumer(self.port, pki(), "consumer-0")

        def send() -> None:
            conn = consumer.connect()
            conn.request("GET", f"/{demo.PROVIDER_ENDPOINT}/metadata", headers=spine_headers())
            conn.getresponse().read()
            conn.close()

        await self.kill_under_load(process, send, lambda: len(provider.seen) >= 150)

        received = {dict(s.headers)[b"Ssp-Traceid"].decode() for s in provider.seen}
        authorised = {r["trace_id"] for r in chain.read_records(chain.audit_files(audit_dir))
                      if r["event"] == "authorised"}
        self.assertGreaterEqual(len(received), 150)
        self.assertEqual(received - authorised, set())

        restarted = await deferToThread(start)
        reply = await consumer.get("metadata")
        self.assertEqual(reply.status, 200)
        restarted.send_signal(signal.SIGTERM)
        # twistd re-raises the stopping signal so the exit status tells why it stopped.
        self.assertEqual(await deferToThread(restarted.wait), -signal.SIGTERM)
        result = verify_files(chain.audit_files(audit_dir))
        self.assertTrue(result.ok, result)

    async def test_kill_9_loses_no_answered_refusal(self):
        """
        Every refusal a consumer received before a C{kill -9} has its
        C{completed} record: it is written before the answer (issue 18: 18
        of 3,182 had none while refusal records lingered 50 ms).
        """
        provider = Provider(self)
        process = await deferToThread(self.start_proxy(provider))
        consumer = Consumer(self.port, pki(), "consumer-0")
        answered: list[str] = []

        def send() -> None:
            headers = spine_headers(sender="200000000999")  # not accredited: 403
            conn = consumer.connect()
            conn.request("GET", f"/{demo.PROVIDER_ENDPOINT}/metadata", headers=headers)
            response = conn.getresponse()
            response.read()
            conn.close()
            if response.status == 403:
                answered.append(headers["Ssp-TraceID"])

        await self.kill_under_load(process, send, lambda: len(answered) >= 400)
        recorded = {r["trace_id"] for r in chain.read_records([self.audit_dir])
                    if r["event"] == "completed"}
        self.assertGreaterEqual(len(answered), 400)
        self.assertEqual(set(answered) - recorded, set())
        self.assertEqual(provider.seen, [])
