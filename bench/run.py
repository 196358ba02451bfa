#!/usr/bin/env python3
"""
Side-by-side benchmark: one mutual-TLS workload against the provider
directly, through nginx as a plain mTLS-to-mTLS hop, and through the proxy.

Run by hand from the repository root::

    python bench/run.py [--quick] [--requests N] [--concurrency C] [--rate R] ...

Everything runs on loopback in a throw-away directory: the demo provider
(one Twisted process, which also serves a 1 GiB body), nginx (one worker,
unprivileged, configuration generated from C{bench/nginx.conf.in}), the
proxy with every check on, and for the workers row the real
C{twistd ssp --workers 1} and C{--workers N}.
This process is the load generator (asyncio + ssl, raw HTTP/1.1).  See
bench/README.md for what each number means and docs/performance.md for
results.  Not a test: nothing under tests/ imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import http.client
import json
import os
import platform
import pwd
import select
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
METADATA_PATH = "/B82617/STU3/1/gpconnect/fhir/metadata"
STREAM_PATH = "/B82617/STU3/1/gpconnect/fhir/Binary/bench-stream"
GiB = 1 << 30
MiB = 1 << 20
FOREIGN_LIMIT = 0.2  # cores of outside CPU load above which a phase is flagged


# -- child processes ---------------------------------------------------------

def _child_logging(root: Path, name: str) -> None:
    from twisted.logger import globalLogBeginner, textFileLogObserver

    log = open(root / f"{name}.log", "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log)], redirectStandardIO=False)


def _announce(port: int) -> None:
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def provider_main(root: Path) -> None:
    """
    The demo provider on an ephemeral loopback port (prints C{PORT n}),
    plus C{STREAM_PATH?bytes=N}: an C{application/octet-stream} body of N
    bytes with a Content-Length, produced as the connection takes it.
    """
    from twisted.internet import reactor
    from twisted.web.server import NOT_DONE_YET

    from ssp import demo

    chunk = os.urandom(64 * 1024) * 4

    class Stream:
        def __init__(self, request: Any, size: int) -> None:
            self.request, self.left = request, size

        def resumeProducing(self) -> None:
            piece = chunk if self.left >= len(chunk) else chunk[: self.left]
            self.left -= len(piece)
            self.request.write(piece)
            if not self.left:
                self.request.unregisterProducer()
                self.request.finish()

        def stopProducing(self) -> None:
            self.left = 0

    class BenchProvider(demo.EchoProvider):
        def render(self, request: Any) -> Any:
            if request.path != STREAM_PATH.encode():
                return super().render(request)
            size = int(request.args.get(b"bytes", [b"0"])[0])
            request.setHeader(b"Content-Type", b"application/octet-stream")
            request.setHeader(b"Content-Length", b"%d" % size)
            if not size:
                return b""
            request.registerProducer(Stream(request, size), False)
            return NOT_DONE_YET

    _child_logging(root, "provider")
    listening = demo.listen_provider(reactor, demo.ensure_pki(root), BenchProvider())
    reactor.callWhenRunning(_announce, listening.getHost().port)
    reactor.run()


def bench_config(root: Path, provider_port: int, listen: str = "systemd:domain=INET:index=0",
                 admin: str | None = None) -> Any:
    """
    The proxy's configuration in this benchmark: the demo's (LDIF
    directory, JWT validation, file audit) with fsync "always", an
    in-memory throttle whose limits are far above the load, and the access
    log in its own file (as nginx's).
    """
    import attrs

    from ssp import demo
    from ssp.config import LimitSet, RateLimit, ThrottleConfig

    config = demo.demo_config(root, demo.ensure_pki(root), provider_port, listen=listen,
                              admin=admin)
    high = LimitSet(default=RateLimit(rate=1_000_000, period=1.0, burst=1_000_000))
    return attrs.evolve(config, audit=attrs.evolve(config.audit, durability="always"),
                        throttle=ThrottleConfig(store="memory", consumer=high, provider=high),
                        log=attrs.evolve(config.log, access_log_file=root / "var" / "access.log"))


def proxy_main(root: Path, provider_port: int, fd: int) -> None:
    """
    The proxy of L{bench_config}, with its access log, in front of the
    provider (see L{serve_proxy}).
    """

    def service_of(reactor: Any) -> Any:
        from ssp.service import SSPService

        return SSPService(bench_config(root, provider_port), reactor)

    serve_proxy(root, "proxy", fd, service_of)


def serve_proxy(root: Path, name: str, fd: int, service_of: Callable[[Any], Any]) -> None:
    """
    Run the proxy service C{service_of(reactor)} accepting on the inherited
    listening socket C{fd}, as systemd socket activation would hand it
    over, logging to C{root/<name>.log}; prints C{PORT n} once serving.
    C{service_of} imports the service itself: Twisted reads C{LISTEN_FDS}
    when its endpoints module is first imported, which must come after.
    """
    os.dup2(fd, 3)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="ssp")
    from twisted.internet import reactor

    from ssp.runtime import settle_heap

    _child_logging(root, name)
    service = service_of(reactor)

    def start() -> None:
        service.startService()
        service.listening().addCallback(lambda port: _announce(port.getHost().port))

    reactor.callWhenRunning(start)
    reactor.callWhenRunning(settle_heap)  # as twistd ssp does
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    profile_to = os.environ.get("SSP_BENCH_CPROFILE")  # set by bench/profile_proxy.py
    if profile_to:
        import cProfile

        cProfile.runctx("reactor.run()", globals(), {"reactor": reactor}, profile_to)
    else:
        reactor.run()


def spawn(args: list[str], root: Path, timeout: float = 30.0,
          pass_fds: tuple[int, ...] = (), script: Path = Path(__file__),
          name: str = "") -> tuple[subprocess.Popen, int]:
    """
    Start C{script} (this one, in a child role) and wait for its C{PORT n}
    line; its stderr goes to C{root/<name>.stderr} (C{name}: the role).
    """
    name = name or args[0]
    proc = subprocess.Popen([sys.executable, str(script.resolve())] + args,
                            cwd=root, env=_child_env(), stdout=subprocess.PIPE,
                            pass_fds=pass_fds,
                            stderr=open(root / f"{name}.stderr", "w"))
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            err = (root / f"{name}.stderr").read_text()[-2000:]
            raise SystemExit(f"{name} did not start:\n{err}")
        if select.select([proc.stdout], [], [], left)[0]:
            buf += os.read(proc.stdout.fileno(), 4096)
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"{name}: unexpected output {line!r}")
    return proc, int(line.split()[1])


def _child_env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))


def start_proxy(root: Path, provider_port: int, script: Path = Path(__file__),
                extra: tuple[str, ...] = (), name: str = "") -> tuple[subprocess.Popen, int]:
    """
    One proxy process (C{script _proxy ROOT PORT FD EXTRA...}: by default
    L{proxy_main}) on a listening socket made here.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        proc, port = spawn(["_proxy", str(root), str(provider_port), str(sock.fileno()), *extra],
                           root, pass_fds=(sock.fileno(),), script=script, name=name)
    finally:
        sock.close()
    return proc, port


def workers_toml(root: Path, provider_port: int, port: int, admin_port: int,
                 audit: Path, reuse_port: bool) -> str:
    """
    A configuration file for C{twistd ssp} equal to L{bench_config} except
    for the listen and admin endpoints, C{reuse_port}, the audit
    directory and a 5 s drain.  The workers share the access-log file.
    """
    from ssp import demo

    certs = root / "certs"
    high = "rate = 1000000\nperiod = 1.0\nburst = 1000000"
    return f"""\
[listen]
endpoint = "tcp:{port}:interface=127.0.0.1"
drain_timeout = 5.0
reuse_port = {str(reuse_port).lower()}
[tls]
certificate = "{certs}/proxy.pem"
private_key = "{certs}/proxy.key"
client_ca = "{certs}/spine-ca.pem"
crls = ["{certs}/spine-ca.crl.pem"]
[upstream]
certificate = "{certs}/proxy-client.pem"
private_key = "{certs}/proxy-client.key"
ca = "{certs}/spine-ca.pem"
[upstream.resolve]
"{demo.PROVIDER_HOST}:443" = "127.0.0.1:{provider_port}"
[directory]
kind = "ldif"
ldif = "{demo.DEMO_LDIF}"
[token]
validate = true
[audit]
directory = "{audit}"
durability = "always"
key_file = "{demo.audit_key(certs)}"
[throttle]
store = "memory"
[throttle.consumer.default]
{high}
[throttle.provider.default]
{high}
[admin]
endpoint = "tcp:{admin_port}:interface=127.0.0.1"
[log]
access_log_file = "{root}/var/access.log"
[[agreements]]
sender = "{demo.CONSUMER_ASID}"
receiver = "{demo.PROVIDER_ASID}"
"""


def free_ports(count: int) -> int:
    """
    A loopback port P with P + 1 ... P + count - 1 free too (admin
    listeners of C{count} workers).
    """
    while True:
        port = free_port()
        try:
            for k in range(1, count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + k))
            return port
        except OSError:
            continue


