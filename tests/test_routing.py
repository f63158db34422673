"""Backend selection against real test backends: priorities, weights, failover, cooldowns, circuit breakers shared
by two http processes, backend health, and the catalogue following `scaigrid admin apply` while running."""

import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from appliance import devstack
from tests.backends import (  # noqa: F401
    USER,
    FakeBackend,
    apply,
    backend,
    chat_call,
    chat_model,
    fake_fixture,
    http_call,
    models_listed,
    shared_env,
    two_http_processes,
)
from tests.catalogue_fixtures import add_tenant
from tests.support.env import create_key
from tests.support.http import http_get
from tests.support.waiting import eventually

BREAKER_OPEN_S = 2


def catalogue(fake: FakeBackend) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    nowhere = f"http://127.0.0.1:{devstack.free_port()}/v1"  # nothing listens: connections are refused
    return [
        {**backend("unreachable", fake, "never"), "base_url": nowhere},
        backend("failing", fake, "fail"),
        backend("healthy", fake, "healthy-model"),
        backend("fail-peer", fake, "fail"),
        backend("ok-peer", fake, "peer-model"),
        backend("heavy", fake, "heavy-model"),
        backend("light", fake, "light-model"),
        backend("first", fake, "first-model"),
        backend("second", fake, "second-model"),
        backend("limited", fake, "ratelimit-30"),
        backend("spare", fake, "spare-model"),
        backend("sluggish", fake, "slow-5", timeout_s=0.5),
        backend("quick", fake, "quick-model"),
        backend("off", fake, "off-model", status="disabled"),
        backend("on", fake, "on-model"),
        backend("flaky", fake, "flaky-model"),
        backend("beta-box", fake, "beta-model", tenant="beta"),
        backend("dup", fake, "platform-dup"),
        backend("dup", fake, "beta-dup", tenant="beta"),  # names are unique per owner
        backend("h-cool", fake, "ratelimit-60"),
        backend("h-ok", fake, "health-ok-model"),
        backend("h-off", fake, "health-off-model", status="disabled"),
    ], [
        chat_model("r/failover", [("unreachable", 1, 1), ("failing", 1, 2), ("healthy", 1, 3)]),
        chat_model("r/peers", [("fail-peer", 1, 1), ("ok-peer", 1, 1)]),
        chat_model("r/weighted", [("heavy", 3, 1), ("light", 1, 1)]),
        chat_model("r/priority", [("second", 1, 2), ("first", 1, 1)]),
        chat_model("r/limited", [("limited", 1, 1), ("spare", 1, 2)]),
        chat_model("r/slow", [("sluggish", 1, 1), ("quick", 1, 2)]),
        chat_model("r/disabled", [("off", 1, 1), ("on", 1, 2)]),
        chat_model("r/flaky", [("flaky", 1, 1)]),
        chat_model("r/dup", [("dup", 1, 1)]),
        chat_model("r/dup", [("dup", 1, 1)], tenant="beta"),
        chat_model("r/health", [("h-cool", 1, 1), ("h-ok", 1, 2), ("h-off", 1, 3)]),
    ]


@dataclass
class Pair:
    """Two http processes of one node (same database and Redis), and keys."""

    env: dict[str, str]
    urls: tuple[str, str]
    user: str
    admin: str

    def chat(self, model: str, process: int = 0) -> tuple[int, dict[str, Any]]:
        status, body = chat_call(self.urls[process], self.user, model)
        return status, json.loads(body)

    def health(self, backend_id: str, process: int = 0, key: str | None = None) -> tuple[int, dict[str, Any]]:
        status, _, body = http_call("GET", f"{self.urls[process]}/v1/backends/{backend_id}/health", key or self.admin)
        return status, json.loads(body)


