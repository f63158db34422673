"""`make bench`, second part: the whole appliance as `make run` starts it, measured through nginx and TLS.

The stack is make run's (appliance/local.py: private MariaDB, Redis and S3, first-boot steps, supervisord with nginx
and every program) on free ports, its one model backend bench/mock_upstream.py. Nothing is pinned: wrk, the mock, the
stream client and every program share the machine's cores, as on a user's appliance. Results replace the stack block
of bench/RESULTS.md.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import uvloop
from minio import Minio

from appliance import config as appliance_config
from appliance import devstack, local
from appliance.config import Appliance
from bench.run import FAST_MODEL, STREAM_MODEL, Target, catalogue, checked, environment, raise_limits, scaigrid, wrk
from scaigrid.settings import read_env_file

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
BEGIN, END = "<!-- stack:begin (bench/stack.py rewrites this block) -->", "<!-- stack:end -->"
CHAT = "/oai/v1/chat/completions"
# Targets of issue 16, point 4.
MIN_SCALING = 1.4  # req/s with two http processes over one
MAX_ADDED_P50_MS = 1.5
MAX_STREAM_GAP_MS = 200.0
CONNECT_CONCURRENCY = 64  # TLS handshakes in flight while the stream client opens its connections
SAMPLE_INTERVAL_S = 0.1
STREAM_TIMEOUT_S = 180.0
FIRST_ANSWER_TIMEOUT_S = 30.0
WARM_UP_ATTEMPTS = 5
TAIL_BYTES = 8
PACE_INTERVAL_MS = 20  # of the stream models: "stream-64x20"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def say(message: str) -> None:
    print(f"[bench-stack] {message}", flush=True)


@dataclass
class Results:
    environment: dict[str, str] = field(default_factory=dict)
    command: str = ""
    # e1: per process count, wrk's stats plus the CPU split of the run
    throughput: dict[int, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)  # run name -> category -> CPU seconds
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    streams: dict[str, dict[str, float]] = field(default_factory=dict)
    limits: list[str] = field(default_factory=list)
    capacity: dict[int, dict[str, float]] = field(default_factory=dict)  # e3's ladder: stream count -> stats
    measured_processes: int = 0  # the stack e2 and e3 ran on
    notes: list[str] = field(default_factory=list)


# --- processes and their CPU ---

@dataclass(frozen=True)
class Proc:
    pid: int
    ppid: int
    comm: str
    argv: tuple[str, ...]
    cpu_s: float


def processes() -> dict[int, Proc]:
    """Every process of the machine, read from /proc (those that end while we read are left out)."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        table[int(entry.name)] = Proc(int(entry.name), int(fields[1]), comm,
                                      tuple(arg.decode(errors="replace") for arg in argv if arg),
                                      (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return table


def tree(root: int, table: dict[int, Proc]) -> set[int]:
    """root and its descendants."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def is_http(proc: Proc) -> bool:
    return any(proc.argv[i:i + 2] == ("--mode", "http") for i in range(len(proc.argv)))


def machine_cpu_s() -> tuple[float, float]:
    """(busy, idle) CPU seconds of the whole machine since boot, all cores."""
    values = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = values
    return (user + nice + system + irq + softirq + steal) / CLK_TCK, (idle + iowait) / CLK_TCK


@dataclass
class Services:
    mariadb: devstack.MariaDB
    redis: devstack.Redis
    s3: devstack.S3Server
    mock: subprocess.Popen[bytes]
    mock_port: int


@dataclass
class Stack:
    appliance: Appliance
    supervisord: subprocess.Popen[bytes]
    services: Services
    key: str

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.appliance.config.https_port}{CHAT}"

    def target(self) -> Target:
        return Target("appliance", self.url, self.supervisord.pid, self.key, FAST_MODEL, STREAM_MODEL)

    def categories(self, table: dict[int, Proc]) -> dict[int, str]:
        """pid -> what it is, for the CPU split; processes of nobody's here are not in it."""
        owner: dict[int, str] = {}
        for pid in tree(self.supervisord.pid, table):
            proc = table[pid]
            owner[pid] = "http processes" if is_http(proc) else "nginx" if proc.comm == "nginx" else "rest of the stack"
        for name, root in (("mock", self.services.mock.pid), ("Redis", self.services.redis.process.pid),
                           ("MariaDB", self.services.mariadb.process.pid),
                           ("rest of the stack", self.services.s3.process.pid)):
            owner.update(dict.fromkeys(tree(root, table), name))
        return owner

    def pids(self, what: Callable[[Proc], bool]) -> list[int]:
        table = processes()
        return sorted(pid for pid in tree(self.supervisord.pid, table) if what(table[pid]))

    def http_pids(self) -> list[int]:
        return self.pids(is_http)

    def nginx_worker_pids(self) -> list[int]:
        return self.pids(lambda proc: proc.comm == "nginx" and "worker" in " ".join(proc.argv))


CATEGORIES = ("http processes", "nginx", "mock", "wrk", "Redis", "MariaDB", "rest of the stack",
              "bench script (e3: the stream client)", "outside the bench", "idle")


class CpuMeter:
    """CPU seconds each part of the bench used between start() and stop(): every process tree by /proc/PID/stat,
    wrk (our only child to end meanwhile) by its rusage, this script by its own, the rest of the machine by
    /proc/stat."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.split: dict[str, float] = {}

    @staticmethod
    def _now() -> tuple[dict[int, Proc], tuple[float, float], float, float, float]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (processes(), machine_cpu_s(), own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime,
                time.monotonic())

    def start(self) -> None:
        self.before = self._now()

    def stop(self) -> dict[str, float]:
        table, machine, own_s, children_s, now_s = self._now()
        before_table, before_machine, before_own_s, before_children_s, started_s = self.before
        split = dict.fromkeys(CATEGORIES, 0.0)
        for pid, name in self.stack.categories(table).items():
            earlier = before_table.get(pid)
            same = earlier is not None and earlier.argv == table[pid].argv  # not a new process on a reused pid
            split[name] += table[pid].cpu_s - (earlier.cpu_s if earlier is not None and same else 0.0)
        split["wrk"] = max(0.0, children_s - before_children_s)
        split["bench script (e3: the stream client)"] = own_s - before_own_s
        split["outside the bench"] = max(0.0, machine[0] - before_machine[0] - sum(split.values()))
        split["idle"] = machine[1] - before_machine[1]
        split["wall s"] = now_s - started_s
        self.split = split
        return split


# --- the stack ---

@contextmanager
def services(base: Path) -> Iterator[Services]:
    """MariaDB, Redis, S3 and the mock, shared by every start of the appliance; stopped in reverse order."""
    stops: list[Callable[[], None]] = []
    try:
        mariadb = devstack.start_mariadb(base / "mariadb")
        stops.append(mariadb.stop)
        redis = devstack.start_redis(base / "redis")
        stops.append(redis.stop)
        s3 = devstack.start_s3(base / "s3")
        stops.append(s3.stop)
        Minio(f"127.0.0.1:{s3.port}", access_key=s3.access_key_id, secret_key=s3.secret_access_key,
              secure=False).make_bucket(local.BUCKET)
        mock_port = devstack.free_port()
        with (base / "mock.log").open("ab") as log:
            # Own session, as the other services: a Ctrl-C in the terminal reaches only us, and we stop it.
            mock = subprocess.Popen([sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)],
                                    cwd=REPO, env={**local.child_env(), "PYTHONPATH": str(REPO)}, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        stops.append(lambda: stop(mock))
        # A socket per stream the gateway opens to it. Only the mock's limit is raised: the appliance's programs keep
        # what supervisord gives them (minfds), as under make run.
        resource.prlimit(mock.pid, resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
        deadline = time.monotonic() + 30
        while not devstack.http_answers(f"http://127.0.0.1:{mock_port}/v1/models"):
            if mock.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the mock did not start:\n{devstack.log_tail(base / 'mock.log')}")
            time.sleep(0.1)
        yield Services(mariadb, redis, s3, mock, mock_port)
    finally:
        for stopper in reversed(stops):
            stopper()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def configure(var: Path, svc: Services, http_processes: int) -> Appliance:
    """make run's appliance.env on fresh free ports, then its first-boot steps (which render every file)."""
    var.mkdir(exist_ok=True)
    # One block of free ports: the http processes listen from HTTP_PORT upwards, one port each.
    port = devstack.free_port_block(len(local.PORT_KEYS) + http_processes - 1)
    values = {"HTTP_PROCESSES": str(http_processes),
              # Only the last stop waits for it: a short drain keeps the run short.
              "HTTP_DRAIN_GRACE_S": "5"}
    for key in local.PORT_KEYS:
        values[key] = str(port)
        port += http_processes if key == "HTTP_PORT" else 1
    appliance = appliance_config.load(local.write_config(var, svc.redis, svc.s3, svc.mariadb, values))
    local.first_boot(appliance, svc.mariadb)
    return appliance


def prepare_node(appliance: Appliance, svc: Services, base: Path) -> tuple[str, str]:
    """The mock in the catalogue, a tenant user's key and limits that never refuse; returns (key, how limits)."""
    env = {**local.child_env(), "PYTHONPATH": str(REPO), **read_env_file(appliance.config.scaigrid_env_file)}
    catalogue_file = base / "catalogue.toml"
    catalogue_file.write_text(catalogue(svc.mock_port))
    checked(scaigrid(env, "admin", "apply", str(catalogue_file)), "scaigrid admin apply")
    key = checked(scaigrid(env, "admin", "create-key", "--role", "tenant_user", "--name", "bench"),
                  "admin create-key").strip()
    return key, raise_limits(env, svc.mariadb, appliance.config.database_name, key)


@contextmanager
def supervised(appliance: Appliance, svc: Services, key: str, count: int, notes: list[str]) -> Iterator[Stack]:
    supervisord = local.start_supervisord(appliance)
    try:
        problems = local.wait_until_ready(appliance, supervisord)
        if problems:
            logs = "\n".join(f"--- {path.name}\n{devstack.log_tail(path)}"
                             for path in sorted(appliance.config.log_dir.glob("*.log")))
            raise SystemExit(f"the appliance is not ready: {problems}\n{logs}")
        stack = Stack(appliance, supervisord, svc, key)
        ready_s = time.monotonic()
        while (answer := post(stack.url, key, {"model": FAST_MODEL, "messages": [{"role": "user", "content": "ping"}]})
               )[0] != 200:
            if time.monotonic() - ready_s > FIRST_ANSWER_TIMEOUT_S:
                raise SystemExit(f"first request through nginx answered {answer[0]}: {answer[1][:300]!r}")
            time.sleep(0.2)
        waited_s = time.monotonic() - ready_s
        if waited_s > 1:
            notes.append(f"HTTP_PROCESSES={count}: every program was ready, yet requests through nginx answered "
                         f"503 for another {waited_s:.0f} s (nginx's log: 'no live upstreams': a worker that reached "
                         "a process before it listened marks that server failed for fail_timeout, 10 s by default)")
        yield stack
    finally:
        local.stop_supervisord(supervisord)


def post(url: str, key: str, body: dict[str, object]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=unverified()) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def unverified() -> ssl.SSLContext:
    """The stack's certificate is self-signed and made for this run; wrk does not check it either."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


# --- the stream client: a raw protocol per connection, cheaper than a full HTTP client per event ---

class Stream(asyncio.Protocol):
    """One keepalive connection carrying one streamed chat completion; times the gaps between SSE events."""

    def __init__(self, request: bytes, finished: Callable[["Stream"], None]) -> None:
        self.request, self.finished = request, finished
        self.transport: asyncio.Transport | None = None
        self.head = b""
        self.status = 0
        self.tail = b""  # the end of the previous read: a "data:" or "[DONE]" may be cut between two reads
        self.sent_s = 0.0
        self.last_s: float | None = None
        self.first_event_s = 0.0
        self.max_gap_s = 0.0
        self.events = 0
        self.ok = self.done = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def send(self) -> None:
        assert self.transport is not None
        self.sent_s = time.monotonic()
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        now_s = time.monotonic()
        if self.done:
            return
        if not self.status:
            self.head += data
            if len(self.head) < 12:
                return
            self.status, data = int(self.head[9:12]), self.head
            if self.status != 200:
                self.finish()
                return
        window = self.tail + data
        events = window.count(b"data:") - self.tail.count(b"data:")  # those wholly in the tail were counted
        self.tail = window[-TAIL_BYTES:]
        if events:
            if self.last_s is None:
                self.first_event_s = now_s - self.sent_s
            else:
                self.max_gap_s = max(self.max_gap_s, now_s - self.last_s)
            self.last_s = now_s
            self.events += events
        if b"[DONE]" in window:
            self.ok = True
            self.finish()

    def connection_lost(self, exc: Exception | None) -> None:
        self.finish()

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.finished(self)


def request_bytes(host: str, path: str, key: str, model: str) -> bytes:
    body = json.dumps({"model": model, "stream": True, "stream_options": {"include_usage": True},
                       "messages": [{"role": "user", "content": "ping"}]}).encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@dataclass
class Sample:
    in_flight: int
    rss_kib: int
    nginx_fds: list[int]


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def sample(in_flight: int, rss_pids: list[int], nginx_workers: list[int]) -> Sample:
    return Sample(in_flight, sum(rss_kib(pid) for pid in rss_pids),
                  [len(os.listdir(f"/proc/{pid}/fd")) for pid in nginx_workers])


async def run_streams(port: int, path: str, key: str, model: str, count: int, tls: bool, rss_pids: list[int],
                      nginx_workers: list[int], meter: CpuMeter | None) -> tuple[dict[str, float], list[Sample]]:
    """Opens `count` keepalive connections (TLS if asked), then sends one streamed request on each at once; the
    meter, if any, runs from the first request sent to the last stream's end."""
    loop = asyncio.get_running_loop()
    context = unverified() if tls else None
    request = request_bytes("localhost", path, key, model)
    all_done = loop.create_future()
    finished: list[Stream] = []

    def on_finish(stream: Stream) -> None:
        finished.append(stream)
        if len(finished) == count and not all_done.done():
            all_done.set_result(None)

    gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def connect() -> Stream:
        async with gate:
            _, stream = await loop.create_connection(
                lambda: Stream(request, on_finish), "127.0.0.1", port,
                ssl=context, server_hostname="localhost" if tls else None)
            return stream

    connect_started_s = time.monotonic()
    streams = await asyncio.gather(*(connect() for _ in range(count)))
    connect_s = time.monotonic() - connect_started_s
    samples: list[Sample] = []
    worst_lag_s = 0.0

    async def watch() -> None:
        # Samples memory while streams run, in a thread: reading /proc of a busy process can take tens of ms, which
        # would hold up the streams' events here. And how late this loop wakes: gaps it causes are the client's.
        nonlocal worst_lag_s
        while not all_done.done():
            before_s = time.monotonic()
            await asyncio.sleep(SAMPLE_INTERVAL_S)
            worst_lag_s = max(worst_lag_s, time.monotonic() - before_s - SAMPLE_INTERVAL_S)
            samples.append(await asyncio.to_thread(sample, count - len(finished), rss_pids, nginx_workers))

    watcher = asyncio.create_task(watch())
    if meter is not None:
        meter.start()
    started_s = time.monotonic()
    for stream in streams:
        stream.send()
    with suppress(TimeoutError):  # the streams not finished by then count as failed
        await asyncio.wait_for(asyncio.shield(all_done), STREAM_TIMEOUT_S)
    wall_s = time.monotonic() - started_s
    if meter is not None:
        meter.stop()
    watcher.cancel()
    for stream in streams:
        if stream.transport is not None:
            stream.transport.close()
    done = [stream for stream in streams if stream.ok]
    gaps = sorted(stream.max_gap_s for stream in done) or [0.0]
    return {
        "streams": count, "ok": len(done), "connect_s": connect_s, "wall_s": wall_s,
        "events_min": min((stream.events for stream in done), default=0),
        "events": sum(stream.events for stream in streams),
        "max_gap_ms": gaps[-1] * 1000, "p99_stream_max_gap_ms": gaps[int(0.99 * (len(gaps) - 1))] * 1000,
        "max_first_event_ms": max((stream.first_event_s for stream in done), default=0.0) * 1000,
        "client_loop_lag_ms": worst_lag_s * 1000,
    }, samples


def streams(port: int, path: str, key: str, model: str, count: int, tls: bool, rss_pids: list[int] | None = None,
            nginx_workers: list[int] | None = None, meter: CpuMeter | None = None
            ) -> tuple[dict[str, float], list[Sample]]:
    # A socket per stream.
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    return uvloop.run(run_streams(port, path, key, model, count, tls, rss_pids or [], nginx_workers or [], meter))


# --- the measurements ---

def throughput(stack: Stack, connections: int, duration_s: float, results: Results) -> None:
    """(e1) non-streamed chat at c=connections through nginx and TLS, with the CPU split of the run."""
    target = stack.target()
    n = len(stack.http_pids())
    # Warm-up (connections, caches, the limiter's scripts), until one passes without errors: right after a start,
    # an nginx worker may still hold a process as failed (see the note supervised() writes).
    for attempt in range(1, WARM_UP_ATTEMPTS + 1):
        warm = wrk(target, connections, 3)
        if not warm["errors"]:
            break
        results.notes.append(f"e1 with {n} http process(es): warm-up {attempt} had {error_kinds(warm)}")
    meter = CpuMeter(stack)
    meter.start()
    stats = wrk(target, connections, duration_s)
    split = meter.stop()
    stats["http_processes"] = n
    stats["http_cpu_s"] = split["http processes"]
    stats["bench_cpu_s"] = sum(value for name, value in split.items() if name not in ("outside the bench", "idle",
                                                                                      "wall s"))
    if stats["errors"]:
        results.notes.append(f"e1 with {n} http process(es): {error_kinds(stats)} in {stats['requests']:.0f} requests")
    results.throughput[n] = stats
    results.cpu[f"e1, {n} http process{'es' if n > 1 else ''}"] = split
    say(f"e1 with {n} http process(es): {stats['rps']:.0f} req/s at c={connections}, p50 "
        f"{stats['p50_us'] / 1000:.2f} ms, {stats['errors']:.0f} errors; CPU s: "
        + ", ".join(f"{name} {value:.1f}" for name, value in split.items()))


def error_kinds(stats: dict[str, float]) -> str:
    kinds = ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts")
    return ", ".join(f"{stats[kind]:.0f} {kind.replace('_', ' ')}" for kind in kinds if stats[kind])


def latency(stack: Stack, duration_s: float, results: Results) -> None:
    """(e2) c=1: the mock direct, then the same request through nginx, TLS and the gateway."""
    direct = Target("direct", f"http://127.0.0.1:{stack.services.mock_port}/v1/chat/completions",
                    stack.services.mock.pid)
    for name, target in (("mock direct", direct), ("through the appliance", stack.target())):
        results.latency[name] = wrk(target, 1, duration_s)
        if results.latency[name]["errors"]:
            results.notes.append(f"e2 {name}: {error_kinds(results.latency[name])}")
        say(f"e2 {name}: p50 {results.latency[name]['p50_us'] / 1000:.3f} ms")


def stream_phase(stack: Stack, count: int, results: Results) -> None:
    """(e3) `count` paced streams at once: the mock direct (what the rig can do), then through the appliance."""
    meter = CpuMeter(stack)
    stats, _ = streams(stack.services.mock_port, "/v1/chat/completions", "", "stream-64x20", count, tls=False,
                       meter=meter)
    results.streams["mock direct"] = stats
    results.cpu[f"e3, {count} streams, mock direct"] = meter.split
    say(f"e3 mock direct: {stats['ok']:.0f}/{count} complete, max gap {stats['max_gap_ms']:.0f} ms")
    http, workers = stack.http_pids(), stack.nginx_worker_pids()
    idle = sample(0, http + workers, workers)
    meter = CpuMeter(stack)
    stats, samples = streams(stack.appliance.config.https_port, CHAT, stack.key, STREAM_MODEL, count, tls=True,
                             rss_pids=http + workers, nginx_workers=workers, meter=meter)
    results.cpu[f"e3, {count} streams through the appliance"] = meter.split
    # The sample with the most streams in flight (all of them until the first ends), the latest of those.
    peak = max(reversed(samples), key=lambda s: s.in_flight) if samples else idle
    stats.update(idle_rss_kib=idle.rss_kib, open_rss_kib=peak.rss_kib, open_streams=peak.in_flight,
                 kib_per_stream=(peak.rss_kib - idle.rss_kib) / max(peak.in_flight, 1))
    stats["nginx_fds_peak"] = max((max(s.nginx_fds, default=0) for s in samples), default=0)
    results.streams["through the appliance"] = stats
    results.limits = limits(stack, workers, http, samples)
    say(f"e3 through the appliance: {stats['ok']:.0f}/{count} complete, max gap {stats['max_gap_ms']:.0f} ms, "
        f"p99 of per-stream max gap {stats['p99_stream_max_gap_ms']:.0f} ms, "
        f"{stats['kib_per_stream']:.1f} KiB RSS per open stream")


def capacity_phase(stack: Stack, ladder: list[int], results: Results) -> None:
    """(e3, first) Paced streams through the appliance, a rung at a time, until one misses the gap target: how many
    this machine carries, where the full count asks more events per second than its cores can relay."""
    for count in ladder:
        stats, _ = streams(stack.appliance.config.https_port, CHAT, stack.key, STREAM_MODEL, count, tls=True)
        results.capacity[count] = stats
        say(f"e3 ladder, {count} streams: {stats['ok']:.0f}/{count} complete, max gap {stats['max_gap_ms']:.0f} ms")
        if stats["ok"] < count or stats["max_gap_ms"] > MAX_STREAM_GAP_MS:
            break


def open_files_limit(pid: int) -> str:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def limits(stack: Stack, workers: list[int], http: list[int], samples: list[Sample]) -> list[str]:
    """What bounds the open streams: nginx's worker_connections and every process's open-files limit."""
    conf = (stack.appliance.config.config_dir / "nginx.conf").read_text()
    match = re.search(r"worker_connections\s+(\d+)", conf)
    peaks = [max((s.nginx_fds[i] for s in samples if i < len(s.nginx_fds)), default=0) for i in range(len(workers))]
    return [
        f"nginx: worker_connections {match[1] if match else '?'} per worker, {len(workers)} workers (worker_processes "
        f"auto); open files limit {', '.join(open_files_limit(pid) for pid in workers)}; most descriptors a worker "
        f"held meanwhile (a client's connection and its upstream one are one each): {', '.join(map(str, peaks))}",
        f"http processes: open files limit {', '.join(open_files_limit(pid) for pid in http)} (supervisord's minfds)",
        f"stream client (this script): open files limit {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}",
    ]


def run(args: argparse.Namespace, results: Results) -> None:
    counts = args.processes
    base = Path(tempfile.mkdtemp(prefix="sgstack-", dir="/tmp"))  # short: MariaDB's socket path limit
    say(f"working directory {base}")
    try:
        with services(base) as svc:
            say("MariaDB, Redis, S3 and the mock up")
            key = ""
            for index, count in enumerate(counts):
                say(f"the appliance with HTTP_PROCESSES={count}: first-boot steps, then supervisord")
                appliance = configure(base / "var", svc, count)
                if not key:
                    key, how = prepare_node(appliance, svc, base)
                    say(f"catalogue applied, key created, limits raised ({how})")
                with supervised(appliance, svc, key, count, results.notes) as stack:
                    throughput(stack, args.connections, args.duration_s, results)
                    if index == len(counts) - 1:
                        results.measured_processes = len(stack.http_pids())
                        latency(stack, args.latency_s, results)
                        capacity_phase(stack, args.stream_ladder, results)
                        stream_phase(stack, args.streams, results)
    finally:
        if args.keep:
            say(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


# --- RESULTS.md ---

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def verdicts(results: Results) -> dict[str, bool]:
    checks = {}
    if {1, 2} <= results.throughput.keys():
        checks["scaling"] = results.throughput[2]["rps"] / results.throughput[1]["rps"] >= MIN_SCALING
    if len(results.latency) == 2:
        checks["latency"] = added_p50_ms(results) <= MAX_ADDED_P50_MS
    stats = results.streams.get("through the appliance")
    if stats:
        checks["streams"] = stats["ok"] == stats["streams"] and stats["max_gap_ms"] <= MAX_STREAM_GAP_MS
    return checks


def added_p50_ms(results: Results) -> float:
    return (results.latency["through the appliance"]["p50_us"] - results.latency["mock direct"]["p50_us"]) / 1000


def render(results: Results, args: argparse.Namespace) -> str:
    checks = verdicts(results)
    env = results.environment
    n = results.measured_processes
    out = [f"Generated by `{results.command}` on {env['date']}.", "",
           "| environment | |", "|---|---|", *(f"| {key} | {value} |" for key, value in env.items()),
           "| pinning | none: wrk (1 thread), the mock, the stream client and every program of the appliance share "
           "all cores, as on an appliance |", ""]
    out += [f"### (e1) Throughput, concurrency {args.connections} (wrk, non-streamed chat, keepalive TLS through "
            f"nginx), {args.duration_s:g} s per run", "",
            "| http processes | req/s | vs one | p50 ms | p99 ms | errors | req per CPU-second of the http "
            "processes | req per CPU-second of all the bench runs |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    one = results.throughput.get(1)
    for count, stats in sorted(results.throughput.items()):
        ratio = f"{stats['rps'] / one['rps']:.2f}x" if one else "-"
        out.append(f"| {count} | {stats['rps']:.0f} | {ratio} | {stats['p50_us'] / 1000:.2f} | "
                   f"{stats['p99_us'] / 1000:.2f} | {stats['errors']:.0f} | "
                   f"{stats['requests'] / stats['http_cpu_s']:.0f} | {stats['requests'] / stats['bench_cpu_s']:.0f} |")
    out += ["", f"Target two processes ≥ {MIN_SCALING:g} times one: {verdict(checks.get('scaling'))}. req/s counts "
            "only while the bench has the cores to itself: *outside the bench* below says how much it had; the "
            "requests per CPU-second do not depend on it.", ""]
    if one:
        split = results.cpu[next(run for run in results.cpu if run.startswith("e1, 1 "))]
        out += [f"With one process the bench kept {one['bench_cpu_s']:.1f} CPU-seconds busy and left "
                f"{split['idle']:.1f} idle ({split['outside the bench']:.1f} went to other work on the machine): were "
                "every idle CPU-second turned into requests at the same CPU per request (all parts counted), two "
                f"processes could reach at most {1 + split['idle'] / one['bench_cpu_s']:.2f} times one.", ""]
    if results.cpu:
        runs = list(results.cpu)
        cores = os.cpu_count() or 1
        out += ["CPU seconds used during each run (`/proc/PID/stat` of each process tree before and after; wrk by "
                "its rusage; *outside the bench* is the machine's busy time (`/proc/stat`) less all the rest; the "
                "rest of the stack is supervisord, grpc, worker, bunker_proxy, the event listener and S3):", "",
                "| | " + " | ".join(runs) + " |", "|---|" + "---:|" * len(runs)]
        for name in CATEGORIES:
            cells = [f"{split[name]:.1f} ({100 * split[name] / (cores * split['wall s']):.0f}%)"
                     for split in results.cpu.values()]
            out.append(f"| {name} | " + " | ".join(cells) + " |")
        out.append("| wall s | " + " | ".join(f"{results.cpu[run]['wall s']:.1f}" for run in runs) + " |")
        out += ["", f"Percentages are of the {cores} cores over the run's wall time.", ""]
    out += [f"### (e2) Latency, concurrency 1 (wrk), {args.latency_s:g} s each, {n} http process(es)", "",
            "| path | p50 ms | p90 ms | p99 ms |", "|---|---:|---:|---:|"]
    for name, stats in results.latency.items():
        out.append(f"| {name} | {stats['p50_us'] / 1000:.3f} | {stats['p90_us'] / 1000:.3f} | "
                   f"{stats['p99_us'] / 1000:.3f} |")
    if len(results.latency) == 2:
        out += ["", f"Added p50 (nginx, TLS and the gateway over the mock direct): {added_p50_ms(results):+.3f} ms; "
                f"target ≤ {MAX_ADDED_P50_MS:g} ms: {verdict(checks.get('latency'))}.", ""]
    out += [f"### (e3) {args.streams:,} concurrent streams (64 chunks 20 ms apart each), {n} http process(es)", "",
            "The client opens every keepalive connection first (TLS to nginx, or plain to the mock), then sends one "
            "streamed request on each at once, and times the gap between consecutive SSE events of each stream.", "",
            "| path | streams complete | max gap ms | p99 of per-stream max gap ms | slowest first event ms | "
            "client loop lag ms | connect s | streams wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, stats in results.streams.items():
        out.append(f"| {name} | {stats['ok']:.0f}/{stats['streams']:.0f} | {stats['max_gap_ms']:.0f} | "
                   f"{stats['p99_stream_max_gap_ms']:.0f} | {stats['max_first_event_ms']:.0f} | "
                   f"{stats['client_loop_lag_ms']:.0f} | {stats['connect_s']:.1f} | {stats['wall_s']:.1f} |")
    if results.capacity:
        carried = [count for count, rung in results.capacity.items()
                   if rung["ok"] == count and rung["max_gap_ms"] <= MAX_STREAM_GAP_MS]
        out += ["", "The ladder first (through the appliance, a rung at a time until one misses the gap target):", "",
                "| streams | complete | max gap ms | p99 of per-stream max gap ms |", "|---:|---:|---:|---:|"]
        out += [f"| {count:,} | {rung['ok']:.0f} | {rung['max_gap_ms']:.0f} | {rung['p99_stream_max_gap_ms']:.0f} |"
                for count, rung in results.capacity.items()]
        out += ["", f"Most paced streams carried with no gap over {MAX_STREAM_GAP_MS:g} ms here: "
                f"**{max(carried, default=0):,}**."]
    stats = results.streams.get("through the appliance")
    if stats:
        out += ["", f"Target every stream complete, no gap over {MAX_STREAM_GAP_MS:g} ms through the appliance: "
                f"{verdict(checks.get('streams'))}.", "",
                *pace(results, args.streams),
                f"RSS of the http processes and nginx's workers: {stats['idle_rss_kib'] / 1024:.1f} MiB idle, "
                f"{stats['open_rss_kib'] / 1024:.1f} MiB with {stats['open_streams']:.0f} streams in flight: "
                f"**{stats['kib_per_stream']:.1f} KiB per open stream**.", "",
                *(f"- {line}" for line in results.limits)]
    out.append("")
    if results.notes:
        out += ["### Notes", "", *(f"- {note}" for note in results.notes), ""]
    return "\n".join(out)


def pace(results: Results, count: int) -> list[str]:
    """Events delivered per second against what the pace asks, and each part's CPU per event: where the time went."""
    lines = []
    for name, stats in results.streams.items():
        split = next((split for run, split in results.cpu.items() if run.endswith(name)), None)
        if split is None or not stats["events"]:
            continue
        per_event = ", ".join(f"{part} {1e6 * split[part] / stats['events']:.0f}"
                              for part in ("http processes", "nginx", "mock", "bench script (e3: the stream client)")
                              if split[part] >= 0.05)
        lines.append(f"- {name}: {stats['events']:,.0f} events in {stats['wall_s']:.1f} s, "
                     f"{stats['events'] / stats['wall_s']:,.0f} per second (the pace asks for "
                     f"{count * 1000 / PACE_INTERVAL_MS:,.0f}); CPU µs per event: {per_event}")
    return ["Where the time went (CPU seconds from the table under e1):", "", *lines, ""] if lines else []


def write_results(block: str) -> None:
    text = RESULTS.read_text()
    if BEGIN in text:
        head, _, rest = text.partition(BEGIN)
        text = head + BEGIN + "\n" + block + "\n" + END + rest.partition(END)[2]
    else:
        text = text.rstrip("\n") + f"\n\n# Through the appliance (issue 16, point 4)\n\n{BEGIN}\n{block}\n{END}\n"
    RESULTS.write_text(text)


def int_list(raw: str) -> list[int]:
    return [int(part) for part in raw.split(",")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int_list, default=[1, 2],
                        help="HTTP_PROCESSES values of e1, comma-separated; e2 and e3 run on the last (default 1,2)")
    parser.add_argument("--connections", type=int, default=64, help="wrk's connections in e1")
    parser.add_argument("--duration-s", type=float, default=20.0, help="length of each e1 run")
    parser.add_argument("--latency-s", type=float, default=15.0, help="length of each e2 run")
    parser.add_argument("--streams", type=int, default=2000, help="concurrent streams in e3")
    parser.add_argument("--stream-ladder", type=int_list, default=[250, 500, 1000, 1500],
                        help="stream counts tried through the appliance before --streams, up to the first that "
                             "misses the gap target (default 250,500,1000,1500)")
    parser.add_argument("--keep", action="store_true", help="keep the working directory (logs, config)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    parser.add_argument("--command", default="make bench", help="how this run was started, for RESULTS.md")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("the bench needs wrk (Debian: apt-get install wrk)")
    # Ctrl-C and SIGTERM unwind through every `finally` (supervisord, services, the working directory); further
    # ones are ignored so that nothing is left behind half stopped.
    signal.signal(signal.SIGINT, local.interrupt)
    signal.signal(signal.SIGTERM, local.interrupt)
    started_s = time.monotonic()
    results = Results(environment=environment(), command=args.command)
    nginx = subprocess.run(["nginx", "-v"], capture_output=True, text=True, check=False)
    results.environment["nginx"] = nginx.stderr.strip().removeprefix("nginx version: ")
    try:
        run(args, results)
    except KeyboardInterrupt:
        say("interrupted; everything stopped, nothing written")
        return 130
    results.environment["load average at end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    results.environment["run time"] = f"{time.monotonic() - started_s:.0f} s"
    block = render(results, args)
    print(block)
    if not args.no_write:
        write_results(block)
        say(f"wrote {RESULTS.relative_to(REPO)}")
    for name, ok in verdicts(results).items():
        say(f"target {name}: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
