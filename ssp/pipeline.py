# -*- test-case-name: tests.test_pipeline -*-
"""
The checks a request must pass before it is forwarded, in the documented
order (C{docs/check-order.md}, SPEC §9.1).  Each line calls the module
named after its concern; the first refusal raised ends the request.
"""

from __future__ import annotations

from typing import Any, Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers

from ssp import headers, policy, target, throttle, token
from ssp.config import Agreement, TokenConfig
from ssp.interfaces import IDirectory, IThrottle
from ssp.model import Claims, ClientIdentity, MessageHandler, RateDecision, SpineHeaders


@attrs.frozen
class Inbound:
    """
    What the pipeline needs to know of a consumer's request.

    @ivar connection: the TLS connection, opaque to the pipeline and handed
        to L{Checks.identify}.
    @ivar fields_checked: every field passed L{headers.field_refusal} as
        it arrived (the strict channel's requests), so it is not run again.
    """

    method: bytes
    uri: bytes
    headers: Headers
    connection: Any
    fields_checked: bool = False


@attrs.frozen
class Checks:
    """
    The collaborators of the checks; replaced as a whole on reload.
    """

    identify: Callable[[Any], ClientIdentity]
    directory: IDirectory
    throttle: IThrottle
    agreements: tuple[Agreement, ...]
    token: TokenConfig
    clock: IReactorTime


@attrs.define
class Findings:
    """
    What the checks established so far; the audit record is built from it
    whether the request is admitted or refused half-way.
    """

    client: ClientIdentity | None = None
    target: target.Target | None = None
    spine: SpineHeaders | None = None
    claims: Claims | None = None
    handler: MessageHandler | None = None
    rate: RateDecision | None = None


async def admit(inbound: Inbound, checks: Checks, found: Findings) -> Findings:
    """
    Run every check in order, recording what each establishes in C{found}.

    @raise ssp.errors.Refusal: from the first check that fails.
    """
    found.client = checks.identify(inbound.connection)                     # 496 / 495
    target.check_method(inbound.method)                                    # 405
    found.target = url = target.parse(inbound.uri)                         # 400
    found.spine = spine = headers.parse(inbound.headers, inbound.fields_checked)  # 400
    found.claims = token.validate(                                         # 400
        headers.single(inbound.headers, b"authorization"), checks.clock.seconds(), checks.token
    )
    token.check_interaction(found.claims, spine.interaction)               # 400
    await policy.check_sender(checks.directory, spine, found.client)      # 495 / 403
    found.handler = await policy.check_receiver(checks.directory, spine)  # 403
    policy.check_target(found.handler, url.text)                           # 400
    token.check_audience(found.claims, found.handler.endpoint, url.text)   # 400
    policy.check_agreement(checks.agreements, spine)                       # 403
    found.rate = await throttle.check_consumer(checks.throttle, spine.sender)  # 429
    await throttle.check_provider(checks.throttle, spine.receiver)        # 503
    return found