@pytest.fixture(scope="module")
def node_pair(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
              fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    tmp_path = tmp_path_factory.mktemp("routing")
    with shared_env(mariadb, redis_server, s3_server) as env:
        # beta's own backend is a fake on loopback: the operator allows private targets.
        env.update(BREAKER_FAILURE_THRESHOLD="2", BREAKER_OPEN_S=str(BREAKER_OPEN_S),
                   BACKEND_ALLOW_PRIVATE_TARGETS="true")
        add_tenant(env, "beta")
        apply(env, tmp_path / "catalogue.toml", *catalogue(fake))
        with two_http_processes(env, tmp_path) as urls:
            yield Pair(env, urls, create_key(env, "tenant_user"), create_key(env, "super_admin"))


@pytest.fixture
def pair(node_pair: Pair, fake: FakeBackend) -> Pair:
    fake.received.clear()
    fake.behaviours.clear()
    return node_pair


def test_failover_walks_the_priority_groups_past_refused_and_failing_backends(pair: Pair, fake: FakeBackend) -> None:
    status, reply = pair.chat("r/failover")
    assert status == 200 and reply["data"]["model"] == "r/failover"
    assert [r.body["model"] for r in fake.received] == ["fail", "healthy-model"]  # "unreachable" refused to connect
    health = pair.health("unreachable")[1]
    assert health["data"]["consecutive_failures"] == 1 and "connect" in health["data"]["last_error"]

    fake.received.clear()
    status, _, body = http_call("POST", pair.urls[1] + "/v1/inference/chat", pair.user,
                                {"model": "r/failover", "messages": USER, "stream": True})
    assert status == 200 and "tok2" in body.decode() and body.endswith(b"data: [DONE]\n\n")
    assert b"event: error" not in body  # the failures came before the first chunk: nothing of them shows
    assert [r.body["model"] for r in fake.received] == ["fail", "healthy-model"]


def test_failover_inside_a_group_then_the_failing_peer_is_left_alone(pair: Pair, fake: FakeBackend) -> None:
    # The peers weigh 1:1 and the pick is random: ask until the failing one has been tried (8 fixed asks all went
    # to the healthy one once in 256 runs), then 8 more.
    sent = 0
    while not fake.requests_for("fail") and sent < 40:
        assert pair.chat("r/peers")[0] == 200
        sent += 1
    assert fake.requests_for("fail"), "40 picks at 1:1 never chose the failing peer"
    for _ in range(8):
        assert pair.chat("r/peers")[0] == 200
    # At most two failures (BREAKER_FAILURE_THRESHOLD) reach the failing peer before its breaker opens.
    assert 1 <= len(fake.requests_for("fail")) <= 2
    assert len(fake.requests_for("peer-model")) == sent + 8  # every ask answered, the failed tries by the peer


def test_lower_priority_number_first_and_weights_inside_a_group(pair: Pair, fake: FakeBackend) -> None:
    for _ in range(5):
        assert pair.chat("r/priority")[0] == 200
    assert len(fake.requests_for("first-model")) == 5 and not fake.requests_for("second-model")
    for _ in range(60):
        assert pair.chat("r/weighted")[0] == 200
    heavy, light = len(fake.requests_for("heavy-model")), len(fake.requests_for("light-model"))
    assert heavy + light == 60 and heavy > light > 0  # weights 3:1 (expected 45:15)


def test_a_rate_limited_backend_cools_down_for_its_retry_after(pair: Pair, fake: FakeBackend) -> None:
    for _ in range(3):
        assert pair.chat("r/limited", process=1)[0] == 200
    assert len(fake.requests_for("ratelimit-30")) == 1  # asked once; then spared for 30 s
    assert len(fake.requests_for("spare-model")) == 3
    health = pair.health("limited")[1]
    assert health["data"]["state"] == "closed" and health["data"]["consecutive_failures"] == 0
    assert health["data"]["healthy"] is False and health["data"]["cooldown_until"]


def test_a_timed_out_backend_fails_over_and_disabled_backends_are_skipped(pair: Pair, fake: FakeBackend) -> None:
    assert pair.chat("r/slow")[0] == 200
    assert [r.body["model"] for r in fake.received] == ["slow-5", "quick-model"]
    assert "timeout" in pair.health("sluggish")[1]["data"]["last_error"]
    fake.received.clear()
    assert pair.chat("r/disabled")[0] == 200
    assert [r.body["model"] for r in fake.received] == ["on-model"]


def _trial_in_background(pair: Pair, process: int) -> tuple[threading.Thread, list[int]]:
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(pair.chat("r/flaky", process)[0]))
    thread.start()
    return thread, outcome