def start_twistd_workers(root: Path, provider_port: int, workers: int,
                         reuse_port: bool) -> tuple[subprocess.Popen, int]:
    """
    C{twistd -n ssp --config FILE --workers N} with a L{workers_toml}
    configuration: with N > 1 a master binding the port and N workers on
    the inherited socket (with C{reuse_port}, N workers each binding the
    port with C{SO_REUSEPORT}), each auditing into C{audit-wN/worker-K};
    with 1, the proxy in the twistd process itself.  Ready once every
    worker's C{/healthz} (admin port + K) answers 200.
    """
    import attrs

    from ssp import config as ssp_config

    port, admin = free_port(), free_ports(workers)
    audit = root / "var" / f"audit-w{workers}"
    path = root / f"ssp-w{workers}.toml"
    path.write_text(workers_toml(root, provider_port, port, admin, audit, reuse_port))
    expected = bench_config(root, provider_port, f"tcp:{port}:interface=127.0.0.1",
                            f"tcp:{admin}:interface=127.0.0.1")
    expected = attrs.evolve(
        expected,
        listen=attrs.evolve(expected.listen, drain_timeout=5.0, reuse_port=reuse_port),
        audit=attrs.evolve(expected.audit, directory=audit))
    if ssp_config.load(path) != expected:
        raise SystemExit(f"{path} does not match bench_config(); update workers_toml()")
    log = root / f"twistd-w{workers}.log"
    with open(root / f"twistd-w{workers}.stderr", "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n",
             "--pidfile=", "--logfile", str(log), "ssp", "--config", str(path),
             "--workers", str(workers)],
            cwd=root, env=_child_env(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=stderr)
    waiting = list(range(workers))
    deadline = time.monotonic() + 60
    while waiting:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop([proc])
            raise SystemExit(f"twistd ssp --workers {workers} did not start:\n"
                             + (_tail(log) + _tail(root / f"twistd-w{workers}.stderr"))[-3000:])
        if _healthy(admin + waiting[0]):
            waiting.pop(0)
        else:
            time.sleep(0.1)
    return proc, port


