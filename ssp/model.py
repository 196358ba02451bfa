# -*- test-case-name: tests.test_pipeline -*-
"""
Immutable value objects shared by the concerns: what SDS says, what a
request claims, what a check decided and what the audit trail records.
"""

from __future__ import annotations

from typing import Any

import attrs


@attrs.frozen
class AccreditedSystem:
    """
    An SDS C{nhsAs} entry: a system accredited to send or receive
    interactions.
    """

    asid: str
    ods_code: str
    party_key: str
    interactions: frozenset[str]
    product_name: str = ""


@attrs.frozen
class MessageHandler:
    """
    An SDS C{nhsMhs} entry: the endpoint a party key serves one interaction
    at.
    """

    party_key: str
    interaction: str
    endpoint: str
    fqdn: str
    cpa_id: str
    ods_code: str = ""


@attrs.frozen
class ClientIdentity:
    """
    The verified client certificate of the consumer's TLS connection.
    """

    subject: str
    fingerprint: str
    dns_names: tuple[str, ...]


@attrs.frozen
class SpineHeaders:
    """
    The validated C{Ssp-*} request headers.
    """

    trace_id: str
    sender: str
    receiver: str
    interaction: str


@attrs.frozen
class Claims:
    """
    The audit-relevant claims of a GP Connect bearer token.
    """

    subject: str = ""
    audience: str = ""
    practitioner_ids: tuple[str, ...] = ()
    organisation_ods: str = ""
    reason_for_request: str = ""
    requested_scope: str = ""
    validated: bool = False


@attrs.frozen
class RateDecision:
    """
    The outcome of spending one unit of a rate limit.

    @ivar limit: the burst, the most requests allowed at once
        (C{X-Rate-Limit-Limit}); C{remaining} never exceeds it.
    @ivar remaining: requests left now (C{X-Rate-Limit-Remaining}).
    @ivar reset_after: seconds until the allowance is full again
        (C{X-Rate-Limit-Reset}).
    @ivar retry_after: seconds until one more request would be allowed;
        zero when allowed.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float = 0.0

    def headers(self) -> list[tuple[bytes, bytes]]:
        """
        The C{X-Rate-Limit-*} response headers describing this decision.
        """
        return [
            (b"X-Rate-Limit-Limit", b"%d" % self.limit),
            (b"X-Rate-Limit-Remaining", b"%d" % self.remaining),
            (b"X-Rate-Limit-Reset", b"%d" % _ceil(self.reset_after)),
        ]


def _ceil(seconds: float) -> int:
    whole = int(seconds)
    return whole if whole == seconds else whole + 1


@attrs.frozen
class AuditRecord:
    """
    One audit event.  A request produces exactly one C{"completed"} record;
    a forwarded request is preceded by an C{"authorised"} record that is
    durable before anything is sent upstream.  Connections refused before
    any HTTP request (failed handshakes, plain HTTP, over a cap) are
    counted in one C{"connection-refused"} record per address, reason and
    interval (C{count}).  Built by L{audit_record}.
    """

    event: str
    request_id: str
    time: float
    consumer_address: str = ""
    method: str = ""
    target: str = ""
    trace_id: str = ""
    sender: str = ""
    receiver: str = ""
    interaction: str = ""
    client_subject: str = ""
    client_fingerprint: str = ""
    claims: Claims | None = None
    decision: str = ""
    token: str = ""
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    upstream_latency: float | None = None
    total_latency: float | None = None
    count: int = 1


def audit_record(event: str, time: float, peer: object, request_id: str = "",
                 with_port: bool = True, **fields: Any) -> AuditRecord:
    """
    The one place an audit record is built: the consumer's address is
    C{host:port} of C{peer} (just C{host} for aggregated records).
    """
    address = str(getattr(peer, "host", ""))
    if with_port:
        address = f"{address}:{getattr(peer, 'port', '')}"
    return AuditRecord(event=event, request_id=request_id, time=time,
                       consumer_address=address, **fields)
