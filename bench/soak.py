#!/usr/bin/env python3
"""
Soak: minutes of mixed, partly hostile load against the proxy running as a
real C{twistd ssp} process with the file audit, then proof that nothing
refused was forwarded, nothing crashed, no audit record was lost and
memory stayed flat.

Run by hand from the repository root::

    python bench/soak.py [--minutes 30] [--workers 6] [--sample 5] [--keep]

Everything runs on loopback in a throw-away directory (C{/tmp/ssp-soak-*},
removed on exit unless C{--keep}): a development PKI, a provider process
that writes down the trace ID of every request it receives, and the proxy
under C{twistd}.  This process is the load: C{--workers} threads of mixed
traffic plus one thread of slow clients.  See C{docs/faults.md}.  Not a
test: nothing under C{tests/} imports it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ssp import chain, demo
from ssp.verify import verify_files
from ssp.pki import DevelopmentPKI, create_development_pki

HOST = demo.PROVIDER_HOST
ENDPOINT = demo.PROVIDER_ENDPOINT
LEGACY_ASID = "918999198993"
LEGACY_ENDPOINT = f"https://{HOST}/gpconnect-demonstrator/v1/fhir"
OTHER_CONSUMER = "200000042019"
UNKNOWN_ASID = "999999999999"
TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
REFUSALS = {400, 403, 405, 408, 413, 414, 429, 431, 495, 496, 497, 503}


# -- the provider process ------------------------------------------------------

def provider_main(root: Path) -> None:
    """
    A provider that appends the C{Ssp-TraceID} of every request it
    receives to C{root/provider-seen.txt}, answers C{/slow} after 0.5 s and
    everything else at once; prints C{PORT n}.
    """
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET

    seen = (root / "provider-seen.txt").open("a", buffering=1)

    class SoakProvider(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            trace = request.getHeader(b"ssp-traceid") or b"-"
            seen.write(trace.decode("latin-1") + "\n")
            body = request.content.read() if request.content is not None else b""
            request.setHeader(b"Content-Type", b"application/fhir+json")
            answer = b'{"resourceType": "CapabilityStatement", "received": %d}' % len(body)
            if request.path.endswith(b"/slow"):
                reactor.callLater(0.5, _finish_later, request, answer)
                return NOT_DONE_YET
            return answer

    def _finish_later(request: Any, answer: bytes) -> None:
        if not request._disconnected:
            request.write(answer)
            request.finish()

    port = demo.listen_provider(reactor, DevelopmentPKI(root / "certs"), SoakProvider())
    reactor.callWhenRunning(lambda: print(f"PORT {port.getHost().port}", flush=True))
    reactor.run()


# -- processes -----------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment() -> dict[str, str]:
    paths = [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return dict(os.environ, PYTHONPATH=os.pathsep.join(paths))


def start_provider(root: Path) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "--provider", str(root)],
        cwd=root, env=environment(), stdout=subprocess.PIPE,
        stderr=(root / "provider.log").open("w"), text=True)
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.startswith("PORT "):
        process.kill()
        raise SystemExit("provider did not start:\n" + (root / "provider.log").read_text())
    return process, int(line.split()[1])


def write_config(root: Path, port: int, provider_port: int) -> Path:
    certs = root / "certs"
    path = root / "ssp.toml"
    path.write_text(f"""
