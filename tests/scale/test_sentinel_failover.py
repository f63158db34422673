"""Redis Sentinel failover under load: the master killed (-9), or moved by SENTINEL FAILOVER, while chat traffic flows
through two http processes, a grpc and a worker process on `redis+sentinel://`. Every process follows the new master,
limits and breakers work on it, every request's usage reaches MariaDB once although the replica had not received the
last writes, and the time to recover is measured (printed as one `sentinel failover:` / `sentinel switchover:` line
each, the numbers docs/operations.md quotes)."""

import asyncio
import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid.accounting import usage
from scaigrid.db.tables import usage_records
from scaigrid.worker import heartbeat
from tests.backends import GATEWAY_SETTINGS, FakeBackend, apply, backend, chat_model, http_call
from tests.support.env import create_key
from tests.support.http import http_get
from tests.support.processes import ModeProcess, scaigrid, start_http
from tests.support.sentinel import MASTER_NAME, SentinelSet, client, role, start_sentinel_set
from tests.support.waiting import eventually

TRAFFIC_THREADS = 3
BREAKER_FAILURES = 3
LIMIT_RPM = 5
USER = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class Outcome:
    started_s: float  # time.monotonic()
    ended_s: float
    url: str
    status: int
    request_id: str
    code: str  # the error envelope's code ('' on success)


class Traffic:
    """Chat requests from a few threads, round robin over the http processes, until stopped; every outcome kept."""

    def __init__(self, urls: list[str], key: str) -> None:
        self.urls, self.key = urls, key
        self.outcomes: list[Outcome] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(index,), daemon=True)
                         for index in range(TRAFFIC_THREADS)]

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def _run(self, index: int) -> None:
        turn = index
        while not self._stop.is_set():
            url = self.urls[turn % len(self.urls)]
            turn += 1
            started_s = time.monotonic()
            try:
                status, headers, body = http_call("POST", url + "/v1/inference/chat", self.key,
                                                  {"model": "acme/chat", "messages": USER}, timeout_s=30)
            except OSError as exc:  # the process itself unreachable: counted, never expected
                status, headers, body = 0, {}, str(exc).encode()
            code = "" if status == 200 else _code(body)
            with self._lock:
                self.outcomes.append(Outcome(started_s, time.monotonic(), url, status,
                                             headers.get("X-Request-ID", ""), code))

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def served_since(self, url: str, since_s: float, count: int = 1) -> bool:
        """Whether `count` requests to `url` started after `since_s` were served."""
        return sum(o.url == url and o.started_s > since_s and o.status == 200 for o in self.snapshot()) >= count


