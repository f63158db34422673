"""Each long-running mode as a real subprocess: it starts, reports health, and leaves cleanly on SIGTERM."""

import json
import signal
import threading
import time
import urllib.request
from http.client import IncompleteRead

import grpc
import redis as sync_redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from appliance import devstack
from tests.modules import probe
from tests.support.http import http_get, http_ok
from tests.support.processes import scaigrid


def metrics_text(port: int) -> str:
    status, _, body = http_get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    return body.decode()


def test_http_serves_health_readiness_metrics_and_exits_0_on_sigterm(start_mode, migrated_env):
    base = f"http://127.0.0.1:{migrated_env['HTTP_PORT']}"
    http = start_mode("http", migrated_env)
    http.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")

    status, headers, body = http_get(base + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert headers["X-Request-ID"].startswith("req_")
    status, _, body = http_get(base + "/health/ready")
    assert json.loads(body) == {"status": "ready", "checks": {"database": "ok", "redis": "ok", "modules": "ok"}}
    assert "scaigrid_http_requests_total" in metrics_text(int(migrated_env["HTTP_PORT"]))

    status, headers, body = http_get(base + "/v1/nothing-here")
    error = json.loads(body)
    assert status == 404 and error["status"] == "error" and error["error"]["code"] == "NOT_FOUND"
    assert error["meta"]["request_id"] == headers["X-Request-ID"]

    assert http.stop() == 0
    lines = http.log_lines()
    assert all("ts" in line and "level" in line for line in lines), "every stdout line is a JSON log object"
    request_line = next(line for line in lines if line.get("event") == "request" and line["path"] == "/v1/nothing-here")
    assert request_line["request_id"] == headers["X-Request-ID"] and request_line["status"] == 404
    assert any(line.get("event") == "drained" for line in lines)


def test_http_readiness_names_a_schema_that_is_not_migrated(start_mode, env):
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    http = start_mode("http", env)  # no migrate first
    http.wait_for(lambda: http_ok(base + "/health"), what="live")
    status, _, body = http_get(base + "/health/ready")
    checks = json.loads(body)["checks"]
    assert status == 503
    assert checks["database"] == "ok" and checks["redis"] == "ok"
    assert checks["modules"].startswith("error: not migrated: core at base")
    assert http.stop() == 0


def test_http_readiness_turns_503_when_redis_goes_away(start_mode, migrated_env, tmp_path):
    own_redis = devstack.start_redis(tmp_path / "redis")
    env = {**migrated_env, "REDIS_URL": own_redis.url}
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    http = start_mode("http", env)
    http.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    own_redis.stop()
    status, _, body = http_get(base + "/health/ready", timeout_s=15)
    assert status == 503
    assert json.loads(body)["checks"]["redis"].startswith("error")
    assert http_ok(base + "/health")  # liveness does not depend on Redis
    assert http.stop() == 0


def test_http_drains_an_in_flight_stream_before_exiting(start_mode, migrated_env):
    env = {**migrated_env, "SCAIGRID_MODULES": "scaibunker,tests.modules.probe:MODULE", "HTTP_DRAIN_GRACE_S": "20"}
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    http = start_mode("http", env)
    http.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")

    received: list[bytes] = []
    streaming = threading.Event()

    def stream() -> None:
        with urllib.request.urlopen(base + "/v1/modules/probe/slow?seconds=3", timeout=30) as response:
            first = response.read(1)
            streaming.set()
            received.extend((first + response.read()).splitlines())

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(10), "the stream's first byte never came"
    http.send(signal.SIGTERM)
    http.wait_for(lambda: http_get(base + "/health/ready")[0] == 503, what="readiness 503 while draining")
    status, _, body = http_get(base + "/v1/modules/probe/slow?seconds=1")
    assert status == 503 and json.loads(body)["error"]["code"] == "SERVICE_DRAINING"
    reader.join(30)

    assert received[-2:] == [b"data: [DONE]", b""] or received[-1] == b"data: [DONE]"
    assert http.stop() == 0
    drained = next(line for line in http.log_lines() if line.get("event") == "drained")
    # At least the stream (a readiness probe of the test's own may still have been in flight on a busy machine).
    assert drained["finished"] >= 1 and drained["cut"] == 0


def test_http_cuts_a_stream_that_outlives_the_grace(start_mode, migrated_env):
    env = {**migrated_env, "SCAIGRID_MODULES": "tests.modules.probe:MODULE", "HTTP_DRAIN_GRACE_S": "1"}
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    http = start_mode("http", env)
    http.wait_for(lambda: http_ok(base + "/health"), what="live")
    outcome: list[object] = []
    streaming = threading.Event()

    def stream() -> None:
        try:
            with urllib.request.urlopen(base + "/v1/modules/probe/slow?seconds=30", timeout=30) as response:
                response.read(1)
                streaming.set()
                outcome.append(response.read())
        except Exception as exc:  # the cut shows as an incomplete read
            outcome.append(exc)

    reader = threading.Thread(target=stream)
    reader.start()
    assert streaming.wait(10), f"the stream's first byte never came: {outcome}"
    started = time.monotonic()
    assert http.stop() == 0
    assert time.monotonic() - started < 15  # bounded by the grace, not by the 30 s stream
    drained = next(line for line in http.log_lines() if line.get("event") == "drained")
    assert (drained["finished"], drained["cut"]) == (0, 1)
    reader.join(30)
    assert isinstance(outcome[0], IncompleteRead), outcome  # the client sees a cut, not a clean end


def test_grpc_health_follows_dependencies_reflection_and_graceful_stop(start_mode, migrated_env):
    grpc_mode = start_mode("grpc", migrated_env)
    target = f"127.0.0.1:{migrated_env['GRPC_PORT']}"

    def serving() -> bool:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    grpc_mode.wait_for(serving, what="SERVING")
    with grpc.insecure_channel(target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=5)
        services = {s.name for reply in replies for s in reply.list_services_response.service}
    assert "grpc.health.v1.Health" in services
    assert 'scaigrid_dependency_up{dependency="database"} 1.0' in metrics_text(int(migrated_env["GRPC_METRICS_PORT"]))
    assert grpc_mode.stop() == 0
    assert any(line.get("event") == "stopped" for line in grpc_mode.log_lines())


def test_grpc_health_turns_not_serving_when_redis_goes_away(start_mode, migrated_env, tmp_path):
    own_redis = devstack.start_redis(tmp_path / "redis")
    env = {**migrated_env, "REDIS_URL": own_redis.url}
    grpc_mode = start_mode("grpc", env)
    target = f"127.0.0.1:{env['GRPC_PORT']}"

    def status() -> int:
        with grpc.insecure_channel(target) as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    grpc_mode.wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
    own_redis.stop()
    grpc_mode.wait_for(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, timeout_s=30,
                       what="NOT_SERVING")
    assert grpc_mode.stop() == 0


def test_worker_heartbeat_metrics_and_check_worker(start_mode, migrated_env):
    assert scaigrid("check", "worker", env=migrated_env).returncode == 1  # nobody is running yet
    worker = start_mode("worker", migrated_env)
    worker.wait_for(lambda: scaigrid("check", "worker", env=migrated_env).returncode == 0, what="fresh heartbeat")
    assert scaigrid("check", "worker", "--this-host", env=migrated_env).returncode == 0
    port = int(migrated_env["WORKER_METRICS_PORT"])
    # The first scheduled beat (the one at start runs before the scheduler) shows in the job metrics.
    worker.wait_for(lambda: 'scaigrid_job_runs_total{job="worker_heartbeat",outcome="ok"}' in metrics_text(port),
                    timeout_s=30, what="a counted heartbeat run")
    assert 'scaigrid_job_last_success_timestamp_seconds{job="worker_heartbeat"}' in metrics_text(port)
    assert worker.stop() == 0
    # A worker that left cleanly removes its heartbeat, so the check fails at once rather than after the TTL.
    result = scaigrid("check", "worker", env=migrated_env)
    assert result.returncode == 1 and "no heartbeat" in result.stderr
    # A fresh heartbeat of a worker on another host (another container or pod) does not vouch for this host's.
    with sync_redis.Redis.from_url(migrated_env["REDIS_URL"]) as client:
        client.set("scaigrid:worker:heartbeat:elsewhere:1", str(time.time()), ex=60)
    assert scaigrid("check", "worker", env=migrated_env).returncode == 0
    elsewhere = scaigrid("check", "worker", "--this-host", env=migrated_env)
    assert elsewhere.returncode == 1 and "no heartbeat on" in elsewhere.stderr


def test_two_workers_run_each_tick_once(start_mode, migrated_env):
    env = {**migrated_env, "SCAIGRID_MODULES": "tests.modules.probe:MODULE"}
    workers = [start_mode("worker", {**env, "WORKER_METRICS_PORT": str(devstack.free_port())}) for _ in range(2)]
    client = sync_redis.Redis.from_url(env["REDIS_URL"])
    try:
        workers[0].wait_for(lambda: len(client.hgetall(probe.TICKS_KEY)) >= 6, timeout_s=40, what="six ticks")
        for worker in workers:
            assert worker.stop() == 0
        counts = {int(tick): int(n) for tick, n in client.hgetall(probe.TICKS_KEY).items()}
        assert set(counts.values()) == {1}, counts  # no tick ran twice
        assert len(client.smembers(probe.RUNNERS_KEY)) >= 1
    finally:
        client.close()


def test_bunker_proxy_runs_without_database_or_redis(start_mode, env):
    proxy_env = {key: value for key, value in env.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    base = f"http://127.0.0.1:{env['BUNKER_PROXY_PORT']}"
    proxy = start_mode("bunker_proxy", proxy_env)
    proxy.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    assert json.loads(http_get(base + "/health/ready")[2]) == {"status": "ready", "checks": {"s3": "ok"}}
    assert "scaigrid_http_requests_total" in metrics_text(int(env["BUNKER_PROXY_PORT"]))
    assert proxy.stop() == 0


def test_bunker_proxy_readiness_fails_when_its_bucket_is_missing(start_mode, env):
    proxy_env = {key: value for key, value in env.items() if key not in ("DATABASE_URL", "REDIS_URL")}
    proxy_env["S3_BUCKET"] = "no-such-bucket"
    base = f"http://127.0.0.1:{env['BUNKER_PROXY_PORT']}"
    proxy = start_mode("bunker_proxy", proxy_env)
    proxy.wait_for(lambda: http_ok(base + "/health"), what="live")
    status, _, body = http_get(base + "/health/ready")
    assert status == 503 and json.loads(body)["checks"]["s3"].startswith("error")
    assert proxy.stop() == 0


def test_secrets_never_reach_the_logs(start_mode, migrated_env):
    env = {**migrated_env, "SCAIKEY_WEBHOOK_SECRET": "hook-secret-value", "SCAIKEY_CLIENT_SECRET": "client-secret-v"}
    base = f"http://127.0.0.1:{env['HTTP_PORT']}"
    http = start_mode("http", env)
    http.wait_for(lambda: http_ok(base + "/health/ready"), what="ready")
    http_get(base + "/v1/missing")
    assert http.stop() == 0
    log = http.log_path.read_text()
    db_password = env["DATABASE_URL"].split(":")[2].split("@")[0]
    for secret in (db_password, env["JWT_SIGNING_SECRET"], "hook-secret-value", "client-secret-v"):
        assert secret not in log


def test_http_through_redis_sentinel(start_mode, migrated_env, tmp_path):
    master = devstack.start_redis(tmp_path / "master")
    sentinel = devstack.start_sentinel(tmp_path / "sentinel", master)
    try:
        env = {**migrated_env, "REDIS_URL": sentinel.url}
        base = f"http://127.0.0.1:{env['HTTP_PORT']}"
        http = start_mode("http", env)
        http.wait_for(lambda: http_ok(base + "/health/ready"), what="ready through the sentinel")
        assert json.loads(http_get(base + "/health/ready")[2])["checks"]["redis"] == "ok"
        assert http.stop() == 0
    finally:
        sentinel.stop()
        master.stop()
