# -*- test-case-name: tests.test_errors -*-
"""
Refusals: every reason the proxy answers a request itself, as a typed
exception, and the one place they become a FHIR C{OperationOutcome}.

The token in each refusal is what the live SSP put in C{display} and
C{diagnostics}; consumers match on it, so it is part of the contract.
"""

from __future__ import annotations

import json
import uuid
from typing import ClassVar
from xml.sax.saxutils import escape

CODING_SYSTEM = "http://fhir.nhs.net/ValueSet/gpconnect-schedule-response-code-1-0"
PROFILE = "https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-OperationOutcome-1"
FHIR_XML = b"application/fhir+xml"
FHIR_JSON = b"application/fhir+json"


class Refusal(Exception):
    """
    The proxy refuses to forward a request.

    @cvar status: the HTTP status sent to the consumer.
    @cvar issue_code: the FHIR C{issue.code}.
    @cvar closes_connection: the refusal ends the connection, not just the
        request: nothing else the consumer sends on it can be admitted.
    @ivar token: the C{display}/C{diagnostics} text.
    @ivar headers: extra response headers (e.g. C{Retry-After}).
    """

    status: ClassVar[int] = 500
    issue_code: ClassVar[str] = "exception"
    closes_connection: ClassVar[bool] = False

    def __init__(self, token: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(token)
        self.token = token
        self.headers = headers

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.status}, {self.token!r})"


class CertificateRequired(Refusal):
    """
    No client certificate was presented (496).  The connection closes: a
    TLS connection cannot acquire a certificate later (renegotiation is
    off), so every further request on it would be refused too.
    """

    status = 496
    issue_code = "security"
    closes_connection = True


class CertificateInvalid(Refusal):
    """
    The client certificate is untrusted, expired, revoked, or not
    registered in SDS for the sending ASID (495).
    """

    status = 495
    issue_code = "security"
    # Judging a bad chain costs a verification each time (bad verdicts
    # are not cached): a keep-alive connection must not buy more than one.
    closes_connection = True


class PlainHTTP(Refusal):
    """Plain HTTP arrived on the TLS port (497)."""

    status = 497
    issue_code = "security"


class MethodNotAllowed(Refusal):
    """The verb is not one the proxy forwards (405)."""

    status = 405
    issue_code = "not-supported"

    def __init__(self) -> None:
        super().__init__("405: Method Not Allowed")


class BadRequest(Refusal):
    """A malformed target, C{Ssp-*} header or bearer token (400)."""

    status = 400
    issue_code = "invalid"


class EndpointMismatch(BadRequest):
    """The target URL is not within the endpoint SDS registers (400)."""

    def __init__(self, endpoint: str, cpa_id: str, target: str) -> None:
        super().__init__(
            f"ENDPOINT_{endpoint}_CPAID_{cpa_id}_VARIES_FROM_TARGETURL_{target}"
        )


class RequestTimeout(BadRequest):
    """The request's headers did not arrive within C{listen.header_timeout} (408)."""

    status = 408
    issue_code = "timeout"

    def __init__(self) -> None:
        super().__init__("REQUEST_TIMEOUT")


class PayloadTooLarge(BadRequest):
    """The request body exceeds C{listen.max_body_bytes} (413)."""

    status = 413
    issue_code = "too-long"

    def __init__(self, limit: int) -> None:
        super().__init__(f"REQUEST_BODY_LARGER_THAN_{limit}_BYTES")


class URITooLong(BadRequest):
    """The request line exceeds C{listen.max_request_line} (414)."""

    status = 414
    issue_code = "too-long"

    def __init__(self, limit: int) -> None:
        super().__init__(f"REQUEST_LINE_LONGER_THAN_{limit}_BYTES")


class HeadersTooLarge(BadRequest):
    """
    The header block exceeds C{listen.max_header_bytes} or
    C{listen.max_headers} (431).
    """

    status = 431
    issue_code = "too-long"

    def __init__(self, token: str) -> None:
        super().__init__(token)


