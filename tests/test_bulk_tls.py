# -*- test-case-name: tests.test_bulk_tls -*-
"""
L{ssp.tls.BulkTLSProtocol} over a real TLS session between two in-memory
transports (C{twisted.test.iosim}): data arrives intact and in order, up
to C{BULK_SIZE} per delivery instead of one TLS record at a time, large
writes reach the socket in C{BULK_SIZE} pieces, and a close after data
still delivers the data first.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate, optionsForClientTLS
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim
from twisted.trial import unittest

from ssp.tls import BULK_SIZE, BulkTLSFactory
from tests.support import pki

RECORD = 16 * 1024


class _Collector(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.lost: Failure | None = None
        self.data_after_loss = False
        self.on_connect: Any = None

    def connectionMade(self) -> None:
        if self.on_connect is not None:
            self.on_connect(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.data_after_loss = self.data_after_loss or self.lost is not None
        self.pieces.append(data)

    def connectionLost(self, reason: Failure) -> None:
        self.lost = reason

    @property
    def received(self) -> bytes:
        return b"".join(self.pieces)


class _CountingTransport(iosim.FakeTransport):
    """
    Remembers the size of every write the TLS layer makes to the socket.
    """

    def write(self, data: bytes) -> None:
        self.writes.append(len(data))
        super().write(data)


def _counting_client(protocol: Any) -> _CountingTransport:
    transport = _CountingTransport(protocol, isServer=False)
    transport.writes = []
    return transport


class BulkTLSTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        p = pki()
        server_certificate = PrivateCertificate.loadPEM(
            p.path("proxy.pem").read_bytes() + p.path("proxy.key").read_bytes()
        )
        authority = Certificate.loadPEM(p.path(p.ca).read_bytes())
        self.clock = Clock()
        self.server, self.client = _Collector(), _Collector()
        self.server_factory = BulkTLSFactory(
            server_certificate.options(), False,
            Factory.forProtocol(lambda: self.server), clock=self.clock,
        )
        self.client_factory = BulkTLSFactory(
            optionsForClientTLS("localhost", trustRoot=authority), True,
            Factory.forProtocol(lambda: self.client), clock=self.clock,
        )

    def connect(self) -> tuple[Any, Any, iosim.IOPump]:
        client_tls, server_tls, pump = iosim.connectedServerAndClient(
            lambda: self.server_factory.buildProtocol(None),
            lambda: self.client_factory.buildProtocol(None),
            clientTransportFactory=_counting_client,
            greet=False,
        )
        pump.flush()
        self.assertTrue(client_tls._handshakeDone)
        return client_tls, server_tls, pump

    def test_large_write_is_delivered_in_bulk(self) -> None:
        client_tls, _, pump = self.connect()
        payload = os.urandom(1 << 20)
        client_tls.transport.writes.clear()
        self.client.transport.write(payload)
        pump.flush()
        self.assertEqual(self.server.received, payload)
        # Twisted's own transport delivers 64 records of 16 KiB here.
        self.assertEqual([len(p) for p in self.server.pieces],
                         [BULK_SIZE] * ((1 << 20) // BULK_SIZE))
        writes = client_tls.transport.writes
        self.assertEqual(len(writes), (1 << 20) // BULK_SIZE)
        self.assertTrue(all(BULK_SIZE < w < BULK_SIZE + 4 * 64 for w in writes), writes)

    def test_odd_sizes_arrive_intact_and_in_order(self) -> None:
        _, _, pump = self.connect()
        sizes = [1, RECORD - 1, RECORD + 1, BULK_SIZE + 7, 3 * BULK_SIZE + RECORD // 2, 5]
        sent = [os.urandom(n) for n in sizes]
        for piece in sent:
            self.client.transport.write(piece)
            self.clock.advance(0)
        pump.flush()
        self.assertEqual(self.server.received, b"".join(sent))
        self.assertTrue(all(len(p) <= BULK_SIZE + 2 * RECORD for p in self.server.pieces))

    def test_small_exchange_both_ways(self) -> None:
        _, _, pump = self.connect()
        self.client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        self.clock.advance(0)
        pump.flush()
        self.server.transport.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.clock.advance(0)
        pump.flush()
        self.assertEqual((self.server.pieces, self.client.pieces),
                         ([b"GET / HTTP/1.1\r\n\r\n"], [b"HTTP/1.1 204 No Content\r\n\r\n"]))

    def test_data_then_close_is_delivered_before_the_close(self) -> None:
        _, _, pump = self.connect()
        payload = os.urandom(100_000)
        self.server.transport.write(payload)
        self.server.transport.loseConnection()
        pump.flush()
        self.assertEqual(self.client.received, payload)
        self.assertFalse(self.client.data_after_loss)
        self.assertIsNotNone(self.client.lost)
        self.client.lost.trap(ConnectionDone)

    def test_write_before_the_handshake_is_sent_after_it(self) -> None:
        payload = os.urandom(200_000)
        self.client.on_connect = lambda transport: transport.write(payload)
        self.connect()
        self.assertEqual(self.server.received, payload)
