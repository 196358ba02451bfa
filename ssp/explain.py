# -*- test-case-name: tests.test_explain -*-
"""
C{ssp explain}: answer "why does my request get 403?" by running the
proxy's own admission pipeline (L{ssp.pipeline.admit}) on a described
request, with collaborators that record instead of acting: nothing is
forwarded, nothing is audited, no rate allowance is spent.

    ssp explain --config etc/ssp.toml --cert consumer.pem \\
        --target https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir/metadata \\
        -H 'Ssp-TraceID: 0c0e5a1e-...' -H 'Ssp-From: 200000000359' \\
        -H 'Ssp-To: 918999198738' -H 'Authorization: Bearer ...' \\
        -H 'Ssp-InteractionID: urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1'

Because the checks are the pipeline itself there is no second copy of
their order to drift: the verdict is the first refusal the proxy would
answer, with its status and token, or ALLOWED.  Around it, explain shows
what each check established and the SDS answers behind it, and says
whether an SDS or rate-store failure, not missing data, decided.

Not explained: what happens before or after admission (request framing,
sizes and time-outs, CORS preflights, the audit trail, the provider).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, TextIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import react
from twisted.web.http_headers import Headers
from zope.interface import implementer

from ssp import policy
from ssp.config import ConfigError, load
from ssp.directory import directory_from_config
from ssp.errors import (
    CertificateRequired,
    DirectoryUnavailable,
    EndpointMismatch,
    Forbidden,
    ProviderBusy,
    Refusal,
    ThrottleUnavailable,
    TooManyRequests,
)
from ssp.interfaces import IDirectory, IThrottle
from ssp.model import AccreditedSystem, ClientIdentity, MessageHandler, RateDecision
from ssp.pipeline import Checks, Findings, Inbound, admit
from ssp.throttle import throttle_from_config
from ssp.tls import ServerTLS


@attrs.frozen
class Request:
    """
    The request to explain, as the consumer would send it.

    @ivar target: the absolute provider URL (the request-target after the
        proxy's leading C{/}).
    @ivar headers: C{(name, value)} pairs; repeats are kept, as on the wire.
    @ivar pem: the consumer's client certificate (and chain), or L{None}
        for a connection without one.
    """

    target: str
    headers: tuple[tuple[str, str], ...]
    pem: bytes | None
    method: str = "GET"


@attrs.frozen
class Lookup:
    """
    One question a check asked, and the answer (or the failure).
    """

    question: str
    answer: str


@attrs.frozen
class Explanation:
    """
    What the pipeline decided and what it saw on the way.

    @ivar refusal: the first refusal, or L{None} when the request is admitted.
    @ivar why: a sentence naming the data behind a refusal, when there is more
        to say than its token.
    """

    refusal: Refusal | None
    found: Findings
    lookups: tuple[Lookup, ...]
    why: str = ""

    @property
    def status(self) -> int | None:
        return None if self.refusal is None else self.refusal.status

    @property
    def token(self) -> str:
        return "" if self.refusal is None else self.refusal.token


@implementer(IDirectory)
@attrs.define
class _RecordingDirectory:
    """
    The configured directory, with every lookup and its answer written down.
    """

    directory: IDirectory
    lookups: list[Lookup]
    systems: dict[str, AccreditedSystem | None] = attrs.Factory(dict)
    handlers: dict[str, tuple[MessageHandler, ...]] = attrs.Factory(dict)

    @property
    def reachable(self) -> bool:
        return bool(self.directory.reachable)

    def knows_interaction(self, interaction: str) -> bool:
        return bool(self.directory.knows_interaction(interaction))

    async def _ask(self, question: str, ask: Callable[[], Deferred[Any]],
                   describe: Callable[[Any], str]) -> Any:
        try:
            answer = await ask()
        except Refusal as refusal:
            self.lookups.append(Lookup(question, f"unreachable ({refusal.token})"))
            raise
        self.lookups.append(Lookup(question, describe(answer)))
        return answer

    def accredited_system(self, asid: str) -> Deferred[AccreditedSystem | None]:
        async def ask() -> AccreditedSystem | None:
            system = await self._ask(f"nhsAs {asid}",
                                     lambda: self.directory.accredited_system(asid),
                                     lambda s: "no entry" if s is None else _describe_system(s))
            self.systems[asid] = system
            return system

        return Deferred.fromCoroutine(ask())

    def message_handlers(
        self, party_key: str, interaction: str | None
    ) -> Deferred[tuple[MessageHandler, ...]]:
        async def ask() -> tuple[MessageHandler, ...]:
            found = await self._ask(
                f"nhsMhs {party_key} {interaction or '(all)'}",
                lambda: self.directory.message_handlers(party_key, interaction),
                lambda hs: f"{len(hs)} record(s)"
                + "".join(f"; {_describe_handler(h)}" for h in hs),
            )
            if interaction is None:
                self.handlers[party_key] = found
            return found

        return Deferred.fromCoroutine(ask())


@implementer(IThrottle)
@attrs.define
class _DryRunThrottle:
    """
    The configured throttle asked what it would decide, spending nothing.
    """

    throttle: IThrottle
    lookups: list[Lookup]

    @property
    def available(self) -> bool:
        return bool(self.throttle.available)

    def consume_consumer(self, asid: str) -> Deferred[RateDecision | None]:
        return self._peek(f"rate consumer {asid}", self.throttle.peek_consumer(asid))

    def consume_provider(self, asid: str) -> Deferred[RateDecision | None]:
        return self._peek(f"rate provider {asid}", self.throttle.peek_provider(asid))

    peek_consumer = consume_consumer
    peek_provider = consume_provider

    def _peek(self, question: str, d: Deferred[RateDecision | None]) -> Deferred[Any]:
        def answered(decision: RateDecision | None) -> RateDecision | None:
            self.lookups.append(Lookup(question, _describe_rate(decision)))
            return decision

        def failed(failure: Any) -> Any:
            self.lookups.append(Lookup(question, f"unreachable ({failure.getErrorMessage()})"))
            return failure

        return d.addCallbacks(answered, failed)


async def explain(
    checks: Checks, verify: Callable[[bytes], ClientIdentity], request: Request
) -> Explanation:
    """
    Run L{admit} on C{request} as the proxy would, recording instead of
    acting.

    @param checks: the proxy's collaborators (its directory, throttle,
        agreements, token settings and clock); C{identify} is replaced.
    @param verify: checks a PEM certificate as the TLS handshake would
        (L{ServerTLS.verify_pem}).
    @raise ValueError: C{request.pem} holds no certificate.
    """
    lookups: list[Lookup] = []
    directory = _RecordingDirectory(checks.directory, lookups)

    def identify(pem: bytes | None) -> ClientIdentity:
        if pem is None:
            raise CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        return verify(pem)

    dry = attrs.evolve(
        checks, identify=identify, directory=directory,
        throttle=_DryRunThrottle(checks.throttle, lookups),
    )
    raw = Headers()
    for name, value in request.headers:
        raw.addRawHeader(name.encode("latin-1"), value.encode("latin-1"))
    inbound = Inbound(request.method.encode("ascii"), b"/" + request.target.encode("utf-8"),
                      raw, request.pem)
    found = Findings()
    try:
        await admit(inbound, dry, found)
    except Refusal as refusal:
        why = await _why(refusal, found, directory, checks)
        return Explanation(refusal, found, tuple(lookups), why)
    return Explanation(None, found, tuple(lookups))


async def _why(refusal: Refusal, found: Findings, directory: _RecordingDirectory,
               checks: Checks) -> str:
    """
    The data behind a refusal, in the operator's terms.
    """
    spine = found.spine
    if isinstance(refusal, DirectoryUnavailable):
        return ("SDS could not be reached and no cached answer was usable: the proxy answers "
                "503 whatever SDS holds; fix the directory connection, not the entries")
    if isinstance(refusal, ThrottleUnavailable):
        return ("the rate store could not be reached and throttle.on_store_failure is "
                "\"closed\": every request is refused until it answers")
    if isinstance(refusal, (TooManyRequests, ProviderBusy)):
        retry = dict(refusal.headers).get(b"Retry-After", b"?").decode()
        return f"the allowance is used up; one more request fits in {retry} s"
    if isinstance(refusal, EndpointMismatch):
        return _outside_endpoint(found)
    if spine is None:
        return ""
    if refusal.token == Forbidden.sender(spine.sender).token:
        return _sender_refused(directory.systems.get(spine.sender), spine.sender,
                               spine.interaction)
    if refusal.token == policy.certificate_token(spine.sender):
        return _certificate_unregistered(found, directory)
    if refusal.token == Forbidden.receiver(spine.receiver).token:
        return await _receiver_refused(directory, spine.receiver, spine.interaction)
    if refusal.token == Forbidden.agreement(spine.sender, spine.receiver).token:
        listed = sorted({i for a in checks.agreements
                         if (a.sender, a.receiver) == (spine.sender, spine.receiver)
                         for i in (a.interactions or ("all interactions",))})
        if not listed:
            return f"no [[agreements]] entry for sender {spine.sender}, receiver {spine.receiver}"
        return f"the agreements for this pair cover only {', '.join(listed)}"
    return ""


def _sender_refused(system: AccreditedSystem | None, asid: str, interaction: str) -> str:
    if system is None:
        return f"SDS has no nhsAs entry with uniqueIdentifier={asid}"
    detail = f"nhsAsSvcIA of {asid} does not list {interaction}"
    near = _near_misses(interaction, system.interactions)
    return detail + (f"; it lists {', '.join(near)}" if near else "")


def _certificate_unregistered(found: Findings, directory: _RecordingDirectory) -> str:
    assert found.client is not None and found.spine is not None
    system = directory.systems.get(found.spine.sender)
    party_key = system.party_key if system else "?"
    fqdns = sorted({h.fqdn.lower() for h in directory.handlers.get(party_key, ()) if h.fqdn})
    return (f"certificate DNS names: {', '.join(found.client.dns_names) or '(none)'}; "
            f"nhsMhsFQDN under party key {party_key}: {', '.join(fqdns) or '(none)'}")


async def _receiver_refused(directory: _RecordingDirectory, asid: str, interaction: str) -> str:
    receiver = directory.systems.get(asid)
    if receiver is None:
        return f"SDS has no nhsAs entry with uniqueIdentifier={asid}"
    detail = f"no nhsMhs entry under party key {receiver.party_key} serves {interaction}"
    try:
        served = await directory.message_handlers(receiver.party_key, None)
    except Refusal:
        return detail
    near = _near_misses(interaction, {h.interaction for h in served})
    return detail + (f"; it serves {', '.join(near)}" if near else "")


def _outside_endpoint(found: Findings) -> str:
    assert found.handler is not None and found.target is not None
    endpoint, target = found.handler.endpoint, found.target.text
    detail = f"target {target} is not within the registered endpoint {endpoint}"
    if target.lower().startswith(endpoint.lower()):
        detail += " (compare case, port and dot segments: no normalisation is applied)"
    return detail


def _base(interaction: str) -> str:
    return re.sub(r"-\d+$", "", interaction).lower()


def _near_misses(wanted: str, available: frozenset[str] | set[str]) -> list[str]:
    """
    Registered interaction IDs an operator may have meant: the same ID in
    another case or another version.
    """
    return sorted(i for i in available if i != wanted and _base(i) == _base(wanted))


def _describe_system(system: AccreditedSystem) -> str:
    product = f", product {system.product_name!r}" if system.product_name else ""
    return (
        f"ODS {system.ods_code or '-'}, party key {system.party_key or '-'}{product}, "
        f"{len(system.interactions)} interaction(s)"
    )


def _describe_handler(handler: MessageHandler) -> str:
    return (
        f"CPA {handler.cpa_id or '-'}: endpoint {handler.endpoint}, "
        f"FQDN {handler.fqdn or '-'}, interaction {handler.interaction}"
    )


def _describe_rate(decision: RateDecision | None) -> str:
    if decision is None:
        return "no limit applies"
    verdict = "allowed" if decision.allowed else "over the limit"
    return f"{verdict}, {decision.remaining} of {decision.limit} left (nothing spent)"


def format_explanation(explanation: Explanation) -> str:
    """
    Render an explanation for a terminal: what was established, the
    lookups behind it, then the verdict and why.
    """
    found = explanation.found
    lines = []
    if found.client is not None:
        lines.append(f"client    {found.client.subject} "
                     f"(DNS {', '.join(found.client.dns_names) or '-'})")
    if found.target is not None:
        lines.append(f"target    {found.target.text}")
    if found.spine is not None:
        spine = found.spine
        lines.append(f"headers   from {spine.sender} to {spine.receiver}, "
                     f"interaction {spine.interaction}")
    if found.claims is not None and found.claims.validated:
        lines.append(f"token     aud {found.claims.audience}")
    for lookup in explanation.lookups:
        lines.append(f"lookup    {lookup.question}: {lookup.answer}")
    if found.handler is not None:
        lines.append(f"endpoint  {_describe_handler(found.handler)}")
    if explanation.refusal is None:
        lines.append("result: ALLOWED (the proxy would forward this request)")
    else:
        lines.append(f"result: REFUSED {explanation.status} {explanation.token}")
        if explanation.why:
            lines.append(f"why: {explanation.why}")
    return "\n".join(lines) + "\n"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssp explain",
        description="Run the proxy's admission checks on a request without forwarding, "
        "auditing or spending rate allowance, and explain the verdict.",
    )
    parser.add_argument("--config", required=True, help="the proxy's TOML configuration")
    parser.add_argument("--target", required=True, help="absolute https:// provider URL")
    parser.add_argument("--method", default="GET", help="the request's verb (default GET)")
    parser.add_argument(
        "-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
        help="a request header as the consumer sends it (Ssp-*, Authorization); repeat",
    )
    parser.add_argument(
        "--cert", help="the consumer's client certificate (PEM); without it the request is "
        "explained as one on a connection without a certificate (496)",
    )
    return parser


async def run(reactor: Any, argv: list[str], out: TextIO, err: TextIO) -> int:
    """
    The C{ssp explain} command: 0 when the request would be admitted, 1
    when refused, 2 for unusable arguments, configuration or certificate.
    """
    args = _parser().parse_args(argv)
    headers = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep:
            err.write(f"ssp explain: header {header!r} is not 'Name: value'\n")
            return 2
        headers.append((name.strip(), value.strip()))
    try:
        config = load(args.config)
        pem = Path(args.cert).read_bytes() if args.cert else None
        server_tls = ServerTLS(config.tls, reactor)
        directory, service = directory_from_config(config.directory, reactor, reactor)
    except (ConfigError, OSError, ValueError) as e:
        err.write(f"ssp explain: {e}\n")
        return 2
    throttle = throttle_from_config(config.throttle, reactor)
    checks = Checks(identify=server_tls.client_identity, directory=directory, throttle=throttle,
                    agreements=config.agreements, token=config.token, clock=reactor)
    service.startService()
    throttle.start()
    try:
        explanation = await explain(
            checks, server_tls.verify_pem,
            Request(args.target, tuple(headers), pem, args.method.upper()),
        )
    except ValueError as e:
        err.write(f"ssp explain: {args.cert}: {e}\n")
        return 2
    finally:
        await throttle.stop()
        await _stop(service)
    out.write(format_explanation(explanation))
    return 0 if explanation.refusal is None else 1


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
