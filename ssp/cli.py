# -*- test-case-name: tests.test_cli -*-
"""
The C{ssp} operator command: C{ssp explain}, C{ssp audit verify},
C{ssp report}.  The proxy itself runs under C{twistd ssp}.
"""

from __future__ import annotations

import sys

USAGE = """usage: ssp COMMAND [ARGS]

commands:
  explain        run the authorisation checks for a request without forwarding it
  audit verify   check the hash chain of audit files and name the first broken record
  report         the transaction report (counts, bytes, latency) from audit files
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["explain"]:
        from ssp.explain import main as explain

        return explain(argv[1:])
    if argv[:1] == ["audit"]:
        from ssp.auditcli import main as audit

        return audit(argv[1:])
    if argv[:1] == ["report"]:
        from ssp.report import main_report

        return main_report(argv[1:])
    print(USAGE, file=sys.stderr)
    return 0 if argv[:1] in (["-h"], ["--help"]) else 2


if __name__ == "__main__":
    raise SystemExit(main())
