# -*- test-case-name: tests.test_demo -*-
"""
The embedded demo: a development PKI in C{certs/} and the audit trail in
C{var/audit/} under the working directory, the demo SDS shipped with the
package (L{DEMO_LDIF}), a demo FHIR provider on loopback that requires the
proxy's client certificate, a consumer rate limit (so responses carry
C{X-Rate-Limit-*}), and a ready curl line.

C{python -m ssp.demo token} prints a fresh GP Connect bearer token for
the demo consumer (tokens live five minutes, so the curl line mints one).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shlex
import sys
import uuid
from pathlib import Path
from typing import Any

from twisted.internet.ssl import Certificate, PrivateCertificate, TLSVersion
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.resource import Resource
from twisted.web.server import Site

from ssp.config import (
    AdminConfig,
    Agreement,
    AuditConfig,
    Config,
    DirectoryConfig,
    LimitSet,
    ListenConfig,
    RateLimit,
    ServerTLSConfig,
    ThrottleConfig,
    UpstreamConfig,
)
from ssp.pki import DevelopmentPKI, create_development_pki

CONSUMER_ASID = "200000000359"
CONSUMER_ODS = "GPC001"
PROVIDER_ASID = "918999198738"
PROVIDER_HOST = "orange.testlab.nhs.uk"
PROVIDER_ENDPOINT = f"https://{PROVIDER_HOST}/B82617/STU3/1/gpconnect/fhir"
METADATA_INTERACTION = "urn:nhs:names:services:gpconnect:fhir:rest:read:metadata-1"
#: Package data, so the demo runs from any directory and after a plain install.
DEMO_LDIF = Path(__file__).resolve().parent / "data" / "demo-sds.ldif"
#: The demo consumer's allowance: generous for a person at a terminal.
CONSUMER_LIMIT = RateLimit(rate=5, period=1.0, burst=10)


def ensure_pki(root: Path) -> DevelopmentPKI:
    """
    The demo PKI in C{root/certs}, and the audit chain key beside it,
    generated on first use.
    """
    certs = root / "certs"
    pki = (create_development_pki(certs) if not (certs / DevelopmentPKI.ca).exists()
           else DevelopmentPKI(certs))
    audit_key(certs)
    return pki


AUDIT_KEY = "audit.key"


def audit_key(directory: Path) -> Path:
    """
    The demo's audit chain key in C{directory} (beside the certificates,
    never in the audit directory), generated on first use.
    """
    path = directory / AUDIT_KEY
    if not path.exists():
        path.write_text(os.urandom(32).hex())
        path.chmod(0o600)
    return path


class EchoProvider(Resource):
    """
    A stand-in GP Connect provider: C{/metadata} answers a
    CapabilityStatement; every other path echoes what arrived (method,
    path, headers, body digest) so a caller can see what the proxy sent.
    """

    isLeaf = True

    def render(self, request: Any) -> bytes:
        body = request.content.read() if request.content is not None else b""
        request.setHeader(b"Content-Type", b"application/fhir+json")
        if request.path.endswith(b"/metadata") and request.method == b"GET":
            document: dict[str, Any] = {
                "resourceType": "CapabilityStatement",
                "status": "active",
                "fhirVersion": "3.0.1",
                "kind": "instance",
                "format": ["application/fhir+json", "application/fhir+xml"],
            }
        else:
            document = {
                "method": request.method.decode(),
                "uri": request.uri.decode("latin-1"),
                "headers": {
                    k.decode().lower(): [v.decode("latin-1") for v in vs]
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                },
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "body_length": len(body),
            }
        return json.dumps(document).encode()


def listen_provider(reactor: Any, pki: DevelopmentPKI, resource: Resource | None = None,
                    host_index: int = 0) -> Any:
    """
    Start a provider on an ephemeral loopback port that only accepts
    clients holding a certificate from the demo CA.
    """
    cert = pki.path(f"provider-{host_index}.pem").read_bytes()
    key = pki.path(f"provider-{host_index}.key").read_bytes()
    options = PrivateCertificate.loadPEM(cert + key).options(
        Certificate.loadPEM(pki.path(DevelopmentPKI.ca).read_bytes())
    )
    options.raiseMinimumTo = TLSVersion.TLSv1_2
    site = Site(resource if resource is not None else EchoProvider())
    return reactor.listenTCP(0, TLSMemoryBIOFactory(options, False, site), interface="127.0.0.1")


def demo_config(root: Path, pki: DevelopmentPKI, provider_port: int,
                listen: str = "tcp:8443:interface=127.0.0.1",
                admin: str | None = "tcp:8081:interface=127.0.0.1") -> Config:
    """
    The configuration of the embedded demo.
    """
    certs = pki.directory
    return Config(
        listen=ListenConfig(endpoint=listen),
        tls=ServerTLSConfig(
            certificate=certs / "proxy.pem",
            private_key=certs / "proxy.key",
            client_ca=certs / DevelopmentPKI.ca,
            crls=(certs / DevelopmentPKI.crl,),
        ),
        upstream=UpstreamConfig(
            certificate=certs / "proxy-client.pem",
            private_key=certs / "proxy-client.key",
            ca=certs / DevelopmentPKI.ca,
            resolve={f"{PROVIDER_HOST}:443": f"127.0.0.1:{provider_port}"},
        ),
        directory=DirectoryConfig(kind="ldif", ldif=DEMO_LDIF),
        throttle=ThrottleConfig(consumer=LimitSet(default=CONSUMER_LIMIT)),
        audit=AuditConfig(directory=root / "var" / "audit", key_file=certs / AUDIT_KEY),
        agreements=(Agreement(sender=CONSUMER_ASID, receiver=PROVIDER_ASID),),
        admin=AdminConfig(endpoint=admin),
    )


def bearer_token(now: float, audience: str = PROVIDER_ENDPOINT) -> str:
    """
    An unsigned GP Connect token for the demo consumer, valid from C{now}.
    """
    issued = int(now)
    claims = {
        "iss": "https://gpc001.ssp-demo.test/",
        "sub": "1",
        "aud": audience,
        "exp": issued + 300,
        "iat": issued,
        "reason_for_request": "directcare",
        "requested_scope": "organization/*.read",
        "requesting_device": {
            "resourceType": "Device",
            "identifier": [{"system": "https://gpc001.ssp-demo.test/Id/device", "value": "demo"}],
            "model": "SSP demo",
            "version": "1.0",
        },
        "requesting_organization": {
            "resourceType": "Organization",
            "name": "Demo Consumer Practice",
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": CONSUMER_ODS}
            ],
        },
        "requesting_practitioner": {
            "resourceType": "Practitioner",
            "id": "1",
            "name": [{"family": "Demo", "given": ["Dana"], "prefix": ["Dr"]}],
            "identifier": [
                {"system": "https://fhir.nhs.uk/Id/sds-user-id", "value": "G13579135"},
                {"system": "https://fhir.nhs.uk/Id/sds-role-profile-id", "value": "UNK"},
            ],
        },
    }
    header = {"alg": "none", "typ": "JWT"}
    return f"{_b64(header)}.{_b64(claims)}."


def _b64(document: dict[str, Any]) -> str:
    raw = json.dumps(document, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def curl_line(pki: DevelopmentPKI, proxy_port: int, python: str = sys.executable) -> str:
    """
    A curl command that reads the demo provider's metadata through the
    proxy with the demo consumer's certificate and a fresh token, showing
    the response headers (C{X-Rate-Limit-*} among them).
    """
    certs = pki.directory.resolve()
    q = shlex.quote
    return " ".join([
        "curl -sS -i",
        "--cacert", q(str(certs / DevelopmentPKI.ca)),
        "--cert", q(str(certs / "consumer-0.pem")),
        "--key", q(str(certs / "consumer-0.key")),
        "-H", q(f"Ssp-TraceID: {uuid.UUID(int=0x5a5)}"),
        "-H", q(f"Ssp-From: {CONSUMER_ASID}"),
        "-H", q(f"Ssp-To: {PROVIDER_ASID}"),
        "-H", q(f"Ssp-InteractionID: {METADATA_INTERACTION}"),
        "-H", f'"Authorization: Bearer $({q(python)} -m ssp.demo token)"',
        q(f"https://localhost:{proxy_port}/{PROVIDER_ENDPOINT}/metadata"),
    ])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["token"]:
        import time

        print(bearer_token(time.time()))
        return 0
    print("usage: python -m ssp.demo token", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
