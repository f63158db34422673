"""`make bench`: mock direct vs floor proxy vs one pinned http process, measured in one run; rewrites RESULTS.md."""

import argparse
import asyncio
import collections
import json
import os
import platform
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from cryptography.fernet import Fernet

from appliance import devstack
from appliance.local import child_env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
LUA = BENCH / "post.lua"
RESULTS = BENCH / "RESULTS.md"
PROFILE_SVG = BENCH / "profile.svg"
BEGIN, END = "<!-- results:begin (bench/run.py rewrites this block) -->", "<!-- results:end -->"
# The proxies under test get a core of their own; everything else (mock, load generators, MariaDB, Redis,
# this script) shares the other one, so the load side never steals cycles from the process being measured.
# `--spin` runs a busy loop at SCHED_IDLE priority on each core so that the vCPUs never halt (waking a halted
# vCPU of a KVM guest can take milliseconds). Off by default: it cut the floor's c=1 tail but slowed the
# gateway's c=1 latency on the machine of RESULTS.md, so it is an experiment, not part of the measurement.
LOAD_CORE, SERVER_CORE = 0, 1
FAST_MODEL, STREAM_MODEL = "bench-fast", "bench-stream"
PORT_SETTINGS = ("HTTP_PORT", "GRPC_PORT", "BUNKER_PROXY_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT")
READY_TIMEOUT_S = 60.0
# Targets of issue 3, item 7.
MIN_FLOOR_RATIO = 0.5
MAX_ADDED_P50_MS = 1.0
MAX_STREAM_GAP_MS = 200.0
MAX_RSS_GROWTH = 0.10
MAX_HOT_PATH_SELECTS = 5  # during the 90,000 requests of phase (d): a reload or two, nothing per request
RSS_TOTAL = 100_000  # RSS is compared after a tenth of these requests and after all


def say(message: str) -> None:
    print(f"[bench] {message}", flush=True)


@dataclass
class Target:
    """One thing requests are sent to: the mock itself, the floor proxy, or the gateway."""

    name: str
    url: str  # the chat completions URL
    pid: int  # the process doing the work, for its CPU time
    key: str = ""
    fast_model: str = "fast"
    stream_model: str = "stream-64x20"


@dataclass
class Results:
    environment: dict[str, str] = field(default_factory=dict)
    command: str = ""
    spin: bool = False
    throughput: dict[str, dict[str, float]] = field(default_factory=dict)
    latency: dict[str, dict[str, float]] = field(default_factory=dict)
    streams: dict[str, dict[str, float]] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    database: dict[str, int] = field(default_factory=dict)
    statements: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)  # phase (a) again, alternated: gateway/floor per CPU-second
    round_s: float = 0.0


# --- processes ---

class Processes:
    """Every process this run starts, stopped in reverse order at the end."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str],
              core: int | None = None) -> subprocess.Popen[bytes]:
        pinned = ["taskset", "-c", str(core), *argv] if core is not None else argv
        with (self.logs / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(pinned, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL)
        self.started.append((name, process))
        return process

    def stop_all(self) -> None:
        for _, process in reversed(self.started):
            if process.poll() is None:
                process.terminate()
        for name, process in reversed(self.started):
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                say(f"{name} ignored SIGTERM; killing it")
                process.kill()
                process.wait()


def wait_http(url: str, process: subprocess.Popen[bytes], what: str, log: Path, timeout_s: float = READY_TIMEOUT_S,
              method: str = "GET") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{what} exited with {process.returncode}:\n{devstack.log_tail(log)}")
        try:
            request = urllib.request.Request(url, method=method, data=b"{}" if method == "POST" else None)
            with urllib.request.urlopen(request, timeout=2):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} not ready after {timeout_s:g} s:\n{devstack.log_tail(log)}")


def post_json(url: str, body: dict[str, object], key: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def cpu_s(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


# --- the node: database, catalogue, key, limits ---

def scaigrid(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scaigrid", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120, check=False)


def checked(result: subprocess.CompletedProcess[str], what: str) -> str:
    if result.returncode != 0:
        raise SystemExit(f"{what} failed (exit {result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result.stdout


def catalogue(mock_port: int) -> str:
    backends, models = [], []
    for slug, upstream_model in ((FAST_MODEL, "fast"), (STREAM_MODEL, "stream-64x20")):
        backends.append(
            f'[[backends]]\nid = "mock-{upstream_model}"\nprovider = "custom"\n'
            f'base_url = "http://127.0.0.1:{mock_port}/v1"\nmodel = "{upstream_model}"\n'
            'cost_input_per_mtok = "0.10"\ncost_output_per_mtok = "0.20"\n')
        models.append(
            f'[[models]]\nslug = "{slug}"\nmodality = "chat"\nmax_output_tokens = 1024\n'
            'price_input_per_mtok = "0.50"\nprice_output_per_mtok = "1.50"\n'
            f'routes = [{{ backend = "mock-{upstream_model}", weight = 1, priority = 1 }}]\n')
    return "\n".join(backends + models)


def raise_limits(env: dict[str, str], mariadb: devstack.MariaDB, database: str, key: str) -> str:
    """Limits far above what the bench sends, so it measures the limiter's cost, not its refusals."""
    rpm = "100000000"
    if "set-limits" in scaigrid(env, "admin", "--help").stdout:
        users = mariadb_query(mariadb, f"SELECT DISTINCT user_id FROM `{database}`.api_keys WHERE user_id IS NOT NULL")
        scopes = [("--key", key), *(("--user", user) for (user,) in users), ("--tenant", "default"),
                  ("--partner", "default")]
        for scope in scopes:
            checked(scaigrid(env, "admin", "set-limits", *scope, "--rpm", rpm), f"admin set-limits {scope[0]}")
        return "`scaigrid admin set-limits --rpm 100000000` on the key, its user, the tenant and the partner"
    mariadb.execute(*(f"UPDATE `{database}`.{table} SET rpm_limit = {rpm}"
                      for table in ("partners", "tenants", "users", "api_keys")))
    return "rpm_limit columns set directly in SQL (no `admin set-limits` yet)"


