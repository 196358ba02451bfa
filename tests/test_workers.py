"""
Two proxy processes sharing one Redis enforce one combined consumer
limit, as several workers or hosts must.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests import redis
from tests.ports import free_port
from tests.support import ROOT, Consumer, Provider, pki
from tests.test_crash import TWISTD, wait_listening, write_config


class SharedThrottleTests(unittest.TestCase):
    skip = redis.SKIP
    timeout = 120

    async def test_two_processes_one_limit(self):
        server = redis.RedisServer.start_for(self)
        provider = Provider(self)
        ports = []
        for n in range(2):
            workdir = Path(self.mktemp()).resolve()
            workdir.mkdir()
            port = free_port()
            write_config(workdir / "ssp.toml", port, provider.port.getHost().port,
                         workdir / "audit", extra=f"""
[throttle]
store = "redis"
redis_url = "{server.url}"
[throttle.consumer.default]
rate = 1
period = 3600.0
burst = 3
""")
            log = workdir / "twistd.log"

            def start(workdir=workdir, port=port, log=log):
                with log.open("ab") as out:
                    process = subprocess.Popen(
                        TWISTD + ["-n", "--pidfile=", "ssp", "--config", str(workdir / "ssp.toml")],
                        cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                        stdout=out, stderr=subprocess.STDOUT)
                self.addCleanup(lambda: process.poll() is None and process.kill())
                wait_listening(port, process, log)

            await deferToThread(start)
            ports.append(port)

        statuses = []
        for n in range(6):
            reply = await Consumer(ports[n % 2], pki(), "consumer-0").get("metadata")
            statuses.append(reply.status)
        self.assertEqual(statuses, [200, 200, 200, 429, 429, 429])
        self.assertEqual(len(provider.seen), 3)
