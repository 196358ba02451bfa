"""
Tests for L{ssp.token}: the GP Connect bearer-token profile.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jwt
from twisted.trial.unittest import SynchronousTestCase

from ssp.config import TokenConfig
from ssp.errors import BadRequest
from ssp.model import Claims
from ssp.token import check_audience, check_interaction, extract, validate

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "jwt"
ENDPOINT = "https://orange.testlab.nhs.uk/B82617/STU3/1/gpconnect/fhir"
TARGET = ENDPOINT + "/Patient/$gpc.getstructuredrecord"
NOW = 1_700_000_000.0
CONFIG = TokenConfig(validate=True, clock_skew=60.0)
DROP = object()


def segment(value: Any) -> bytes:
    raw = value if isinstance(value, bytes) else json.dumps(value).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=")


def payload(issued: float = NOW, **changes: Any) -> dict[str, Any]:
    """
    A valid claim set issued at C{issued}, with C{changes} applied (L{DROP}
    removes a claim).
    """
    claims: dict[str, Any] = {
        "iss": "https://consumer.example.nhs.uk/",
        "sub": "10019",
        "aud": ENDPOINT,
        "exp": int(issued) + 300,
        "iat": int(issued),
        "reason_for_request": "directcare",
        "requested_scope": "patient/*.read",
        "requesting_device": {
            "resourceType": "Device",
            "identifier": [{"system": "https://consumer.example/device", "value": "dev-1"}],
            "model": "Consumer",
            "version": "1.0",
        },
        "requesting_organization": {
            "resourceType": "Organization",
            "name": "Practice",
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "GPC001"}
            ],
        },
        "requesting_practitioner": {
            "resourceType": "Practitioner",
            "id": "10019",
            "name": [{"family": "Jones", "given": ["Sam"], "prefix": ["Dr"]}],
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "G13579135"},
                {"system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": "111111111"},
            ],
        },
    }
    for name, value in changes.items():
        if value is DROP:
            del claims[name]
        else:
            claims[name] = value
    return claims


def mint(claims: Any = None, header: Any = None, signature: bytes = b"") -> bytes:
    """
    An C{Authorization} header carrying an unsigned token.
    """
    header = {"alg": "none", "typ": "JWT"} if header is None else header
    claims = payload() if claims is None else claims
    return b"Bearer " + segment(header) + b"." + segment(claims) + b"." + signature


class ValidateTests(SynchronousTestCase):
    def refused(self, authorization: bytes | None, now: float = NOW) -> str:
        error = self.assertRaises(BadRequest, validate, authorization, now, CONFIG)
        self.assertEqual(error.status, 400)
        return error.token

    def test_valid(self) -> None:
        """
        A well-formed token yields its audit-relevant claims, validated.
        """
        claims = validate(mint(), NOW, CONFIG)
        self.assertEqual(
            claims,
            Claims(
                subject="10019",
                audience=ENDPOINT,
                practitioner_ids=("G13579135", "111111111", "10019"),
                organisation_ods="GPC001",
                reason_for_request="directcare",
                requested_scope="patient/*.read",
                validated=True,
            ),
        )

    def test_header_untouched(self) -> None:
        """
        Validation only reads the header: the caller's bytes are unchanged,
        so the token forwarded is the token received.
        """
        header = bytearray(mint())
        before = bytes(header)
        validate(bytes(header), NOW, CONFIG)
        self.assertEqual(bytes(header), before)

    def test_missing_header(self) -> None:
        for value in (None, b"", b"   "):
            self.assertEqual(self.refused(value), "BAD_REQUEST: Authorization header is missing")

    def test_not_bearer(self) -> None:
        for value in (b"Basic dXNlcjpwdw==", b"Bearer", b"Bearer a b", mint()[7:]):
            self.assertEqual(
                self.refused(value), "BAD_REQUEST: Authorization header is not 'Bearer <JWT>'"
            )

    def test_scheme_case_insensitive(self) -> None:
        """
        RFC 7235 auth schemes are case-insensitive.
        """
        self.assertTrue(validate(b"bearer " + mint()[7:], NOW, CONFIG).validated)

    def test_each_claim_missing(self) -> None:
        for name in payload():
            token = self.refused(mint(payload(**{name: DROP})))
            self.assertEqual(token, f"BAD_REQUEST: JWT claim '{name}' is missing")

    def test_wrong_types(self) -> None:
        cases = {
            "iss": [None, 5, "", "not a url", "ftp://consumer.example/"],
            "sub": [None, 10019, "", ["10019"]],
            "aud": [None, [ENDPOINT], "http://orange.testlab.nhs.uk/B82617", "/relative"],
            "exp": [str(int(NOW) + 300), float(int(NOW) + 300), True, None],
            "iat": [str(int(NOW)), float(int(NOW)), None],
            "reason_for_request": ["DirectCare", "", None, "secondary-use"],
            "requested_scope": [
                "patient/*.delete",
                "patient/*.read conf/X",
                "patient/*.readconf/N",
                "user/*.read",
                "Patient/*.read",
                ["patient/*.read"],
            ],
            "requesting_device": [None, "device", []],
            "requesting_organization": [None, "org"],
            "requesting_practitioner": [None, []],
        }
        for name, values in cases.items():
            for value in values:
                token = self.refused(mint(payload(**{name: value})))
                self.assertTrue(
                    token.startswith(f"BAD_REQUEST: JWT claim '{name}"), (name, value, token)
                )

    def test_resource_shapes(self) -> None:
        """
        The FHIR resources in claims must have the right C{resourceType},
        well-formed identifiers, an ODS code and a practitioner id.
        """
        base = payload()
        device = dict(base["requesting_device"], resourceType="Practitioner")
        self.assertEqual(
            self.refused(mint(payload(requesting_device=device))),
            "BAD_REQUEST: JWT claim 'requesting_device.resourceType' must be 'Device'",
        )
        device = dict(base["requesting_device"], identifier=[])
        self.assertEqual(
            self.refused(mint(payload(requesting_device=device))),
            "BAD_REQUEST: JWT claim 'requesting_device.identifier' must be a non-empty array",
        )
        device = dict(base["requesting_device"], identifier=[{"system": "x"}])
        self.assertIn(
            "'requesting_device.identifier' entries",
            self.refused(mint(payload(requesting_device=device))),
        )
        org = dict(base["requesting_organization"], identifier=[{"system": "local", "value": "X"}])
        self.assertEqual(
            self.refused(mint(payload(requesting_organization=org))),
            "BAD_REQUEST: JWT claim 'requesting_organization.identifier' has no ODS code"
            " (https://fhir.nhs.uk/Id/ods-organization-code)",
        )
        org = dict(
            base["requesting_organization"],
            identifier=[
                {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "[ODSCode]"}
            ],
        )
        self.assertEqual(
            self.refused(mint(payload(requesting_organization=org))),
            "BAD_REQUEST: JWT claim 'requesting_organization.identifier' ODS code must be alphanumeric",
        )
        practitioner = {k: v for k, v in base["requesting_practitioner"].items() if k != "id"}
        self.assertEqual(
            self.refused(mint(payload(requesting_practitioner=practitioner))),
            "BAD_REQUEST: JWT claim 'requesting_practitioner.id' must be a non-empty string",
        )
        practitioner = dict(base["requesting_practitioner"], identifier="G13579135")
        self.assertEqual(
            self.refused(mint(payload(requesting_practitioner=practitioner))),
            "BAD_REQUEST: JWT claim 'requesting_practitioner.identifier' must be a non-empty array",
        )

    def test_sub_is_practitioner(self) -> None:
        self.assertEqual(
            self.refused(mint(payload(sub="999"))),
            "BAD_REQUEST: JWT claim 'sub' must equal requesting_practitioner.id",
        )

    def test_lifetime(self) -> None:
        for exp in (int(NOW) + 299, int(NOW) + 301, int(NOW) + 3600):
            self.assertEqual(
                self.refused(mint(payload(exp=exp))),
                f"BAD_REQUEST: JWT claim 'exp' must be iat + 300 seconds, is iat + {exp - int(NOW)}",
            )

    def test_expiry_with_skew(self) -> None:
        """
        A token is accepted until C{exp} plus the skew, refused from then on.
        """
        token = mint(payload(issued=NOW - 300))
        self.assertTrue(validate(token, NOW + 59, CONFIG).validated)
        self.assertEqual(
            self.refused(token, now=NOW + 60),
            "BAD_REQUEST: JWT claim 'exp' has passed: the token has expired",
        )
        strict = TokenConfig(clock_skew=0)
        self.assertRaises(BadRequest, validate, token, NOW, strict)
        self.assertTrue(validate(token, NOW - 1, strict).validated)

    def test_future_iat_within_skew(self) -> None:
        """
        A consumer clock slightly ahead is tolerated up to the skew.
        """
        self.assertTrue(validate(mint(payload(issued=NOW + 60)), NOW, CONFIG).validated)
        self.assertEqual(
            self.refused(mint(payload(issued=NOW + 61))),
            "BAD_REQUEST: JWT claim 'iat' is in the future",
        )

    def test_scope_suffixes(self) -> None:
        for scope in (
            "patient/*.read",
            "patient/*.write",
            "organization/*.read",
            "organization/*.write",
            "patient/*.read conf/N",
            "patient/*.write conf/R",
        ):
            claims = validate(mint(payload(requested_scope=scope)), NOW, CONFIG)
            self.assertEqual(claims.requested_scope, scope)

    def test_migration_reason(self) -> None:
        claims = validate(mint(payload(reason_for_request="migration")), NOW, CONFIG)
        self.assertEqual(claims.reason_for_request, "migration")

    def test_name_shapes(self) -> None:
        """
        Practitioner C{name} is an array in STU3 and an object in DSTU2-era
        tokens; neither is checked.
        """
        base = payload()["requesting_practitioner"]
        for name in (
            [{"family": "Jones", "given": ["Sam"]}],
            {"family": ["Jones"], "given": ["Sam"], "prefix": ["Dr"]},
        ):
            practitioner = dict(base, name=name)
            claims = validate(
                mint(payload(requesting_practitioner=practitioner)), NOW, CONFIG
            )
            self.assertTrue(claims.validated)

    def test_deprecated_ods_system(self) -> None:
        org = dict(
            payload()["requesting_organization"],
            identifier=[
                {"system": "http://fhir.nhs.net/Id/ods-organization-code", "value": "B82617"}
            ],
        )
        claims = validate(mint(payload(requesting_organization=org)), NOW, CONFIG)
        self.assertEqual(claims.organisation_ods, "B82617")

    def test_signed_token_refused(self) -> None:
        """
        A signed token has no verification path in GP Connect: refused.
        """
        signed = jwt.encode(payload(), "secret", algorithm="HS256").encode()
        self.assertEqual(
            self.refused(b"Bearer " + signed),
            "BAD_REQUEST: JWT header 'alg' must be 'none' (GP Connect tokens are unsigned)",
        )
        self.assertEqual(
            self.refused(mint(header={"typ": "JWT"})),
            "BAD_REQUEST: JWT header 'alg' must be 'none' (GP Connect tokens are unsigned)",
        )

    def test_none_with_signature_refused(self) -> None:
        self.assertEqual(
            self.refused(mint(signature=b"c2lnbmF0dXJl")),
            "BAD_REQUEST: JWT signature must be empty for alg 'none'",
        )

    def test_malformed(self) -> None:
        header = segment({"alg": "none"})
        for value in (
            b"Bearer " + header + b"." + segment(payload()),  # no signature segment
            b"Bearer " + header + b".." + segment(payload()) + b".",
            b"Bearer " + header + b".!!!!.",
            b"Bearer " + header + b".e30x.",  # base64 of '{}' plus a stray character
            b"Bearer " + header + b"." + segment(b"not json") + b".",
            b"Bearer " + header + b"." + segment([1, 2]) + b".",
            b"Bearer " + segment(b"{not json") + b"." + segment(payload()) + b".",
            b"Bearer \xe2\x82\xac.e30.",
        ):
            self.assertTrue(
                self.refused(value).startswith("BAD_REQUEST: JWT is malformed: "), value
            )

    def test_padded_segments_refused(self) -> None:
        """
        RFC 7515 §2 base64url has no C{=} padding (the NHS demonstrator
        refuses it too), in any segment.
        """
        header = base64.urlsafe_b64encode(b'{"alg": "none" }')
        body = base64.urlsafe_b64encode(json.dumps(payload()).encode() + b" ")
        self.assertTrue(header.endswith(b"=") and body.endswith(b"="))
        for token in (header + b"." + segment(payload()) + b".",
                      segment({"alg": "none"}) + b"." + body + b".",
                      segment({"alg": "none"}) + b"." + segment(payload()) + b".YQ=="):
            self.assertEqual(
                self.refused(b"Bearer " + token),
                "BAD_REQUEST: JWT is malformed: base64url segments must not be padded",
            )

    def test_repeated_members_refused(self) -> None:
        """
        JSON objects must have unique member names (RFC 7519 §4), at any
        depth: Python keeps the last, a provider may read the first.
        """
        good = json.dumps(payload())
        practitioner = '"requesting_practitioner": {"resourceType": "Practitioner", '
        cases = {
            "JWT claim 'sub'": good.replace('"sub": "10019"', '"sub": "10019", "sub": "other"'),
            "JWT claim 'requesting_practitioner.id'": good.replace(
                practitioner, practitioner + '"id": "evil", '),
            "JWT claim 'requesting_organization.identifier[0].value'": good.replace(
                '"value": "GPC001"', '"value": "EVIL1", "value": "GPC001"'),
        }
        for name, text in cases.items():
            self.assertNotEqual(text, good, name)
            self.assertEqual(self.refused(mint(text.encode())),
                             f"BAD_REQUEST: {name} is repeated")
        header = b'{"alg": "none", "alg": "none"}'
        self.assertEqual(self.refused(mint(header=header)),
                         "BAD_REQUEST: JWT header 'alg' is repeated")

    def test_not_strict_json_refused(self) -> None:
        """
        Only RFC 8259 JSON in UTF-8: no C{NaN}/C{Infinity}, no UTF-16.
        """
        for body in (json.dumps(payload(exp=float("nan"))).encode(),
                     json.dumps(payload()).encode("utf-16")):
            self.assertTrue(self.refused(mint(body)).startswith(
                "BAD_REQUEST: JWT is malformed: payload is not JSON"), body[:20])

    def test_same_strictness_as_pyjwt(self) -> None:
        """
        The decoder refuses what PyJWT's refuses and accepts what it
        accepts (padding apart, which PyJWT accepts): wrong padding, a
        length of 1 mod 4, stray bits in the last character, a signature
        segment that is not base64url.
        """
        header = segment({"alg": "none"})
        body = segment(payload())
        cases = [
            header + b"." + body + b"=.",  # padding (refused even where allowed)
            header + b"." + body[: (len(body) // 4) * 4 + 1] + b".",  # 1 mod 4
            header + b"." + segment({"a": 1})[:-1] + b"f.",  # non-canonical last char
            header + b"." + body + b".====",
            header + b"." + body,
        ]
        for token in cases:
            with self.assertRaises(jwt.DecodeError):
                jwt.decode(token, options={"verify_signature": False})
            self.assertTrue(
                self.refused(b"Bearer " + token).startswith("BAD_REQUEST: JWT is malformed: "),
                token,
            )
        token = header + b"." + body + b"."
        self.assertEqual(
            jwt.decode(token, options={"verify_signature": False}),
            payload(),
        )
        self.assertTrue(validate(b"Bearer " + token, NOW, CONFIG).validated)

    def test_fixture_expired(self) -> None:
        """
        The example token is well-formed but long expired.
        """
        token = (FIXTURES / "expired.jwt").read_bytes().strip()
        self.assertEqual(
            self.refused(b"Bearer " + token),
            "BAD_REQUEST: JWT claim 'exp' has passed: the token has expired",
        )
        claims = validate(b"Bearer " + token, 1610374884 + 10, CONFIG)
        self.assertEqual(claims.organisation_ods, "GPC001")

    def test_fixture_spec_example(self) -> None:
        """
        The DSTU2-era spec example has a template ODS code, lives 300000 s
        and names an OAuth token endpoint as audience: each is refused,
        even at its own issue time.
        """
        raw = (FIXTURES / "dstu2-era.jwt").read_bytes().strip()
        claims = jwt.decode(raw, options={"verify_signature": False})
        now = claims["iat"]
        self.assertEqual(
            self.refused(b"Bearer " + raw, now=now),
            "BAD_REQUEST: JWT claim 'requesting_organization.identifier' ODS code must be alphanumeric",
        )
        claims["requesting_organization"]["identifier"][0]["value"] = "B82617"
        self.assertEqual(
            self.refused(mint(claims), now=now),
            "BAD_REQUEST: JWT claim 'exp' must be iat + 300 seconds, is iat + 300000",
        )
        claims["exp"] = claims["iat"] + 300
        checked = validate(mint(claims), now, CONFIG)
        error = self.assertRaises(BadRequest, check_audience, checked, ENDPOINT, TARGET)
        self.assertEqual(
            error.token,
            f"BAD_REQUEST: JWT claim 'aud' is not within the registered endpoint {ENDPOINT}",
        )


class PresenceOnlyTests(SynchronousTestCase):
    """
    With validation switched off the token need only be present.
    """

    config = TokenConfig(validate=False)

    def test_absent_refused(self) -> None:
        for value in (None, b""):
            error = self.assertRaises(BadRequest, validate, value, NOW, self.config)
            self.assertEqual(error.token, "BAD_REQUEST: Authorization header is missing")

    def test_garbage_accepted(self) -> None:
        for value in (
            b"Basic abc",
            b"Bearer not-a-jwt",
            b"Bearer a.b.c",
            mint(payload(issued=0, sub=5)),
        ):
            claims = validate(value, NOW, self.config)
            self.assertFalse(claims.validated)

    def test_claims_extracted(self) -> None:
        """
        Expired or otherwise invalid tokens are still logged with their
        claims.
        """
        claims = validate(mint(payload(issued=0)), NOW, self.config)
        self.assertEqual(claims.subject, "10019")
        self.assertEqual(claims.organisation_ods, "GPC001")
        self.assertEqual(claims.practitioner_ids, ("G13579135", "111111111", "10019"))

    def test_wrong_types_ignored(self) -> None:
        bad = payload(
            sub=5,
            aud=[ENDPOINT],
            requesting_practitioner={"id": 7, "identifier": [{"value": 1}, "x"]},
            requesting_organization=[],
        )
        self.assertEqual(
            extract(mint(bad)),
            Claims(reason_for_request="directcare", requested_scope="patient/*.read"),
        )


SERVICES = "urn:nhs:names:services:gpconnect:"
METADATA = SERVICES + "fhir:rest:read:metadata-1"
STRUCTURED = SERVICES + "fhir:operation:gpc.getstructuredrecord-1"
MIGRATE_STRUCTURED = SERVICES + "fhir:operation:gpc.migratestructuredrecord-1"
MIGRATE_DOCUMENT = SERVICES + "documents:fhir:rest:migrate:binary-1"
BOOK = SERVICES + "fhir:rest:create:appointment-1"


class CheckInteractionTests(SynchronousTestCase):
    """
    C{requested_scope} and C{reason_for_request} against the interaction
    (SPEC §4, notes/spec-digest.md §3).
    """

    def refused(self, interaction: str, scope: str, reason: str = "directcare") -> str:
        claims = Claims(requested_scope=scope, reason_for_request=reason, validated=True)
        return self.assertRaises(BadRequest, check_interaction, claims, interaction).token

    def accepted(self, interaction: str, scope: str, reason: str = "directcare") -> None:
        claims = Claims(requested_scope=scope, reason_for_request=reason, validated=True)
        self.assertIsNone(check_interaction(claims, interaction))

    def test_scope_per_family(self) -> None:
        expected = {
            METADATA: "organization/*.read",
            SERVICES + "structured:fhir:rest:read:metadata-1": "organization/*.read",
            SERVICES + "documents:fhir:rest:read:metadata-1": "organization/*.read",
            SERVICES + "fhir:rest:search:slot-1": "organization/*.read",
            SERVICES + "fhir:rest:read:practitioner-1": "organization/*.read",
            SERVICES + "fhir:rest:search:organization-1": "organization/*.read",
            SERVICES + "fhir:rest:read:location-1": "organization/*.read",
            SERVICES + "fhir:rest:read:metadata": "organization/*.read",  # 0.x, unversioned
            STRUCTURED: "patient/*.read",
            SERVICES + "fhir:operation:gpc.getcarerecord-1": "patient/*.read",
            SERVICES + "fhir:rest:search:patient-1": "patient/*.read",
            SERVICES + "fhir:rest:read:appointment-1": "patient/*.read",
            SERVICES + "fhir:rest:search:patient_appointments-1": "patient/*.read",
            SERVICES + "documents:fhir:rest:search:documentreference-1": "patient/*.read",
            SERVICES + "documents:fhir:rest:read:binary-1": "patient/*.read",
            BOOK: "patient/*.write",
            SERVICES + "fhir:rest:update:appointment-1": "patient/*.write",
            SERVICES + "fhir:rest:cancel:appointment-1": "patient/*.write",
            SERVICES + "fhir:operation:gpc.registerpatient-1": "patient/*.write",
        }
        scopes = ("patient/*.read", "patient/*.write", "organization/*.read",
                  "organization/*.write")
        for interaction, scope in expected.items():
            self.accepted(interaction, scope)
            self.accepted(interaction, scope + " conf/R")
            for other in scopes:
                if other != scope:
                    self.assertEqual(
                        self.refused(interaction, other),
                        f"BAD_REQUEST: JWT claim 'requested_scope' must be {scope} "
                        f"for {interaction}")

    def test_migration_only_for_migration_interactions(self) -> None:
        for interaction in (MIGRATE_STRUCTURED, MIGRATE_DOCUMENT):
            self.accepted(interaction, "patient/*.read conf/N", "migration")
            self.assertEqual(
                self.refused(interaction, "patient/*.read", "directcare"),
                f"BAD_REQUEST: JWT claim 'reason_for_request' must be migration for {interaction}")
        for interaction in (STRUCTURED, METADATA, SERVICES + "other:fhir:rest:read:thing-1"):
            scope = "organization/*.read" if interaction == METADATA else "patient/*.read"
            self.assertEqual(
                self.refused(interaction, scope, "migration"),
                f"BAD_REQUEST: JWT claim 'reason_for_request' must be directcare for {interaction}")

    def test_unknown_interaction_needs_no_particular_scope(self) -> None:
        """
        SDS decides whether an interaction the table does not know is
        allowed at all; its scope is only checked for format.
        """
        for scope in ("patient/*.write", "organization/*.read"):
            self.accepted(SERVICES + "fhir:rest:read:newthing-1", scope)
            self.accepted("urn:nhs:names:services:other:x", scope)

    def test_not_checked_unless_validated(self) -> None:
        claims = Claims(requested_scope="patient/*.write", reason_for_request="migration")
        self.assertIsNone(check_interaction(claims, METADATA))


class CheckAudienceTests(SynchronousTestCase):
    def claims(self, aud: str, validated: bool = True) -> Claims:
        return Claims(audience=aud, validated=validated)

    def test_equal_or_under(self) -> None:
        for aud in (
            ENDPOINT,
            ENDPOINT + "/",
            ENDPOINT + "/metadata",
            ENDPOINT + "/Patient?identifier=x",
        ):
            check_audience(self.claims(aud), ENDPOINT)

    def test_outside(self) -> None:
        for aud in (
            ENDPOINT + "X",
            "https://orange.testlab.nhs.uk/B82617/STU3/1",
            "https://orange.testlab.nhs.uk:443/B82617/STU3/1/gpconnect/fhir",
            "https://authorize.fhir.nhs.net/token",
        ):
            error = self.assertRaises(BadRequest, check_audience, self.claims(aud), ENDPOINT)
            self.assertEqual(
                error.token,
                f"BAD_REQUEST: JWT claim 'aud' is not within the registered endpoint {ENDPOINT}",
            )

    def test_target_within_audience(self) -> None:
        """
        C{aud} is the service root, or the full resource URL (older
        consumers); the target must be within it on a segment boundary, or
        differ from it only by a query.
        """
        metadata = ENDPOINT + "/metadata"
        for aud, target in (
            (ENDPOINT, metadata),
            (ENDPOINT, ENDPOINT),
            (ENDPOINT + "/", metadata),
            (metadata, metadata + "?_format=json"),
            (metadata, metadata),
        ):
            check_audience(self.claims(aud), ENDPOINT, target)
        for aud, target in (
            (metadata, ENDPOINT + "/Patient/1"),
            (ENDPOINT + "/Patient", ENDPOINT + "/PatientX"),
            (metadata + "?_format=json", metadata + "?_format=xml"),
            (ENDPOINT, ENDPOINT + "X/metadata"),
        ):
            error = self.assertRaises(
                BadRequest, check_audience, self.claims(aud), ENDPOINT, target
            )
            self.assertEqual(
                error.token, "BAD_REQUEST: JWT claim 'aud' does not cover the target URL"
            )

    def test_endpoint_with_trailing_slash(self) -> None:
        """
        "Within" is the target check's rule: with an endpoint registered as
        C{.../fhir/}, an C{aud} of C{.../fhir} is outside it, and an C{aud}
        of C{.../fhir/} does not cover the target C{.../fhir}.
        """
        slashed = ENDPOINT + "/"
        check_audience(self.claims(slashed), slashed, slashed + "metadata")
        error = self.assertRaises(BadRequest, check_audience, self.claims(ENDPOINT), slashed)
        self.assertEqual(
            error.token,
            f"BAD_REQUEST: JWT claim 'aud' is not within the registered endpoint {slashed}",
        )
        error = self.assertRaises(
            BadRequest, check_audience, self.claims(slashed), slashed, ENDPOINT
        )
        self.assertEqual(error.token, "BAD_REQUEST: JWT claim 'aud' does not cover the target URL")

    def test_not_validated(self) -> None:
        """
        Presence-only mode never refuses on C{aud}.
        """
        elsewhere = self.claims("https://elsewhere.example/", validated=False)
        check_audience(elsewhere, ENDPOINT)
        check_audience(elsewhere, ENDPOINT, TARGET)
