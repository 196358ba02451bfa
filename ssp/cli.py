# -*- test-case-name: tests.test_cli -*-
"""
The C{ssp} operator command: C{ssp explain}, C{ssp audit verify},
C{ssp report}.  The proxy itself runs under C{twistd ssp}.

A thin dispatcher: each subcommand lives in the module that owns its
concern and is imported only when run; this module only knows the names.
"""

from __future__ import annotations

import importlib
import sys

from ssp import __version__

#: command words -> (module, function taking the remaining arguments, help).
COMMANDS = {
    ("explain",): ("ssp.explain", "main",
                   "run the authorisation checks for a request without forwarding it"),
    ("audit", "verify"): ("ssp.auditcli", "main_verify",
                          "check the audit chains against the key and anchor, name each break"),
    ("audit", "archive"): ("ssp.auditcli", "main_archive",
                           "compress closed audit files, remove expired ones (anchor records it)"),
    ("report",): ("ssp.report", "main_report",
                  "the transaction report (counts, bytes, latency) from audit files"),
}

_HELP = ("-h", "--help")


def usage(prefix: tuple[str, ...] = ()) -> str:
    """
    The usage of C{ssp} or, with C{prefix} (C{("audit",)}), of the
    commands under it.
    """
    name = " ".join(("ssp", *prefix))
    rows = [(" ".join(words[len(prefix):]), text)
            for words, (_, _, text) in COMMANDS.items() if words[:len(prefix)] == prefix]
    width = max(len(words) for words, _ in rows) + 2
    listing = "\n".join(f"  {words:<{width}} {text}" for words, text in rows)
    options = "" if prefix else "\noptions:\n  --version   print the version\n  --help      this text\n"
    return (f"usage: {name} COMMAND [ARGS]   ({name} COMMAND --help for its options)\n\n"
            f"commands:\n{listing}\n{options}").rstrip("\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:
        print(f"ssp {__version__}")
        return 0
    for words, (module, function, _) in COMMANDS.items():
        if tuple(argv[:len(words)]) == words:
            run = getattr(importlib.import_module(module), function)
            return int(run(argv[len(words):]))
    groups = {words[0] for words in COMMANDS if len(words) > 1}
    prefix = tuple(argv[:1]) if argv[:1] and argv[0] in groups else ()
    rest = argv[len(prefix):]
    if rest[:1] and rest[0] in _HELP:
        print(usage(prefix))
        return 0
    print(usage(prefix), file=sys.stderr)
    return 2

if __name__ == "__main__":
    raise SystemExit(main())
