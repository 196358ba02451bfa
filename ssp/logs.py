# -*- test-case-name: tests.test_logs -*-
"""
Operational logs as JSON lines, for journald and SIEM collectors.

C{twistd --logger ssp.logs.json_observer ssp ...} replaces twistd's text
log with one compact JSON object per line.  Twisted's own C{eventAsJSON}
is a round-trip format full of C{log_*} bookkeeping; operators want the
time, level, source, message and the event's own fields, nothing else.
"""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
)
from zope.interface import implementer

_SCALARS = (str, int, float, bool, type(None))


def event_as_line(event: dict[str, Any]) -> str:
    """
    One log event as a compact JSON object (no trailing newline).

    Event fields that are plain values are kept under their own names;
    Twisted's C{log_*} bookkeeping and unserialisable objects are dropped.
    A failure becomes its traceback text.
    """
    level = event.get("log_level")
    line: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), UTC)
        .isoformat(timespec="milliseconds"),
        "level": level.name if level is not None else "info",
        "namespace": event.get("log_namespace", "-"),
        "message": formatEvent(event),
    }
    for key, value in event.items():
        if not key.startswith("log_") and key not in line and isinstance(value, _SCALARS):
            line[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        line["traceback"] = failure.getTraceback()
    return json.dumps(line, separators=(",", ":"), default=str)


@implementer(ILogObserver)
class JSONLinesObserver:
    """
    Writes each event as one JSON line and flushes, so a collector reading
    the stream sees every event as it happens.
    """

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, event: dict[str, Any]) -> None:
        self._stream.write(event_as_line(event) + "\n")
        self._stream.flush()


def json_observer(level: LogLevel = LogLevel.info, stream: IO[str] | None = None) -> ILogObserver:
    """
    The observer factory for C{twistd --logger ssp.logs.json_observer}:
    JSON lines on standard output, C{info} and above.
    """
    return FilteringLogObserver(
        JSONLinesObserver(stream if stream is not None else sys.stdout),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )
