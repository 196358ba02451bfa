# -*- test-case-name: tests.test_pki -*-
"""
A development PKI: a stand-in for the Spine CA and the certificates the
demo and the tests need (proxy server and client, consumers, providers),
plus expired, untrusted and revoked variants and a CRL.

Never used in production, where the Spine PKI issues every certificate.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


@attrs.frozen
class Issued:
    """
    A certificate with its private key.
    """

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str, chain: bytes = b"") -> tuple[Path, Path]:
        """
        Write C{name.pem} (the certificate, then C{chain}: the intermediate
        CAs a client sends with it, or the rest of a CA bundle) and
        C{name.key} (mode 0600).
        """
        cert_path = directory / f"{name}.pem"
        key_path = directory / f"{name}.key"
        cert_path.write_bytes(self.certificate_pem() + chain)
        key_path.touch(mode=0o600)
        key_path.write_bytes(self.key_pem())
        return cert_path, key_path


@attrs.frozen
class Authority:
    """
    A certificate authority able to issue leaf certificates and CRLs.
    """

    issued: Issued

    @classmethod
    def create(cls, name: str, now: datetime.datetime | None = None) -> Authority:
        """
        A self-signed root CA.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        subject = _name(name)
        return cls(Issued(_ca_certificate(subject, key.public_key(), subject, key, now), key))

    def subordinate(self, name: str) -> Authority:
        """
        An intermediate CA issued by this one.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        issuer = self.issued
        certificate = _ca_certificate(_name(name), key.public_key(),
                                      issuer.certificate.subject, issuer.key, None)
        return Authority(Issued(certificate, key))

    def chain_pem(self) -> bytes:
        """
        This CA's certificate as a client sends it after its own (empty for
        a root, which the server holds).
        """
        certificate = self.issued.certificate
        return b"" if certificate.issuer == certificate.subject else self.issued.certificate_pem()

    def issue(
        self,
        common_name: str,
        dns_names: tuple[str, ...] = (),
        ip_addresses: tuple[str, ...] = (),
        server: bool = True,
        client: bool = True,
        valid_days: int = 825,
        not_before: datetime.datetime | None = None,
    ) -> Issued:
        """
        Issue a leaf certificate for C{common_name} with the given SANs.
        """
        start = not_before or (_now() - _DAY)
        key = ec.generate_private_key(ec.SECP256R1())
        usages = [u for u, on in ((ExtendedKeyUsageOID.SERVER_AUTH, server),
                                  (ExtendedKeyUsageOID.CLIENT_AUTH, client)) if on]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.issued.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + valid_days * _DAY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self.issued.key.public_key()
                ),
                critical=False,
            )
        )
        alt_names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns_names]
        alt_names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if alt_names:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        return Issued(builder.sign(self.issued.key, hashes.SHA256()), key)

    @classmethod
    def load(cls, certificate: Path, key: Path) -> Authority:
        """
        A CA written by L{Issued.write}.
        """
        private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
        assert isinstance(private_key, ec.EllipticCurvePrivateKey)
        return cls(Issued(x509.load_pem_x509_certificate(certificate.read_bytes()), private_key))

    def crl(self, revoked: tuple[x509.Certificate, ...] = (),
            last_update: datetime.datetime | None = None,
            next_update: datetime.datetime | None = None) -> bytes:
        """
        A PEM CRL revoking C{revoked}, issued a day ago and valid for a week
        unless told otherwise.
        """
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.issued.certificate.subject)
            .last_update(last_update or now - _DAY)
            .next_update(next_update or now + 7 * _DAY)
        )
        for certificate in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(certificate.serial_number)
                .revocation_date(now - _DAY)
                .build()
            )
        crl = builder.sign(self.issued.key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_certificate(subject: x509.Name, public_key: ec.EllipticCurvePublicKey,
                    issuer: x509.Name, issuer_key: ec.EllipticCurvePrivateKey,
                    now: datetime.datetime | None) -> x509.Certificate:
    now = now or _now()
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _DAY)
        .not_valid_after(now + 3650 * _DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
        .sign(issuer_key, hashes.SHA256())
    )


def self_signed(common_name: str, dns_names: tuple[str, ...]) -> Issued:
    """
    A self-signed client certificate naming C{dns_names}: what an attacker
    mints to claim someone else's FQDN.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    start = _now() - _DAY
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + 825 * _DAY)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns_names]),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


