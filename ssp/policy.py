# -*- test-case-name: tests.test_policy -*-
"""
The Spine authorisation checks, in the order the pipeline runs them
(SPEC section 9.1):

  1. L{check_sender}: the sending ASID is in SDS (403), its client
     certificate names an FQDN registered for it (495), and it may send
     the interaction (403).
  2. L{check_receiver}: the receiving ASID has an MHS endpoint for the
     interaction (403).
  3. L{check_target}: the target URL lies within that endpoint (400).
  4. L{check_agreement}: a data-sharing agreement covers the pair (403).

Each raises a L{Refusal} carrying the live SSP's token.  The target check
is what keeps the proxy from connecting to any host SDS does not register
for the receiver and interaction.
"""

from __future__ import annotations

from urllib.parse import unquote

from twisted.logger import Logger

from ssp.config import Agreement
from ssp.errors import CertificateInvalid, EndpointMismatch, Forbidden
from ssp.interfaces import IDirectory
from ssp.model import AccreditedSystem, ClientIdentity, MessageHandler, SpineHeaders

log = Logger()


async def sender_system(directory: IDirectory, headers: SpineHeaders) -> AccreditedSystem:
    """
    The sender's C{nhsAs} entry.

    @raise Forbidden: C{ASID_CHECK_FAILED_MESSAGESENDER_<from>} if SDS has
        no such ASID.
    """
    system = await directory.accredited_system(headers.sender)
    if system is None:
        raise Forbidden.sender(headers.sender)
    return system


async def registered_fqdns(directory: IDirectory, system: AccreditedSystem) -> set[str]:
    """
    The FQDNs (lower case) of the MHS records under a system's party key:
    the names its client certificate may carry.
    """
    handlers = await directory.message_handlers(system.party_key, None)
    return {h.fqdn.lower().rstrip(".") for h in handlers if h.fqdn}


def certificate_token(asid: str) -> str:
    """
    The 495 token for a certificate that does not name the ASID's FQDN.
    """
    return f"CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_{asid}"


async def check_certificate(
    directory: IDirectory, system: AccreditedSystem, client: ClientIdentity
) -> None:
    """
    Bind the client certificate to the sending ASID: one of its DNS names
    must equal (ignoring case) an C{nhsMhsFQDN} registered under the
    sender's party key.  Wildcard names match only literally: Spine
    certificates are issued per FQDN.

    @raise CertificateInvalid: C{CERTIFICATE_FQDN_NOT_REGISTERED_FOR_ASID_<from>}.
    """
    registered = await registered_fqdns(directory, system)
    presented = {name.lower().rstrip(".") for name in client.dns_names}
    if not registered & presented:
        raise CertificateInvalid(certificate_token(system.asid))


def check_sender_interaction(system: AccreditedSystem, headers: SpineHeaders) -> None:
    """
    The sender's C{nhsAsSvcIA} must list the interaction, case-exactly.

    @raise Forbidden: C{ASID_CHECK_FAILED_MESSAGESENDER_<from>}.
    """
    if headers.interaction not in system.interactions:
        raise Forbidden.sender(headers.sender)


async def check_sender(
    directory: IDirectory, headers: SpineHeaders, client: ClientIdentity | None
) -> AccreditedSystem:
    """
    Sender known (403), certificate FQDN registered for it (495), sender
    allowed the interaction (403), in that order.  An unknown sender is 403
    rather than 495: there is no FQDN to compare with.

    @param client: the verified client certificate; L{None} skips the
        binding (the pipeline has already refused a missing certificate).
    """
    system = await sender_system(directory, headers)
    if client is not None:
        await check_certificate(directory, system, client)
    check_sender_interaction(system, headers)
    return system