class Forbidden(Refusal):
    """An SDS or data-sharing-agreement authorisation check failed (403)."""

    status = 403
    issue_code = "forbidden"

    @classmethod
    def sender(cls, asid: str) -> Forbidden:
        return cls(f"ASID_CHECK_FAILED_MESSAGESENDER_{asid}")

    @classmethod
    def receiver(cls, asid: str) -> Forbidden:
        return cls(f"PARTYKEY_INTERACTION_CHECK_FAILED_MESSAGERECEIVER_{asid}")

    @classmethod
    def agreement(cls, sender: str, receiver: str) -> Forbidden:
        return cls(f"FOT_CHECK_FAILED_MESSAGESENDER_{sender}_MESSAGERECEIVER_{receiver}")


class TooManyRequests(Refusal):
    """The consumer exceeded its rate limit (429)."""

    status = 429
    issue_code = "throttled"


class ProviderBusy(Refusal):
    """The provider's global rate limit is exhausted (503)."""

    status = 503
    issue_code = "throttled"


class DirectoryUnavailable(Refusal):
    """SDS cannot be reached and no usable cached answer exists (503)."""

    status = 503
    issue_code = "transient"

    def __init__(self, token: str = "SDS_UNAVAILABLE") -> None:
        super().__init__(token)


class AuditUnavailable(Refusal):
    """The audit trail cannot be written durably: fail closed (503)."""

    status = 503
    issue_code = "transient"

    def __init__(self, token: str = "AUDIT_UNAVAILABLE") -> None:
        super().__init__(token)


class UpstreamFailed(Refusal):
    """The provider is unreachable, failed TLS or sent invalid HTTP (502)."""

    status = 502
    issue_code = "transient"

    def __init__(self, target: str) -> None:
        super().__init__(f"ERROR_COMMUNICATING_TO_ENDPOINT_URL_{target}")


class UpstreamTimeout(Refusal):
    """The provider did not connect or answer in time (504)."""

    status = 504
    issue_code = "timeout"

    def __init__(self, target: str) -> None:
        super().__init__(f"TIMEOUT_COMMUNICATING_TO_ENDPOINT_URL_{target}")


def wants_xml(accept: bytes | None, query_format: bytes | None = None) -> bool:
    """
    Whether the consumer asked for FHIR XML, by C{_format} or C{Accept}.
    """
    chosen = query_format if query_format else accept
    return bool(chosen) and b"xml" in chosen.lower() and b"json" not in chosen.lower()


def operation_outcome(refusal: Refusal, xml: bool = False) -> tuple[bytes, bytes]:
    """
    Render a refusal as a GP Connect SSP C{OperationOutcome}.

    @return: C{(content_type, body)}.
    """
    outcome_id = str(uuid.uuid4())
    if xml:
        token = escape(refusal.token, {'"': "&quot;"})
        body = (
            '<OperationOutcome xmlns="http://hl7.org/fhir">'
            f'<id value="{outcome_id}"/>'
            f'<meta><profile value="{PROFILE}"/></meta>'
            '<issue><severity value="error"/>'
            f'<code value="{refusal.issue_code}"/>'
            "<details><coding>"
            f'<system value="{CODING_SYSTEM}"/>'
            f'<code value="{refusal.status}"/>'
            f'<display value="{token}"/>'
            "</coding></details>"
            f'<diagnostics value="{token}"/>'
            "</issue></OperationOutcome>"
        )
        return FHIR_XML, body.encode("utf-8")
    document = {
        "resourceType": "OperationOutcome",
        "id": outcome_id,
        "meta": {"profile": [PROFILE]},
        "issue": [
            {
                "severity": "error",
                "code": refusal.issue_code,
                "details": {
                    "coding": [
                        {
                            "system": CODING_SYSTEM,
                            "code": str(refusal.status),
                            "display": refusal.token,
                        }
                    ]
                },
                "diagnostics": refusal.token,
            }
        ],
    }
    return FHIR_JSON, json.dumps(document).encode("utf-8")
