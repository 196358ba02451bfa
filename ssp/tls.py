# -*- test-case-name: tests.test_proxy,tests.test_bulk_tls -*-
"""
Transport security on both legs.

Inbound, the handshake asks for a client certificate but lets an absent or
invalid one through, recording OpenSSL's verdict; the HTTP layer then
answers 496 or 495 with an OperationOutcome (SPEC §9.3), so the consumer
learns why and the attempt is audited.  Plain HTTP on the TLS port is
answered with 497.  Outbound, one TLS client creator per provider host is
built once and reused (Twisted #9138: building one per request halves
throughput).
"""

from __future__ import annotations

import hashlib
import weakref
from pathlib import Path
from typing import Any, Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL.SSL import WantReadError, ZeroReturnError
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from ssp.config import ServerTLSConfig, UpstreamConfig
from ssp.errors import CertificateInvalid, CertificateRequired, PlainHTTP, operation_outcome
from ssp.model import ClientIdentity

log = Logger()

_TLS_RECORD_HANDSHAKE = 0x16
# Distinct client certificates whose parsed identity is remembered: a
# consumer reconnecting skips parsing its certificate again.
IDENTITY_CACHE_SIZE = 1024


def read_pem(path: Path) -> bytes:
    """
    A PEM file's bytes; the error names the file (OpenSSL's would not).
    """
    try:
        return path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from e


def read_certificates(path: Path) -> list[x509.Certificate]:
    """
    Every certificate in a PEM bundle.
    """
    data = read_pem(path)
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ValueError(f"{path}: no certificate found") from e


def read_private_key(path: Path) -> crypto.PKey:
    """
    An unencrypted PEM private key.
    """
    data = read_pem(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: not an unencrypted PEM private key") from e
    return crypto.PKey.from_cryptography_key(key)  # type: ignore[arg-type]  # others raise


def _server_context(config: ServerTLSConfig, verify: Callable[..., bool]) -> SSL.Context:
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
    )
    context.set_cipher_list(config.ciphers.encode("ascii"))
    chain = read_certificates(config.certificate)
    context.use_certificate(crypto.X509.from_cryptography(chain[0]))
    for extra in chain[1:]:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    context.use_privatekey(read_private_key(config.private_key))
    context.check_privatekey()
    store = context.get_cert_store()
    assert store is not None  # a new context always has one
    authorities = read_certificates(config.client_ca)
    for authority in authorities:
        store.add_cert(crypto.X509.from_cryptography(authority))
    if config.crls:
        for crl_path in config.crls:
            for crl in read_crls(crl_path):
                store.add_crl(crl)
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    context.set_client_ca_list(
        [crypto.X509.from_cryptography(a).get_subject() for a in authorities]
    )
    context.set_session_id(b"ssp")
    context.set_verify(SSL.VERIFY_PEER, verify)
    return context


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """
    Every CRL in a PEM file.
    """
    data = read_pem(path)
    marker = b"-----END X509 CRL-----"
    pieces = [p + marker for p in data.split(marker) if p.strip()]
    if not pieces:
        raise ValueError(f"{path}: no CRL found")
    return [x509.load_pem_x509_crl(p) for p in pieces]


