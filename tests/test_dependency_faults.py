"""
Dependency faults end to end: SDS (a real slapd), the shared rate store (a
real Redis) and the audit trail (real files) fail under a running proxy.
Each fault must give its documented status, forward nothing it should not,
and heal by itself when the dependency returns.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater
from twisted.trial import unittest

from ssp import chain, demo
from ssp.verify import verify_files
from ssp.audit import FileAuditSink
from ssp.config import DirectoryConfig, LimitSet, RateLimit, ThrottleConfig
from ssp.directory import CachingDirectory, LDAPDirectory, LDIFDirectory
from ssp.service import Concerns
from ssp.testing import MemoryThrottle, RecordingAuditSink
from ssp.throttle import throttle_from_config
from tests import redis, slapd
from tests.support import DEMO_LDIF, Provider, Proxy, Reply, spine_headers


async def until(condition: Any, timeout: float = 10.0) -> None:
    """
    Wait for C{condition()} to become true: for an event, not for time.
    """
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError(f"{condition} still false after {timeout} s")


def traces(provider: Provider) -> list[str]:
    return [dict(s.headers)[b"Ssp-Traceid"].decode() for s in provider.seen]


class FaultTestCase(unittest.TestCase):
    async def deploy(self, directory: Any = None, throttle: Any = None,
                     sink: Any = None) -> tuple[Provider, Proxy]:
        provider = Provider(self)
        self.sink = sink if sink is not None else RecordingAuditSink()
        concerns = Concerns(
            directory=directory or LDIFDirectory.from_file(DEMO_LDIF),
            throttle=throttle or MemoryThrottle(),
            audit=self.sink,
        )
        proxy = await Proxy(self, provider, concerns=concerns).start()
        return provider, proxy

    async def get(self, proxy: Proxy, **headers: str) -> tuple[Reply, str]:
        sent = spine_headers(**headers)
        reply = await proxy.consumer().get("metadata", sent)
        return reply, sent["Ssp-TraceID"]

    def assertRefusedNotForwarded(self, reply: Reply, trace: str, status: int, token: str,
                                  provider: Provider) -> None:
        self.assertEqual((reply.status, reply.token()), (status, token))
        self.assertNotIn(trace, traces(provider))


class DirectoryFaultTests(FaultTestCase):
    """
    SDS over LDAP behind the cache, with the cache's clock in the test's
    hands: stale answers within C{stale_limit}, 503 beyond it or with
    nothing cached, and fresh answers once slapd is back.
    """

    skip = slapd.SKIP

    async def deploy_sds(self) -> tuple[Provider, Proxy, slapd.Slapd, LDAPDirectory]:
        self.sds = slapd.Slapd.start_for(self, [DEMO_LDIF])
        config = DirectoryConfig(kind="ldap", urls=(self.sds.url,), connect_timeout=1.0,
                                 receive_timeout=1.0, time_limit=1)
        ldap = LDAPDirectory(config, reactor)
        ldap.start()
        self.addCleanup(ldap.stop)
        self.clock = Clock()
        self.cache = CachingDirectory(ldap, self.clock, ttl=300, negative_ttl=60,
                                      stale_limit=600)
        provider, proxy = await self.deploy(directory=self.cache)
        return provider, proxy, self.sds, ldap

    async def test_sds_down(self) -> None:
        provider, proxy, sds, ldap = await self.deploy_sds()
        first, _ = await self.get(proxy)
        second, _ = await self.get(proxy)
        self.assertEqual((first.status, second.status), (200, 200))
        searches = ldap.searches
        self.assertEqual((self.cache.hits, self.cache.stale_served), (self.cache.misses, 0))

        sds.stop()
        self.clock.advance(300 + 599)
        stale, _ = await self.get(proxy)
        self.assertEqual(stale.status, 200)
        self.assertGreater(self.cache.stale_served, 0)
        self.assertGreater(ldap.searches, searches)

        unknown, trace = await self.get(proxy, sender="200000042019")
        self.assertRefusedNotForwarded(unknown, trace, 503, "SDS_UNAVAILABLE", provider)
        self.clock.advance(2)
        closed, trace = await self.get(proxy)
        self.assertRefusedNotForwarded(closed, trace, 503, "SDS_UNAVAILABLE", provider)
        self.assertEqual(len(provider.seen), 3)

        sds.start()
        recovered, _ = await self.get(proxy)
        self.assertEqual(recovered.status, 200)
        self.assertEqual(len(provider.seen), 4)
        refused = [r for r in self.sink.completed() if r.decision == "refused"]
        self.assertEqual([(r.status, r.token) for r in refused], [(503, "SDS_UNAVAILABLE")] * 2)
        self.assertEqual(len([r for r in self.sink.records if r.event == "authorised"]), 4)

    async def test_sds_hangs(self) -> None:
        """
        A slapd that accepts connections but never answers (stopped with
        SIGSTOP) costs a bounded wait: the stale answer is served, and a
        lookup with nothing cached is refused; both come back once it runs.
        """
        provider, proxy, sds, _ = await self.deploy_sds()
        self.assertEqual((await self.get(proxy))[0].status, 200)
        self.clock.advance(301)
        sds.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: sds.process and sds.process.send_signal(signal.SIGCONT))
        started = reactor.seconds()
        (stale, _), (unknown, trace) = await gatherResults([
            Deferred.fromCoroutine(self.get(proxy)),
            Deferred.fromCoroutine(self.get(proxy, sender="200000042019")),
        ])
        self.assertLess(reactor.seconds() - started, 8)
        self.assertEqual(stale.status, 200)
        self.assertRefusedNotForwarded(unknown, trace, 503, "SDS_UNAVAILABLE", provider)
        sds.process.send_signal(signal.SIGCONT)
        self.clock.advance(600)
        self.assertEqual((await self.get(proxy))[0].status, 200)


    async def test_sds_saturated(self) -> None:
        """
        With the only LDAP connection stuck on a stalled slapd and no room
        to queue, a request whose sender is not cached is refused with 503
        C{SDS_UNAVAILABLE} while the stuck one still waits: it neither
        queues behind it nor reaches SDS later.
        """
        sds = slapd.Slapd.start_for(self, [DEMO_LDIF])
        config = DirectoryConfig(kind="ldap", urls=(sds.url,), connect_timeout=1.0,
                                 receive_timeout=5.0, time_limit=5, connections=1,
                                 max_queued_searches=0)
        ldap = LDAPDirectory(config, reactor)
        ldap.start()
        self.addCleanup(ldap.stop)
        cache = CachingDirectory(ldap, Clock(), ttl=300, negative_ttl=60, stale_limit=600)
        provider, proxy = await self.deploy(directory=cache)
        sds.process.send_signal(signal.SIGSTOP)
        self.addCleanup(lambda: sds.process and sds.process.send_signal(signal.SIGCONT))
        stuck = Deferred.fromCoroutine(self.get(proxy))
        await until(lambda: ldap.searches == 1)
        refused, trace = await self.get(proxy, sender="200000042019")
        self.assertFalse(stuck.called)
        self.assertRefusedNotForwarded(refused, trace, 503, "SDS_UNAVAILABLE", provider)
        self.assertEqual((ldap.searches, ldap.refused), (1, 1))
        sds.process.send_signal(signal.SIGCONT)
        self.assertEqual((await stuck)[0].status, 200)


class ThrottleFaultTests(FaultTestCase):
    """
    Redis killed under the proxy: C{on_store_failure = "local"} keeps
    admitting against per-process limits, C{"closed"} refuses with 503;
    either way the shared store is used again once Redis answers.
    """

    skip = redis.SKIP

    async def deploy_redis(self, policy: str) -> tuple[Provider, Proxy, Any]:
        self.redis = redis.RedisServer.start_for(self)
        config = ThrottleConfig(store="redis", redis_url=self.redis.url, on_store_failure=policy,
                                consumer=LimitSet(RateLimit(rate=1, period=3600.0, burst=50)))
        throttle = throttle_from_config(config, reactor)
        self.store = throttle.store
        self.store.backoff_initial, self.store.backoff_max = 0.05, 0.2
        throttle.start()
        self.addCleanup(throttle.stop)
        provider, proxy = await self.deploy(throttle=throttle)
        return provider, proxy, throttle

    def redis_key_exists(self) -> bool:
        key = f"ssp:rl:consumer:{demo.CONSUMER_ASID}".encode()
        with socket.create_connection(("127.0.0.1", self.redis.port), timeout=5) as s:
            s.sendall(b"EXISTS %s\r\n" % key)
            return s.recv(16) == b":1\r\n"

    async def test_redis_down_local_policy(self) -> None:
        provider, proxy, _ = await self.deploy_redis("local")
        reply, _ = await self.get(proxy)
        self.assertEqual((reply.status, reply.header("X-Rate-Limit-Limit")), (200, "50"))
        self.assertTrue(self.redis_key_exists())

        self.redis.stop()
        degraded, _ = await self.get(proxy)
        self.assertEqual((degraded.status, degraded.header("X-Rate-Limit-Limit")), (200, "50"))
        self.assertFalse(self.store.available)

        self.redis.start()
        self.assertFalse(self.redis_key_exists())
        await until(lambda: self.store.available)
        shared, _ = await self.get(proxy)
        self.assertEqual(shared.status, 200)
        self.assertTrue(self.redis_key_exists())
        self.assertEqual(len(provider.seen), 3)

    async def test_redis_down_closed_policy(self) -> None:
        provider, proxy, _ = await self.deploy_redis("closed")
        self.assertEqual((await self.get(proxy))[0].status, 200)

        self.redis.stop()
        for _ in range(2):
            reply, trace = await self.get(proxy)
            self.assertRefusedNotForwarded(reply, trace, 503, "THROTTLE_UNAVAILABLE", provider)
            self.assertIsNotNone(reply.header("Strict-Transport-Security"))

        self.redis.start()
        await until(lambda: self.store.available)
        self.assertEqual((await self.get(proxy))[0].status, 200)
        self.assertTrue(self.redis_key_exists())
        self.assertEqual(len(provider.seen), 2)
        refused = [r for r in self.sink.completed() if r.decision == "refused"]
        self.assertEqual([(r.status, r.token) for r in refused],
                         [(503, "THROTTLE_UNAVAILABLE")] * 2)


class FailingWrite:
    """
    C{os.write} for the audit sink that fails with C{error} while set, as
    a full (ENOSPC) or read-only (EROFS) disk does.
    """

    def __init__(self) -> None:
        self.error: int | None = None

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.error is not None:
            raise OSError(self.error, os.strerror(self.error))
        return os.write(fd, data)


def _mount_skip() -> str | None:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "mounting a tmpfs needs root and mount(8)"
    return None


class AuditFaultTests(FaultTestCase):
    """
    The file audit trail fails: every request is refused with 503
    AUDIT_UNAVAILABLE and nothing is forwarded; when the disk takes writes
    again requests pass, and the hash chain is intact.
    """

    async def deploy_audit(self, directory: Path, **options: Any) -> tuple[Provider, Proxy]:
        sink = FileAuditSink(directory, reactor, **options)
        await sink.start()
        self.addCleanup(sink.stop)
        return await self.deploy(sink=sink)

    async def test_write_errors_injected(self) -> None:
        """
        Disk full and read-only disk, emulated by a C{write} that raises
        ENOSPC or EROFS: runs anywhere, without mounting anything.
        """
        directory = Path(self.mktemp()).resolve()
        write = FailingWrite()
        provider, proxy = await self.deploy_audit(directory, raw_write=write)
        for code in (errno.ENOSPC, errno.EROFS):
            self.assertEqual((await self.get(proxy))[0].status, 200)
            await until(lambda: self.sink.pending == 0)
            write.error = code
            reply, trace = await self.get(proxy)
            self.assertRefusedNotForwarded(reply, trace, 503, "AUDIT_UNAVAILABLE", provider)
            self.assertFalse(self.sink.writable)
            write.error = None
            self.assertEqual((await self.get(proxy))[0].status, 200)
            self.assertTrue(self.sink.writable)
        self.flushLoggedErrors(OSError)
        await self.check_trail(directory, provider, forwarded=4)

    async def test_disk_full_then_read_only(self) -> None:
        """
        A real tmpfs of 128 KiB: filled up (ENOSPC), then remounted
        read-only (EROFS), then writable but still full, then with space
        again.  Skipped without root, as mounting needs it.
        """
        skip = _mount_skip()
        if skip:
            raise unittest.SkipTest(skip)
        mount = Path(self.mktemp()).resolve()
        mount.mkdir(parents=True)
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k,mode=0700", "tmpfs",
                                  str(mount)], capture_output=True, text=True, check=False)
        if mounted.returncode:
            raise unittest.SkipTest(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
        self.addCleanup(subprocess.run, ["umount", "-l", str(mount)], check=True)
        directory = mount / "audit"
        provider, proxy = await self.deploy_audit(directory)
        self.assertEqual((await self.get(proxy))[0].status, 200)
        await until(lambda: self.sink.pending == 0)

        filler = mount / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            self.assertEqual(e.errno, errno.ENOSPC)
        finally:
            os.close(fd)
        # The audit file's last page may still take a record or two; the
        # completed record of a request forwarded then may find the disk full.
        # Read-only needs the sink to hold no open file: it closes it after a
        # failure, but a completed record written later may still find room.
        statuses, squeezed = [], set()
        while True:
            reply, trace = await self.get(proxy)
            statuses.append(reply.status)
            squeezed.add(trace)
            self.assertIn(reply.status, (200, 503))
            self.assertLess(len(statuses), 10)
            if reply.status == 503:
                self.assertRefusedNotForwarded(reply, trace, 503, "AUDIT_UNAVAILABLE", provider)
                await until(lambda: self.sink.pending == 0)
                if not self.sink.writable:
                    break
        await self.remount(mount, "ro")
        reply, trace = await self.get(proxy)
        self.assertRefusedNotForwarded(reply, trace, 503, "AUDIT_UNAVAILABLE", provider)
        await self.remount(mount, "rw")
        reply, trace = await self.get(proxy)
        self.assertRefusedNotForwarded(reply, trace, 503, "AUDIT_UNAVAILABLE", provider)
        self.assertFalse(self.sink.writable)

        filler.unlink()
        self.assertEqual((await self.get(proxy))[0].status, 200)
        self.assertTrue(self.sink.writable)
        self.flushLoggedErrors(OSError)
        await self.check_trail(directory, provider, statuses.count(200) + 2, squeezed)

    async def remount(self, mount: Path, mode: str) -> None:
        for _ in range(50):
            done = subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)],
                                  capture_output=True, text=True, check=False)
            if done.returncode == 0:
                return
            await deferLater(reactor, 0.02)
        raise AssertionError(f"remount,{mode} failed: {done.stderr}")

    async def check_trail(self, directory: Path, provider: Provider, forwarded: int,
                          unfinished: set[str] = frozenset()) -> None:
        """
        After the sink stopped: the chain verifies; every request the
        provider saw has its authorised record, and its completed one
        unless it is in C{unfinished} (completed while the disk was
        failing: logged as lost); a refused request has no authorised
        record and at most one completed one (written if the disk
        recovered in time), saying why.
        """
        self.assertEqual(len(provider.seen), forwarded)
        await self.sink.stop()
        self.assertTrue(verify_files([directory]).ok)
        records = list(chain.read_records([directory]))
        seen = set(traces(provider))
        authorised = [r["trace_id"] for r in records if r["event"] == "authorised"]
        completed = [r for r in records if r["event"] == "completed"]
        self.assertEqual(sorted(authorised), sorted(seen))
        self.assertEqual(len({r["trace_id"] for r in completed}), len(completed))
        self.assertLessEqual(seen - unfinished, {r["trace_id"] for r in completed})
        self.assertEqual({(r["status"], r["token"]) for r in completed
                          if r["trace_id"] not in seen} - {(503, "AUDIT_UNAVAILABLE")}, set())
