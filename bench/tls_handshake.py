#!/usr/bin/env python3
"""
The server's CPU for one inbound mutual-TLS handshake, full or resumed,
and for judging the client certificate, measured in memory (no sockets,
no HTTP): what resuming a session can save the proxy per new connection.

    python bench/tls_handshake.py [--rounds 300]

Server side: the proxy's own context (L{ssp.tls.ServerTLS}) on the
development PKI.  Client side: pyOpenSSL with C{consumer-0}, offering the
previous session when resuming.  Only the server's calls are timed
(C{time.process_time} around them).  Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from OpenSSL import SSL  # noqa: E402
from twisted.internet import reactor  # noqa: E402

from ssp.config import ServerTLSConfig  # noqa: E402
from ssp.pki import DevelopmentPKI, create_development_pki  # noqa: E402
from ssp.tls import ServerTLS  # noqa: E402


def client_context(pki: DevelopmentPKI, version: int) -> SSL.Context:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(version)
    context.set_max_proto_version(version)
    context.use_certificate_file(str(pki.path("consumer-0.pem")))
    context.use_privatekey_file(str(pki.path("consumer-0.key")))
    context.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return context


def handshake(server_tls: ServerTLS, client_ctx: SSL.Context,
              session: SSL.Session | None) -> tuple[float, SSL.Connection, SSL.Connection]:
    """
    One handshake in memory; returns the server's CPU seconds in it.
    """
    server = server_tls.serverConnectionForTLS(None)
    server.set_accept_state()
    client = SSL.Connection(client_ctx, None)
    client.set_connect_state()
    if session is not None:
        client.set_session(session)
    spent = 0.0
    for _ in range(10):
        try:
            client.do_handshake()
        except SSL.WantReadError:
            pass
        _move(client, server)
        started = time.process_time()
        try:
            server.do_handshake()
            done = True
        except SSL.WantReadError:
            done = False
        spent += time.process_time() - started
        _move(server, client)
        if done and server.get_peer_finished() is not None:
            break
    # The client reads the TLS 1.3 tickets the server sent after its Finished.
    try:
        client.recv(1)
    except SSL.WantReadError:
        pass
    # As after a TLS close on both sides: OpenSSL makes a session
    # unresumable when its connection is freed without one.
    for connection in (server, client):
        connection.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)
    return spent, server, client


def _move(sender: SSL.Connection, receiver: SSL.Connection) -> None:
    try:
        receiver.bio_write(sender.bio_read(65536))
    except SSL.WantReadError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    pki = create_development_pki(Path(tempfile.mkdtemp(prefix="ssp-hs-")))
    config = ServerTLSConfig(certificate=pki.path("proxy.pem"), private_key=pki.path("proxy.key"),
                             client_ca=pki.path(DevelopmentPKI.ca), crls=(pki.path(pki.crl),))
    server_tls = ServerTLS(config, reactor)
    print(f"{'':24} {'server CPU µs (median)':>24} {'resumed':>8}")
    for name, version in (("TLS 1.2", SSL.TLS1_2_VERSION), ("TLS 1.3", SSL.TLS1_3_VERSION)):
        client_ctx = client_context(pki, version)
        for resume in (False, True):
            times, reused, session = [], 0, None
            for _ in range(args.rounds):
                spent, server, client = handshake(server_tls, client_ctx,
                                                  session if resume else None)
                times.append(spent)
                reused += bool(SSL._lib.SSL_session_reused(server._ssl))
                session = client.get_session()
            label = f"{name} {'resumed' if resume else 'full'} handshake"
            print(f"{label:24} {statistics.median(times) * 1e6:24.0f} {reused:8d}")
    server_tls = ServerTLS(config, reactor)
    client_ctx = client_context(pki, SSL.TLS1_3_VERSION)
    for label, fresh in (("verdict, verified", True), ("verdict, cached chain", False)):
        times = []
        for _ in range(args.rounds):
            _, server, _ = handshake(server_tls, client_ctx, None)
            if fresh:
                server_tls._good.clear()
            started = time.process_time()
            server_tls.client_identity(server)
            times.append(time.process_time() - started)
        print(f"{label:24} {statistics.median(times) * 1e6:24.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