def mariadb_query(mariadb: devstack.MariaDB, sql: str) -> list[list[str]]:
    result = subprocess.run(
        ["mariadb", "--no-defaults", "--batch", "--skip-column-names", "--protocol=TCP", "--host=127.0.0.1",
         f"--port={mariadb.port}", "--user=root", "-e", sql],
        env={**os.environ, "MYSQL_PWD": mariadb.root_password}, capture_output=True, text=True, timeout=30,
        check=True)
    return [line.split("\t") for line in result.stdout.splitlines()]


def mariadb_status(mariadb: devstack.MariaDB) -> dict[str, int]:
    names = ("Com_select", "Com_insert", "Com_update", "Com_delete", "Questions")
    quoted = ",".join(f"'{name}'" for name in names)
    rows = mariadb_query(mariadb, f"SHOW GLOBAL STATUS WHERE Variable_name IN ({quoted})")
    return {name: int(value) for name, value in rows}


# --- load generators ---

def wrk(target: Target, connections: int, duration_s: float, max_requests: int | None = None) -> dict[str, float]:
    """One wrk run (one thread, on the load core); returns the JSON line post.lua prints."""
    body = json.dumps({"model": target.fast_model, "messages": [{"role": "user", "content": "ping"}]})
    env = {**os.environ, "BENCH_BODY": body, "BENCH_KEY": target.key,
           "BENCH_MAX_REQUESTS": "" if max_requests is None else str(max_requests)}
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_s:g}s", "--timeout", "10s", "-s", str(LUA), target.url]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None and process.stderr is not None
    lines = []
    for line in process.stdout:
        if line.strip() == "stopped":
            process.send_signal(signal.SIGINT)  # wrk then prints its summary and exits
        elif line.startswith("{"):
            lines.append(line)
    stderr = process.stderr.read()
    if process.wait() != 0 or not lines:
        raise SystemExit(f"wrk against {target.name} failed:\n{''.join(lines)}\n{stderr}")
    stats: dict[str, float] = json.loads(lines[-1])
    stats["rps"] = stats["requests"] / (stats["duration_us"] / 1e6)
    stats["errors"] = sum(stats[name] for name in
                          ("connect_errors", "read_errors", "write_errors", "status_errors", "timeouts"))
    return stats


@dataclass
class StreamStats:
    ok: bool = False
    events: int = 0
    first_event_s: float = 0.0
    max_gap_s: float = 0.0


async def one_stream(session: aiohttp.ClientSession, target: Target, started_s: float) -> StreamStats:
    stats = StreamStats()
    body = {"model": target.stream_model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "ping"}]}
    headers = {"Authorization": f"Bearer {target.key}"} if target.key else {}
    async with session.post(target.url, json=body, headers=headers) as response:
        if response.status != 200:
            await response.read()
            return stats
        last_s = None
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            now_s = time.monotonic()
            if last_s is None:
                stats.first_event_s = now_s - started_s
            else:
                stats.max_gap_s = max(stats.max_gap_s, now_s - last_s)
            last_s = now_s
            stats.events += 1
            if line.strip() == b"data: [DONE]":
                stats.ok = True
    return stats