def authorised_records(directory: Path) -> int:
    """
    Requests a proxy has forwarded, from its audit trail in C{directory}:
    one C{authorised} record each, on disk before the request went
    upstream, so before its response arrived.
    """
    return sum(json.loads(line).get("event") == "authorised"
               for path in sorted(directory.glob("*.jsonl"))
               for line in path.read_text().splitlines() if line)


def worker_number(pid: int) -> int:
    """
    K of the C{twistd ssp --worker K} process C{pid}.
    """
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--worker") + 1])


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        connection.request("GET", "/healthz")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_nginx(root: Path, provider_port: int) -> tuple[subprocess.Popen | None, int, str]:
    """
    nginx as a plain mTLS-to-mTLS hop (same certificates, CA and CRL as the
    proxy; no Spine checks), one worker, as an unprivileged user when run
    as root, with every path under C{root/nginx}.

    @return: the master process (L{None} when nginx is unavailable), its
        port, and why it is unavailable (or C{""}).
    """
    binary = shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)
    if binary is None:
        return None, 0, "nginx not installed (apt-get install nginx-light)"
    prefix = root / "nginx"
    prefix.mkdir()
    certs = root / "certs"
    for name in ("proxy.pem", "proxy.key", "proxy-client.pem", "proxy-client.key",
                 "spine-ca.pem", "spine-ca.crl.pem"):
        shutil.copy(certs / name, prefix / name)
    port = free_port()
    conf = (BENCH / "nginx.conf.in").read_text()
    for key, value in {"PREFIX": str(prefix), "PORT": str(port),
                       "PROVIDER_PORT": str(provider_port)}.items():
        conf = conf.replace("@" + key + "@", value)
    (prefix / "nginx.conf").write_text(conf)
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        root.chmod(0o711)
        for path in [prefix, *prefix.iterdir()]:
            os.chown(path, nobody.pw_uid, nobody.pw_gid)
        user = {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}
    proc = subprocess.Popen(
        [binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
         "-e", str(prefix / "error.log")],
        cwd=prefix, stdout=subprocess.DEVNULL, stderr=open(root / "nginx.stderr", "w"), **user)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, port, ""
        except OSError:
            time.sleep(0.05)
    proc.kill()
    error = (root / "nginx.stderr").read_text() + _tail(prefix / "error.log")
    raise SystemExit(f"nginx did not start:\n{error[-2000:]}")


def _tail(path: Path) -> str:
    return path.read_text()[-2000:] if path.exists() else ""


def stop(procs: list[subprocess.Popen], timeout: float = 15.0) -> None:
    """
    C{SIGTERM} each process and wait for it and its descendants (nginx's
    and twistd's workers); C{SIGKILL} whatever is left after C{timeout}.
    """
    trees = {p.pid: process_tree(p.pid) for p in procs if p.poll() is None}
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    left = [pid for tree in trees.values() for pid in tree[1:]]
    while left:
        left = [pid for pid in left if _alive(pid)]
        if left and time.monotonic() > deadline:
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            break
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """
    C{pid} and its descendants (nginx's worker is a child of its master).
    """
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return pids


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds of C{pid} (Linux C{/proc}); 0 once it is gone.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """
    CPU seconds every core of the machine spent busy so far (C{/proc/stat}).
    """
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- load generator ----------------------------------------------------------

class Target:
    """
    Where to connect, what request bytes to send, and which processes do
    the work behind it (for CPU and memory accounting).
    """

    def __init__(self, name: str, port: int, server_hostname: str, ctx: ssl.SSLContext,
                 request: Callable[[str], bytes], pids: Callable[[], list[int]]) -> None:
        self.name = name
        self.port = port
        self.server_hostname = server_hostname
        self.ctx = ctx
        self.request = request  # (path) -> bytes
        self.pids = pids
        self.path = METADATA_PATH

    async def connect(self, session: ssl.SSLSession | None = None,
                      ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """
        A new TLS connection, offering to resume C{session} if given.
        """
        ctx: Any = self.ctx if session is None else _Resuming(self.ctx, session)
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=ctx,
                                             server_hostname=self.server_hostname)


class _Resuming:
    """
    An SSL context offering C{session} on the connection it wraps: asyncio
    takes no session argument, but builds its TLS object with C{wrap_bio}.
    """

    def __init__(self, ctx: ssl.SSLContext, session: ssl.SSLSession) -> None:
        self._ctx, self._session = ctx, session

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | None = None) -> ssl.SSLObject:
        return self._ctx.wrap_bio(incoming, outgoing, server_side, server_hostname,
                                  session=self._session)


