# -*- test-case-name: tests.test_explain -*-
"""
C{ssp explain}: run the SDS and data-sharing checks for one would-be request
against the configured directory, without forwarding anything, and show
each verdict with the SDS data behind it.

An operator answering "why does my request get 403?" runs::

    ssp explain --config etc/ssp.toml \\
        --target https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata \\
        -H 'Ssp-From: 200000000359' -H 'Ssp-To: 918999198738' \\
        -H 'Ssp-InteractionID: urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1' \\
        --cert consumer.pem

The checks are the very functions of L{ssp.policy} the proxy runs, in the
same order; the first failure ends the run and later checks show as
skipped, just as the proxy would not reach them.  Transport checks (chain,
expiry, revocation), the bearer token and rate limits are not explained.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable, NoReturn, TextIO

import attrs
from cryptography import x509
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.web.http_headers import Headers

from ssp import headers, policy, target
from ssp.config import Agreement, ConfigError, load
from ssp.directory import directory_from_config
from ssp.errors import CertificateInvalid, Refusal
from ssp.interfaces import IDirectory
from ssp.model import AccreditedSystem, ClientIdentity, MessageHandler, SpineHeaders
from ssp.tls import identity_of

PASS = "pass"
FAIL = "fail"
SKIPPED = "skipped"


@attrs.frozen
class Step:
    """
    One check and its verdict.

    @ivar verdict: C{"pass"}, C{"fail"} or C{"skipped"}.
    @ivar detail: the SDS (or configuration) data the verdict rests on.
    @ivar status: the HTTP status the proxy would answer, when failing.
    @ivar token: the refusal token, when failing.
    """

    name: str
    verdict: str
    detail: str
    status: int | None = None
    token: str = ""


def client_identity(pem: bytes) -> ClientIdentity:
    """
    The identity of a PEM certificate, read as the proxy reads a client
    certificate.
    """
    return identity_of(x509.load_pem_x509_certificate(pem))


def _describe_system(system: AccreditedSystem) -> str:
    product = f", product {system.product_name!r}" if system.product_name else ""
    return (
        f"nhsAs {system.asid}: ODS {system.ods_code or '-'}, party key "
        f"{system.party_key or '-'}{product}, {len(system.interactions)} interaction(s)"
    )


def _describe_handler(handler: MessageHandler) -> str:
    return (
        f"nhsMhs CPA {handler.cpa_id or '-'}: endpoint {handler.endpoint}, "
        f"FQDN {handler.fqdn or '-'}, interaction {handler.interaction}"
    )


def _base(interaction: str) -> str:
    return re.sub(r"-\d+$", "", interaction).lower()


def _near_misses(wanted: str, available: frozenset[str] | set[str]) -> list[str]:
    """
    Registered interaction IDs an operator may have meant: the same ID in
    another case or another version.
    """
    return sorted(i for i in available if i != wanted and _base(i) == _base(wanted))


class _Run:
    """
    Collects steps; after the first failure every later step is skipped.
    """

    def __init__(self) -> None:
        self.steps: list[Step] = []

    @property
    def failed(self) -> bool:
        return any(s.verdict == FAIL for s in self.steps)

    async def check(
        self,
        name: str,
        run: Callable[[], Awaitable[Any] | Any],
        passed: Callable[[Any], str],
        failed: Callable[[Refusal], Awaitable[str] | str],
    ) -> Any:
        if self.failed:
            self.steps.append(Step(name, SKIPPED, "not checked: an earlier check failed"))
            return None
        try:
            result = run()
            if inspect.isawaitable(result):
                result = await result
        except Refusal as refusal:
            detail = failed(refusal)
            if inspect.isawaitable(detail):
                try:
                    detail = await detail
                except Refusal as again:
                    detail = f"(SDS data unavailable: {again.token})"
            self.steps.append(Step(name, FAIL, detail, refusal.status, refusal.token))
            return None
        self.steps.append(Step(name, PASS, passed(result)))
        return result

    def skip(self, name: str, reason: str) -> None:
        self.steps.append(Step(name, SKIPPED, reason))


def _request(target_url: str, given: dict[str, str]) -> tuple[str, SpineHeaders]:
    """
    Parse the target and headers exactly as the proxy does; a missing
    C{Ssp-TraceID} is supplied, since it plays no part in authorisation.
    """
    raw = Headers({name: [value.strip()] for name, value in given.items()})
    if not raw.hasHeader("Ssp-TraceID"):
        raw.setRawHeaders("Ssp-TraceID", [str(uuid.UUID(int=0))])
    url = target.parse(b"/" + target_url.encode("ascii", "replace"))
    return url.text, headers.parse(raw)


async def explain(
    directory: IDirectory,
    agreements: tuple[Agreement, ...],
    target_url: str,
    headers: dict[str, str],
    client_cert_pem: bytes | None,
) -> list[Step]:
    """
    Run the authorisation checks for one request and explain each.

    @param target_url: the absolute provider URL (as after the proxy's
        prefix; a wholly percent-encoded one is decoded once).
    @param headers: at least C{Ssp-From}, C{Ssp-To}, C{Ssp-InteractionID}
        (names case-insensitive).
    @param client_cert_pem: the consumer's certificate, to check its FQDN
        binding; L{None} skips that check.
    """
    run = _Run()
    parsed = await run.check(
        "request",
        lambda: _request(target_url, headers),
        lambda r: f"target {r[0]}; from {r[1].sender} to {r[1].receiver}, "
        f"interaction {r[1].interaction}",
        lambda refusal: "the Ssp-From, Ssp-To and Ssp-InteractionID headers and an "
        "absolute https:// target are required",
    )
    target, spine = parsed if parsed else (target_url, None)

    async def sender_absent(refusal: Refusal) -> str:
        return f"SDS has no nhsAs entry with uniqueIdentifier={spine.sender}"

    system = await run.check(
        "sender known",
        lambda: policy.sender_system(directory, spine),
        _describe_system,
        sender_absent,
    )

    if client_cert_pem is None:
        run.skip(
            "certificate FQDN",
            "not checked: an earlier check failed"
            if run.failed
            else "not checked: no client certificate given (--cert)",
        )
    else:
        identity: list[ClientIdentity] = []

        async def bind() -> ClientIdentity:
            try:
                identity.append(client_identity(client_cert_pem))
            except ValueError as e:
                raise CertificateInvalid("CERTIFICATE_UNREADABLE") from e
            await policy.check_certificate(directory, system, identity[0])
            return identity[0]

        async def unbound(refusal: Refusal) -> str:
            if not identity:
                return "the certificate is not a readable PEM X.509 certificate"
            fqdns = await policy.registered_fqdns(directory, system)
            return (
                f"certificate DNS names: {', '.join(identity[0].dns_names) or '(none)'}; "
                f"nhsMhsFQDN under party key {system.party_key}: "
                f"{', '.join(sorted(fqdns)) or '(none)'}"
            )

        await run.check(
            "certificate FQDN",
            bind,
            lambda ident: f"certificate {ident.subject} names "
            f"{', '.join(ident.dns_names)}, registered under party key {system.party_key}",
            unbound,
        )

    def sender_refused(refusal: Refusal) -> str:
        detail = f"nhsAsSvcIA of {system.asid} does not list {spine.interaction}"
        near = _near_misses(spine.interaction, system.interactions)
        if near:
            detail += f"; it lists {', '.join(near)}"
        return detail

    await run.check(
        "sender interaction",
        lambda: policy.check_sender_interaction(system, spine),
        lambda _: f"nhsAsSvcIA of {system.asid} lists {spine.interaction}",
        sender_refused,
    )

    async def receiver_refused(refusal: Refusal) -> str:
        receiver = await directory.accredited_system(spine.receiver)
        if receiver is None:
            return f"SDS has no nhsAs entry with uniqueIdentifier={spine.receiver}"
        handlers = await directory.message_handlers(receiver.party_key, None)
        detail = (
            f"{_describe_system(receiver)}; no nhsMhs entry under party key "
            f"{receiver.party_key} serves {spine.interaction}"
        )
        near = _near_misses(spine.interaction, {h.interaction for h in handlers})
        if near:
            detail += f"; it serves {', '.join(near)}"
        return detail

    handler = await run.check(
        "receiver endpoint",
        lambda: policy.check_receiver(directory, spine),
        _describe_handler,
        receiver_refused,
    )

    def target_refused(refusal: Refusal) -> str:
        detail = f"target {target} is not within the registered endpoint {handler.endpoint}"
        if target.lower().startswith(handler.endpoint.lower()):
            detail += " (compare case, port and dot segments: no normalisation is applied)"
        return detail

    await run.check(
        "target within endpoint",
        lambda: policy.check_target(handler, target),
        lambda _: f"{target} is within {handler.endpoint} (CPA {handler.cpa_id or '-'})",
        target_refused,
    )

    def agreement_refused(refusal: Refusal) -> str:
        pair = [a for a in agreements if (a.sender, a.receiver) == (spine.sender, spine.receiver)]
        if not pair:
            return f"no [[agreements]] entry with sender {spine.sender}, receiver {spine.receiver}"
        listed = sorted({i for a in pair for i in a.interactions})
        return f"the agreements for this pair cover only {', '.join(listed)}"

    await run.check(
        "data-sharing agreement",
        lambda: policy.check_agreement(agreements, spine),
        lambda _: _describe_agreement(policy.matching_agreement(agreements, spine)),
        agreement_refused,
    )
    return run.steps


def _describe_agreement(agreement: Agreement | None) -> str:
    assert agreement is not None
    scope = ", ".join(agreement.interactions) if agreement.interactions else "all interactions"
    return f"agreement {agreement.sender} -> {agreement.receiver} for {scope}"


_LABELS = {PASS: "PASS", FAIL: "FAIL", SKIPPED: "SKIP"}


def format_steps(steps: list[Step]) -> str:
    """
    Render steps for a terminal: one line per check, the detail beneath a
    failure's status and token, and a closing verdict.
    """
    width = max((len(s.name) for s in steps), default=0)
    lines = []
    for step in steps:
        head = f"{_LABELS[step.verdict]}  {step.name.ljust(width)}  "
        if step.verdict == FAIL:
            lines.append(f"{head}{step.status} {step.token}")
            lines.append(" " * len(head) + step.detail)
        else:
            lines.append(head + step.detail)
    failed = [s for s in steps if s.verdict == FAIL]
    if failed:
        lines.append(f"result: REFUSED {failed[0].status} {failed[0].token}")
    else:
        lines.append("result: ALLOWED by the SDS and data-sharing checks")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssp explain",
        description="Explain the SDS and data-sharing checks for a request, without forwarding it.",
    )
    parser.add_argument("--config", required=True, help="the proxy's TOML configuration")
    parser.add_argument("--target", required=True, help="absolute https:// provider URL")
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (Ssp-From, Ssp-To, Ssp-InteractionID); repeat",
    )
    parser.add_argument("--cert", help="the consumer's client certificate (PEM)")
    return parser


async def run(reactor: Any, argv: list[str], out: TextIO, err: TextIO) -> int:
    """
    The C{ssp explain} command: 0 when every check run passed, 1 when one
    failed, 2 for unusable arguments or configuration.
    """
    args = _parser().parse_args(argv)
    headers = {}
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep:
            err.write(f"ssp explain: header {header!r} is not 'Name: value'\n")
            return 2
        headers[name.strip()] = value.strip()
    try:
        config = load(args.config)
        pem = Path(args.cert).read_bytes() if args.cert else None
        directory, service = directory_from_config(config.directory, reactor, reactor)
    except (ConfigError, OSError) as e:
        err.write(f"ssp explain: {e}\n")
        return 2
    service.startService()
    try:
        steps = await explain(directory, config.agreements, args.target, headers, pem)
    finally:
        await Deferred.fromCoroutine(_stop(service))
    out.write(format_steps(steps))
    return 1 if any(s.verdict == FAIL for s in steps) else 0


async def _stop(service: Any) -> None:
    result = service.stopService()
    if isinstance(result, Deferred):
        await result


def main(argv: list[str] | None = None) -> NoReturn:
    """
    Entry point for C{ssp explain ARGS}; exits with L{run}'s code.
    """
    arguments = sys.argv[1:] if argv is None else argv

    async def _main(reactor: Any) -> None:
        code = await run(reactor, arguments, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))
