# -*- test-case-name: tests.test_tls_identity,tests.test_pipeline -*-
"""
Transport security on both legs.

Inbound, the handshake asks for a client certificate but lets an absent or
invalid one through; each request then has the certificate chain verified
against the current CAs and CRLs (whole chain), whether its TLS session
was new or resumed, and the HTTP layer answers 496 or 495 with an
OperationOutcome (SPEC §9.3), so the consumer learns why and the attempt
is audited.  Plain HTTP on the TLS port is answered with 497.  Outbound, one TLS client creator per provider host is
built once and reused (Twisted #9138: building one per request halves
throughput).
"""

from __future__ import annotations

import datetime
import hashlib
import math
import typing
import weakref
from pathlib import Path
from typing import Any, Callable

import attrs
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from OpenSSL.SSL import WantReadError, ZeroReturnError
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL._util import make_assert
from twisted.internet import interfaces
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import (
    Certificate,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
    trustRootFromCertificates,
)
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from ssp.config import ServerTLSConfig, UpstreamConfig
from ssp.errors import CertificateInvalid, CertificateRequired, PlainHTTP, operation_outcome
from ssp.model import ClientIdentity

log = Logger()

_TLS_RECORD_HANDSHAKE = 0x16
_openssl_assert = make_assert(crypto.Error)
# Distinct client certificate chains whose good verdict is remembered: a
# consumer reconnecting is not verified again while nothing changed.
VERDICT_CACHE_SIZE = 1024
# Seconds a TLS session stays resumable (from the server's cache).
SESSION_LIFETIME = 3600


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
    return crypto.PKey.from_cryptography_key(key)


