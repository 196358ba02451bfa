# -*- test-case-name: tests.test_token -*-
"""
The GP Connect bearer token: an unsigned JWT carrying who is asking, for
whom and why.  The proxy checks its profile and keeps the claims for the
audit trail; it never changes the token (it only reads the header bytes).

GP Connect defines no signed variant (no keys, no JWKS), so only
C{alg: none} with an empty signature segment is accepted: a signed token
cannot be verified by anyone on the path and is refused rather than
trusted.  With no signature to check, decoding is two base64url segments
and two C{json.loads} calls, done here rather than by PyJWT (whose per-
character padding checks cost more than every other check together; see
C{docs/performance.md}), with the same strictness.  Every time check uses
the C{now} the caller passes, so the clock is injected.

Every refusal is a L{BadRequest} whose token has one shape,
C{BAD_REQUEST: JWT claim '<name>' <problem>} (or C{Authorization header}/
C{JWT} for the envelope); C{docs/token.md} lists them all.
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any
from urllib.parse import urlsplit

from ssp.config import TokenConfig
from ssp.errors import BadRequest
from ssp.model import Claims
from ssp.policy import within_endpoint

LIFETIME = 300
REASONS = ("directcare", "migration")
ODS_SYSTEMS = (
    "https://fhir.nhs.uk/Id/ods-organization-code",
    # DSTU2-era system that providers were still required to accept.
    "http://fhir.nhs.net/Id/ods-organization-code",
)

# RFC 7515 §2: base64url without padding.
_BASE64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_BASE64URL_BYTES = _BASE64URL.encode("ascii")
_FROM_URLSAFE = bytes.maketrans(b"-_", b"+/")
# The bits of a segment's last character that encode nothing, by the
# segment's length mod 4: 2 characters carry 1 byte, 3 carry 2.
_UNUSED_BITS = {2: 0b1111, 3: 0b11}
_SCOPE = re.compile(r"(patient|organization)/\*\.(read|write)( conf/[NR])?\Z")
_ODS = re.compile(r"[A-Za-z0-9]{1,12}\Z")

# The scope each GP Connect interaction needs (notes/spec-digest.md §3),
# read from its ID so that versions and the documents programme's variant
# spellings are covered: ...:fhir:rest:<verb>:<resource>[-n] or
# ...:fhir:operation:<operation>[-n].
_INTERACTION = re.compile(
    r"urn:nhs:names:services:gpconnect(?:-documents)?(?::[a-z]+)?:fhir:"
    r"(?:rest:(?P<verb>[a-z]+):(?P<resource>[a-z_]+)|operation:(?P<operation>gpc\.[a-z]+))"
    r"(?:-[0-9]+)?\Z"
)
_ORGANISATION_READ = "organization/*.read"
_PATIENT_READ = "patient/*.read"
_PATIENT_WRITE = "patient/*.write"
_ORGANISATION_RESOURCES = frozenset({"metadata", "practitioner", "organization", "location", "slot"})
_PATIENT_RESOURCES = frozenset(
    {"patient", "patient_appointments", "appointment", "documentreference", "binary"}
)
_PATIENT_VERBS = {"read": _PATIENT_READ, "search": _PATIENT_READ, "migrate": _PATIENT_READ,
                  "create": _PATIENT_WRITE, "update": _PATIENT_WRITE, "cancel": _PATIENT_WRITE}
_OPERATIONS = {
    "gpc.registerpatient": _PATIENT_WRITE,
    "gpc.getstructuredrecord": _PATIENT_READ,
    "gpc.migratestructuredrecord": _PATIENT_READ,
    "gpc.getcarerecord": _PATIENT_READ,
}
_MIGRATIONS = ("gpc.migratestructuredrecord", "migrate")


def validate(
    authorization: bytes | None, now: float, config: TokenConfig
) -> Claims:
    """
    Check the C{Authorization} header of a request against the GP Connect
    token profile.

    @param authorization: the raw header value, or L{None} when absent.
    @param now: the current time (seconds since the epoch, from the
        injected clock).
    @param config: with C{validate} false only the header's presence is
        required and the claims are extracted best-effort.
    @return: the audit-relevant claims; C{validated} says whether they
        were checked.
    @raise BadRequest: naming the header or claim at fault.
    """
    if not authorization or not authorization.strip():
        raise BadRequest("BAD_REQUEST: Authorization header is missing")
    if not config.validate:
        return extract(authorization)
    token = _bearer(authorization)
    payload = _decode(token)
    for name, check in _CLAIM_CHECKS:
        if name not in payload:
            raise _claim(name, "is missing")
        check(payload[name], name)
    practitioner = payload["requesting_practitioner"]
    if payload["sub"] != practitioner["id"]:
        raise _claim("sub", "must equal requesting_practitioner.id")
    exp, iat = payload["exp"], payload["iat"]
    if exp - iat != LIFETIME:
        raise _claim("exp", f"must be iat + {LIFETIME} seconds, is iat + {exp - iat}")
    if now >= exp + config.clock_skew:
        raise _claim("exp", "has passed: the token has expired")
    if iat > now + config.clock_skew:
        raise _claim("iat", "is in the future")
    return _claims(payload, validated=True)


def check_audience(claims: Claims, endpoint: str, target: str | None = None) -> None:
    """
    Check, once SDS has named the provider's registered endpoint, that the
    token was addressed to it: C{aud} is within the endpoint (older
    consumers send the full resource URL); and, when C{target} is given,
    that the target is within C{aud}.  "Within" is the one rule the target
    check uses, L{ssp.policy.within_endpoint}.

    @raise BadRequest: naming C{aud}.  Nothing is checked for claims that
        were not validated.
    """
    if not claims.validated:
        return
    if not within_endpoint(endpoint, claims.audience):
        raise _claim("aud", f"is not within the registered endpoint {endpoint}")
    if target is not None and not within_endpoint(claims.audience, target):
        raise _claim("aud", "does not cover the target URL")


def check_interaction(claims: Claims, interaction: str) -> None:
    """
    Check the claims that depend on the interaction (SPEC §4):
    C{requested_scope} is the scope the interaction needs (a C{conf/}
    suffix aside), and C{reason_for_request} is C{migration} exactly for
    the migration interactions.  An interaction this module does not know
    needs no particular scope (SDS decides whether it is allowed at all)
    and is not a migration.

    @raise BadRequest: naming the claim.  Nothing is checked for claims
        that were not validated.
    """
    if not claims.validated:
        return
    scope, migration = _needs(interaction)
    granted = claims.requested_scope.partition(" ")[0]
    if scope is not None and granted != scope:
        raise _claim("requested_scope", f"must be {scope} for {interaction}")
    if migration != (claims.reason_for_request == "migration"):
        expected = "migration" if migration else "directcare"
        raise _claim("reason_for_request", f"must be {expected} for {interaction}")


def _needs(interaction: str) -> tuple[str | None, bool]:
    """
    The scope C{interaction} needs (L{None} when unknown) and whether it
    migrates a record.
    """
    match = _INTERACTION.match(interaction)
    if match is None:
        return None, False
    operation = match["operation"]
    if operation is not None:
        return _OPERATIONS.get(operation), operation in _MIGRATIONS
    verb, resource = match["verb"], match["resource"]
    migration = verb in _MIGRATIONS
    if resource in _ORGANISATION_RESOURCES and verb in ("read", "search"):
        return _ORGANISATION_READ, migration
    if resource in _PATIENT_RESOURCES:
        return _PATIENT_VERBS.get(verb), migration
    return None, migration


def extract(authorization: bytes | None) -> Claims:
    """
    Read whatever audit-relevant claims a header carries, never raising:
    used when validation is off, and to audit refused requests.
    """
    token = _bearer_token(authorization or b"")
    if token is None:
        return Claims()
    try:
        _, payload = _segments(token.decode("ascii"))
    except (BadRequest, ValueError):
        return Claims()
    return _claims(payload, validated=False)


def _bearer(authorization: bytes) -> str:
    token = _bearer_token(authorization)
    if token is None:
        raise BadRequest("BAD_REQUEST: Authorization header is not 'Bearer <JWT>'")
    try:
        return token.decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("BAD_REQUEST: JWT is malformed: not ASCII") from None


def _bearer_token(authorization: bytes) -> bytes | None:
    """
    The token of C{Bearer <token>}: the scheme in any case, one or more
    spaces, a token without whitespace, optional trailing spaces; else
    L{None}.  (As the regular expression C{bearer +(\\S+) *\\Z} would,
    without its per-byte scan of a kilobyte token.)
    """
    if authorization[:6].lower() != b"bearer" or authorization[6:7] != b" ":
        return None
    token = authorization[7:].strip(b" ")
    return token if token and token.split() == [token] else None


def _decode(token: str) -> dict[str, Any]:
    header, payload = _segments(token)
    if header.get("alg") != "none":
        raise BadRequest(
            "BAD_REQUEST: JWT header 'alg' must be 'none' (GP Connect tokens are unsigned)"
        )
    if token[token.rindex(".") + 1 :]:
        raise BadRequest("BAD_REQUEST: JWT signature must be empty for alg 'none'")
    return payload


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """
    The JSON objects of a compact JWT's header and payload; the third
    segment must be base64url too (possibly empty) but is not decoded.

    @raise BadRequest: C{JWT is malformed: ...}.
    """
    segments = token.split(".")
    if len(segments) != 3:
        raise BadRequest("BAD_REQUEST: JWT is malformed: expected header.payload.signature")
    if "=" in token:
        raise BadRequest("BAD_REQUEST: JWT is malformed: base64url segments must not be padded")
    if not (
        _is_base64url(segments[0])
        and _is_base64url(segments[1])
        and (not segments[2] or _is_base64url(segments[2]))
    ):
        raise BadRequest("BAD_REQUEST: JWT is malformed: segments must be base64url")
    header = _json_object(segments[0], "header", "JWT header")
    payload = _json_object(segments[1], "payload", "JWT claim")
    if segments[2]:
        _base64url(segments[2], "signature")
    return header, payload


def _is_base64url(segment: str) -> bool:
    """
    Whether C{segment} is one or more base64url characters (RFC 7515 §2).
    """
    return (segment.isascii() and segment != ""
            and not segment.encode("ascii").translate(None, _BASE64URL_BYTES))


def _base64url(segment: str, name: str) -> bytes:
    """
    Decode one unpadded base64url segment (already L{_is_base64url}),
    refusing the non-canonical spellings PyJWT refuses: a length of 1 mod 4,
    stray bits in the last character.  The stray bits are read from that
    character rather than by encoding the result again and comparing.
    """
    remainder = len(segment) % 4
    if remainder == 1:
        raise BadRequest(f"BAD_REQUEST: JWT is malformed: invalid {name} length")
    try:
        decoded = binascii.a2b_base64(
            segment.encode("ascii").translate(_FROM_URLSAFE) + b"=" * (-remainder % 4)
        )
    except binascii.Error:
        raise BadRequest(f"BAD_REQUEST: JWT is malformed: invalid {name} base64url") from None
    if remainder and _BASE64URL.find(segment[-1]) & _UNUSED_BITS[remainder]:
        raise BadRequest(f"BAD_REQUEST: JWT is malformed: non-canonical {name} base64url")
    return decoded


def _json_object(segment: str, name: str, member: str) -> dict[str, Any]:
    """
    Parse a segment as RFC 8259 JSON in UTF-8 (no C{NaN}/C{Infinity}, no
    other encoding), whose top level is an object and whose objects have
    unique member names (RFC 7515 §5.2, RFC 7519 §4): a provider reading
    the first of two C{sub} members would act on one the proxy never saw.

    @param member: how a refusal names a member, C{JWT claim} or C{JWT header}.
    """
    try:
        text = _base64url(segment, name).decode("utf-8")
        value = _DECODER.decode(text)
    except _Repeated:
        raise BadRequest(f"BAD_REQUEST: {member} '{_repeated_path(text)}' is repeated") from None
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"BAD_REQUEST: JWT is malformed: {name} is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"BAD_REQUEST: JWT is malformed: {name} is not a JSON object")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _unique_members(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """
    A JSON object's members as a dict (the fast path: no copy, no walk).

    @raise _Repeated: a member name occurs twice.
    """
    members = dict(pairs)
    if len(members) != len(pairs):
        raise _Repeated()
    return members


# Built once: json.loads with hooks would build a decoder per call.
_DECODER = json.JSONDecoder(object_pairs_hook=_unique_members, parse_constant=_no_constant)


def _repeated_path(text: str) -> str:
    """
    The path of the first repeated member name in JSON C{text} that has
    one, for the refusal (the slow path, taken only then).
    """
    try:
        _unique(json.loads(text, object_pairs_hook=_Members), "")
    except _Repeated as e:
        return str(e)
    return ""


class _Members(list):
    """
    A JSON object's members as parsed, in order, duplicates kept.
    """


class _Repeated(Exception):
    """
    A JSON object has two members of one name (L{_unique} gives its path as
    the exception's text).
    """


def _unique(value: Any, path: str) -> Any:
    """
    C{value} with every L{_Members} made a dict.

    @raise _Repeated: with the path of the first repeated member.
    """
    if isinstance(value, _Members):
        result = {}
        for key, item in value:
            if key in result:
                raise _Repeated(path + key)
            result[key] = _unique(item, f"{path}{key}.")
        return result
    if isinstance(value, list):
        return [_unique(item, f"{path[:-1]}[{i}].") for i, item in enumerate(value)]
    return value


def _claim(name: str, problem: str) -> BadRequest:
    return BadRequest(f"BAD_REQUEST: JWT claim '{name}' {problem}")


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _claim(name, "must be a non-empty string")
    return value


def _check_url(value: Any, name: str, schemes: tuple[str, ...]) -> None:
    parts = urlsplit(_string(value, name))
    if parts.scheme not in schemes or not parts.netloc:
        raise _claim(name, f"must be an absolute {' or '.join(schemes)} URL")


def _check_iss(value: Any, name: str) -> None:
    _check_url(value, name, ("https", "http"))


def _check_aud(value: Any, name: str) -> None:
    _check_url(value, name, ("https",))


def _check_time(value: Any, name: str) -> None:
    if type(value) is not int:
        raise _claim(name, "must be an integer number of seconds since the epoch")


def _check_reason(value: Any, name: str) -> None:
    if value not in REASONS:
        raise _claim(name, "must be one of " + ", ".join(REASONS))


def _check_scope(value: Any, name: str) -> None:
    if not isinstance(value, str) or not _SCOPE.match(value):
        raise _claim(name, "must be (patient|organization)/*.(read|write) [conf/N|conf/R]")


def _resource(value: Any, name: str, resource_type: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _claim(name, f"must be a FHIR {resource_type} object")
    if value.get("resourceType") != resource_type:
        raise _claim(f"{name}.resourceType", f"must be '{resource_type}'")
    return value


def _identifiers(resource: dict[str, Any], name: str) -> list[tuple[str, str]]:
    """
    The C{(system, value)} pairs of a resource's C{identifier} array, which
    must hold at least one well-formed entry.
    """
    name = f"{name}.identifier"
    entries = resource.get("identifier")
    if not isinstance(entries, list) or not entries:
        raise _claim(name, "must be a non-empty array")
    pairs = []
    for entry in entries:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("system"), str)
            and isinstance(entry.get("value"), str)
            and entry["value"].strip()
        ):
            raise _claim(name, "entries must have a string system and a non-empty value")
        pairs.append((entry["system"], entry["value"]))
    return pairs


def _check_device(value: Any, name: str) -> None:
    _identifiers(_resource(value, name, "Device"), name)


def _check_organisation(value: Any, name: str) -> None:
    pairs = _identifiers(_resource(value, name, "Organization"), name)
    codes = [v for s, v in pairs if s in ODS_SYSTEMS]
    if not codes:
        raise _claim(f"{name}.identifier", f"has no ODS code ({ODS_SYSTEMS[0]})")
    if not _ODS.match(codes[0]):
        raise _claim(f"{name}.identifier", "ODS code must be alphanumeric")


def _check_practitioner(value: Any, name: str) -> None:
    practitioner = _resource(value, name, "Practitioner")
    _string(practitioner.get("id"), f"{name}.id")
    _identifiers(practitioner, name)


_CLAIM_CHECKS = (
    ("iss", _check_iss),
    ("sub", _string),
    ("aud", _check_aud),
    ("exp", _check_time),
    ("iat", _check_time),
    ("reason_for_request", _check_reason),
    ("requested_scope", _check_scope),
    ("requesting_device", _check_device),
    ("requesting_organization", _check_organisation),
    ("requesting_practitioner", _check_practitioner),
)


def _claims(payload: dict[str, Any], validated: bool) -> Claims:
    """
    Pick the audit-relevant claims, keeping only well-typed values so that
    best-effort extraction never raises.
    """
    practitioner = _dict(payload.get("requesting_practitioner"))
    organisation = _dict(payload.get("requesting_organization"))
    ids = [v for _, v in _pairs(practitioner)]
    if isinstance(practitioner.get("id"), str):
        ids.append(practitioner["id"])
    ods = [v for s, v in _pairs(organisation) if s in ODS_SYSTEMS]
    return Claims(
        subject=_text(payload.get("sub")),
        audience=_text(payload.get("aud")),
        practitioner_ids=tuple(dict.fromkeys(ids)),
        organisation_ods=ods[0] if ods else "",
        reason_for_request=_text(payload.get("reason_for_request")),
        requested_scope=_text(payload.get("requested_scope")),
        validated=validated,
    )


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _pairs(resource: dict[str, Any]) -> list[tuple[str, str]]:
    entries = resource.get("identifier")
    if not isinstance(entries, list):
        return []
    return [
        (e["system"], e["value"])
        for e in entries
        if isinstance(e, dict)
        and isinstance(e.get("system"), str)
        and isinstance(e.get("value"), str)
    ]