[listen]
endpoint = "tcp:{port}:interface=127.0.0.1"
idle_timeout = 10.0
header_timeout = 5.0
[tls]
certificate = "{certs}/proxy.pem"
private_key = "{certs}/proxy.key"
client_ca = "{certs}/spine-ca.pem"
crls = ["{certs}/spine-ca.crl.pem"]
[upstream]
certificate = "{certs}/proxy-client.pem"
private_key = "{certs}/proxy-client.key"
ca = "{certs}/spine-ca.pem"
response_timeout = 10.0
[upstream.resolve]
"{HOST}:443" = "127.0.0.1:{provider_port}"
[directory]
ldif = "{REPO}/etc/demo-sds.ldif"
[audit]
directory = "{root}/audit"
durability = "always"
key_file = "{demo.audit_key(certs)}"
[admin]
endpoint = ""
[log]
access_log = false
[throttle.consumer.overrides.{OTHER_CONSUMER}]
rate = 1
period = 60.0
burst = 2
[throttle.provider.overrides.{LEGACY_ASID}]
rate = 1
period = 60.0
burst = 1
[[agreements]]
sender = "{demo.CONSUMER_ASID}"
receiver = "{demo.PROVIDER_ASID}"
[[agreements]]
sender = "{demo.CONSUMER_ASID}"
receiver = "{LEGACY_ASID}"
[[agreements]]
sender = "{OTHER_CONSUMER}"
receiver = "{demo.PROVIDER_ASID}"
""")
    return path


def start_proxy(root: Path, config: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        TWISTD + ["-n", "--pidfile=", "--logfile", str(root / "twistd.log"), "ssp",
                  "--config", str(config)],
        cwd=root, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("proxy exited:\n" + (root / "twistd.log").read_text()[-3000:])
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return process
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("proxy did not listen within 60 s")


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# -- the client side -----------------------------------------------------------

class Sent:
    """
    One request (or connection) the soak made.

    @ivar audited: it must have exactly one C{completed} audit record
        carrying its trace ID.
    @ivar forwardable: the proxy may forward it; when false, the provider
        seeing its trace ID is a failure.
    """

    __slots__ = ("audited", "error", "forwardable", "kind", "status", "trace")

    def __init__(self, trace: str, kind: str, audited: bool, forwardable: bool) -> None:
        self.trace, self.kind = trace, kind
        self.audited, self.forwardable = audited, forwardable
        self.status: int | None = None
        self.error: str | None = None


class Client:
    """
    Blocking TLS clients with each consumer certificate, and a minimal
    HTTP/1.1 response reader that copes with pipelining.
    """

    def __init__(self, port: int, certs: Path) -> None:
        self.port = port
        self.contexts: dict[str | None, ssl.SSLContext] = {}
        for cert in (None, "consumer-0", "consumer-1", "consumer-expired", "consumer-revoked",
                     "consumer-untrusted"):
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(str(certs / "spine-ca.pem"))
            if cert is not None:
                context.load_cert_chain(str(certs / f"{cert}.pem"), str(certs / f"{cert}.key"))
            self.contexts[cert] = context
        weak = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        weak.check_hostname, weak.verify_mode = False, ssl.CERT_NONE
        weak.maximum_version = ssl.TLSVersion.TLSv1_2
        weak.set_ciphers("AES128-SHA:AES256-SHA")
        self.weak = weak

    def connect(self, cert: str | None = "consumer-0", timeout: float = 30) -> ssl.SSLSocket:
        plain = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        try:
            return self.contexts[cert].wrap_socket(plain, server_hostname="localhost")
        except BaseException:
            plain.close()
            raise


def read_response(f: Any) -> tuple[int, dict[str, str], bytes]:
    """
    One response from a buffered socket file: status, headers (lower-case
    names, last value wins) and body (Content-Length, chunked, or to EOF).
    """
    line = f.readline(65537)
    if not line:
        raise ConnectionError("connection closed before a response")
    status = int(line.split(b" ", 2)[1])
    headers: dict[str, str] = {}
    while True:
        line = f.readline(65537)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int(f.readline().split(b";")[0], 16)
            if size == 0:
                while f.readline() not in (b"\r\n", b"\n", b""):
                    pass
                break
            parts.append(f.read(size))
            f.readline()
        body = b"".join(parts)
    else:
        body = f.read()
    return status, headers, body


def request_bytes(method: str, target: str, headers: dict[str, str], body: bytes = b"",
                  version: str = "HTTP/1.1") -> bytes:
    lines = [f"{method} {target} {version}", "Host: localhost"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def spine(trace: str, sender: str = demo.CONSUMER_ASID, receiver: str = demo.PROVIDER_ASID,
          audience: str = ENDPOINT, token_age: float = 0.0) -> dict[str, str]:
    return {
        "Ssp-TraceID": trace,
        "Ssp-From": sender,
        "Ssp-To": receiver,
        "Ssp-InteractionID": demo.METADATA_INTERACTION,
        "Authorization": "Bearer " + demo.bearer_token(time.time() - token_age, audience),
    }


class Load:
    """
    The scenarios, each one function recording what it sent.
    """

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sent: list[Sent] = []
        self.lock = threading.Lock()
        self.connection_refusals: collections.Counter[str] = collections.Counter()
        self.slowloris_closed: list[float | None] = []

    def record(self, kind: str, audited: bool = True, forwardable: bool = False) -> Sent:
        item = Sent(str(uuid.uuid4()), kind, audited, forwardable)
        with self.lock:
            self.sent.append(item)
        return item

    def exchange(self, items: list[Sent], data: bytes, cert: str | None = "consumer-0",
                 pieces: int = 1, pause: float = 0.0) -> None:
        """
        Send C{data} (in C{pieces} with C{pause} between them) and read one
        response per item.
        """
        try:
            with self.client.connect(cert) as sock:
                step = max(1, len(data) // pieces)
                for start in range(0, len(data), step):
                    sock.sendall(data[start:start + step])
                    if pause:
                        time.sleep(pause)
                f = sock.makefile("rb")
                for item in items:
                    item.status = read_response(f)[0]
        except (OSError, ValueError, IndexError) as e:
            for item in items:
                if item.status is None:
                    item.error = type(e).__name__

    # Admitted traffic.

    def good(self) -> None:
        item = self.record("good", forwardable=True)
        self.exchange([item], request_bytes("GET", f"/{ENDPOINT}/metadata", spine(item.trace)))

    def keep_alive(self) -> None:
        items = [self.record("keep-alive", forwardable=True) for _ in range(3)]
        try:
            with self.client.connect() as sock:
                f = sock.makefile("rb")
                for item in items:
                    sock.sendall(request_bytes("GET", f"/{ENDPOINT}/metadata", spine(item.trace)))
                    item.status = read_response(f)[0]
        except (OSError, ValueError) as e:
            for item in items:
                item.error = item.error or type(e).__name__

    def pipelined(self) -> None:
        items = [self.record("pipelined", forwardable=True) for _ in range(2)]
        data = b"".join(request_bytes("GET", f"/{ENDPOINT}/metadata", spine(i.trace))
                        for i in items)
        self.exchange(items, data)

    def upload(self) -> None:
        item = self.record("upload", forwardable=True)
        body = os.urandom(64 * 1024)
        headers = {**spine(item.trace), "Content-Length": str(len(body))}
        self.exchange([item], request_bytes("POST", f"/{ENDPOINT}/echo", headers, body))

    def chunked_upload(self) -> None:
        item = self.record("chunked-upload", forwardable=True)
        body = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in [os.urandom(4096)] * 8) + b"0\r\n\r\n"
        headers = {**spine(item.trace), "Transfer-Encoding": "chunked"}
        self.exchange([item], request_bytes("POST", f"/{ENDPOINT}/echo", headers, body))

    def http_1_0(self) -> None:
        item = self.record("http/1.0", forwardable=True)
        self.exchange([item], request_bytes("GET", f"/{ENDPOINT}/metadata", spine(item.trace),
                                            version="HTTP/1.0"))

    def throttled_consumer(self) -> None:
        item = self.record("429-or-200", forwardable=True)
        headers = spine(item.trace, sender=OTHER_CONSUMER)
        self.exchange([item], request_bytes("GET", f"/{ENDPOINT}/metadata", headers), "consumer-1")

    def throttled_provider(self) -> None:
        item = self.record("503-or-200", forwardable=True)
        headers = spine(item.trace, receiver=LEGACY_ASID, audience=LEGACY_ENDPOINT)
        self.exchange([item], request_bytes("GET", f"/{LEGACY_ENDPOINT}/metadata", headers))

    # Refusals of every kind.

    def refusal(self) -> None:
        kind, build = random.choice(REFUSAL_CASES)
        item = self.record(kind)
        method, target, headers, cert = build(item.trace)
        self.exchange([item], request_bytes(method, target, headers), cert)

    def plain_http(self) -> None:
        self.connection_refusals["plain-http"] += 1
        try:
            with socket.create_connection(("127.0.0.1", self.client.port), timeout=30) as sock:
                sock.sendall(request_bytes("GET", f"/{ENDPOINT}/metadata",
                                           spine(str(uuid.uuid4()))))
                read_response(sock.makefile("rb"))
        except (OSError, ValueError):
            pass

    def weak_tls(self) -> None:
        self.connection_refusals["tls-failed"] += 1
        try:
            plain = socket.create_connection(("127.0.0.1", self.client.port), timeout=30)
            with self.client.weak.wrap_socket(plain) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        except (OSError, ssl.SSLError):
            pass

    # Hostile framing: never forwarded; audited or not depending on where
    # the parser stops it (reported, not required).

    def framing(self) -> None:
        kind, build = random.choice(FRAMING_CASES)
        item = self.record(kind, audited=False)
        self.exchange([item], build(item.trace))

    # Clients that go away.

    def disconnect_waiting(self) -> None:
        item = self.record("disconnect-waiting", forwardable=True)
        try:
            with self.client.connect() as sock:
                sock.sendall(request_bytes("GET", f"/{ENDPOINT}/slow", spine(item.trace)))
                time.sleep(0.05)
        except OSError as e:
            item.error = type(e).__name__

    def disconnect_uploading(self) -> None:
        item = self.record("disconnect-uploading", forwardable=True)
        headers = {**spine(item.trace), "Content-Length": str(1024 * 1024)}
        try:
            with self.client.connect() as sock:
                sock.sendall(request_bytes("POST", f"/{ENDPOINT}/echo", headers,
                                           os.urandom(16 * 1024)))
                time.sleep(0.05)
        except OSError as e:
            item.error = type(e).__name__

    # Slow clients (their own thread).

    def slow_valid(self) -> None:
        item = self.record("slow-valid", forwardable=True)
        data = request_bytes("GET", f"/{ENDPOINT}/metadata", spine(item.trace))
        self.exchange([item], data, pieces=6, pause=0.3)

    def slowloris(self, limit: float = 30.0) -> None:
        """
        Half a header block, then silence: the proxy should hang up.
        """
        started = time.monotonic()
        closed: float | None = None
        try:
            with self.client.connect(timeout=limit) as sock:
                sock.sendall(f"GET /{ENDPOINT}/metadata HTTP/1.1\r\nSsp-From: 2".encode())
                while sock.recv(4096):
                    pass
                closed = time.monotonic() - started
        except OSError:
            closed = None if time.monotonic() - started >= limit else time.monotonic() - started
        with self.lock:
            self.slowloris_closed.append(closed)


def _case(method: str, target: str, headers: Callable[[str], dict[str, str]],
          cert: str | None = "consumer-0") -> Callable[[str], tuple[str, str, dict, str | None]]:
    return lambda trace: (method, target, headers(trace), cert)


def _without(name: str) -> Callable[[str], dict[str, str]]:
    def build(trace: str) -> dict[str, str]:
        headers = spine(trace)
        del headers[name]
        return headers
    return build


REFUSAL_CASES: list[tuple[str, Callable[[str], tuple[str, str, dict, str | None]]]] = [
    ("405", _case("TRACE", f"/{ENDPOINT}/metadata", spine)),
    ("400-http", _case("GET", f"/http://{HOST}/B82617/STU3/1/gpconnect/fhir/metadata", spine)),
    ("400-ip", _case("GET", "/https://127.0.0.1/B82617/STU3/1/gpconnect/fhir/metadata", spine)),
    ("400-dots", _case("GET", f"/{ENDPOINT}/..%2F..%2Fadmin", spine)),
    ("400-header", _case("GET", f"/{ENDPOINT}/metadata", _without("Ssp-From"))),
    ("400-token", _case("GET", f"/{ENDPOINT}/metadata", _without("Authorization"))),
    ("400-expired", _case("GET", f"/{ENDPOINT}/metadata",
                          lambda t: spine(t, token_age=3600))),
    ("403-sender", _case("GET", f"/{ENDPOINT}/metadata", lambda t: spine(t, UNKNOWN_ASID))),
    ("403-receiver", _case("GET", f"/{ENDPOINT}/metadata",
                           lambda t: spine(t, receiver=UNKNOWN_ASID))),
    ("403-fot", _case("GET", f"/{LEGACY_ENDPOINT}/metadata",
                      lambda t: spine(t, OTHER_CONSUMER, LEGACY_ASID, LEGACY_ENDPOINT),
                      "consumer-1")),
    ("495-fqdn", _case("GET", f"/{ENDPOINT}/metadata", spine, "consumer-1")),
    ("495-expired", _case("GET", f"/{ENDPOINT}/metadata", spine, "consumer-expired")),
    ("495-revoked", _case("GET", f"/{ENDPOINT}/metadata", spine, "consumer-revoked")),
    ("495-untrusted", _case("GET", f"/{ENDPOINT}/metadata", spine, "consumer-untrusted")),
    ("496", _case("GET", f"/{ENDPOINT}/metadata", spine, None)),
]


def _framed(extra: bytes, body: bytes = b"", method: str = "POST") -> Callable[[str], bytes]:
    def build(trace: str) -> bytes:
        head = request_bytes(method, f"/{ENDPOINT}/echo", spine(trace))[:-2]
        return head + extra + b"\r\n" + body
    return build


FRAMING_CASES: list[tuple[str, Callable[[str], bytes]]] = [
    ("cl+te", _framed(b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n", b"0\r\n\r\n")),
    ("cl-cl", _framed(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"abcdef")),
    ("bad-chunk", _framed(b"Transfer-Encoding: chunked\r\n", b"zz\r\nabc\r\n0\r\n\r\n")),
    ("obs-fold", _framed(b"X-Folded: a\r\n b\r\nContent-Length: 0\r\n")),
    ("nul", _framed(b"X-Nul: a\x00b\r\nContent-Length: 0\r\n")),
    ("bare-cr", _framed(b"X-CR: a\rb\r\nContent-Length: 0\r\n")),
    ("big-header", _framed(b"X-Big: " + b"a" * 70000 + b"\r\nContent-Length: 0\r\n")),
    ("many-headers", _framed(b"".join(b"X-H%d: v\r\n" % n for n in range(300)))),
    ("long-line", lambda trace: request_bytes("GET", f"/{ENDPOINT}/" + "a" * 20000,
                                              spine(trace))),
    ("garbage", lambda trace: b"\x16\x03\x01 not http at all " + trace.encode() + b"\r\n\r\n"),
]


# -- running and checking ------------------------------------------------------

MIX: list[tuple[str, int]] = [
    ("good", 30), ("keep_alive", 6), ("pipelined", 4), ("upload", 4), ("chunked_upload", 3),
    ("http_1_0", 2), ("throttled_consumer", 4), ("throttled_provider", 3), ("refusal", 25),
    ("plain_http", 2), ("weak_tls", 2), ("framing", 8), ("disconnect_waiting", 3),
    ("disconnect_uploading", 2),
]


def run_load(load: Load, seconds: float, workers: int) -> None:
    deadline = time.monotonic() + seconds
    names = [n for n, _ in MIX]
    weights = [w for _, w in MIX]

    def mixed() -> None:
        while time.monotonic() < deadline:
            getattr(load, random.choices(names, weights)[0])()

    def slow() -> None:
        while time.monotonic() < deadline:
            load.slow_valid()
            if time.monotonic() < deadline - 30:
                load.slowloris()

    threads = [threading.Thread(target=mixed, daemon=True) for _ in range(workers)]
    threads.append(threading.Thread(target=slow, daemon=True))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def sample_rss(pid: int, interval: float, stop: threading.Event,
               samples: list[tuple[float, int]]) -> None:
    start = time.monotonic()
    while not stop.is_set():
        try:
            samples.append((time.monotonic() - start, rss_bytes(pid)))
        except (OSError, RuntimeError):
            return
        stop.wait(interval)


def slope_mb_per_hour(samples: list[tuple[float, int]]) -> float:
    """
    Least-squares slope of RSS over time, in MiB per hour.
    """
    if len(samples) < 2:
        return 0.0
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_r = sum(r for _, r in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    cov = sum((t - mean_t) * (r - mean_r) for t, r in samples)
    return (cov / var) * 3600 / 2**20 if var else 0.0


def check(root: Path, load: Load, proxy_exit: int | None, log: str,
          samples: list[tuple[float, int]]) -> dict[str, Any]:
    directory = root / "audit"
    verified = verify_files([directory])
    records = list(chain.read_records([directory]))
    completed: collections.Counter[str] = collections.Counter()
    decisions: dict[str, str] = {}
    authorised: set[str] = set()
    connection: collections.Counter[str] = collections.Counter()
    for r in records:
        if r["event"] == "authorised":
            authorised.add(r["trace_id"])
        elif r["event"] == "connection-refused":
            plain = r["token"] == "HTTP_REQUEST_SENT_TO_HTTPS_PORT"
            connection["plain-http" if plain else "tls-failed"] += r["count"]
        elif r["event"] == "completed":
            completed[r["trace_id"]] += 1
            decisions[r["trace_id"]] = r["decision"]
    received = set((root / "provider-seen.txt").read_text().split())

    statuses: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    lost, duplicated, forwarded_refused = [], [], []
    framing_audited: collections.Counter[str] = collections.Counter()
    for item in load.sent:
        outcome = str(item.status) if item.status is not None else item.error or "no-reply"
        statuses[item.kind][outcome] += 1
        count = completed[item.trace]
        if item.audited and count == 0:
            lost.append(item.trace)
        if count > 1:
            duplicated.append(item.trace)
        if not item.audited and count:
            framing_audited[item.kind] += 1
        refused = (not item.forwardable or decisions.get(item.trace) == "refused"
                   or (item.status in REFUSALS and item.trace not in authorised))
        if refused and item.trace in received:
            forwarded_refused.append(item.trace)
    unaudited_forwards = sorted(received - authorised - {"-"})
    rss = [r for _, r in samples]
    closed = [c for c in load.slowloris_closed if c is not None]
    return {
        "requests": len(load.sent),
        "by_kind": {k: dict(v) for k, v in sorted(statuses.items())},
        "connection_refusals_sent": dict(load.connection_refusals),
        "connection_refusals_audited": dict(connection),
        "forwarded_when_refused": len(forwarded_refused),
        "forwarded_without_authorised_record": len(unaudited_forwards),
        "audit_lost": len(lost),
        "audit_duplicated": len(duplicated),
        "audit_chain_ok": verified.ok,
        "audit_records": verified.records,
        "framing_probes": sum(1 for i in load.sent if not i.audited),
        "framing_probes_audited": sum(framing_audited.values()),
        "framing_probes_audited_by_kind": dict(sorted(framing_audited.items())),
        "slowloris": {"sent": len(load.slowloris_closed), "closed_by_proxy": len(closed),
                      "max_seconds": round(max(closed), 1) if closed else None},
        "crashes": int(proxy_exit not in (None, 0, -signal.SIGTERM))
        + log.count("Unhandled error") + log.count("Traceback (most recent call last)"),
        "proxy_exit": proxy_exit,
        "rss_mib": {
            "first": round(rss[0] / 2**20, 1) if rss else None,
            "last": round(rss[-1] / 2**20, 1) if rss else None,
            "max": round(max(rss) / 2**20, 1) if rss else None,
            "samples": len(rss),
            "slope_mib_per_hour_all": round(slope_mb_per_hour(samples), 2),
            "slope_mib_per_hour_second_half": round(
                slope_mb_per_hour(samples[len(samples) // 2:]), 2),
        },
        "examples": {"lost": lost[:5], "forwarded_when_refused": forwarded_refused[:5],
                     "duplicated": duplicated[:5]},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--workers", type=int, default=6)
    parser.add_argument("--sample", type=float, default=5.0, help="RSS sampling interval, s")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results-soak.json")
    parser.add_argument("--provider", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.provider:
        provider_main(options.provider)
        return 0

    root = Path(tempfile.mkdtemp(prefix="ssp-soak-"))
    processes: list[subprocess.Popen] = []
    try:
        create_development_pki(root / "certs",
                               consumers=("gpc001.ssp-demo.test", "k81045.ssp-demo.test"))
        provider, provider_port = start_provider(root)
        processes.append(provider)
        port = free_port()
        proxy = start_proxy(root, write_config(root, port, provider_port), port)
        processes.append(proxy)
        print(f"soak: {options.minutes} min, {options.workers} workers + 1 slow, "
              f"proxy pid {proxy.pid} on {port}, work dir {root}", file=sys.stderr)

        load = Load(Client(port, root / "certs"))
        stop, samples = threading.Event(), []
        sampler = threading.Thread(target=sample_rss,
                                   args=(proxy.pid, options.sample, stop, samples))
        sampler.start()
        started = time.monotonic()
        run_load(load, options.minutes * 60, options.workers)
        elapsed = time.monotonic() - started
        stop.set()
        sampler.join()

        alive = proxy.poll() is None
        proxy.send_signal(signal.SIGTERM)
        try:
            proxy_exit = proxy.wait(60)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy_exit = proxy.wait()
        log = (root / "twistd.log").read_text(errors="replace")
        result = check(root, load, None if alive else proxy_exit, log, samples)
        result.update(minutes=round(elapsed / 60, 2), workers=options.workers,
                      requests_per_second=round(len(load.sent) / elapsed, 1),
                      proxy_alive_at_end=alive,
                      command=" ".join(["python", "bench/soak.py"] + (argv or sys.argv[1:])))
        options.json.write_text(json.dumps(result, indent=2) + "\n")
        report(result)
        ok = (alive and result["forwarded_when_refused"] == 0 and result["crashes"] == 0
              and result["audit_lost"] == 0 and result["audit_duplicated"] == 0
              and result["audit_chain_ok"] and result["forwarded_without_authorised_record"] == 0)
        return 0 if ok else 1
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
        if options.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def report(result: dict[str, Any]) -> None:
    rss = result["rss_mib"]
    print(f"minutes {result['minutes']}  requests {result['requests']} "
          f"({result['requests_per_second']}/s)  framing probes {result['framing_probes']} "
          f"(audited {result['framing_probes_audited']})")
    for kind, counts in result["by_kind"].items():
        print(f"  {kind:22s} " + "  ".join(f"{k}:{v}" for k, v in sorted(counts.items())))
    print(f"framing probes audited by kind {result['framing_probes_audited_by_kind']}")
    print(f"connection-level sent {result['connection_refusals_sent']} "
          f"audited {result['connection_refusals_audited']}")
    print(f"slowloris {result['slowloris']}")
    print(f"forwarded-when-refused {result['forwarded_when_refused']}  "
          f"forwarded-without-authorised-record {result['forwarded_without_authorised_record']}  "
          f"crashes {result['crashes']}  audit lost {result['audit_lost']}  "
          f"duplicated {result['audit_duplicated']}  chain ok {result['audit_chain_ok']} "
          f"({result['audit_records']} records)")
    print(f"RSS MiB first {rss['first']} last {rss['last']} max {rss['max']} "
          f"slope {rss['slope_mib_per_hour_all']} MiB/h (second half "
          f"{rss['slope_mib_per_hour_second_half']}) over {rss['samples']} samples")


if __name__ == "__main__":
    raise SystemExit(main())