def _code(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return body[:80].decode(errors="replace")


def metric(url: str, name: str, labels: str = "") -> float:
    """A sample of an http process's /metrics (0 if absent)."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def redis_ready(url: str) -> bool:
    status, _, body = http_get(url + "/health/ready", timeout_s=3)
    return status == 200 and json.loads(body)["checks"]["redis"] == "ok"


def grpc_serving(port: str) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def worker_beat_since(redis_port: int, since_unix: float) -> bool:
    """Whether a worker wrote its heartbeat to the Redis on `redis_port` after `since_unix`."""
    with client(redis_port) as redis:
        beats = [redis.get(key) for key in redis.scan_iter(heartbeat.KEY_PREFIX + "*")]
    return any(beat is not None and float(beat) > since_unix for beat in beats)


def first_times(checks: dict[str, Callable[[], bool]], since_s: float, timeout_s: float) -> dict[str, float]:
    """Seconds from `since_s` until each check first held (each polled until it does)."""
    reached: dict[str, float] = {}

    def all_reached() -> bool:
        for name, check in checks.items():
            if name not in reached:
                try:
                    if check():
                        reached[name] = time.monotonic() - since_s
                except (OSError, grpc.RpcError, ValueError):
                    pass  # still failing over
        return len(reached) == len(checks)

    eventually(all_reached, "every process healthy on the new master", timeout_s, interval_s=0.05,
               context=lambda: f"reached so far: {reached}")
    return reached


def our_clients(redis_port: int) -> list[str]:
    """The clients of a server, commands and subscriptions alike, other than the sentinels, its replication link and
    this question itself, as `addr flags cmd`."""
    with client(redis_port) as redis:
        clients = redis.client_list()
    return [f"{c['addr']} {c['flags']} {c['cmd']}" for c in clients
            if not c["name"].startswith("sentinel-") and not {"M", "S"} & set(c["flags"]) and c["cmd"] != "client|list"]


def stored_request_ids(database_url: str) -> list[str]:
    """The request ids of usage_records, one per row."""
    async def query() -> list[str]:
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as conn:
                return list(await conn.scalars(select(usage_records.c.request_id)))
        finally:
            await engine.dispose()

    return asyncio.run(query())


@dataclass
class Stack:
    """Two http processes, a grpc and a worker process on the Sentinel set, serving a catalogue of fake backends."""

    env: dict[str, str]
    urls: list[str]
    redis_set: SentinelSet
    fake: FakeBackend


@pytest.fixture
def stack(migrated_env: dict[str, str], start_mode: Callable[..., ModeProcess], tmp_path: Path) -> Iterator[Stack]:
    redis_set = start_sentinel_set(tmp_path / "rs")
    fake = FakeBackend().start()
    try:
        env = {**migrated_env, **GATEWAY_SETTINGS, "REDIS_URL": redis_set.url,
               # Strict: a request served proves its process reached Redis, so "first success" is the recovery.
               "RATE_LIMIT_ON_REDIS_FAILURE": "refuse", "USAGE_FLUSH_INTERVAL_S": "2", "WORKER_HEARTBEAT_TTL_S": "3",
               "BREAKER_FAILURE_THRESHOLD": str(BREAKER_FAILURES), "BREAKER_OPEN_S": "300"}
        apply(env, tmp_path / "catalogue.toml", [backend("b-ok", fake, "ok"), backend("b-bad", fake, "fail")],
              [chat_model("acme/chat", [("b-ok", 1, 1)]), chat_model("acme/flaky", [("b-bad", 1, 1)])])
        second = {**env, "HTTP_PORT": str(devstack.free_port())}
        start_http(start_mode, env)
        start_http(start_mode, second)
        grpc_mode = start_mode("grpc", env)
        grpc_mode.wait_for(lambda: grpc_serving(env["GRPC_PORT"]), what="SERVING")
        start_mode("worker", env)
        eventually(lambda: worker_beat_since(redis_set.master.port, 0), "the worker's heartbeat", 30)
        yield Stack(env, [f"http://127.0.0.1:{e['HTTP_PORT']}" for e in (env, second)], redis_set, fake)
    finally:
        fake.stop()
        redis_set.stop()


def assert_usage_stored_once(stack: Stack, outcomes: list[Outcome]) -> None:
    """Every served request's usage record in MariaDB, once, and nothing else, once the worker flushed the buffer."""
    served = sorted(o.request_id for o in outcomes if o.status == 200)
    with client(stack.redis_set.agreed_master() or 0) as redis:
        eventually(lambda: redis.llen(usage.BUFFER_KEY) == 0 and len(stored_request_ids(stack.env["DATABASE_URL"]))
                   >= len(served), "the usage flushed", 60)
    assert sorted(stored_request_ids(stack.env["DATABASE_URL"])) == served


@pytest.mark.timeout(420)
def test_kill_9_of_the_master_under_load(stack: Stack):
    env, urls, redis_set, fake = stack.env, stack.urls, stack.redis_set, stack.fake
    old_port, new_port = redis_set.master.port, redis_set.replica.port
    with Traffic(urls, create_key(env, "tenant_user")) as traffic:
        eventually(lambda: all(traffic.served_since(url, 0, 20) for url in urls), "traffic flowing", 60)
        # What the master takes while its replica lags never reaches the replica: the failover loses those writes.
        with redis_set.replica_lagging():
            lag_s = time.monotonic()
            eventually(lambda: all(traffic.served_since(url, lag_s, 3) for url in urls), "writes during the lag")
            with client(old_port) as master:
                master_offset = int(master.info("replication")["master_repl_offset"])
            killed_s, killed_unix = time.monotonic(), time.time()
            redis_set.kill_master()
        lost_bytes = master_offset - redis_set.replica_offset()
        assert lost_bytes > 0, "the replica has every write of the master"
        eventually(lambda: redis_set.agreed_master() == new_port, "the sentinels agreeing on the replica", 60,
                   ignoring=(OSError,))
        promoted_s = time.monotonic() - killed_s
        recovery = first_times({
            **{f"first request served by http {i}": lambda url=url: traffic.served_since(url, killed_s)
               for i, url in enumerate(urls)},
            **{f"http {i} ready": lambda url=url: redis_ready(url) for i, url in enumerate(urls)},
            "grpc SERVING": lambda: grpc_serving(env["GRPC_PORT"]),
            "worker heartbeat": lambda: worker_beat_since(new_port, killed_unix),
        }, killed_s, timeout_s=60)
        healthy_s = killed_s + max(recovery.values())

        # The old master back, empty: the sentinels make it a replica of the new one, and nobody writes to it.
        redis_set.restart_old_master(old_port)
        eventually(lambda: role(old_port).get("master_link_status") == "up", "the old master a replica", 90,
                   interval_s=0.2)
        assert role(old_port)["master_port"] == str(new_port)
        rejoined_s = time.monotonic()
        eventually(lambda: all(traffic.served_since(url, rejoined_s, 10) for url in urls), "traffic after rejoin", 60)
    outcomes = traffic.snapshot()
    assert our_clients(old_port) == [], "a process still talks to the old master"

    failed = [o for o in outcomes if o.status != 200]
    assert {(o.status, o.code) for o in failed} <= {(503, "LIMITS_UNAVAILABLE")}, failed[:5]
    late = [o for o in failed if o.started_s > healthy_s]
    assert late == [], f"failures after every process was healthy again: {late[:5]}"

    # Usage: every served request's record in MariaDB, once; those Redis lost came from the processes' journals.
    assert_usage_stored_once(stack, outcomes)
    lost_in_lag = sum(o.status == 200 and lag_s < o.ended_s < killed_s for o in outcomes)
    replayed = [metric(url, "scaigrid_usage_replayed_total") for url in urls]
    assert all(count > 0 for count in replayed), f"no journal replay: Redis lost nothing? {replayed}"

    # Limits on the new master: a key with LIMIT_RPM gets exactly that many through both processes together.
    limited = create_key(env, "tenant_user")
    result = scaigrid("admin", "set-limits", "--key", limited, "--rpm", str(LIMIT_RPM), env=env)
    assert result.returncode == 0, result.stderr
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: http_call("POST", urls[i % 2] + "/v1/inference/chat", limited, {
            "model": "acme/chat", "messages": USER})[0], range(3 * LIMIT_RPM)))
    assert sorted(statuses) == [200] * LIMIT_RPM + [429] * (2 * LIMIT_RPM)

    # Breakers on the new master: BREAKER_FAILURES failures open it, and both processes (the second told through the
    # invalidation bus, resubscribed on the new master) stop sending to the backend.
    key = create_key(env, "tenant_user")
    for _ in range(BREAKER_FAILURES):
        assert http_call("POST", urls[0] + "/v1/inference/chat", key, {"model": "acme/flaky", "messages": USER}
                         )[0] >= 500
    assert len(fake.requests_for("fail")) == BREAKER_FAILURES
    for url in urls:
        eventually(lambda url=url: metric(url, "scaigrid_circuit_breaker_state", '{backend_id="b-bad"}') == 2,
                   f"the breaker open in {url}", 10)
        status, _, body = http_call("POST", url + "/v1/inference/chat", key, {"model": "acme/flaky", "messages": USER})
        assert (status, _code(body)) == (503, "MODEL_UNAVAILABLE")
    assert len(fake.requests_for("fail")) == BREAKER_FAILURES

    refused = [o for o in failed if o.started_s > killed_s]
    served = [o for o in outcomes if o.status == 200]
    rate = len(outcomes) / (max(o.ended_s for o in outcomes) - min(o.started_s for o in outcomes))
    print(f"sentinel failover: {len(outcomes)} requests ({rate:.0f}/s), {len(served)} served, {len(refused)} refused "
          f"(503) during the failover; promoted after {promoted_s:.2f} s; "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in recovery.items())
          + f"; {lost_in_lag} requests ({lost_bytes} bytes of replication stream) during the replica's lag, "
          f"{sum(replayed):g} replayed from journals (by process: {replayed}); "
          f"the old master a replica {rejoined_s - killed_s:.1f} s after the kill")