def _server_context(config: ServerTLSConfig) -> SSL.Context:
    """
    The inbound TLS context.  It asks for a client certificate and takes
    whatever is presented: the verdict is reached per request by
    L{ServerTLS.client_identity}, never here (a resumed session skips the
    handshake's verification).  Stateless tickets are off: a ticket does
    not carry the intermediates a client sent, while a session kept in
    this process's cache does, so a resumed connection is verified over
    the same chain as its first (C{docs/performance.md}).  A client closing
    without TLS's close_notify (most HTTP clients) leaves its session
    resumable, as TLS 1.1+ allows: OpenSSL would otherwise drop it from the
    cache; the HTTP framing, not the TLS close, says whether a request
    arrived whole.
    """
    context = SSL.Context(SSL.TLS_SERVER_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(
        SSL.OP_NO_COMPRESSION | SSL.OP_CIPHER_SERVER_PREFERENCE | SSL.OP_NO_RENEGOTIATION
        | SSL.OP_NO_TICKET | SSL.OP_IGNORE_UNEXPECTED_EOF
    )
    context.set_cipher_list(config.ciphers.encode("ascii"))
    chain = read_certificates(config.certificate)
    context.use_certificate(crypto.X509.from_cryptography(chain[0]))
    for extra in chain[1:]:
        context.add_extra_chain_cert(crypto.X509.from_cryptography(extra))
    context.use_privatekey(read_private_key(config.private_key))
    context.check_privatekey()
    context.set_client_ca_list(
        [crypto.X509.from_cryptography(a).get_subject() for a in read_certificates(config.client_ca)]
    )
    context.set_session_id(b"ssp")
    context.set_timeout(SESSION_LIFETIME)
    context.set_verify(SSL.VERIFY_PEER, _take_any_certificate)
    return context


def _take_any_certificate(connection: SSL.Connection, certificate: crypto.X509, error: int,
                          depth: int, ok: int) -> bool:
    return True


@attrs.frozen
class CRLFile:
    """
    A configured CRL file and the earliest nextUpdate of the CRLs in it.
    """

    path: Path
    next_update: float


def read_crls(path: Path) -> list[x509.CertificateRevocationList]:
    """
    Every CRL in a PEM file; the error names the file.
    """
    data = read_pem(path)
    marker = b"-----END X509 CRL-----"
    pieces = [p + marker for p in data.split(marker) if p.strip()]
    if not pieces:
        raise ValueError(f"{path}: no CRL found")
    try:
        return [x509.load_pem_x509_crl(p) for p in pieces]
    except ValueError as e:
        raise ValueError(f"{path}: not a PEM CRL: {e}") from e


def fresh_crls(path: Path, now: float) -> tuple[list[x509.CertificateRevocationList], CRLFile]:
    """
    L{read_crls}, refused (the error names the file) when a CRL is past its
    nextUpdate or not yet issued at C{now}: OpenSSL would then refuse every
    consumer (C{CRL_EXPIRED}, C{CRL_NOT_YET_VALID}).
    """
    crls = read_crls(path)
    next_updates = []
    for crl in crls:
        if crl.last_update_utc.timestamp() > now:
            raise ValueError(f"{path}: not yet valid (lastUpdate "
                             f"{crl.last_update_utc:%Y-%m-%d %H:%M} UTC)")
        next_update = crl.next_update_utc
        if next_update is not None:
            if next_update.timestamp() <= now:
                raise ValueError(f"{path}: expired (nextUpdate {next_update:%Y-%m-%d %H:%M} UTC)")
            next_updates.append(next_update.timestamp())
    return crls, CRLFile(path, min(next_updates, default=math.inf))


class ClientTrust:
    """
    What consumer certificates are verified against: the configured CAs
    and CRLs of one configuration.  With CRLs configured, every
    certificate of the chain (leaf and intermediates) must be covered by a
    current CRL of its issuer and absent from it.

    @ivar crl_files: each CRL file with its earliest nextUpdate.
    @ivar valid_until: when the first CRL expires (infinity without CRLs).
    """

    def __init__(self, config: ServerTLSConfig, now: float) -> None:
        self._authorities = [crypto.X509.from_cryptography(a)
                             for a in read_certificates(config.client_ca)]
        self._crls = []
        files = []
        for path in config.crls:
            crls, crl_file = fresh_crls(path, now)
            self._crls += [_openssl_crl(crl) for crl in crls]
            files.append(crl_file)
        self.crl_files = tuple(files)
        self.valid_until = min((f.next_update for f in files), default=math.inf)
        self._store: tuple[int, crypto.X509Store] | None = None

    def verify(self, leaf: crypto.X509, intermediates: list[crypto.X509],
               now: float) -> list[crypto.X509]:
        """
        The verified chain of C{leaf} (with the intermediates its holder
        sent) at time C{now}.

        @raise CertificateInvalid: naming OpenSSL's reason.
        """
        try:
            context = crypto.X509StoreContext(self._store_at(int(now)), leaf, intermediates)
            return context.get_verified_chain()
        except crypto.X509StoreContextError as e:
            reason = _verify_reason(e.errors[0])
            raise CertificateInvalid(f"CLIENT_CERTIFICATE_INVALID_{reason}") from None

    def _store_at(self, second: int) -> crypto.X509Store:
        """
        A store of the CAs and CRLs verifying at C{second}.  A store's time
        can be set only once (OpenSSL keeps the first), so each second that
        sees a verification gets a new one: cheap, as the CRLs are parsed
        once, here only referenced.
        """
        if self._store is not None and self._store[0] == second:
            return self._store[1]
        store = crypto.X509Store()
        for authority in self._authorities:
            store.add_cert(authority)
        # pyOpenSSL would parse each CRL again (40 ms for 20,000 entries);
        # the store takes a reference to the parsed one instead.
        for crl in self._crls:
            _openssl_assert(_lib.X509_STORE_add_crl(store._store, crl) == 1)
        if self._crls:
            store.set_flags(crypto.X509StoreFlags.CRL_CHECK | crypto.X509StoreFlags.CRL_CHECK_ALL)
        # As OpenSSL's handshake does for a server: the chain must be fit
        # for TLS client authentication (extended key usage).  pyOpenSSL
        # has no public call for it.
        _openssl_assert(_lib.X509_STORE_set_purpose(store._store, _lib.X509_PURPOSE_SSL_CLIENT)
                        == 1)
        store.set_time(datetime.datetime.fromtimestamp(second, datetime.timezone.utc))
        self._store = (second, store)
        return store


def _openssl_crl(crl: x509.CertificateRevocationList) -> Any:
    """
    C{crl} parsed by OpenSSL, freed with the last reference to it.
    """
    der = crl.public_bytes(serialization.Encoding.DER)
    bio = _ffi.gc(_lib.BIO_new_mem_buf(der, len(der)), _lib.BIO_free)
    parsed = _lib.d2i_X509_CRL_bio(bio, _ffi.NULL)
    _openssl_assert(parsed != _ffi.NULL)
    return _ffi.gc(parsed, _lib.X509_CRL_free)


@attrs.frozen
class _Verdict:
    """
    A good verdict on a client certificate chain: it stands while the trust
    it was reached under is the current one, until a certificate of the
    chain or a CRL expires.
    """

    identity: ClientIdentity
    trust: ClientTrust
    until: float

    def stands(self, trust: ClientTrust, now: float) -> bool:
        return self.trust is trust and now < self.until


@implementer(interfaces.IOpenSSLServerConnectionCreator)
class ServerTLS:
    """
    Creates inbound TLS connections from the current server context and
    judges their client certificates against the current L{ClientTrust};
    L{reload} replaces both atomically.

    @ivar trust: the CAs and CRLs in force.
    """

    def __init__(self, config: ServerTLSConfig, clock: IReactorTime) -> None:
        self._clock = clock
        self._verdicts: weakref.WeakKeyDictionary[SSL.Connection, _Verdict] = (
            weakref.WeakKeyDictionary()
        )
        self._good: dict[tuple[bytes, ...], _Verdict] = {}
        self._context, self.trust = self._load(config)

    def _load(self, config: ServerTLSConfig) -> tuple[SSL.Context, ClientTrust]:
        return _server_context(config), ClientTrust(config, self._clock.seconds())

    def reload(self, config: ServerTLSConfig) -> None:
        """
        Load new certificates, CAs and CRLs; raises without changing anything
        if they are unusable.  Every open connection's certificate is judged
        again, against the new CAs and CRLs, on its next request.
        """
        self._context, self.trust = self._load(config)
        self._good.clear()

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        return connection

    def client_identity(self, connection: SSL.Connection | None) -> ClientIdentity:
        """
        The client certificate of a connection, verified for this request:
        against the current CAs and CRLs, at the current time, over the
        chain its holder sent (kept with a resumed session).  Nothing but a
        good verdict admits.

        @raise CertificateRequired: none was presented (496).
        @raise CertificateInvalid: it failed verification (495).
        """
        if connection is None:
            raise CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        now = self._clock.seconds()
        verdict = self._verdicts.get(connection)
        if verdict is None or not verdict.stands(self.trust, now):
            verdict = self._verdict(connection, now)
            self._verdicts[connection] = verdict
        return verdict.identity

    def _verdict(self, connection: SSL.Connection, now: float) -> _Verdict:
        """
        L{ClientTrust.verify} of the connection's chain; a good verdict is
        remembered by the chain's DER bytes (dumping them costs a
        fiftieth of verifying), so a consumer reconnecting is not verified
        again.  The oldest entry goes when the cache is full.
        """
        peer = connection.get_peer_certificate()
        if peer is None:
            raise CertificateRequired("CLIENT_CERTIFICATE_REQUIRED")
        intermediates = connection.get_peer_cert_chain() or []
        key = tuple(crypto.dump_certificate(crypto.FILETYPE_ASN1, c)
                    for c in [peer, *intermediates])
        trust = self.trust
        known = self._good.get(key)
        if known is not None and known.stands(trust, now):
            return known
        chain = trust.verify(peer, intermediates, now)
        expiry = min(c.to_cryptography().not_valid_after_utc.timestamp() for c in chain)
        verdict = _Verdict(identity_of(peer.to_cryptography()), trust,
                           min(expiry, trust.valid_until))
        if len(self._good) >= VERDICT_CACHE_SIZE:
            del self._good[next(iter(self._good))]
        self._good[key] = verdict
        return verdict


_VERIFY_REASONS = {
    10: "EXPIRED",
    9: "NOT_YET_VALID",
    23: "REVOKED",
    2: "UNTRUSTED",
    20: "UNTRUSTED",
    21: "UNTRUSTED",
    18: "UNTRUSTED",
    19: "UNTRUSTED",
    24: "UNTRUSTED",
    7: "BAD_SIGNATURE",
    3: "CRL_UNAVAILABLE",
    8: "CRL_BAD_SIGNATURE",
    11: "CRL_NOT_YET_VALID",
    12: "CRL_EXPIRED",
    26: "NOT_FOR_CLIENT_AUTH",
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


class ConnectionCounter(typing.Protocol):
    """
    What L{TLSOrPlainFactory} needs of the connection caps
    (L{ssp.channel.ConnectionCaps}).
    """

    def open(self, address: str | None) -> bool: ...

    def identify(self, address: str) -> bool: ...

    def close(self, address: str | None) -> None: ...


class _Uncounted:
    """
    No caps.
    """

    def open(self, address: str | None) -> bool:
        return True

    def identify(self, address: str) -> bool:
        return True

    def close(self, address: str | None) -> None:
        pass


def host_of(address: object) -> str:
    """
    The host of an L{IAddress} (the key of the per-address cap).
    """
    return str(getattr(address, "host", ""))


class _TLSOrPlain(Protocol):
    """
    Looks at the first byte of a connection: a TLS handshake record goes
    on to TLS; anything else is answered with a plain-HTTP 497 and closed.
    """

    def __init__(self, factory: TLSOrPlainFactory) -> None:
        self._factory = factory
        self._tls: Protocol | None = None
        self._silence: IDelayedCall | None = None
        self._admitted = False
        self._address: str | None = None

    def connectionMade(self) -> None:
        # Counted against the connection caps from now on; until its first
        # byte it is invisible to the site's timers: a silent one is cut
        # off here.
        factory = self._factory
        if not factory.proxy_protocol:
            self._address = host_of(self.transport.getPeer())
        if not factory.caps.open(self._address):
            self._refuse()
            return
        self._admitted = True
        self._silence = factory.clock.callLater(factory.first_byte_timeout,
                                                self.transport.abortConnection)

    def _refuse(self) -> None:
        self.transport.abortConnection()
        self._factory.on_refused(self.transport.getPeer())

    def dataReceived(self, data: bytes) -> None:
        if self._tls is not None:
            self._tls.dataReceived(data)
            return
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        if self._address is None:
            # Behind the PROXY protocol: the header has named the consumer.
            address = host_of(self.transport.getPeer())
            if not self._factory.caps.identify(address):
                self._refuse()
                return
            self._address = address
        if data[0] != _TLS_RECORD_HANDSHAKE:
            self._factory.refuse_plain(self.transport)
            return
        self._tls = self._factory.tls.buildProtocol(self.transport.getPeer())
        if self._tls is None:
            self.transport.loseConnection()
            return
        self._tls.makeConnection(self.transport)
        self._tls.dataReceived(data)

    def connectionLost(self, reason: Failure) -> None:
        if not self._admitted:
            return
        self._factory.caps.close(self._address)
        if self._silence is not None and self._silence.active():
            self._silence.cancel()
        if self._tls is None:
            return
        handle = self._tls.getHandle()
        if handle.get_peer_finished() is None:
            error = getattr(self._tls, "tls_error", None)
            self._factory.on_handshake_failure(self.transport.getPeer(),
                                               reason if error is None else Failure(error))
        self._tls.connectionLost(reason)


def handshake_failure_reason(reason: Failure) -> str:
    """
    Why an inbound handshake failed, for its audit record: OpenSSL's own
    words when it refused (protocol version, cipher, certificate, alert
    from the client), otherwise how the connection ended.
    """
    error = reason.value
    if isinstance(error, SSL.Error):
        # pyOpenSSL's args: one list of (library, function, reason) entries.
        entries = error.args[0] if error.args and isinstance(error.args[0], list) else []
        text = "; ".join(str(entry[-1]) for entry in entries) or str(error)
        return f"TLS_HANDSHAKE_FAILED: {text}"[:200]
    return f"TLS_HANDSHAKE_INCOMPLETE: {reason.getErrorMessage()}"[:200]


class TLSOrPlainFactory(Factory):
    """
    The listening factory: TLS for the site, 497 for plain HTTP, and hooks
    for handshakes that fail and plain requests (audited by the service).

    @ivar first_byte_timeout: seconds a new connection may stay silent
        before it is aborted (unaudited: nothing was said).
    @ivar caps: counts each connection from the moment it is accepted
        (L{ssp.channel.ConnectionCaps}); one it refuses is aborted at once
        and handed to C{on_refused}.
    @ivar proxy_protocol: connections come through the PROXY protocol, so
        the consumer's address is known at the first byte, not at accept.
    """

    def __init__(
        self,
        tls: TLSMemoryBIOFactory,
        hsts: bytes,
        clock: IReactorTime,
        first_byte_timeout: float,
        on_handshake_failure: Callable[[object, Failure], None] = lambda peer, reason: None,
        on_plain_http: Callable[[object], None] = lambda peer: None,
        caps: ConnectionCounter | None = None,
        proxy_protocol: bool = False,
        on_refused: Callable[[object], None] = lambda peer: None,
    ) -> None:
        self.tls = tls
        self.hsts = hsts
        self.clock = clock
        self.first_byte_timeout = first_byte_timeout
        self.on_handshake_failure = on_handshake_failure
        self.on_plain_http = on_plain_http
        self.caps = caps or _Uncounted()
        self.proxy_protocol = proxy_protocol
        self.on_refused = on_refused

    def buildProtocol(self, addr: object) -> _TLSOrPlain:
        return _TLSOrPlain(self)

    def doStart(self) -> None:
        self.tls.doStart()

    def doStop(self) -> None:
        self.tls.doStop()

    def refuse_plain(self, transport: interfaces.ITransport) -> None:
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

    # The OpenSSL error that ended the connection, if one did (a failed
    # handshake is audited with it).
    tls_error: SSL.Error | None = None

    def _tlsShutdownFinished(self, reason: Failure | None) -> None:
        if reason is not None and isinstance(reason.value, SSL.Error) and self.tls_error is None:
            self.tls_error = reason.value
        super()._tlsShutdownFinished(reason)

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
        return connecting.addCallback(lambda tls: tls.wrappedProtocol)


def send_now(transport: interfaces.ITransport) -> None:
    """
    Hand what a TLS transport holds to the kernel now.

    Twisted's TLS transport keeps small writes until the end of the reactor
    turn, and its TCP transport sends only at the next poll, after every
    other call due in that turn (here: the audit record, the access log).
    At the end of a response or a request that is latency for nothing:
    profiling showed 0.4 ms of the added latency at modest rates here.
    """
    aggregator = getattr(transport, "_aggregator", None)
    if aggregator is not None:
        aggregator.flush()
    tcp = getattr(transport, "transport", None)
    do_write = getattr(tcp, "doWrite", None)
    # A closing connection is left to the reactor, which must see the
    # result of its last write to finish closing it.
    if (do_write is not None and getattr(tcp, "connected", False)
            and not tcp.disconnecting and not getattr(tcp, "_writeDisconnecting", False)):
        # An error leaves the data buffered and the socket registered for
        # writing: the reactor then sees it and closes the connection.
        do_write()