@implementer(interfaces.IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Creates inbound TLS connections from the current server context, which
    L{reload} replaces atomically: connections already open keep theirs.
    """

    def __init__(self, config: ServerTLSConfig) -> None:
        self._verdicts: weakref.WeakKeyDictionary[SSL.Connection, int] = (
            weakref.WeakKeyDictionary()
        )
        self._identities: weakref.WeakKeyDictionary[SSL.Connection, ClientIdentity] = (
            weakref.WeakKeyDictionary()
        )
        self._by_certificate: dict[bytes, ClientIdentity] = {}
        self._context = _server_context(config, self._record_verdict)

    def reload(self, config: ServerTLSConfig) -> None:
        """
        Load new certificates, CAs and CRLs; raises without changing anything
        if they are unusable.
        """
        self._context = _server_context(config, self._record_verdict)

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def _record_verdict(
        self, connection: SSL.Connection, certificate: crypto.X509, error: int, depth: int, ok: int
    ) -> bool:
        if not ok and connection not in self._verdicts:
            self._verdicts[connection] = error
        return True

    def client_identity(self, connection: SSL.Connection | None) -> ClientIdentity:
        """
        The verified client certificate of a connection.

        @raise CertificateRequired: none was presented (496).
        @raise CertificateInvalid: it failed verification (495).
        """
        if connection is None:
            raise CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        known = self._identities.get(connection)
        if known is not None:
            return known
        peer = connection.get_peer_certificate()
        if peer is None:
            raise CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        error = self._verdicts.get(connection)
        if error is not None:
            raise CertificateInvalid(f"CLIENT_CERTIFICATE_INVALID_{_verify_reason(error)}")
        identity = self._identity_of(peer)
        self._identities[connection] = identity
        return identity

    def verify_pem(self, pem: bytes) -> ClientIdentity:
        """
        Verify a PEM certificate (leaf first, then any intermediates)
        against the current client CAs and CRLs as a handshake would, for
        C{ssp explain}: the same verdicts as L{client_identity}.

        @raise CertificateInvalid: it fails verification (495).
        @raise ValueError: C{pem} holds no certificate.
        """
        leaf, *chain = x509.load_pem_x509_certificates(pem)
        store = self._context.get_cert_store()
        assert store is not None
        context = crypto.X509StoreContext(
            store,
            crypto.X509.from_cryptography(leaf),
            [crypto.X509.from_cryptography(c) for c in chain],
        )
        try:
            context.verify_certificate()
        except crypto.X509StoreContextError as e:
            raise CertificateInvalid(
                f"CLIENT_CERTIFICATE_INVALID_{_verify_reason(e.errors[0])}"
            ) from e
        return identity_of(leaf)

    def _identity_of(self, peer: crypto.X509) -> ClientIdentity:
        """
        L{identity_of}, remembered by the certificate's DER bytes (dumping
        them costs a tenth of parsing the certificate); the oldest entry
        goes when the cache is full.
        """
        der = crypto.dump_certificate(crypto.FILETYPE_ASN1, peer)
        identity = self._by_certificate.get(der)
        if identity is None:
            identity = identity_of(peer.to_cryptography())
            if len(self._by_certificate) >= IDENTITY_CACHE_SIZE:
                del self._by_certificate[next(iter(self._by_certificate))]
            self._by_certificate[der] = identity
        return identity


_VERIFY_REASONS = {
    10: "EXPIRED",
    9: "NOT_YET_VALID",
    23: "REVOKED",
    2: "UNTRUSTED",
    20: "UNTRUSTED",
    21: "UNTRUSTED",
    18: "UNTRUSTED",
    19: "UNTRUSTED",
    7: "BAD_SIGNATURE",
    3: "CRL_UNAVAILABLE",
    12: "CRL_EXPIRED",
}


def _verify_reason(error: int) -> str:
    return _VERIFY_REASONS.get(error, f"VERIFY_ERROR_{error}")


def identity_of(certificate: x509.Certificate) -> ClientIdentity:
    """
    The subject, SHA-256 fingerprint and DNS names (SAN, or CN when there
    is no SAN) of a certificate.
    """
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = tuple(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = tuple(
            str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        )
    der = certificate.public_bytes(serialization.Encoding.DER)
    return ClientIdentity(
        subject=certificate.subject.rfc4514_string(),
        fingerprint=hashlib.sha256(der).hexdigest(),
        dns_names=names,
    )


class _TLSOrPlain(Protocol):
    """
    Looks at the first byte of a connection: a TLS handshake record goes
    on to TLS; anything else is answered with a plain-HTTP 497 and closed.
    """

    def __init__(self, factory: TLSOrPlainFactory) -> None:
        self._factory = factory
        self._tls: TLSMemoryBIOProtocol | None = None
        self._silence: IDelayedCall | None = None

    def connectionMade(self) -> None:
        # Until its first byte a connection is invisible to the site's
        # limits and timers: a silent one is cut off here.
        factory = self._factory
        self._silence = factory.clock.callLater(factory.first_byte_timeout,
                                                self.transport.abortConnection)

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
            return
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        if data[0] != _TLS_RECORD_HANDSHAKE:
            self._factory.refuse_plain(self.transport)
            return
        self._tls = self._factory.tls.buildProtocol(self.transport.getPeer())
        if self._tls is None:
            self.transport.loseConnection()
            return
        self._tls.makeConnection(self.transport)
        self._tls.dataReceived(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        if self._tls is None:
            return
        handle = self._tls.getHandle()
        if handle.get_peer_finished() is None:
            self._factory.on_handshake_failure(self.transport.getPeer(), reason)
        self._tls.connectionLost(reason)


class TLSOrPlainFactory(Factory):
    """
    The listening factory: TLS for the site, 497 for plain HTTP, and hooks
    for handshakes that fail and plain requests (audited by the service).

    @ivar first_byte_timeout: seconds a new connection may stay silent
        before it is aborted (unaudited: nothing was said).
    """

    def __init__(
        self,
        tls: TLSMemoryBIOFactory,
        hsts: bytes,
        clock: IReactorTime,
        first_byte_timeout: float,
        on_handshake_failure: Callable[[object, Failure], None] = lambda peer, reason: None,
        on_plain_http: Callable[[object], None] = lambda peer: None,
    ) -> None:
        self.tls = tls
        self.hsts = hsts
        self.clock = clock
        self.first_byte_timeout = first_byte_timeout
        self.on_handshake_failure = on_handshake_failure
        self.on_plain_http = on_plain_http

    def buildProtocol(self, addr: object) -> _TLSOrPlain:
        return _TLSOrPlain(self)

    def doStart(self) -> None:
        self.tls.doStart()

    def doStop(self) -> None:
        self.tls.doStop()

    def refuse_plain(self, transport: interfaces.ITransport | None) -> None:
        content_type, body = operation_outcome(PlainHTTP("HTTP_REQUEST_SENT_TO_HTTPS_PORT"))
        transport.write(
            b"HTTP/1.1 497 HTTP Request Sent to HTTPS Port\r\n"
            b"Content-Type: " + content_type + b"\r\n"
            b"Content-Length: %d\r\n"
            b"Strict-Transport-Security: %s\r\n"
            b"Connection: close\r\n\r\n" % (len(body), self.hsts) + body
        )
        transport.loseConnection()
        self.on_plain_http(transport.getPeer())


class UpstreamTLS:
    """
    Mutual TLS towards providers: the proxy's client certificate, the
    provider's chain verified against the configured CAs and its name
    checked by service-identity.  One creator per host, built on first use.
    """

    def __init__(self, config: UpstreamConfig) -> None:
        self._trust = trustRootFromCertificates(
            [Certificate.loadPEM(c.public_bytes(serialization.Encoding.PEM))
             for c in read_certificates(config.ca)]
        )
        self._client = PrivateCertificate.loadPEM(
            read_pem(config.certificate) + read_pem(config.private_key)
        )
        self._creators: dict[str, interfaces.IOpenSSLClientConnectionCreator] = {}

    def creator_for(self, hostname: str) -> interfaces.IOpenSSLClientConnectionCreator:
        creator = self._creators.get(hostname)
        if creator is None:
            creator = optionsForClientTLS(
                hostname,
                trustRoot=self._trust,
                clientCertificate=self._client,
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2},
            )
            self._creators[hostname] = creator
        return creator


# The largest plaintext of one TLS record, and what a record adds to it
# (TLS 1.2 AES-GCM: header, explicit nonce, tag; TLS 1.3 adds less).
_RECORD = 16 * 1024
_RECORD_OVERHEAD = 64
# How much plaintext is moved per call between TLS and the application:
# four records, small enough that each copy stays in the CPU's cache (a
# larger size measured slower, a smaller one spends more calls).
BULK_SIZE = 64 * 1024


class BulkTLSProtocol(BufferingTLSTransport):
    """
    Twisted's TLS transport, moving data C{BULK_SIZE} at a time rather than
    a TLS record (16 KiB) at a time.

    Twisted hands the application each record's plaintext separately and
    encrypts a large write one record per C{SSL_write}, reading the send
    BIO after each.  Relaying a streamed body then ran the HTTP parser, the
    relay, the server's write path and a socket write per record on each
    side: most of the proxy's CPU on a large body (docs/performance.md).
    Here what one socket read decrypts to reaches the application up to
    C{BULK_SIZE} per C{dataReceived}, and a write is read out of the send
    BIO up to C{BULK_SIZE} of plaintext at a time: about a third less CPU
    per streamed GiB.  What is held is still bounded by one socket read
    and one application write.
    """

    def _flushReceiveBIO(self) -> None:
        received: list[bytes] = []
        size = 0
        while not self._lostTLSConnection:
            try:
                piece = self._tlsConnection.recv(2 * _RECORD)
                received.append(piece)
                size += len(piece)
                if size >= BULK_SIZE:
                    self._deliver(received)
                    size = 0
            except WantReadError:
                break
            except ZeroReturnError:
                self._deliver(received)
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except SSL.Error:
                failure = Failure()
                self._deliver(received)
                self._tlsShutdownFinished(failure)
        self._deliver(received)
        self._flushSendBIO()

    def _deliver(self, received: list[bytes]) -> None:
        if received and not self._aborted:
            ProtocolWrapper.dataReceived(self, b"".join(received))
        received.clear()

    def _write(self, data: bytes) -> None:
        if self._lostTLSConnection:
            return
        view = memoryview(data)
        sent = flushed = 0
        try:
            while sent < len(view):
                sent += self._tlsConnection.send(view[sent:])
                if sent - flushed >= BULK_SIZE:
                    self._flushSendBIO(sent - flushed)
                    flushed = sent
        except WantReadError:
            self._flushSendBIO(sent - flushed)
            self._bufferedWrite(bytes(view[sent:]))
            return
        except SSL.Error:
            failure = Failure()
            self._flushSendBIO(sent - flushed)
            self._tlsShutdownFinished(failure)
            return
        self._flushSendBIO(sent - flushed)

    def _flushSendBIO(self, plaintext: int = 0) -> None:
        """
        Write everything in the send BIO to the transport at once:
        C{plaintext} bytes were just encrypted into it (or a handshake or
        alert is waiting, for which 32 KiB is read at a time).
        """
        size = max(2 * _RECORD, plaintext + (plaintext // _RECORD + 1) * _RECORD_OVERHEAD)
        pieces: list[bytes] = []
        while True:
            try:
                piece = self._tlsConnection.bio_read(size)
            except WantReadError:
                break
            pieces.append(piece)
            if len(piece) < size:
                break
        if pieces:
            self.transport.write(b"".join(pieces))


class BulkTLSFactory(TLSMemoryBIOFactory):
    """
    L{TLSMemoryBIOFactory} building L{BulkTLSProtocol}s.
    """

    protocol = BulkTLSProtocol


@implementer(interfaces.IStreamClientEndpoint)
class BulkTLSEndpoint:
    """
    C{wrapClientTLS}, with L{BulkTLSProtocol}: TLS over C{endpoint}.
    """

    def __init__(self, creator: interfaces.IOpenSSLClientConnectionCreator,
                 endpoint: interfaces.IStreamClientEndpoint) -> None:
        self._creator = creator
        self._endpoint = endpoint

    def connect(self, factory: interfaces.IProtocolFactory) -> Deferred[interfaces.IProtocol]:
        connecting = self._endpoint.connect(BulkTLSFactory(self._creator, True, factory))
        def unwrap(tls: Any) -> interfaces.IProtocol:
            return tls.wrappedProtocol

        return connecting.addCallback(unwrap)