async def exchange(target: Target, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bool:
    """
    Send one GET and read the whole response (Content-Length or chunked).
    Returns whether the connection may be reused; raises on a non-200.
    """
    writer.write(target.request(target.path))
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                break
            body += (await reader.readexactly(size + 2))[:-2]
    elif "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    else:
        body = await reader.read()
        return False
    if status != 200:
        raise RuntimeError(f"{target.name}: HTTP {status}: {body[:300]!r}")
    return headers.get("connection", "").lower() != "close"


class Pool:
    """
    Up to C{size} keep-alive connections; a request takes one (opening it
    if needed) and gives it back.
    """

    def __init__(self, target: Target, size: int) -> None:
        self.target = target
        self.idle: asyncio.Queue = asyncio.Queue()
        for _ in range(size):
            self.idle.put_nowait(None)

    async def request(self) -> None:
        conn = await self.idle.get()
        try:
            if conn is None:
                conn = await self.target.connect()
            reusable = await exchange(self.target, *conn)
        except BaseException:
            if conn is not None:
                conn[1].close()
            self.idle.put_nowait(None)
            raise
        if not reusable:
            conn[1].close()
            conn = None
        self.idle.put_nowait(conn)

    async def close(self) -> None:
        while not self.idle.empty():
            conn = self.idle.get_nowait()
            if conn is not None:
                conn[1].close()
                try:
                    await asyncio.wait_for(conn[1].wait_closed(), 1)
                except (TimeoutError, OSError, ssl.SSLError):
                    pass


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


async def open_loop(target: Target, rate: float, duration: float, concurrency: int) -> dict:
    """
    Requests started on a fixed schedule; latency is measured from the
    scheduled time, so queueing behind a slow response counts.
    """
    pool = Pool(target, concurrency)
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter() + 0.05

    async def one(at: float) -> None:
        nonlocal errors
        try:
            await pool.request()
            latencies.append(time.perf_counter() - at)
        except Exception:
            errors += 1

    tasks = []
    for i in range(int(rate * duration)):
        at = start + i / rate
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(at)))
    await asyncio.gather(*tasks)
    await pool.close()
    ms = [x * 1000 for x in latencies] or [float("nan")]
    return {"requests": len(latencies), "errors": errors,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "max_ms": max(ms)}


async def closed_loop(target: Target, requests: int, concurrency: int, keepalive: bool,
                      time_limit: float, resume: bool = False) -> dict:
    """
    C{concurrency} workers each sending back-to-back requests, over one
    kept-alive connection each, or over a new TLS connection per request
    (with C{resume}, each offering the TLS session of the worker's previous
    connection, as a client with a session cache does).
    """
    remaining = requests
    done = 0
    errors = 0
    resumed = 0
    deadline = time.perf_counter() + time_limit

    async def worker() -> None:
        nonlocal remaining, done, errors, resumed
        conn = None
        session = None
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            try:
                if conn is None:
                    conn = await target.connect(session if resume else None)
                reusable = await exchange(target, *conn)
                done += 1
                tls = conn[1].get_extra_info("ssl_object")
                resumed += tls.session_reused
                session = tls.session
            except Exception:
                errors += 1
                reusable = False
            if not (keepalive and reusable) and conn is not None:
                conn[1].close()
                conn = None
        if conn is not None:
            conn[1].close()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"requests": done, "errors": errors, "seconds": elapsed, "resumed": resumed,
            "rps": done / elapsed if elapsed else 0.0,
            "truncated": done + errors < requests}


