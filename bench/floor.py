#!/usr/bin/env python3
"""
The floor of our stack: a bare C{twisted.web} relay with the proxy's two
mutual-TLS legs and nothing else (no Spine checks, no audit, no access log,
no metrics).  C{bench/run.py} runs it beside nginx and the proxy, so that
the proxy's cost is reported as a ratio to what Twisted itself needs for
the same hop.

Inbound it requires a client certificate from the demo CA, checked against
the demo CRL, TLS 1.2+; outbound it presents the proxy's client certificate
over an C{HTTPConnectionPool} of keep-alive connections and verifies the
provider's name, as C{ssp} does.  The proxied target is carried in the path
(C{/https://host/...}) and sent to the provider at C{127.0.0.1:PORT}.  The
response body is relayed as it arrives, with back-pressure.

Usage (from bench/run.py)::

    python bench/floor.py CERTS_DIR PROVIDER_PORT     # prints "PORT n"
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from OpenSSL import SSL, crypto
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import (
    Certificate,
    CertificateOptions,
    PrivateCertificate,
    TLSVersion,
    optionsForClientTLS,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

# RFC 9110 §7.6.1, plus the framing the client re-creates.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
              b"proxy-authorization", b"te", b"trailer", b"upgrade", b"transfer-encoding",
              b"host"}


class Relay(Protocol):
    """
    Writes a provider's body to the consumer's request as it arrives; the
    provider's transport is the request's producer, so a slow consumer
    pauses the provider.
    """

    def __init__(self, request: Any) -> None:
        self.request = request

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        self.request.write(data)

    def connectionLost(self, reason: Any) -> None:
        self.request.unregisterProducer()
        if not self.request._disconnected:
            if not reason.check(ResponseDone, PotentialDataLoss):
                self.request.transport.abortConnection()
                return
            self.request.finish()


class Hop(Resource):
    isLeaf = True

    def __init__(self, agent: Agent) -> None:
        super().__init__()
        self.agent = agent

    def render(self, request: Any) -> Any:
        target = request.uri[1:]
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in HOP_BY_HOP:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"host", [urlsplit(target).netloc])
        d = self.agent.request(request.method, target, headers, None)

        def relay(response: Any) -> None:
            request.setResponseCode(response.code, response.phrase)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            response.deliverBody(Relay(request))

        def failed(_: Any) -> None:
            request.setResponseCode(502)
            request.finish()

        d.addCallbacks(relay, failed)
        request.notifyFinish().addErrback(lambda _: d.cancel())
        return NOT_DONE_YET


class Loopback:
    """
    Every provider host is at C{127.0.0.1:port}; one TLS creator per host.
    """

    def __init__(self, port: int, trust: Certificate, client: PrivateCertificate) -> None:
        self.port, self.trust, self.client = port, trust, client
        self.creators: dict[bytes, Any] = {}

    def endpointForURI(self, uri: Any) -> Any:
        creator = self.creators.get(uri.host)
        if creator is None:
            creator = self.creators[uri.host] = optionsForClientTLS(
                uri.host.decode(), trustRoot=self.trust, clientCertificate=self.client,
                extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2})
        return wrapClientTLS(creator, TCP4ClientEndpoint(reactor, "127.0.0.1", self.port))


def server_options(certs: Path) -> CertificateOptions:
    server = PrivateCertificate.loadPEM(
        (certs / "proxy.pem").read_bytes() + (certs / "proxy.key").read_bytes())
    ca = Certificate.loadPEM((certs / "spine-ca.pem").read_bytes())
    options = CertificateOptions(
        privateKey=server.privateKey.original, certificate=server.original,
        verify=True, caCerts=[ca.original], requireCertificate=True,
        raiseMinimumTo=TLSVersion.TLSv1_2)
    store = options.getContext().get_cert_store()
    store.add_crl(x509.load_pem_x509_crl((certs / "spine-ca.crl.pem").read_bytes()))
    store.set_flags(crypto.X509StoreFlags.CRL_CHECK)
    options.getContext().set_options(SSL.OP_NO_COMPRESSION)
    return options


def main(certs: Path, provider_port: int) -> None:
    pool = HTTPConnectionPool(reactor)
    pool.maxPersistentPerHost = 64
    client = PrivateCertificate.loadPEM(
        (certs / "proxy-client.pem").read_bytes() + (certs / "proxy-client.key").read_bytes())
    trust = Certificate.loadPEM((certs / "spine-ca.pem").read_bytes())
    agent = Agent.usingEndpointFactory(reactor, Loopback(provider_port, trust, client), pool)
    site = Site(Hop(agent))
    site.log = lambda request: None
    port = reactor.listenTCP(0, TLSMemoryBIOFactory(server_options(certs), False, site),
                             backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print(f"PORT {port.getHost().port}", flush=True))
    reactor.run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
