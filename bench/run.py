#!/usr/bin/env python3
"""
Side-by-side benchmark: the demo provider directly vs. through the proxy.

Run by hand from the repository root::

    python bench/run.py [--requests N] [--concurrency C] [--rate R] [--duration S]

One provider process and one proxy process (the proxy forwards to that same
provider) are started on loopback in a throw-away directory; this process
is the load generator (asyncio + ssl, raw HTTP/1.1 over mutual TLS).
See bench/README.md for what each number means.  Not a test: nothing under
tests/ imports it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import select
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
METADATA_PATH = "/B82617/STU3/1/gpconnect/fhir/metadata"


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
    The demo provider on an ephemeral loopback port; prints C{PORT n}.
    """
    from twisted.internet import reactor

    from ssp import demo

    _child_logging(root, "provider")
    listening = demo.listen_provider(reactor, demo.ensure_pki(root))
    reactor.callWhenRunning(_announce, listening.getHost().port)
    reactor.run()


def proxy_main(root: Path, provider_port: int) -> None:
    """
    The demo proxy (every check, file audit with fsync "always") in front
    of the provider on C{provider_port}; prints C{PORT n}.
    """
    from twisted.internet import reactor

    from ssp import demo
    from ssp.service import SSPService

    _child_logging(root, "proxy")
    config = demo.demo_config(root, demo.ensure_pki(root), provider_port,
                              listen="tcp:0:interface=127.0.0.1",
                              admin="tcp:0:interface=127.0.0.1")
    service = SSPService(config, reactor)

    def start() -> None:
        service.startService()
        service.listening().addCallback(lambda port: _announce(port.getHost().port))

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


def spawn(args: list[str], root: Path, timeout: float = 20.0) -> tuple[subprocess.Popen, int]:
    """
    Start this script in a child role and wait for its C{PORT n} line.
    """
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve())] + args,
                            cwd=root, env=env, stdout=subprocess.PIPE,
                            stderr=open(root / f"{args[0]}.stderr", "w"))
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            err = (root / f"{args[0]}.stderr").read_text()[-2000:]
            raise SystemExit(f"{args[0]} did not start:\n{err}")
        if select.select([proc.stdout], [], [], left)[0]:
            chunk = os.read(proc.stdout.fileno(), 4096)
            buf += chunk
    line = buf.split(b"\n", 1)[0].decode()
    if not line.startswith("PORT "):
        proc.kill()
        raise SystemExit(f"{args[0]}: unexpected output {line!r}")
    return proc, int(line.split()[1])


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def cpu_seconds(pid: int) -> float:
    """
    User + system CPU seconds of C{pid} (Linux C{/proc}).
    """
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- load generator ----------------------------------------------------------

class Target:
    """
    Where to connect and what request bytes to send.
    """

    def __init__(self, name: str, port: int, server_hostname: str, ctx: ssl.SSLContext,
                 request: Any) -> None:
        self.name = name
        self.port = port
        self.server_hostname = server_hostname
        self.ctx = ctx
        self.request = request  # () -> bytes

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port, ssl=self.ctx,
                                             server_hostname=self.server_hostname)


async def exchange(target: Target, reader: asyncio.StreamReader,
                   writer: asyncio.StreamWriter) -> bool:
    """
    Send one GET and read the whole response (Content-Length or chunked).
    Returns whether the connection may be reused; raises on a non-200.
    """
    writer.write(target.request())
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
                except (asyncio.TimeoutError, OSError, ssl.SSLError):
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
    ms = [x * 1000 for x in latencies]
    return {"requests": len(ms), "errors": errors,
            "p50_ms": percentile(ms, 50), "p99_ms": percentile(ms, 99),
            "mean_ms": statistics.fmean(ms), "max_ms": max(ms)}


async def closed_loop(target: Target, requests: int, concurrency: int, keepalive: bool,
                      time_limit: float) -> dict:
    """
    C{concurrency} workers each sending back-to-back requests, over one
    kept-alive connection each, or over a new TLS connection per request.
    """
    remaining = requests
    done = 0
    errors = 0
    deadline = time.perf_counter() + time_limit

    async def worker() -> None:
        nonlocal remaining, done, errors
        conn = None
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            try:
                if conn is None:
                    conn = await target.connect()
                reusable = await exchange(target, *conn)
                done += 1
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
    return {"requests": done, "errors": errors, "seconds": elapsed,
            "rps": done / elapsed if elapsed else 0.0,
            "truncated": done + errors < requests}


