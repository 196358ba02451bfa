# -*- test-case-name: tests.test_contracts -*-
"""
The pluggable concerns of the proxy, as zope Interfaces.

Each has a real implementation in the module named after its concern and an
in-memory fake in L{ssp.testing}; the request pipeline only ever sees these
interfaces, so every check can be unit-tested without sockets.

L{IExchange} is the boundary between the HTTP channel (L{ssp.channel}),
which implements it, and the proxy (L{ssp.proxy}), which uses it: neither
imports the other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from twisted.web.iweb import IRequest
from zope.interface import Attribute, Interface

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred
    from twisted.web.http_headers import Headers
    from twisted.web.iweb import IBodyProducer, IResponse

    from ssp.model import AccreditedSystem, AuditRecord, MessageHandler, RateDecision


class IDirectory(Interface):
    """
    The Spine Directory Service (SDS): accredited systems (C{nhsAs}) and
    message handling service endpoints (C{nhsMhs}) under C{ou=services,o=nhs}.

    Matching follows SDS rules: C{uniqueIdentifier} and C{nhsMhsSvcIA}
    compare case-exactly, C{nhsMhsPartyKey} ignores case.  Every method
    returns a L{Deferred}; implementations that block (LDAP) must do so off
    the reactor thread.  A directory that cannot answer fails the Deferred
    with L{ssp.errors.DirectoryUnavailable}.
    """

    def accredited_system(asid: str) -> "Deferred[AccreditedSystem | None]":
        """
        The C{nhsAs} entry whose C{uniqueIdentifier} is C{asid}, or L{None}.
        """

    def message_handlers(
        party_key: str, interaction: "str | None"
    ) -> "Deferred[tuple[MessageHandler, ...]]":
        """
        The C{nhsMhs} entries for C{party_key} (case-ignore) that serve
        C{interaction} (case-exact); all of the party key's entries when
        C{interaction} is L{None}.
        """

    def knows_interaction(interaction: str) -> bool:
        """
        Whether an entry this directory holds or has answered with names
        C{interaction}: only such IDs become metric label values, so a
        consumer cannot mint series by sending random ones.
        """

    reachable = Attribute(
        "False while the directory behind cannot be reached (its last lookup failed); "
        "C{/readyz} reports it."
    )


class ICacheCounters(Interface):
    """
    A cache's lookup counters, which C{/metrics} exports
    (C{ssp_sds_cache_lookups}); a directory without a cache lacks them.
    """

    hits = Attribute("Lookups answered from a fresh entry.")
    misses = Attribute("Lookups that asked the directory behind.")
    stale_served = Attribute("Lookups answered from a stale entry while SDS was down.")


class IThrottle(Interface):
    """
    Rate limits per consumer ASID (C{Ssp-From}) and per provider ASID
    (C{Ssp-To}).  Each call consumes one unit when allowed, and answers
    L{None} when no limit applies to the ASID (no X-Rate-Limit headers).
    """

    def consume_consumer(asid: str) -> "Deferred[RateDecision | None]":
        """
        Spend one request from the consumer's allowance.
        """

    def consume_provider(asid: str) -> "Deferred[RateDecision | None]":
        """
        Spend one request from the provider's global allowance.
        """

    def peek_consumer(asid: str) -> "Deferred[RateDecision | None]":
        """
        What L{consume_consumer} would decide now, spending nothing: how
        C{ssp explain} asks without using up anyone's allowance.
        """

    def peek_provider(asid: str) -> "Deferred[RateDecision | None]":
        """
        What L{consume_provider} would decide now, spending nothing.
        """
    available = Attribute(
        "False while the shared rate store cannot be reached and C{on_store_failure} "
        "applies; C{/readyz} and C{ssp_throttle_store_up} report it."
    )


class IAuditSink(Interface):
    """
    The durable, tamper-evident audit trail.
    """

    def append(record: "AuditRecord") -> "Deferred[None]":
        """
        Append a record.  The Deferred fires once the record is as durable
        as the configured policy demands, and fails with
        L{ssp.errors.AuditUnavailable} if it cannot be written: callers
        must then refuse rather than forward unaudited.
        """

    writable = Attribute("True while the sink believes it can write durably.")
    pending = Attribute("Records accepted but not yet as durable as the policy demands.")


class IUpstream(Interface):
    """
    The forwarding agent: sends an admitted request to the provider.
    """

    def request(
        method: bytes,
        url: bytes,
        headers: "Headers",
        body: "IBodyProducer | None",
    ) -> "Deferred[IResponse]":
        """
        Issue the request over mutual TLS.  Fails with
        L{ssp.errors.UpstreamFailed} or L{ssp.errors.UpstreamTimeout}.
        """


class IExchange(IRequest):
    """
    One request on a consumer's connection, as the proxy sees it: a Twisted
    request whose body streams, and the little it may know of the
    connection under it.
    """

    body = Attribute(
        "The upload, a L{ssp.forward.RequestBody} fed as it arrives; L{None} when the "
        "request has no body."
    )
    refusal = Attribute(
        "The channel's refusal of the request after it started (a malformed, oversized "
        "or stalled body), or L{None}."
    )
    work = Attribute("The Deferred handling the request; the channel cancels it when it "
                     "refuses the request.")
    finished = Attribute("True once the response is complete.")
    startedWriting = Attribute("True once the response head has been written.")
    gone = Attribute("True once the consumer's connection is lost.")
    closes_after_response = Attribute(
        "True when the connection will not be reused after this response."
    )
    fields_checked = Attribute(
        "True when every request field passed L{ssp.headers.field_refusal} as its line "
        "arrived (a request with a field it refuses never reaches the proxy)."
    )

    def abort() -> None:
        """
        Drop the connection at once, without completing the response: the
        consumer must not take a cut-short body for a whole one.
        """

    def notifyFinish() -> Deferred[None]:
        """
        A Deferred that fires when the response is complete, or fails when
        the consumer's connection is lost first.
        """

    def close_after_response() -> None:
        """
        Read no further request on this connection: it closes once this
        response is sent.
        """

    def send_continue() -> None:
        """
        Send the C{100 Continue} the consumer waits for (RFC 9110 §10.1.1)
        now that the request is admitted and about to be forwarded; a
        refused request gets only its final status.  Nothing is sent when
        the consumer did not ask, or its body is already in.
        """

    def tls_connection() -> object:
        """
        The connection's OpenSSL C{Connection} (its peer certificate chain),
        or L{None} when it is not TLS.
        """