def choose_handler(handlers: tuple[MessageHandler, ...]) -> MessageHandler:
    """
    Pick one of several MHS records for the same party key and interaction
    (an SDS data error): the lowest C{(nhsMhsCPAId, nhsMhsEndPoint)}, so the
    choice is stable across servers, restarts and replicas.
    """
    chosen = min(handlers, key=lambda h: (h.cpa_id, h.endpoint))
    if len(handlers) > 1:
        log.warn(
            "SDS has {count} MHS records for {party_key} {interaction}; using CPA {cpa_id}",
            count=len(handlers),
            party_key=chosen.party_key,
            interaction=chosen.interaction,
            cpa_id=chosen.cpa_id,
        )
    return chosen


async def check_receiver(directory: IDirectory, headers: SpineHeaders) -> MessageHandler:
    """
    The receiver's MHS record for the interaction: its C{nhsAs} entry's
    party key, then the C{nhsMhs} entry for that party key and interaction.
    The receiver's own C{nhsAsSvcIA} is not consulted: serving is what the
    MHS record registers.

    @raise Forbidden: C{PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_<to>}
        if the ASID is unknown or has no endpoint for the interaction.
    """
    system = await directory.accredited_system(headers.receiver)
    if system is None:
        raise Forbidden.receiver(headers.receiver)
    handlers = await directory.message_handlers(system.party_key, headers.interaction)
    if not handlers:
        raise Forbidden.receiver(headers.receiver)
    return choose_handler(handlers)


def within_endpoint(endpoint: str, target_url: str) -> bool:
    """
    Whether C{target_url} is C{endpoint} or lies under it on a path-segment
    boundary, compared as exact strings (no case folding, no default-port
    or IP normalisation), with no C{.}/C{..} segment after the endpoint
    (which the provider would resolve to outside it).

    The one rule for "within": the target check, the token's C{aud} and
    C{ssp explain} all use it.  An endpoint registered with a trailing
    C{/} does not contain the URL without it: the target must start with
    the endpoint exactly (SPEC §3).
    """
    if not endpoint:
        return False
    if target_url == endpoint:
        return True
    if endpoint.endswith("/"):
        rest = target_url[len(endpoint) :] if target_url.startswith(endpoint) else None
    elif target_url.startswith(endpoint + "/") or target_url.startswith(endpoint + "?"):
        rest = target_url[len(endpoint) :]
    else:
        rest = None
    if rest is None:
        return False
    path = rest.split("?", 1)[0].replace("\\", "/")
    if "." not in path and "%" not in path:
        return True  # no segment can be a dot segment, encoded or not
    return not any(unquote(s) in (".", "..") for s in path.split("/"))


def check_target(handler: MessageHandler, target_url: str) -> None:
    """
    The target URL (absolute, as the consumer sent it after the one
    percent-decoding, query included) must lie within the registered
    endpoint; see L{within_endpoint}.

    @raise EndpointMismatch: C{ENDPOINT_<endpoint>_CPAID_<cpa>_VARIES_FROM_TARGETURL_<target>}.
    """
    if not within_endpoint(handler.endpoint, target_url):
        raise EndpointMismatch(handler.endpoint, handler.cpa_id, target_url)


def matching_agreement(
    agreements: tuple[Agreement, ...], headers: SpineHeaders
) -> Agreement | None:
    """
    The first agreement letting the sender call the receiver for the
    interaction (an agreement listing no interactions covers all).
    """
    for agreement in agreements:
        if (
            agreement.sender == headers.sender
            and agreement.receiver == headers.receiver
            and (not agreement.interactions or headers.interaction in agreement.interactions)
        ):
            return agreement
    return None


def check_agreement(agreements: tuple[Agreement, ...], headers: SpineHeaders) -> None:
    """
    A configured data-sharing agreement must cover sender, receiver and
    interaction.  No agreements configured means nothing is allowed.

    @raise Forbidden: C{FOT_CHECK_FAILED_MESSAGESENDER_<from>_MESSAGERECEIVER_<to>}.
    """
    if matching_agreement(agreements, headers) is None:
        raise Forbidden.agreement(headers.sender, headers.receiver)