def contexts(certs: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """
    Client contexts: as the proxy (provider wants a demo-CA client
    certificate) and as the demo consumer (for the proxy).
    """
    def make(name: str) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(certs / "spine-ca.pem"))
        ctx.load_cert_chain(str(certs / f"{name}.pem"), str(certs / f"{name}.key"))
        return ctx

    return make("proxy-client"), make("consumer-0")


def targets(certs: Path, provider_port: int, proxy_port: int) -> tuple[Target, Target]:
    from ssp import demo

    as_proxy, as_consumer = contexts(certs)
    direct_bytes = (f"GET {METADATA_PATH} HTTP/1.1\r\n"
                    f"Host: {demo.PROVIDER_HOST}\r\nAccept: application/fhir+json\r\n\r\n"
                    ).encode()
    token = demo.bearer_token(time.time())  # lives 300 s; one per run
    proxied_head = (f"GET /{demo.PROVIDER_ENDPOINT}/metadata HTTP/1.1\r\n"
                    f"Host: localhost:{proxy_port}\r\nAccept: application/fhir+json\r\n"
                    f"Ssp-From: {demo.CONSUMER_ASID}\r\nSsp-To: {demo.PROVIDER_ASID}\r\n"
                    f"Ssp-InteractionID: {demo.METADATA_INTERACTION}\r\n"
                    f"Authorization: Bearer {token}\r\n")

    def proxied_bytes() -> bytes:
        return f"{proxied_head}Ssp-TraceID: {uuid.uuid4()}\r\n\r\n".encode()

    return (Target("direct", provider_port, demo.PROVIDER_HOST, as_proxy, lambda: direct_bytes),
            Target("proxied", proxy_port, "localhost", as_consumer, proxied_bytes))


async def measure(args: argparse.Namespace, direct: Target, proxied: Target,
                  pids: dict[str, int]) -> dict:
    def cpu() -> dict[str, float]:
        return {name: cpu_seconds(pid) for name, pid in pids.items()}

    async def phase(label: str, coro: Any) -> dict:
        before = cpu()
        result = await coro
        after = cpu()
        n = max(result["requests"], 1)
        result["cpu_ms_per_request"] = {k: round((after[k] - before[k]) * 1000 / n, 3)
                                        for k in before}
        print(f"  {label}: {result['requests']} requests, {result['errors']} errors",
              file=sys.stderr)
        return result

    for t in (direct, proxied):  # warm-up: imports, pools, upstream connections
        await closed_loop(t, max(50, args.concurrency * 5), args.concurrency, True, 10)
        await closed_loop(t, 10, 2, False, 10)

    out: dict = {}
    out["latency"] = {t.name: await phase(f"latency {t.name}",
                                          open_loop(t, args.rate, args.duration, args.concurrency))
                      for t in (direct, proxied)}
    out["keepalive"] = {t.name: await phase(f"keep-alive {t.name}",
                                            closed_loop(t, args.requests, args.concurrency, True,
                                                        args.phase_limit))
                        for t in (direct, proxied)}
    out["handshake"] = {t.name: await phase(f"handshake {t.name}",
                                            closed_loop(t, args.handshakes, args.concurrency,
                                                        False, args.phase_limit))
                        for t in (direct, proxied)}
    return out


