"""
Would a strict HTTP/1.1 parser library replace our patches of Twisted's
private parser internals?  Feeds every row of the hostile framing
catalogue (tests/test_hostile.py) to h11 and httptools and counts the rows
each would let through that the proxy refuses (a lost row), and the rows
the proxy accepts that it would refuse.

    pip install h11 httptools && python bench/parsers.py

Only the request leg is measured here; the decision and its figures are
in docs/architecture.md ("Twisted boundary").
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import h11  # noqa: E402
import httptools  # noqa: E402

from tests.test_hostile import FRAMING_CASES  # noqa: E402


def h11_rejects(payload: bytes) -> bool:
    """
    Whether h11 refuses any request of C{payload}; each complete one is
    answered so that the next pipelined one is parsed too.
    """
    connection = h11.Connection(h11.SERVER, max_incomplete_event_size=8192)
    connection.receive_data(payload)
    try:
        while True:
            event = connection.next_event()
            if event in (h11.NEED_DATA, h11.PAUSED) and connection.our_state is not h11.DONE:
                return False
            if isinstance(event, h11.EndOfMessage) or event is h11.PAUSED:
                connection.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                connection.send(h11.EndOfMessage())
                if connection.our_state is not h11.DONE or connection.their_state is not h11.DONE:
                    return False
                connection.start_next_cycle()
    except h11.RemoteProtocolError:
        return True
    except h11.LocalProtocolError:
        return False


def httptools_rejects(payload: bytes) -> bool:
    """
    Whether httptools refuses any request of C{payload}.
    """
    parser = httptools.HttpRequestParser(object())
    try:
        parser.feed_data(payload)
    except httptools.HttpParserUpgrade:
        return False
    except httptools.HttpParserError:
        return True
    return False


def main() -> None:
    refused = [c for c in FRAMING_CASES if c.refused]
    accepted = [c for c in FRAMING_CASES if not c.refused]
    for name, rejects in (("h11", h11_rejects), ("httptools", httptools_rejects)):
        lost = [c.name for c in refused if not rejects(c.payload())]
        extra = [c.name for c in accepted if rejects(c.payload())]
        print(f"{name}: refuses {len(refused) - len(lost)} of {len(refused)} rows the proxy "
              f"refuses; also refuses {len(extra)} of {len(accepted)} it accepts")
        for row in lost:
            print(f"  lost: {row}")
        for row in extra:
            print(f"  over-strict: {row}")


if __name__ == "__main__":
    main()