def test_breaker_opens_half_opens_and_closes_across_two_processes(pair: Pair, fake: FakeBackend) -> None:
    fake.behaviours["flaky-model"] = "fail"
    for _ in range(2):
        status, reply = pair.chat("r/flaky", process=0)
        assert (status, reply["error"]["code"]) == (502, "BACKEND_ERROR")
    # Process B never called the backend, yet refuses it: the breaker is shared.
    status, reply = pair.chat("r/flaky", process=1)
    assert (status, reply["error"]["code"]) == (503, "MODEL_UNAVAILABLE")
    assert len(fake.requests_for("flaky-model")) == 2
    status, health = pair.health("flaky", process=1)
    assert status == 200
    assert health["data"]["state"] == "open" and health["data"]["consecutive_failures"] == 2
    assert "HTTP 500" in health["data"]["last_error"] and health["data"]["opened_until"]
    # A tenant admin sees what kind of failure it was, never the backend's own words.
    tenant_view = pair.health("flaky", process=1, key=create_key(pair.env, "tenant_admin"))[1]["data"]
    assert tenant_view["state"] == "open" and tenant_view["last_error"] == "status: HTTP 500"
    metrics = http_get(pair.urls[1] + "/metrics")[2].decode()
    assert 'scaigrid_circuit_breaker_state{backend_id="flaky"} 2.0' in metrics
    assert 'scaigrid_backend_health{backend_id="flaky"} 0.0' in metrics

    # After BREAKER_OPEN_S one trial goes through; it fails, so the breaker opens again.
    eventually(lambda: pair.chat("r/flaky", process=1)[0] == 502, "a failed trial", timeout_s=BREAKER_OPEN_S + 5)
    assert len(fake.requests_for("flaky-model")) == 3
    assert pair.health("flaky")[1]["data"]["state"] == "open"

    # The backend recovers, slowly: while its trial runs on B, A sends it nothing.
    fake.behaviours["flaky-model"] = "slow-1.5"
    opened_until = datetime.fromisoformat(pair.health("flaky")[1]["data"]["opened_until"]).timestamp()
    # Waits out the breaker's open window, the behaviour under test; plus 1 s as the times shown are whole seconds.
    time.sleep(max(0.0, opened_until - time.time()) + 1)
    trial, outcome = _trial_in_background(pair, process=1)
    eventually(lambda: pair.health("flaky")[1]["data"]["state"] == "half_open", "half-open")
    status, reply = pair.chat("r/flaky", process=0)
    assert (status, reply["error"]["code"]) == (503, "MODEL_UNAVAILABLE")
    trial.join(10)
    assert outcome == [200]
    assert len(fake.requests_for("flaky-model")) == 4
    status, health = pair.health("flaky", process=0)
    assert (health["data"]["state"], health["data"]["consecutive_failures"]) == ("closed", 0)
    eventually(lambda: pair.chat("r/flaky", process=0)[0] == 200, "closed on A too")
    metrics = http_get(pair.urls[0] + "/metrics")[2].decode()
    assert 'scaigrid_circuit_breaker_state{backend_id="flaky"} 0.0' in metrics


