# -*- test-case-name: tests.test_stream -*-
"""
The relay of a provider's body to the consumer: for a large body it
widens the socket buffers of both connections (fewer reads, no pause of
the provider per read) and puts them back when the body ends, while a
consumer that stops reading still pauses the provider with a bounded
amount held in the proxy.  Unit tests drive L{forward.relay} over real
Twisted C{FileDescriptor}s on a memory reactor; one end-to-end test
stalls a real consumer in the middle of a real stream.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

from twisted.internet import reactor
from twisted.internet.abstract import FileDescriptor
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import MemoryReactor
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial import unittest
from twisted.web._newclient import TransportProxyProducer
from twisted.web.client import ResponseDone
from twisted.web.iweb import UNKNOWN_LENGTH

from ssp import forward
from ssp.errors import UpstreamFailed
from tests.support import ENDPOINT, Provider, Proxy, pattern_sha256, spine_headers, until
from tests.test_hostile import wait_for

Relay = forward._Relay
RECORD = 16 * 1024  # what one TLS record carries, as the relay receives it
DEFAULT_SEND_LIMIT = FileDescriptor.SEND_LIMIT


class _Socket(FileDescriptor):
    """
    A connected TCP connection as far as buffering goes; C{doWrite} hands
    everything to a kernel that takes it all.
    """

    connected = 1

    def writeSomeData(self, data: bytes) -> int:
        return len(data)

    def buffered(self) -> int:
        return len(self.dataBuffer) - self.offset + self._tempDataLen


class _Wrapper:
    """
    Stands for a TLS transport: a protocol wrapper over the TCP connection.
    """

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    def pauseProducing(self) -> None:
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        self.transport.resumeProducing()

    def stopProducing(self) -> None:
        self.transport.stopProducing()


class _Request:
    """
    The parts of a server request the relay uses, writing to C{connection}
    (which may be L{None}: a fake without a socket).
    """

    def __init__(self, connection: _Socket | None) -> None:
        self.connection = connection
        self.transport = _Wrapper(connection)
        self.gone = False
        self.written: list[bytes] = []

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        if self.connection is not None:
            self.connection.registerProducer(producer, streaming)

    def unregisterProducer(self) -> None:
        if self.connection is not None:
            self.connection.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.connection is not None:
            self.connection.write(data)


class _Response:
    def __init__(self, length: Any, connection: Any) -> None:
        self.length = length
        self._transport = TransportProxyProducer(_Wrapper(connection))

    def deliverBody(self, protocol: Any) -> None:
        protocol.makeConnection(self._transport)


class RelayBufferTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactor()
        self.provider = _Socket(self.reactor)
        self.consumer = _Socket(self.reactor)
        self.provider.startReading()
        self.request = _Request(self.consumer)

    def relay(self, length: Any, request: Any = None, provider: Any = None) -> tuple[Any, Any]:
        response = _Response(length, self.provider if provider is None else provider)
        return forward.relay(response, request or self.request, Clock(), 60.0, "target")

    def limits(self) -> tuple[int, int, int]:
        return (self.provider.bufferSize, self.consumer.bufferSize, self.consumer.SEND_LIMIT)

    def reading(self) -> bool:
        return self.provider in self.reactor.getReaders()

    def test_large_body_widens_both_connections_until_it_ends(self) -> None:
        default = self.limits()
        self.assertEqual(default, (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))
        done, relay = self.relay(10 << 20)
        self.assertEqual(self.limits(), (Relay.READ_SIZE, Relay.SEND_BUFFER, Relay.READ_SIZE))
        pieces = [bytes([n]) * RECORD for n in range(5)] + [b"tail"]
        for piece in pieces:
            relay.dataReceived(piece)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(done), 5 * RECORD + 4)
        self.assertEqual(self.request.written, pieces)
        self.assertEqual(self.consumer.buffered(), 5 * RECORD + 4)
        self.assertEqual(self.limits(), default)

    def test_body_of_unknown_length_widens(self) -> None:
        done, relay = self.relay(UNKNOWN_LENGTH)
        self.assertEqual(self.limits(), (Relay.READ_SIZE, Relay.SEND_BUFFER, Relay.READ_SIZE))
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(done), 0)
        self.assertEqual(self.limits(), (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))

    def test_small_bodies_leave_the_connections_alone(self) -> None:
        for length in (0, 180, Relay.TWISTED_BUFFER):
            done, relay = self.relay(length)
            self.assertEqual(self.limits(), (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))
            relay.dataReceived(b"x" * length)
            relay.connectionLost(Failure(ResponseDone()))
            self.assertEqual(self.successResultOf(done), length)

    def test_larger_limits_are_kept(self) -> None:
        self.consumer.bufferSize = 4 << 20
        done, relay = self.relay(10 << 20)
        self.assertEqual(self.consumer.bufferSize, 4 << 20)
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.consumer.bufferSize, 4 << 20)

    def test_transports_without_sockets(self) -> None:
        request = _Request(None)
        done, relay = self.relay(10 << 20, request, provider=object())
        relay.dataReceived(b"body")
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual((self.successResultOf(done), request.written), (4, [b"body"]))

    def test_limits_restored_when_the_provider_breaks_off(self) -> None:
        done, relay = self.relay(10 << 20)
        relay.dataReceived(b"x" * RECORD)
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, UpstreamFailed)
        self.assertEqual(self.limits(), (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))

    def test_limits_restored_when_the_consumer_leaves(self) -> None:
        done, relay = self.relay(10 << 20)
        relay.dataReceived(b"x" * RECORD)
        self.request.gone = True
        relay.stop()
        self.assertTrue(self.provider.disconnecting)
        relay.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(done, UpstreamFailed)
        self.assertEqual(self.limits(), (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))

    def test_one_read_never_pauses_the_provider(self) -> None:
        """
        A whole read's worth of records fits in the consumer's buffer: a
        consumer that keeps up does not pause the provider (with Twisted's
        64 KiB, every read did).
        """
        done, relay = self.relay(10 << 20)
        for _ in range(3):
            for _ in range(Relay.READ_SIZE // RECORD):
                relay.dataReceived(b"r" * RECORD)
            self.assertTrue(self.reading())
            self.consumer.doWrite()
            self.assertEqual(self.consumer.buffered(), 0)
        self.assertTrue(self.reading())

    def test_consumer_that_stops_reading_pauses_the_provider(self) -> None:
        done, relay = self.relay(10 << 20)
        for _ in range(Relay.SEND_BUFFER // RECORD + 1):
            relay.dataReceived(b"s" * RECORD)
        self.assertFalse(self.reading())
        self.assertGreater(self.consumer.buffered(), Relay.SEND_BUFFER)
        self.assertLessEqual(self.consumer.buffered(), Relay.SEND_BUFFER + RECORD)
        self.consumer.doWrite()
        self.assertTrue(self.reading())
        relay.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(done), sum(map(len, self.request.written)))


class StalledConsumerTests(unittest.TestCase):
    async def test_stalled_consumer_pauses_provider_then_body_arrives_whole(self) -> None:
        """
        A consumer stops reading in the middle of a large body: the proxy
        stops reading from the provider holding a bounded amount, then
        relays the rest intact once the consumer reads again, and the
        connections get Twisted's buffer sizes back.
        """
        provider = Provider(self)
        proxy = await Proxy(self, provider).start()
        relays: list[Any] = []
        original = forward.relay

        def capture(*args: Any, **kwargs: Any) -> Any:
            done, relay = original(*args, **kwargs)
            relays.append(relay)
            return done, relay

        self.patch(forward, "relay", capture)
        size, first = 64 << 20, 2 << 20
        read_on = threading.Event()

        def download() -> tuple[int, int, str]:
            conn = proxy.consumer().connect()
            conn.request("GET", f"/{ENDPOINT}/big?n={size}", headers=spine_headers())
            response = conn.getresponse()
            digest = hashlib.sha256()
            chunk = response.read(first)
            total = len(chunk)
            digest.update(chunk)
            read_on.wait(30)
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                total += len(chunk)
            conn.close()
            return response.status, total, digest.hexdigest()

        downloading = deferToThread(download)
        try:
            sockets = await self.sockets_of(relays)
            provider_socket, consumer_socket = sockets
            self.assertEqual((provider_socket.bufferSize, consumer_socket.bufferSize),
                             (Relay.READ_SIZE, Relay.SEND_BUFFER))
            paused = await wait_for(lambda: provider_socket not in reactor.getReaders(), 10)
            self.assertTrue(paused, "the provider was never paused")
            # The relay comes to a standstill once the kernel's buffers are
            # full (they may grow a little first), far from the body's end.
            held = [self.held(consumer_socket)]
            still, last = 0, -1
            deadline = reactor.seconds() + 10
            while still < 10 and reactor.seconds() < deadline:
                still = still + 1 if relays[0].sent == last else 0
                last = relays[0].sent
                held.append(self.held(consumer_socket))
                await deferLater(reactor, 0.01)
            self.assertEqual(still, 10, "the relay did not come to a standstill")
            self.assertLess(relays[0].sent, first + (16 << 20))
            # At most one read's worth of records beyond the limit, and TLS's framing.
            self.assertLessEqual(max(held), Relay.SEND_BUFFER + Relay.READ_SIZE + 128 * 1024)
        finally:
            read_on.set()
        status, total, sha = await downloading
        self.assertEqual((status, total), (200, size))
        self.assertEqual(sha, pattern_sha256(size))
        self.assertEqual(relays[0].sent, size)
        await until(proxy.settled)
        self.assertEqual(proxy.audit.completed()[0].bytes_out, size)
        self.assertEqual((provider_socket.bufferSize, consumer_socket.bufferSize,
                          consumer_socket.SEND_LIMIT),
                         (64 * 1024, 64 * 1024, DEFAULT_SEND_LIMIT))

    async def sockets_of(self, relays: list[Any]) -> tuple[Any, Any]:
        self.assertTrue(await wait_for(lambda: bool(relays), 10), "no relay started")
        relay = relays[0]
        provider = forward._socket_under(relay.transport._producer)
        consumer = forward._socket_under(relay._request.transport)
        self.assertIsNotNone(provider)
        self.assertIsNotNone(consumer)
        return provider, consumer

    @staticmethod
    def held(connection: Any) -> int:
        return len(connection.dataBuffer) - connection.offset + connection._tempDataLen
