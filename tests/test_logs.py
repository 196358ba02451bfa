"""
JSON-lines operational logs, in process and from a real C{twistd}.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

from twisted.internet.threads import deferToThread
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.trial import unittest

from ssp.logs import event_as_line, json_observer
from tests.ports import free_port
from tests.support import ROOT, Consumer, Provider, pki
from tests.test_crash import TWISTD, wait_listening, write_config


class EventAsLineTests(unittest.TestCase):
    def test_fields(self) -> None:
        """
        Time, level, namespace, the formatted message and the event's own
        plain fields; no C{log_*} bookkeeping, no objects.
        """
        event = {
            "log_format": "{method} {status}", "log_level": LogLevel.warn,
            "log_namespace": "ssp.service", "log_time": 0.5, "log_source": object(),
            "method": "GET", "status": 403, "opaque": object(),
        }
        self.assertEqual(json.loads(event_as_line(event)), {
            "time": "1970-01-01T00:00:00.500+00:00", "level": "warn",
            "namespace": "ssp.service", "message": "GET 403", "method": "GET", "status": 403,
        })

    def test_failure(self) -> None:
        """
        A logged failure arrives as its traceback text.
        """
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            failure = Failure()
        line = json.loads(event_as_line(
            {"log_format": "boom", "log_failure": failure, "log_time": 0}))
        self.assertIn("ZeroDivisionError", line["traceback"])

    def test_level_filter(self) -> None:
        """
        The observer writes C{info} and above, one flushed line each.
        """
        stream = io.StringIO()
        log = Logger(namespace="t", observer=json_observer(stream=stream))
        log.debug("hidden")
        log.info("shown {n}", n=1)
        log.error("also shown")
        lines = [json.loads(line) for line in stream.getvalue().splitlines()]
        self.assertEqual([(x["level"], x["message"]) for x in lines],
                         [("info", "shown 1"), ("error", "also shown")])


class TwistdTests(unittest.TestCase):
    timeout = 60

    async def test_every_line_is_json(self) -> None:
        """
        C{twistd --logger ssp.logs.json_observer}: everything the proxy
        logs, access lines included, is one JSON object per line.
        """
        provider = Provider(self)
        workdir = Path(self.mktemp()).resolve()
        workdir.mkdir()
        port = free_port()
        write_config(workdir / "ssp.toml", port, provider.port.getHost().port,
                     workdir / "audit")
        config = workdir / "ssp.toml"
        config.write_text(config.read_text().replace("access_log = false", "access_log = true"))
        output = workdir / "stdout"

        def start() -> subprocess.Popen[bytes]:
            with output.open("ab") as out:
                process = subprocess.Popen(
                    TWISTD + ["-n", "--pidfile=", "--logger", "ssp.logs.json_observer",
                              "ssp", "--config", str(config)],
                    cwd=workdir, env={**os.environ, "PYTHONPATH": str(ROOT)},
                    stdout=out, stderr=subprocess.STDOUT)
            self.addCleanup(lambda: process.poll() is None and process.kill())
            wait_listening(port, process, output)
            return process

        process = await deferToThread(start)
        reply = await Consumer(port, pki(), "consumer-0").get("metadata")
        self.assertEqual(reply.status, 200)
        process.terminate()
        await deferToThread(process.wait, 30)
        lines = [json.loads(line) for line in output.read_text().splitlines()]
        access = [x for x in lines if x.get("status") == 200 and x.get("decision") == "forwarded"]
        self.assertEqual(len(access), 1)
        self.assertEqual(access[0]["namespace"], "ssp.service")
        self.assertIn("metadata 200 forwarded", access[0]["message"])