def test_a_models_health_follows_its_backends_in_every_process(pair: Pair, fake: FakeBackend) -> None:
    def health(process: int) -> tuple[str, int, int]:
        status, _, body = http_call("GET", f"{pair.urls[process]}/v1/models/r/health", pair.user)
        data = json.loads(body)["data"]
        assert status == 200, data
        return data["health_status"], data["active_backend_count"], data["total_backend_count"]

    # The disabled backend counts among all, never among the active.
    assert health(0) == health(1) == ("healthy", 2, 3)
    # The first backend asks to be left alone for 60 s: the request fails over, and the model is degraded
    # everywhere, since the cooldown is shared.
    assert pair.chat("r/health")[0] == 200
    assert [r.body["model"] for r in fake.received] == ["ratelimit-60", "health-ok-model"]
    for process in (0, 1):
        eventually(lambda process=process: health(process) == ("degraded", 1, 3), f"degraded on process {process}")
    listed = json.loads(http_call("GET", f"{pair.urls[1]}/v1/models?limit=100", pair.user)[2])["data"]["items"]
    assert {m["slug"]: m["health_status"] for m in listed}["r/health"] == "degraded"
    fake.behaviours["health-ok-model"] = "ratelimit-60"
    status, reply = pair.chat("r/health")
    assert (status, reply["error"]["code"]) == (429, "BACKEND_RATE_LIMITED")
    for process in (0, 1):
        eventually(lambda process=process: health(process) == ("unavailable", 0, 3),
                   f"unavailable on process {process}")


def test_backend_health_needs_routing_view_and_hides_other_tenants_backends(pair: Pair) -> None:
    status, reply = pair.health("healthy", key=pair.user)
    assert (status, reply["error"]["code"]) == (403, "AUTHZ_PERMISSION_DENIED")
    tenant_admin = create_key(pair.env, "tenant_admin")
    status, reply = pair.health("healthy", key=tenant_admin)
    assert status == 200 and reply["data"]["state"] == "closed" and reply["data"]["inflight"] == 0
    assert pair.health("beta-box", key=tenant_admin)[1]["error"]["code"] == "BACKEND_NOT_FOUND"
    assert pair.health("no-such-backend")[1]["error"]["code"] == "BACKEND_NOT_FOUND"
    beta_admin = create_key(pair.env, "tenant_admin", "beta")
    assert pair.health("beta-box", key=beta_admin)[0] == 200


def test_a_tenants_own_model_and_backend_of_a_platform_name_serve_that_tenant_only(pair: Pair, fake: FakeBackend
                                                                                   ) -> None:
    beta_user = create_key(pair.env, "tenant_user", "beta")
    status, body = chat_call(pair.urls[1], beta_user, "r/dup")
    assert status == 200, body
    assert pair.chat("r/dup")[0] == 200
    assert [r.body["model"] for r in fake.received] == ["beta-dup", "platform-dup"]
    # Each is its own backend to breakers and metrics, the tenant's labelled with its tenant.
    beta_admin = create_key(pair.env, "tenant_admin", "beta")
    status, reply = pair.health("dup", process=1, key=beta_admin)
    assert (status, reply["data"]["backend_id"], reply["data"]["state"]) == (200, "dup", "closed")
    metrics = http_get(pair.urls[1] + "/metrics")[2].decode()
    assert 'scaigrid_backend_health{backend_id="dup"} 1.0' in metrics
    assert re.search(r'scaigrid_backend_health\{backend_id="dup@ten_[0-9a-f]{32}"\} 1\.0', metrics), metrics


def test_every_process_follows_an_applied_catalogue_change(pair: Pair, fake: FakeBackend, tmp_path: Path) -> None:
    apply(pair.env, tmp_path / "more.toml", [backend("late", fake, "late-model")],
          [chat_model("r/late", [("late", 1, 1)])])
    for url in pair.urls:
        eventually(lambda url=url: "r/late" in models_listed(url, pair.user), f"r/late listed at {url}")
    assert pair.chat("r/late", process=1)[0] == 200
    assert [r.body["model"] for r in fake.received] == ["late-model"]