@attrs.frozen
class DevelopmentPKI:
    """
    Every certificate a demo or test deployment needs, written to a
    directory.  Paths are attributes so configurations can point at them.
    """

    directory: Path

    ca = "spine-ca.pem"
    crl = "spine-ca.crl.pem"

    def path(self, name: str) -> Path:
        return self.directory / name


def create_development_pki(
    directory: Path,
    proxy_hosts: tuple[str, ...] = ("localhost",),
    consumers: tuple[str, ...] = ("gpc001.ssp-demo.test",),
    providers: tuple[str, ...] = ("orange.testlab.nhs.uk",),
) -> DevelopmentPKI:
    """
    Generate a development PKI into C{directory}:

      - C{spine-ca.pem}: the trust anchor for both legs, followed by the
        intermediate CAs below (a client CA bundle holds the whole chain, so
        that every CRL is signed by one of its CAs); C{spine-ca.key}, so
        that tests can issue CRLs;
      - C{proxy.pem/.key}: the proxy's server certificate;
      - C{proxy-client.pem/.key}: the proxy's outbound client certificate;
      - C{consumer-<n>.pem/.key} for each consumer FQDN (C{n} from 0);
      - C{provider-<n>.pem/.key} for each provider FQDN;
      - C{consumer-expired}, C{consumer-revoked}, C{consumer-untrusted}
        (issued by another CA) and C{consumer-self-signed} for the first
        consumer FQDN;
      - C{consumer-chained}: the first consumer FQDN under the intermediate
        C{spine-sub-ca.pem/.key}, and C{consumer-revoked-intermediate} under an
        intermediate the root has revoked (each C{.pem} holds the leaf and
        its intermediate, as a client sends them);
      - C{spine-ca.crl.pem}: the root's CRL (revoking C{consumer-revoked}
        and the revoked intermediate) and each intermediate's (empty), so
        that the whole chain can be checked.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca = Authority.create("SSP Development Spine CA")
    sub = ca.subordinate("SSP Development Spine Sub CA")
    revoked_sub = ca.subordinate("SSP Development Revoked Sub CA")
    ca.issued.write(directory, "spine-ca",
                    sub.issued.certificate_pem() + revoked_sub.issued.certificate_pem())
    ip_hosts = tuple(h for h in proxy_hosts if _is_ip(h))
    dns_hosts = tuple(h for h in proxy_hosts if not _is_ip(h))
    ca.issue(proxy_hosts[0], dns_hosts, ip_hosts + ("127.0.0.1",), client=False).write(
        directory, "proxy"
    )
    ca.issue("ssp.ssp-demo.test", ("ssp.ssp-demo.test",), server=False).write(
        directory, "proxy-client"
    )
    for n, fqdn in enumerate(consumers):
        ca.issue(fqdn, (fqdn,), server=False).write(directory, f"consumer-{n}")
    for n, fqdn in enumerate(providers):
        ca.issue(fqdn, (fqdn,), client=False).write(directory, f"provider-{n}")
    first = consumers[0]
    ca.issue(first, (first,), server=False, valid_days=1,
             not_before=_now() - 10 * _DAY).write(directory, "consumer-expired")
    revoked = ca.issue(first, (first,), server=False)
    revoked.write(directory, "consumer-revoked")
    Authority.create("Untrusted CA").issue(first, (first,), server=False).write(
        directory, "consumer-untrusted"
    )
    self_signed(first, (first,)).write(directory, "consumer-self-signed")
    sub.issued.write(directory, "spine-sub-ca")
    sub.issue(first, (first,), server=False).write(directory, "consumer-chained", sub.chain_pem())
    revoked_sub.issue(first, (first,), server=False).write(
        directory, "consumer-revoked-intermediate", revoked_sub.chain_pem()
    )
    (directory / DevelopmentPKI.crl).write_bytes(
        ca.crl((revoked.certificate, revoked_sub.issued.certificate)) + sub.crl()
        + revoked_sub.crl()
    )
    return DevelopmentPKI(directory)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)