class _Sink(asyncio.Protocol):
    """
    Reads one response (Content-Length or chunked) and discards its body.
    """

    def __init__(self, request: bytes, done: asyncio.Future) -> None:
        self.request, self.done = request, done
        self.head = b""
        self.status = 0
        self.length: int | None = None
        self.chunked = False
        self.line = b""  # chunked: the start of a size line split across reads
        self.chunk_left = 0
        self.received = 0

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.length is None and not self.chunked:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            self.status = int(lines[0].split()[1])
            fields = {k.strip().lower(): v.strip()
                      for k, _, v in (line.partition(":") for line in lines[1:])}
            self.chunked = fields.get("transfer-encoding", "").lower() == "chunked"
            self.length = None if self.chunked else int(fields.get("content-length", -1))
        if self.chunked:
            self._chunks(data)
        else:
            self.received += len(data)
            if self.received >= (self.length or 0):
                self._finish()

    def _chunks(self, data: bytes) -> None:
        """
        Skip chunk data (and its CRLF) without copying it; only a size line
        split across reads is buffered.
        """
        at, end = 0, len(data)
        while at < end:
            if self.chunk_left:
                take = min(self.chunk_left, end - at)
                self.chunk_left -= take
                at += take
                continue
            newline = data.find(b"\n", at)
            if newline < 0:
                self.line += data[at:]
                return
            size_line, self.line, at = self.line + data[at:newline], b"", newline + 1
            size = int(size_line.strip().split(b";")[0], 16)
            if not size:
                self._finish()
                return
            self.received += size
            self.chunk_left = size + 2

    def _finish(self) -> None:
        if self.length is None:
            self.length = self.received
        if not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def stream(target: Target, size: int, sample: float = 0.05) -> dict:
    """
    One GET of a C{size}-byte body, read as fast as it comes, while the
    RSS of the processes behind C{target} is sampled from C{/proc}.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()
    path = f"{STREAM_PATH}?bytes={size}"
    sink = _Sink(target.request(path), done)
    pids = target.pids()
    before = {pid: rss_bytes(pid) for pid in pids}
    peak = dict(before)
    start = time.perf_counter()
    transport, _ = await loop.create_connection(
        lambda: sink, "127.0.0.1", target.port, ssl=target.ctx,
        server_hostname=target.server_hostname)
    while not done.done():
        await asyncio.wait([done], timeout=sample)
        for pid in pids:
            peak[pid] = max(peak[pid], rss_bytes(pid))
    elapsed = time.perf_counter() - start
    transport.close()
    ok = sink.status == 200 and sink.received == size == sink.length
    return {"requests": 1, "errors": 0 if ok else 1, "bytes": sink.received,
            "status": sink.status, "seconds": elapsed,
            "mib_per_s": sink.received / MiB / elapsed if elapsed else 0.0,
            "rss_before_mib": sum(before.values()) / MiB,
            "rss_growth_mib": max(peak[p] - before[p] for p in pids) / MiB}


def contexts(certs: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """
    Client contexts: as the proxy (the provider wants a demo-CA client
    certificate) and as the demo consumer (for nginx and the proxy).
    """
    def make(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs / "spine-ca.pem"))
        ctx.load_cert_chain(str(certs / f"{name}.pem"), str(certs / f"{name}.key"))
        return ctx

    return make("proxy-client"), make("consumer-0")


def requests_for(port_of: Callable[[], int]) -> tuple[Callable[[str], bytes],
                                                      Callable[[str], bytes]]:
    """
    Request builders: direct to the provider, and the proxied form (target
    URL in the path, the four C{Ssp-*} headers with a fresh trace id, one
    bearer token per run) that nginx and the proxy both receive.
    """
    from ssp import demo

    token = demo.bearer_token(time.time())  # lives 300 s; one per run

    def direct(path: str) -> bytes:
        return (f"GET {path} HTTP/1.1\r\nHost: {demo.PROVIDER_HOST}\r\n"
                "Accept: application/fhir+json\r\n\r\n").encode()

    def proxied(path: str) -> bytes:
        return (f"GET /https://{demo.PROVIDER_HOST}{path} HTTP/1.1\r\n"
                f"Host: localhost:{port_of()}\r\nAccept: application/fhir+json\r\n"
                f"Ssp-From: {demo.CONSUMER_ASID}\r\nSsp-To: {demo.PROVIDER_ASID}\r\n"
                f"Ssp-InteractionID: {demo.METADATA_INTERACTION}\r\n"
                f"Authorization: Bearer {token}\r\n"
                f"Ssp-TraceID: {uuid.uuid4()}\r\n\r\n").encode()

    return direct, proxied


# -- the run -----------------------------------------------------------------

class Bench:
    """
    The processes of a run and the measurements taken against them.
    """

    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        self.args = args
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.notes: list[str] = []

    def start(self) -> None:
        from ssp import demo

        (self.root / "etc").mkdir()
        shutil.copy(REPO / "etc" / "demo-sds.ldif", self.root / "etc" / "demo-sds.ldif")
        demo.ensure_pki(self.root)
        self.provider, self.provider_port = spawn(["_provider", str(self.root)], self.root)
        self.procs.append(self.provider)
        self.nginx, nginx_port, why = (None, 0, "skipped (--no-nginx)")
        if self.args.nginx:
            self.nginx, nginx_port, why = start_nginx(self.root, self.provider_port)
        if self.nginx is not None:
            self.procs.append(self.nginx)
        else:
            self.notes.append(f"nginx row not available: {why}")
        self.floor, floor_port = spawn([str(self.root / "certs"), str(self.provider_port)],
                                       self.root, script=BENCH / "floor.py", name="floor")
        self.procs.append(self.floor)
        proxy, proxy_port = start_proxy(self.root, self.provider_port)
        self.proxies = [proxy]
        self.procs.append(proxy)
        as_proxy, as_consumer = contexts(self.root / "certs")
        direct_req, _ = requests_for(lambda: 0)
        self.targets = [Target("direct", self.provider_port, "orange.testlab.nhs.uk", as_proxy,
                               direct_req, lambda: [self.provider.pid])]
        if self.nginx is not None:
            nginx = self.nginx
            self.targets.append(Target("nginx", nginx_port, "localhost", as_consumer,
                                       requests_for(lambda: nginx_port)[1],
                                       lambda: process_tree(nginx.pid)[1:] or [nginx.pid]))
        self.targets.append(Target("floor", floor_port, "localhost", as_consumer,
                                   requests_for(lambda: floor_port)[1],
                                   lambda: [self.floor.pid]))
        self.targets.append(Target("ssp", proxy_port, "localhost", as_consumer,
                                   requests_for(lambda: proxy_port)[1],
                                   self.ssp_pids))
        print(f"provider :{self.provider_port}, nginx :{nginx_port or '-'}, floor :{floor_port}, "
              f"ssp :{proxy_port} (pid {self.proxies[0].pid}), work dir {self.root}",
              file=sys.stderr)

    def ssp_pids(self) -> list[int]:
        """
        The proxy processes now serving: one, or a twistd master and its
        workers.
        """
        return [pid for p in self.proxies for pid in process_tree(p.pid)]

    def pids(self) -> dict[str, list[int]]:
        groups = {"provider": [self.provider.pid], "ssp": self.ssp_pids(),
                  "floor": [self.floor.pid], "loadgen": [os.getpid()]}
        if self.nginx is not None:
            groups["nginx"] = process_tree(self.nginx.pid)
        return groups

    async def phase(self, label: str, coro: Any) -> dict:
        def cpu() -> dict[str, float]:
            return {name: sum(cpu_seconds(p) for p in pids) for name, pids in self.pids().items()}

        before, busy, started = cpu(), machine_busy_seconds(), time.monotonic()
        result = await coro
        after = cpu()
        n = max(result["requests"], 1)
        result["cpu_ms_per_request"] = {k: round((after[k] - before[k]) * 1000 / n, 3)
                                        for k in before}
        # CPU used by processes outside the benchmark, in cores: another
        # job on the machine makes every number of the phase unreliable.
        ours = sum(after.values()) - sum(before.values())
        elapsed = max(time.monotonic() - started, 1e-6)
        result["foreign_cores"] = round(
            max(0.0, machine_busy_seconds() - busy - ours) / elapsed, 2)
        print(f"  {label}: {result['requests']} requests, {result['errors']} errors",
              file=sys.stderr)
        return result

    async def measure(self) -> dict:
        a = self.args
        if a.only == "workers":
            return {"workers": await self.measure_workers()}
        for t in self.targets:  # warm-up: imports, pools, upstream connections, caches
            await closed_loop(t, max(100, a.concurrency * 10), a.concurrency, True, 10)
            await closed_loop(t, 20, 2, False, 10)
        out: dict[str, Any] = {"latency": {}, "keepalive": {}, "handshake": {}}
        for t in self.targets:
            out["latency"][t.name] = await self.phase(
                f"latency {t.name}", open_loop(t, a.rate, a.duration, a.concurrency))
        for t in self.targets:
            out["keepalive"][t.name] = await self.phase(
                f"keep-alive {t.name}",
                closed_loop(t, a.requests, a.concurrency, True, a.phase_limit))
        for t in self.targets:
            out["handshake"][t.name] = await self.phase(
                f"handshake {t.name}",
                closed_loop(t, a.handshakes, a.concurrency, False, a.phase_limit, a.resume))
        if a.stream_bytes:
            out["stream"] = {}
            for t in self.targets:
                out["stream"][t.name] = await self.phase(
                    f"stream {t.name}", stream(t, a.stream_bytes))
        if a.workers > 1:
            out["workers"] = await self.measure_workers()
        return out

    async def measure_workers(self) -> dict:
        """
        Keep-alive throughput of C{twistd ssp --workers 1} and of
        C{--workers N}, at a concurrency high enough to keep every worker
        busy.  The first proxy is stopped first: only one runs at a time.
        """
        a = self.args
        ssp = self.targets[-1]
        concurrency = a.concurrency * a.workers
        result: dict[str, Any] = {"concurrency": concurrency}
        for count in (1, a.workers):
            stop(self.proxies)
            self.procs = [p for p in self.procs if p not in self.proxies]
            proc, port = start_twistd_workers(self.root, self.provider_port, count,
                                              a.reuse_port)
            self.proxies = [proc]
            self.procs.append(proc)
            target = Target(f"ssp-w{count}", port, "localhost", ssp.ctx,
                            requests_for(lambda port=port: port)[1], self.ssp_pids)
            await closed_loop(target, max(100, concurrency * 10), concurrency, True, 10)
            # With one worker twistd serves itself; with more, its children do.
            workers = (sorted(process_tree(proc.pid)[1:], key=worker_number) if count > 1
                       else [proc.pid])
            audit = self.root / "var" / f"audit-w{count}"
            trails = [audit / f"worker-{k}" for k in range(count)] if count > 1 else [audit]
            before = {pid: cpu_seconds(pid) for pid in [proc.pid, *workers]}
            served = [authorised_records(d) for d in trails]
            result[str(count)] = phase = await self.phase(
                f"keep-alive ssp --workers {count}",
                closed_loop(target, a.requests * count, concurrency, True, a.phase_limit))
            used = {pid: round(cpu_seconds(pid) - b, 2) for pid, b in before.items()}
            phase["cpu_split_s"] = [used[pid] for pid in workers]
            phase["master_cpu_s"] = used[proc.pid] if count > 1 else 0.0
            stop(self.proxies)
            phase["requests_split"] = [authorised_records(d) - n for d, n in zip(trails, served)]
        return result


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _fmt_ratio(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def hop_cpu_ms(phase: dict, name: str) -> float:
    """
    The CPU ms per request of the hop C{name} itself in C{phase}.
    """
    own = {"direct": "provider"}.get(name, name)
    return phase[name]["cpu_ms_per_request"][own]


def verdicts(r: dict) -> list[tuple[str, str, str, bool | None]]:
    """
    Each issue-21 target: (name, measured, target, met?).  CPU is compared
    with the floor (a bare Twisted relay, C{bench/floor.py}) and, for
    streams, with nginx.
    """
    lat, ka, hs = r["latency"], r["keepalive"], r["handshake"]
    out: list[tuple[str, str, str, bool | None]] = []
    added50 = lat["ssp"]["p50_ms"] - lat["direct"]["p50_ms"]
    out.append(("added latency p50 @100/s", f"{added50:+.2f} ms", "<= 1 ms", added50 <= 1))
    if "floor" in ka:
        k = _ratio(hop_cpu_ms(ka, "ssp"), hop_cpu_ms(ka, "floor"))
        h = _ratio(hop_cpu_ms(hs, "ssp"), hop_cpu_ms(hs, "floor"))
        out.append(("keep-alive CPU/request vs floor", _fmt_ratio(k), "<= 1.5x",
                    k is not None and k <= 1.5))
        out.append(("new-connection CPU/request vs floor", _fmt_ratio(h), "<= 1.3x",
                    h is not None and h <= 1.3))
    if "stream" in r:
        s = r["stream"]
        if "nginx" in s:
            c = _ratio(hop_cpu_ms(s, "ssp"), hop_cpu_ms(s, "nginx"))
            out.append(("stream CPU/GiB vs nginx", _fmt_ratio(c), "<= 1.2x",
                        c is not None and c <= 1.2 and not s["ssp"]["errors"]))
        g = s["ssp"]["rss_growth_mib"]
        out.append(("stream proxy RSS growth", f"{g:.1f} MiB", "<= 32 MiB", g <= 32))
    else:
        out.append(("stream", "not run (--stream-bytes 0)", "", None))
    out.append(workers_verdict(r))
    return out


def workers_verdict(r: dict) -> tuple[str, str, str, bool | None]:
    if "workers" not in r:
        return ("CPU/request, 2 workers vs 1", "not available (--workers 0/1)", "<= 1.1x", None)
    w = r["workers"]
    n = str(r["args"]["workers"])
    x = _ratio(w[n]["cpu_ms_per_request"]["ssp"], w["1"]["cpu_ms_per_request"]["ssp"])
    return (f"CPU/request, {n} workers vs 1", _fmt_ratio(x), "<= 1.1x",
            x is not None and x <= 1.1)


def workers_rows(r: dict) -> list[tuple[str, str]]:
    """
    The workers row as (label, value) lines: throughput, CPU and how the
    requests and CPU were split between the workers.
    """
    w = r["workers"]
    n = str(r["args"]["workers"])
    mode = "reuse_port" if r["args"]["reuse_port"] else "shared socket"
    return [
        (f"keep-alive req/s C={w['concurrency']}: twistd --workers 1 / {n} ({mode})",
         f"{w['1']['rps']:.0f} / {w[n]['rps']:.0f}"),
        ("  hop CPU ms/req (master included)",
         f"{w['1']['cpu_ms_per_request']['ssp']:.3f} / {w[n]['cpu_ms_per_request']['ssp']:.3f}"),
        (f"  {n} workers: requests each", " / ".join(str(c) for c in w[n]["requests_split"])),
        (f"  {n} workers: CPU s each (master)",
         " / ".join(f"{c:.1f}" for c in w[n]["cpu_split_s"]) + f" ({w[n]['master_cpu_s']:.1f})"),
    ]


def workers_warnings(r: dict) -> list[str]:
    w = r["workers"]
    errors = sum(w[k]["errors"] for k in w if isinstance(w[k], dict))
    lines = [f"WARNING: {errors} failed requests"] if errors else []
    split = w[str(r["args"]["workers"])]["requests_split"]
    if min(split) < 0.5 * sum(split) / len(split):
        lines.append(f"WARNING: workers served {' / '.join(map(str, split))} requests: the "
                     "kernel gave most keep-alive connections to some workers, so the "
                     "workers ratio measures that split, not capacity")
    return lines


def workers_table(r: dict) -> str:
    """
    The report of C{--only workers}.
    """
    rows = workers_rows(r)
    width = max(len(label) for label, _ in rows)
    lines = [f"{label.ljust(width)}  {value}" for label, value in rows]
    name, measured, target, met = workers_verdict(r)
    lines += ["", f"target (issue 21): {name} {measured} (target {target}) "
                  f"{'met' if met else 'NOT MET'}"]
    busy = busy_phases(r)
    if busy:
        lines.append("WARNING: other processes used CPU during (phase/target cores): "
                     + ", ".join(busy) + "; numbers from a busy machine are not comparable")
    return "\n".join(lines + workers_warnings(r))


def busy_phases(r: dict) -> list[str]:
    """
    The phases during which other processes used more than
    L{FOREIGN_LIMIT} cores, as C{phase/target cores}.
    """
    phases = [(name, r.get(name, {})) for name in ("latency", "keepalive", "handshake", "stream")]
    phases.append(("workers", {k: v for k, v in r.get("workers", {}).items()
                               if isinstance(v, dict)}))
    return [f"{name}/{t} {x['foreign_cores']:.1f}" for name, phase in phases
            for t, x in phase.items() if x.get("foreign_cores", 0) > FOREIGN_LIMIT]


def table(r: dict) -> str:
    lat, ka, hs = r["latency"], r["keepalive"], r["handshake"]
    names = [n for n in ("direct", "nginx", "floor", "ssp") if n in lat]

    def row(label: str, values: dict[str, str]) -> tuple[str, ...]:
        return (label,) + tuple(values.get(n, "") for n in names)

    def cpu(phase: dict, group: str) -> dict[str, str]:
        return {n: f"{phase[n]['cpu_ms_per_request'][group]:.3f}"
                for n in names if group in phase[n]["cpu_ms_per_request"]}

    def hop_cpu(phase: dict) -> dict[str, str]:
        return {n: f"{hop_cpu_ms(phase, n):.3f}" for n in names}

    rate = r["args"]["rate"]
    rows = [
        ("metric",) + tuple(names),
        row(f"latency p50 ms @{rate:g}/s", {n: f"{lat[n]['p50_ms']:.2f}" for n in names}),
        row(f"latency p99 ms @{rate:g}/s", {n: f"{lat[n]['p99_ms']:.2f}" for n in names}),
        row("  added p50 / p99 ms", {n: f"+{lat[n]['p50_ms'] - lat['direct']['p50_ms']:.2f} / "
                                      f"+{lat[n]['p99_ms'] - lat['direct']['p99_ms']:.2f}"
                                   for n in names if n != "direct"}),
        row(f"keep-alive req/s (C={r['args']['concurrency']})",
            {n: f"{ka[n]['rps']:.0f}" for n in names}),
        row("  hop CPU ms/req", hop_cpu(ka)),
        row("  provider / loadgen CPU ms/req",
            {n: f"{ka[n]['cpu_ms_per_request']['provider']:.2f} / "
                f"{ka[n]['cpu_ms_per_request']['loadgen']:.2f}" for n in names}),
        row("new-handshake req/s" + (" (resuming)" if r["args"]["resume"] else ""),
            {n: f"{hs[n]['rps']:.0f}" for n in names}),
        row("  TLS sessions resumed", {n: f"{hs[n].get('resumed', 0)}" for n in names}),
        row("  hop CPU ms/req", hop_cpu(hs)),
        row("  provider / loadgen CPU ms/req",
            {n: f"{hs[n]['cpu_ms_per_request']['provider']:.2f} / "
                f"{hs[n]['cpu_ms_per_request']['loadgen']:.2f}" for n in names}),
    ]
    if "stream" in r:
        s = r["stream"]
        rows += [
            row(f"stream {r['args']['stream_bytes'] / GiB:g} GiB MiB/s",
                {n: f"{s[n]['mib_per_s']:.0f}" for n in names}),
            row("  hop CPU s/GiB", {n: f"{hop_cpu_ms(s, n) / 1000 * GiB / r['args']['stream_bytes']:.2f}"
                                    for n in names}),
            row("  hop RSS growth MiB", {n: f"{s[n]['rss_growth_mib']:.1f}" for n in names}),
        ]
    if "workers" in r:
        rows += [row(label, {"ssp": value}) for label, value in workers_rows(r)]
    widths = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths)).rstrip() for x in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))

    checks = verdicts(r)
    busy = busy_phases(r)
    lines += ["", "targets (issue 21)" + (": UNRELIABLE, the machine was busy (see below)"
                                         if busy else ":")]
    width = max(len(c[0]) for c in checks)
    for name, measured, target, met in checks:
        mark = {True: "met", False: "NOT MET", None: "-"}[met]
        lines.append(f"  {name.ljust(width)}  {measured:>14}  {target:<10} {mark}")
    for base in ("floor", "nginx"):
        if base in ka:
            def cost(phase: dict, base: str = base) -> str:
                return _fmt_ratio(_ratio(hop_cpu_ms(phase, "ssp"), hop_cpu_ms(phase, base)))

            stream_cost = f", stream {cost(r['stream'])}" if "stream" in r else ""
            lines.append(f"  (hop CPU, ssp / {base}: keep-alive {cost(ka)}, "
                         f"handshake {cost(hs)}{stream_cost})")
    phases = [lat, ka, hs] + [r[k] for k in ("stream",) if k in r]
    errors = sum(x["errors"] for ph in phases for x in ph.values())
    truncated = [f"{n}/{t}" for n, ph in (("keepalive", ka), ("handshake", hs))
                 for t, x in ph.items() if x["truncated"]]
    lines += [f"NOTE: {n}" for n in r.get("notes", [])]
    if busy:
        lines.append("WARNING: other processes used CPU during (phase/target cores): "
                     + ", ".join(busy) + "; numbers from a busy machine are not comparable")
    if errors:
        lines.append(f"WARNING: {errors} failed requests")
    if truncated:
        lines.append(f"WARNING: hit the per-phase time limit: {', '.join(truncated)}")
    if "workers" in r:
        lines += workers_warnings(r)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_provider"]:
        provider_main(Path(argv[1]))
        return 0
    if argv[:1] == ["_proxy"]:
        proxy_main(Path(argv[1]), int(argv[2]), int(argv[3]))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000,
                        help="requests per target in the keep-alive phase (default 3000)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections / workers of the load generator (default 8)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="open-loop rate for the latency phase, req/s (default 100)")
    parser.add_argument("--duration", type=float, default=10.0,
                        help="seconds per target in the latency phase (default 10)")
    parser.add_argument("--handshakes", type=int, default=None,
                        help="requests per target in the handshake phase (default requests/3)")
    parser.add_argument("--resume", action="store_true",
                        help="new-handshake phase: each connection offers the previous session")
    parser.add_argument("--phase-limit", type=float, default=12.0,
                        help="cap, in seconds, on each throughput measurement (default 12)")
    parser.add_argument("--stream-bytes", type=int, default=GiB,
                        help="size of the streamed response (default 1 GiB; 0 skips it)")
    parser.add_argument("--workers", type=int, default=2,
                        help="N of twistd ssp --workers N in the workers row (default 2; 1 skips it)")
    parser.add_argument("--reuse-port", action=argparse.BooleanOptionalAction, default=True,
                        help="[listen] reuse_port in the workers row: one SO_REUSEPORT socket "
                             "per worker (default), or with --no-reuse-port one shared socket")
    parser.add_argument("--only", choices=["workers"], default=None,
                        help="run only the workers row (1 vs N workers)")
    parser.add_argument("--no-nginx", dest="nginx", action="store_false",
                        help="leave out the nginx baseline")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: few requests, 64 MiB stream (about 15 s)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work directory (logs, audit, nginx files)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the raw results "
                             "(default bench/results-<UTC timestamp>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.duration = min(args.requests, 600), min(args.duration, 2.0)
        args.stream_bytes = min(args.stream_bytes, 64 * MiB)
    if args.handshakes is None:
        args.handshakes = max(1, args.requests // 3)
    if args.only == "workers":
        if args.workers < 2:
            parser.error("--only workers needs --workers 2 or more")
        args.nginx = False
    stamp = datetime.datetime.now(datetime.UTC)
    if args.json is None:
        args.json = BENCH / f"results-{stamp:%Y%m%dT%H%M%SZ}.json"

    sys.path.insert(0, str(REPO))
    root = Path(tempfile.mkdtemp(prefix="ssp-bench-")).resolve()
    bench = Bench(args, root)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        bench.start()
        started = time.monotonic()
        results = asyncio.run(bench.measure())
        results["args"] = {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}
        results["notes"] = bench.notes
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform(),
                              "openssl": ssl.OPENSSL_VERSION,
                              "nginx": _nginx_version()}
        results["date"] = stamp.isoformat(timespec="seconds")
        results["seconds"] = round(time.monotonic() - started, 1)
        text = workers_table(results) if args.only else table(results)
        print(text)
        results["table"] = text
        results["busy_phases"] = busy_phases(results)
        results["targets"] = [dict(zip(("name", "measured", "target", "met"), v))
                              for v in ([workers_verdict(results)] if args.only
                                        else verdicts(results))]
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stop(bench.procs)
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _nginx_version() -> str:
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    try:
        return subprocess.run([binary, "-v"], capture_output=True, text=True,
                              timeout=5).stderr.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    raise SystemExit(main())