async def loop_lag(stop: asyncio.Event, worst: list[float]) -> None:
    """How late this process's own event loop wakes up: gaps it causes are the rig's, not the target's."""
    interval_s = 0.01
    while not stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(interval_s)
        worst[0] = max(worst[0], time.monotonic() - before - interval_s)


async def streams(target: Target, count: int) -> dict[str, float]:
    stop, worst_lag = asyncio.Event(), [0.0]
    lag_task = asyncio.create_task(loop_lag(stop, worst_lag))
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        started_s = time.monotonic()
        results = await asyncio.gather(*(one_stream(session, target, started_s) for _ in range(count)),
                                       return_exceptions=True)
        wall_s = time.monotonic() - started_s
    stop.set()
    await lag_task
    done = [result for result in results if isinstance(result, StreamStats) and result.ok]
    gaps = sorted(result.max_gap_s for result in done) or [0.0]
    return {
        "streams": count, "ok": len(done), "wall_s": wall_s,
        "events_min": min((result.events for result in done), default=0),
        "max_gap_ms": gaps[-1] * 1000, "p99_stream_max_gap_ms": gaps[int(0.99 * (len(gaps) - 1))] * 1000,
        "max_first_event_ms": max((result.first_event_s for result in done), default=0.0) * 1000,
        "client_loop_lag_ms": worst_lag[0] * 1000,
    }


# --- profile ---