def table(r: dict) -> str:
    lat, ka, hs = r["latency"], r["keepalive"], r["handshake"]
    d, p = "direct", "proxied"

    def ratio(a: float, b: float) -> str:
        return f"{a / b:.2f}x" if b else "n/a"

    def cpu(x: dict) -> str:
        c = x["cpu_ms_per_request"]
        return f"prov {c['provider']:.2f} / ssp {c['proxy']:.2f} / gen {c['loadgen']:.2f}"

    rows = [
        ("metric", "direct", "proxied", "proxied vs direct", "CPU ms/req (proxied run)"),
        (f"latency p50 ms @{r['args']['rate']:g}/s", f"{lat[d]['p50_ms']:.2f}",
         f"{lat[p]['p50_ms']:.2f}", f"+{lat[p]['p50_ms'] - lat[d]['p50_ms']:.2f} ms",
         cpu(lat[p])),
        (f"latency p99 ms @{r['args']['rate']:g}/s", f"{lat[d]['p99_ms']:.2f}",
         f"{lat[p]['p99_ms']:.2f}", f"+{lat[p]['p99_ms'] - lat[d]['p99_ms']:.2f} ms", ""),
        (f"keep-alive req/s (C={r['args']['concurrency']})", f"{ka[d]['rps']:.0f}",
         f"{ka[p]['rps']:.0f}", ratio(ka[p]["rps"], ka[d]["rps"]), cpu(ka[p])),
        ("new-handshake req/s", f"{hs[d]['rps']:.0f}", f"{hs[p]['rps']:.0f}",
         ratio(hs[p]["rps"], hs[d]["rps"]), cpu(hs[p])),
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    added50 = lat[p]["p50_ms"] - lat[d]["p50_ms"]
    added99 = lat[p]["p99_ms"] - lat[d]["p99_ms"]
    lines += [
        "",
        f"added latency p50 {added50:.2f} ms (target <= 1 ms), "
        f"p99 {added99:.2f} ms (target <= 5 ms)",
        f"keep-alive ratio {ratio(ka[p]['rps'], ka[d]['rps'])}, "
        f"handshake ratio {ratio(hs[p]['rps'], hs[d]['rps'])} "
        "(vs the demo provider, not nginx)",
        f"direct-run CPU ms/req: keep-alive {cpu(ka[d])}; handshake {cpu(hs[d])}",
    ]
    errors = sum(x["errors"] for ph in (lat, ka, hs) for x in ph.values())
    truncated = [f"{n}/{t}" for n, ph in (("keepalive", ka), ("handshake", hs))
                 for t, x in ph.items() if x["truncated"]]
    if errors:
        lines.append(f"WARNING: {errors} failed requests")
    if truncated:
        lines.append(f"WARNING: hit the per-phase time limit: {', '.join(truncated)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_provider"]:
        provider_main(Path(argv[1]))
        return 0
    if argv[:1] == ["_proxy"]:
        proxy_main(Path(argv[1]), int(argv[2]))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=3000,
                        help="requests per target in the keep-alive phase (default 3000)")
    parser.add_argument("--concurrency", type=int, default=8,
                        help="connections / workers (default 8)")
    parser.add_argument("--rate", type=float, default=100.0,
                        help="open-loop rate for the latency phase, req/s (default 100)")
    parser.add_argument("--duration", type=float, default=5.0,
                        help="seconds per target in the latency phase (default 5)")
    parser.add_argument("--handshakes", type=int, default=None,
                        help="requests per target in the handshake phase (default requests/3)")
    parser.add_argument("--phase-limit", type=float, default=12.0,
                        help="cap, in seconds, on each throughput measurement (default 12)")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results-latest.json")
    args = parser.parse_args(argv)
    if args.handshakes is None:
        args.handshakes = max(1, args.requests // 3)

    sys.path.insert(0, str(REPO))
    root = Path(tempfile.mkdtemp(prefix="ssp-bench-"))
    procs: list[subprocess.Popen] = []
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    try:
        (root / "etc").mkdir()
        shutil.copy(REPO / "etc" / "demo-sds.ldif", root / "etc" / "demo-sds.ldif")
        from ssp import demo

        demo.ensure_pki(root)
        provider, provider_port = spawn(["_provider", str(root)], root)
        procs.append(provider)
        proxy, proxy_port = spawn(["_proxy", str(root), str(provider_port)], root)
        procs.append(proxy)
        print(f"provider :{provider_port} (pid {provider.pid}), proxy :{proxy_port} "
              f"(pid {proxy.pid}), work dir {root}", file=sys.stderr)
        direct, proxied = targets(root / "certs", provider_port, proxy_port)
        pids = {"provider": provider.pid, "proxy": proxy.pid, "loadgen": os.getpid()}
        started = time.monotonic()
        results = asyncio.run(measure(args, direct, proxied, pids))
        results["args"] = {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()}
        results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(),
                              "platform": platform.platform(),
                              "openssl": ssl.OPENSSL_VERSION}
        results["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds")
        results["seconds"] = round(time.monotonic() - started, 1)
        text = table(results)
        print(text)
        results["table"] = text
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {args.json}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        stop(procs)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