@pytest.mark.timeout(300)
def test_a_switchover_under_load(stack: Stack):
    """SENTINEL FAILOVER, as an operator moves the master off a host before its maintenance: the old master stays up,
    a master, for seconds before the sentinels demote it; a process still connected to it writes what the demotion
    then discards, and its subscription hears nothing published on the new master."""
    urls, redis_set = stack.urls, stack.redis_set
    old_port, new_port = redis_set.master.port, redis_set.replica.port
    with Traffic(urls, create_key(stack.env, "tenant_user")) as traffic:
        eventually(lambda: all(traffic.served_since(url, 0, 20) for url in urls), "traffic flowing", 60)
        switched_s = time.monotonic()
        assert client(redis_set.sentinels[0].port).sentinel_failover(MASTER_NAME)
        eventually(lambda: redis_set.agreed_master() == new_port, "the sentinels agreeing on the replica", 30)
        agreed_s = time.monotonic()
        # Still a master that takes writes (the sentinels demote it only seconds later): nobody may write there.
        eventually(lambda: our_clients(old_port) == [], "every process off the old master", 5)
        moved_s = time.monotonic()
        assert role(old_port)["role"] == "master", "demoted before the processes left it: the check proves nothing"
        eventually(lambda: role(old_port).get("master_link_status") == "up", "the old master a replica", 60,
                   interval_s=0.2)
        recovered_s = time.monotonic()
        eventually(lambda: all(traffic.served_since(url, recovered_s, 10) for url in urls), "traffic after", 60)
    outcomes = traffic.snapshot()
    failed = [o for o in outcomes if o.status != 200]
    print(f"sentinel switchover: {len(outcomes)} requests, {len(failed)} failed; sentinels agreed "
          f"{agreed_s - switched_s:.1f} s after SENTINEL FAILOVER, every process off the old master "
          f"{moved_s - agreed_s:.1f} s later; the old master a replica {recovered_s - switched_s:.1f} s after it")
    assert failed == []
    assert_usage_stored_once(stack, outcomes)