def profile(pid: int, target: Target, duration_s: int, raw_path: Path, svg_path: Path = PROFILE_SVG) -> list[str]:
    """py-spy (non-blocking, on the load core) on the http process under c=32 load; returns a summary."""
    py_spy = str(Path(sys.executable).with_name("py-spy"))
    common = ["--pid", str(pid), "--duration", str(duration_s), "--rate", "200", "--nonblocking"]
    recorders = [
        subprocess.Popen([py_spy, "record", *common, "--format", "raw", "-o", str(raw_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        subprocess.Popen([py_spy, "record", *common, "-o", str(svg_path)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
    ]
    time.sleep(1)  # let py-spy attach before the load starts
    wrk(target, 32, duration_s + 2)
    for recorder in recorders:
        _, stderr = recorder.communicate(timeout=60)
        if recorder.returncode != 0:
            return [f"py-spy failed: {stderr.decode(errors='replace').strip()}"]
    return summarise_profile(raw_path.read_text())


# Frames every sample of the main thread passes through: always ~100%, so they say nothing.
ENTRY_FRAMES = ("scaigrid/__main__.py", "scaigrid/cli.py", "scaigrid/modes/")


def frame_name(frame: str) -> str:
    """'handler (scaigrid/api/gateway.py:40)' -> 'handler (scaigrid/api/gateway.py)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "python3.11/"):
        path = path.split(marker, 1)[-1]
    return f"{name} ({path})" if path else name


def package(name: str) -> str:
    """'send (aiohttp/client.py)' -> 'aiohttp'; the standard library's modules by their own name."""
    path = name.rpartition(" (")[2].rstrip(")")
    if "/" not in path:
        return path.removesuffix(".py") or "?"
    return path.split("/", 1)[0]


def summarise_profile(collapsed: str) -> list[str]:
    own: collections.Counter[str] = collections.Counter()
    by_package: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = [frame_name(frame) for frame in stack.split(";")]
        total += count
        if frames[-1].endswith("select (selectors.py)"):
            idle += count
        own[frames[-1]] += count
        by_package[package(frames[-1])] += count
        for name in set(frames):
            if "scaigrid/" in name and not any(entry in name for entry in ENTRY_FRAMES):
                inclusive[name] += count
    if not total:
        return ["py-spy recorded no samples"]

    def pct(count: int) -> str:
        return f"{100 * count / total:.1f}%"

    lines = [f"{total} samples, {pct(idle)} waiting in epoll (idle).", "",
             "Own time by package (where the CPU actually is, event-loop callbacks included):", "",
             ", ".join(f"{name} {pct(count)}" for name, count in by_package.most_common() if count >= total / 200)
             + ", the rest under 0.5% each.",
             "", "Most own time (leaf frames):", ""]
    lines += [f"- {pct(count)} `{name}`" for name, count in own.most_common(15)]
    lines += ["", "ScaiGrid code, inclusive time (the frame or anything it calls):", ""]
    lines += [f"- {pct(count)} `{name}`" for name, count in inclusive.most_common(20)]
    return lines


# --- the run ---

def environment() -> dict[str, str]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                            check=False).stdout.strip()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load average at start": " ".join(f"{load:.2f}" for load in os.getloadavg()),
        "cpu": cpu, "cores": str(os.cpu_count()), "kernel": platform.release(),
        "python": platform.python_version(), "aiohttp": aiohttp.__version__,
        "wrk": (wrk_version.stdout + wrk_version.stderr).split("\n", 1)[0].split(" Copyright")[0].strip(),
        "commit": commit + " (plus the working tree)",
    }


@contextmanager
def node_services(base: Path) -> Iterator[tuple[devstack.MariaDB, devstack.Redis]]:
    mariadb = devstack.start_mariadb(base / "mariadb")
    try:
        redis = devstack.start_redis(base / "redis")
        try:
            yield mariadb, redis
        finally:
            redis.stop()
    finally:
        mariadb.stop()


def measure_target(target: Target, duration_s: float, results: Results) -> int:
    """Throughput at c=32 and latency at c=1; returns the number of requests sent."""
    warm = wrk(target, 32, 2)
    cpu_before_s = cpu_s(target.pid)
    throughput = wrk(target, 32, duration_s)
    # CPU per request does not depend on how much of its core the process got: it stays comparable when
    # something else on the machine competes for the core.
    throughput["cpu_ms_per_request"] = 1000 * (cpu_s(target.pid) - cpu_before_s) / throughput["requests"]
    latency = wrk(target, 1, duration_s)
    for stats, what in ((warm, "warm-up"), (throughput, "c=32"), (latency, "c=1")):
        if stats["errors"]:
            results.notes.append(f"{target.name} {what}: {stats['errors']:.0f} errors of {stats['requests']:.0f}")
    results.throughput[target.name] = throughput
    results.latency[target.name] = latency
    say(f"{target.name}: {throughput['rps']:.0f} req/s at c=32 ({throughput['cpu_ms_per_request']:.3f} ms CPU "
        f"per request); c=1 p50 {latency['p50_us'] / 1000:.2f} ms, "
        f"p99 {latency['p99_us'] / 1000:.2f} ms ({throughput['errors'] + latency['errors']:.0f} errors)")
    return int(warm["requests"] + throughput["requests"] + latency["requests"])


def measure_streams(target: Target, count: int, results: Results) -> None:
    stats = asyncio.run(streams(target, count))
    results.streams[target.name] = stats
    say(f"{target.name}: {stats['ok']:.0f}/{count} streams complete, max gap {stats['max_gap_ms']:.0f} ms, "
        f"slowest first event {stats['max_first_event_ms']:.0f} ms, "
        f"client loop lag {stats['client_loop_lag_ms']:.0f} ms")


def start_gateway(procs: Processes, env: dict[str, str], mariadb: devstack.MariaDB, database: str,
                  mock_port: int, base: Path, results: Results) -> tuple[Target, subprocess.Popen[bytes]] | None:
    """Catalogue, key, limits, then one pinned http process; None (with a note) when inference is not there yet."""
    catalogue_file = base / "catalogue.toml"
    catalogue_file.write_text(catalogue(mock_port))
    applied = scaigrid(env, "admin", "apply", str(catalogue_file))
    if applied.returncode != 0:
        results.notes.append("gateway not measured: `scaigrid admin apply` failed: "
                             + (applied.stderr.strip().splitlines() or ["?"])[-1])
        return None
    key = checked(scaigrid(env, "admin", "create-key", "--role", "tenant_user", "--name", "bench"),
                  "admin create-key").strip()
    how = raise_limits(env, mariadb, database, key)
    say(f"catalogue applied, key created, limits raised ({how})")
    http = procs.start("http", [sys.executable, "-m", "scaigrid", "run", "--mode", "http"], env, SERVER_CORE)
    origin = f"http://127.0.0.1:{env['HTTP_PORT']}"
    wait_http(origin + "/health/ready", http, "http mode", procs.logs / "http.log")
    target = Target("gateway", origin + "/oai/v1/chat/completions", http.pid, key, FAST_MODEL, STREAM_MODEL)
    status, body = post_json(target.url, {"model": FAST_MODEL, "messages": [{"role": "user", "content": "ping"}]}, key)
    if status != 200:
        results.notes.append(f"gateway not measured: first request answered {status}: {body[:300]!r}")
        return None
    say(f"gateway answers (pid {http.pid}, pinned to core {SERVER_CORE})")
    return target, http


def run(args: argparse.Namespace) -> Results:
    results = Results(environment=environment(), command=args.command, spin=args.spin)
    os.sched_setaffinity(0, {LOAD_CORE})  # inherited by every child not started under taskset
    base = Path(tempfile.mkdtemp(prefix="sgbench-", dir="/tmp"))  # short: MariaDB's socket path limit
    logs = base / "logs"
    logs.mkdir()
    say(f"working directory {base}; this script, the mock, wrk, MariaDB and Redis on core {LOAD_CORE}, "
        f"the proxy under test on core {SERVER_CORE}")
    procs = Processes(logs)
    with node_services(base) as (mariadb, redis):
        try:
            database = "scaigrid"
            env = {
                **child_env(), "PYTHONPATH": str(REPO),
                "APP_ENV": "production", "APP_LOG_LEVEL": "info",
                "DATABASE_URL": mariadb.create_database(database, database, secrets.token_hex(12)),
                "REDIS_URL": redis.url,
                "JWT_SIGNING_SECRET": secrets.token_hex(32),
                "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode(),
                "SERVICE_TOKEN_SECRET": secrets.token_hex(32),
                **dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True)),
            }
            checked(scaigrid(env, "migrate"), "scaigrid migrate")
            say("MariaDB and Redis up, schema migrated")

            mock_port, floor_port = devstack.free_ports(2)
            mock = procs.start("mock", [sys.executable, "-m", "bench.mock_upstream", "--port", str(mock_port)], env)
            floor = procs.start("floor", [sys.executable, "-m", "bench.floor_proxy", "--port", str(floor_port),
                                          "--upstream", f"http://127.0.0.1:{mock_port}"], env, SERVER_CORE)
            direct = Target("direct", f"http://127.0.0.1:{mock_port}/v1/chat/completions", mock.pid)
            floor_target = Target("floor", f"http://127.0.0.1:{floor_port}/v1/chat/completions", floor.pid)
            wait_http(direct.url, mock, "mock", logs / "mock.log", method="POST")
            wait_http(floor_target.url, floor, "floor proxy", logs / "floor.log", method="POST")

            if args.spin:
                for core in (LOAD_CORE, SERVER_CORE):
                    procs.start(f"spin-{core}", ["chrt", "--idle", "0", sys.executable, "-c", "while True: pass"],
                                env, core)
            gateway = start_gateway(procs, env, mariadb, database, mock_port, base, results)
            if args.throughput_only:
                if gateway is None:
                    raise SystemExit(f"gateway not measured: {results.notes}")
                throughput_rounds(floor_target, gateway[0], args)
                profile_both(floor_target, gateway[0], args, logs)
                return results
            targets = [direct, floor_target] + ([gateway[0]] if gateway else [])
            say(f"phases (a) throughput at c=32 and (b) latency at c=1, {args.duration_s:g} s each")
            sent = {target.name: measure_target(target, args.duration_s, results) for target in targets}
            if gateway:
                say(f"phase (a) again: floor and gateway alternated, {args.rounds} round(s)")
                results.rounds = throughput_rounds(floor_target, gateway[0], args)
                results.round_s = args.duration_s
            say(f"phase (c): {args.streams} concurrent streams of 64 chunks 20 ms apart")
            for target in targets:
                measure_streams(target, args.streams, results)
            if gateway:
                target, http = gateway
                sent["gateway"] += args.streams + 1
                memory_phase(target, http.pid, sent["gateway"], mariadb, args.requests, results)
                if args.profile or missed(results):
                    say(f"profiling the http process with py-spy for {args.profile_s} s under c=32")
                    results.profile = profile(http.pid, target, args.profile_s, logs / "profile.txt")
        finally:
            procs.stop_all()
    say(f"logs kept in {logs}")
    return results


def throughput_rounds(floor: Target, gateway: Target, args: argparse.Namespace) -> list[float]:
    """Phase (a) for the floor and the gateway (and the p50 at c=1), alternated `--rounds` times: each round's
    gateway-to-floor ratio of requests per CPU-second. One pass of each drifts with the machine's other load; the
    median of alternating rounds does not."""
    ratios = []
    for round_number in range(1, args.rounds + 1):
        cpu_ms, p50_ms = {}, {}
        for target in (floor, gateway):
            wrk(target, 32, 2)
            before_s = cpu_s(target.pid)
            stats = wrk(target, 32, args.duration_s)
            cpu_ms[target.name] = 1000 * (cpu_s(target.pid) - before_s) / stats["requests"]
            p50_ms[target.name] = wrk(target, 1, max(1, args.duration_s // 2))["p50_us"] / 1000
            if stats["errors"]:
                say(f"{target.name}: {stats['errors']:.0f} errors of {stats['requests']:.0f}")
        ratios.append(cpu_ms["floor"] / cpu_ms["gateway"])
        say(f"round {round_number}: floor {1000 / cpu_ms['floor']:.0f} req/CPU-s, gateway "
            f"{1000 / cpu_ms['gateway']:.0f} req/CPU-s, ratio {100 * ratios[-1]:.1f}%; c=1 p50 floor "
            f"{p50_ms['floor']:.2f} ms, gateway {p50_ms['gateway']:.2f} ms")
    say(f"median ratio over {len(ratios)} round(s): {100 * median(ratios):.1f}%")
    return ratios


def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def profile_both(floor: Target, gateway: Target, args: argparse.Namespace, logs: Path) -> None:
    """--throughput-only --profile: the floor's profile too, for what aiohttp costs per request without the gateway."""
    if args.profile:
        for target in (floor, gateway):
            say(f"profiling the {target.name} with py-spy for {args.profile_s} s under c=32")
            summary = profile(target.pid, target, args.profile_s, logs / f"profile-{target.name}.txt",
                              logs / f"profile-{target.name}.svg")
            print("\n".join(summary), flush=True)


def memory_phase(target: Target, pid: int, sent: int, mariadb: devstack.MariaDB, total: int,
                 results: Results) -> None:
    """Phase (d), with no worker running: RSS after 10,000 and 100,000 requests, and MariaDB queries meanwhile."""
    first = total // 10
    if sent < first:
        say(f"phase (d): {first - sent} more requests to reach {first}")
        wrk(target, 32, 900, first - sent)
    rss_first = rss_kib(pid)
    general_log = mariadb.log_path.with_name("general.log")
    mariadb.execute(f"SET GLOBAL general_log_file = '{general_log}'", "SET GLOBAL general_log = 1")
    before = mariadb_status(mariadb)
    say(f"phase (d): RSS {rss_first / 1024:.1f} MiB after {first} requests; {total - first} more")
    stats = wrk(target, 32, 900, total - first)
    rss_total = rss_kib(pid)
    after = mariadb_status(mariadb)
    mariadb.execute("SET GLOBAL general_log = 0")
    results.statements = statement_counts(general_log.read_text(errors="replace"))
    results.memory = {"first": first, "total": total, "rss_first_kib": rss_first, "rss_total_kib": rss_total,
                      "growth": (rss_total - rss_first) / rss_first, "requests": stats["requests"],
                      "rps": stats["rps"], "errors": stats["errors"]}
    # Our own SHOW STATUS statement counts one Question; SELECTs it does not count.
    results.database = {name: after[name] - before[name] for name in after}
    results.database["Questions"] -= 1
    say(f"phase (d): RSS {rss_total / 1024:.1f} MiB after {total} ({100 * results.memory['growth']:+.1f}%), "
        f"{stats['rps']:.0f} req/s, MariaDB during the {stats['requests']:.0f} requests: {results.database}")


def statement_counts(general_log: str) -> dict[str, int]:
    """What MariaDB was asked, literals blanked so that the same statement counts once; our own SHOW/SET left out."""
    counts: collections.Counter[str] = collections.Counter()
    for match in re.finditer(r"^[^\n]*?\d+ (?:Query|Execute)\t([^\n]*)", general_log, re.MULTILINE):
        statement = re.sub(r"'[^']*'|\b\d+\b", "?", match[1]).replace("`", "").strip()
        if not statement.upper().startswith(("SHOW GLOBAL STATUS", "SET GLOBAL")):
            counts[statement[:160]] += 1
    return dict(counts.most_common(10))


def missed(results: Results) -> bool:
    return not all(verdicts(results).values())


def verdicts(results: Results) -> dict[str, bool]:
    checks: dict[str, bool] = {}
    if {"floor", "gateway"} <= results.throughput.keys():
        # Per CPU-second of the process under test: what its core could serve if nothing else ran on it.
        floor_cpu_ms = results.throughput["floor"]["cpu_ms_per_request"]
        ratio = floor_cpu_ms / results.throughput["gateway"]["cpu_ms_per_request"]
        checks["throughput"] = (median(results.rounds) if results.rounds else ratio) >= MIN_FLOOR_RATIO
        added_ms = (results.latency["gateway"]["p50_us"] - results.latency["direct"]["p50_us"]) / 1000
        checks["latency"] = added_ms <= MAX_ADDED_P50_MS
    if "gateway" in results.streams:
        stats = results.streams["gateway"]
        checks["streams"] = stats["ok"] == stats["streams"] and stats["max_gap_ms"] <= MAX_STREAM_GAP_MS
    if results.memory:
        checks["memory"] = results.memory["growth"] <= MAX_RSS_GROWTH
        checks["database"] = results.database["Com_select"] <= MAX_HOT_PATH_SELECTS
    return checks


# --- RESULTS.md ---

def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def render(results: Results) -> str:
    checks = verdicts(results)
    env = results.environment
    out = [f"Generated by `{results.command}` on {env['date']}.", "",
           "| environment | |", "|---|---|", *(f"| {key} | {value} |" for key, value in env.items()),
           f"| pinning | the http process (and, in its turn, the floor proxy) alone on core {SERVER_CORE} "
           f"(`taskset -c {SERVER_CORE}`); mock, wrk (1 thread), the stream client, MariaDB and Redis on core "
           f"{LOAD_CORE} |",
           "| idle cores | " + ("kept awake by a SCHED_IDLE busy loop each (`--spin`)" if results.spin
                              else "allowed to halt (no `--spin`)") + " |", ""]
    out += ["### (a) Throughput, concurrency 32 (wrk, non-streamed chat completion)", "",
            "| target | req/s | vs floor | CPU ms per request | req per CPU-second | vs floor | errors |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    floor = results.throughput.get("floor", {})
    for name, stats in results.throughput.items():
        ratio = f"{100 * stats['rps'] / floor['rps']:.0f}%" if floor else "-"
        cpu_ratio = f"{100 * floor['cpu_ms_per_request'] / stats['cpu_ms_per_request']:.0f}%" if floor else "-"
        out.append(f"| {name} | {stats['rps']:.0f} | {ratio} | {stats['cpu_ms_per_request']:.3f} | "
                   f"{1000 / stats['cpu_ms_per_request']:.0f} | {cpu_ratio} | {stats['errors']:.0f} |")
    if results.rounds:
        out += ["", f"Then the floor and the gateway alternated, {len(results.rounds)} rounds (each: 2 s warm-up, "
                f"{results.round_s:g} s at c=32): gateway requests per CPU-second "
                f"{', '.join(f'{100 * r:.1f}%' for r in results.rounds)} of the floor's; median "
                f"**{100 * median(results.rounds):.1f}%**. The verdict takes the median: one pass of each (the table) "
                "drifts with whatever else the machine's host runs meanwhile."]
    out += ["", f"Target gateway ≥ {MIN_FLOOR_RATIO:.0%} of floor, judged on requests per CPU-second of the pinned "
            f"process (req/s alone depends on how much of its core the process got while the machine was shared): "
            f"{verdict(checks.get('throughput'))}.", ""]
    out += ["### (b) Latency, concurrency 1 (wrk)", "",
            "| target | p50 ms | p90 ms | p99 ms | added p50 vs direct |", "|---|---:|---:|---:|---:|"]
    direct_p50 = results.latency.get("direct", {}).get("p50_us", 0.0)
    for name, stats in results.latency.items():
        out.append(f"| {name} | {stats['p50_us'] / 1000:.3f} | {stats['p90_us'] / 1000:.3f} | "
                   f"{stats['p99_us'] / 1000:.3f} | {(stats['p50_us'] - direct_p50) / 1000:+.3f} ms |")
    out += ["", f"Target gateway p50 ≤ direct p50 + {MAX_ADDED_P50_MS:g} ms: {verdict(checks.get('latency'))}.", ""]
    out += ["### (c) Concurrent streams (aiohttp client, 64 chunks 20 ms apart each, all started at once)", "",
            "| target | streams complete | max gap ms | p99 of per-stream max gap ms | slowest first event ms | "
            "client loop lag ms | wall s |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, stats in results.streams.items():
        out.append(f"| {name} | {stats['ok']:.0f}/{stats['streams']:.0f} | {stats['max_gap_ms']:.0f} | "
                   f"{stats['p99_stream_max_gap_ms']:.0f} | {stats['max_first_event_ms']:.0f} | "
                   f"{stats['client_loop_lag_ms']:.0f} | {stats['wall_s']:.1f} |")
    out += ["", f"Target no gap over {MAX_STREAM_GAP_MS:g} ms through the gateway: {verdict(checks.get('streams'))}.",
            ""]
    out += ["### (d) Memory and database, gateway only, no worker running", ""]
    if results.memory:
        memory = results.memory
        first, total = int(memory["first"]), int(memory["total"])
        out += [f"| RSS after {first:,} requests | RSS after {total:,} | growth | req/s, last {total - first:,} |",
                "|---:|---:|---:|---:|",
                f"| {memory['rss_first_kib'] / 1024:.1f} MiB | {memory['rss_total_kib'] / 1024:.1f} MiB | "
                f"{100 * memory['growth']:+.1f}% | {memory['rps']:.0f} |", "",
                f"Target growth ≤ {MAX_RSS_GROWTH:.0%}: {verdict(checks.get('memory'))}.", "",
                f"Target no MariaDB query on the hot path (Com_select ≤ {MAX_HOT_PATH_SELECTS}): "
                f"{verdict(checks.get('database'))}.", "",
                f"MariaDB statements while the last {total - first:,} requests ran (`SHOW GLOBAL STATUS` deltas): "
                + ", ".join(f"{name} {value}" for name, value in results.database.items()) + ".", ""]
        if results.statements:
            out += ["Statements in MariaDB's general log meanwhile (literals blanked), most frequent first:", "",
                    "| count | statement |", "|---:|---|",
                    *(f"| {count} | `{text}` |" for text, count in results.statements.items()), ""]
    else:
        out += ["Not measured (no working gateway).", ""]
    if results.notes:
        out += ["### Notes", "", *(f"- {note}" for note in results.notes), ""]
    if results.profile:
        out += ["### Profile of the http process (py-spy, under c=32 load)", "",
                f"Flame graph: `bench/{PROFILE_SVG.name}`; the collapsed stacks (`profile.txt`, ~1 MB) stay with "
                "the run's logs in its temporary directory.", "",
                *results.profile, ""]
    return "\n".join(out)


def write_results(results: Results) -> None:
    block = f"{BEGIN}\n{render(results)}\n{END}"
    if RESULTS.exists() and BEGIN in (text := RESULTS.read_text()):
        head, rest = text.split(BEGIN, 1)
        RESULTS.write_text(head + block + rest.split(END, 1)[1])
    else:
        RESULTS.write_text(f"# Gateway benchmark\n\n## Results\n\n{block}\n\n## Analysis\n\n(hand-written)\n")
    say(f"wrote {RESULTS.relative_to(REPO)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration-s", type=float, default=10.0, help="length of each wrk measurement")
    parser.add_argument("--streams", type=int, default=500, help="concurrent streams in phase (c)")
    parser.add_argument("--requests", type=int, default=RSS_TOTAL, help="requests of phase (d)")
    parser.add_argument("--profile", action="store_true", help="profile the http process even if all targets hold")
    parser.add_argument("--profile-s", type=int, default=20, help="length of the py-spy recording")
    parser.add_argument("--spin", action="store_true", help="keep both cores from halting (see the top of run.py)")
    parser.add_argument("--command", default="make bench", help="how this run was started, for RESULTS.md")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only phase (a), floor and gateway, in --rounds alternating rounds; prints the ratios "
                             "and leaves RESULTS.md and profile.svg alone (for measuring one change)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --throughput-only")
    args = parser.parse_args()
    if (os.cpu_count() or 1) < 2:
        raise SystemExit("the bench pins the proxy under test to its own core: it needs at least 2 cores")
    missing = [tool for tool in ("wrk", "taskset", "chrt") if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"the bench needs {', '.join(missing)} (Debian: apt-get install wrk util-linux)")
    # So that `finally` stops every process we started, also when we are terminated.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    started_s = time.monotonic()
    results = run(args)
    if args.throughput_only:
        say(f"done in {time.monotonic() - started_s:.0f} s")
        return 0
    results.environment["load average at end"] = " ".join(f"{load:.2f}" for load in os.getloadavg())
    write_results(results)
    for name, ok in verdicts(results).items():
        say(f"target {name}: {'met' if ok else 'MISSED'}")
    say(f"done in {time.monotonic() - started_s:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
