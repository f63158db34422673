"""Parity with the managed ScaiGrid: the requests SCAIGRID_API.md documents, sent to a running node exactly as a
client of the managed product sends them (paths, bodies, query parameters, headers), and the documented answers.

One real http process and a worker (usage is flushed every second) serve a catalogue of real test backends; each
test is one documented area and makes its own tenant, users and keys through the API. The table in docs/api.md
("Parity with the managed ScaiGrid") says, item by item, what is supported, what differs and what is not on the
node; `test_modules_as_documented`, `test_audit_log_as_documented` and `test_cors_as_documented` cover what the
`modules` branch of issue 15 delivers.
"""

import csv
import io
import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx2
import openai
import pytest

from appliance import devstack
from tests.backends import (  # noqa: F401 (fake_fixture: the fixture `fake`)
    PROMPT_TOKENS,
    TRANSCRIPT,
    FakeBackend,
    apply,
    backend,
    chat_model,
    fake_fixture,
    mode_process,
    shared_env,
    speech_bytes,
    wav,
)
from tests.identity import Reply, call, tenant, user_with_key, webhook
from tests.support.env import create_key
from tests.support.http import http_get, http_ok
from tests.support.processes import ModeProcess, scaigrid
from tests.support.waiting import eventually
from tests.webhook_receiver import Receiver

# What the catalogue charges and what its backend costs, per million tokens (a chat answer: 11 tokens in, 2 out).
PRICE_IN, PRICE_OUT, COST_IN, COST_OUT = "2", "4", "1", "2"
CHAT_COST = (PROMPT_TOKENS * Decimal(PRICE_IN) + 2 * Decimal(PRICE_OUT)) / 10**6
CHAT_BACKEND_COST = (PROMPT_TOKENS * Decimal(COST_IN) + 2 * Decimal(COST_OUT)) / 10**6
SCAIKEY_SECRET = secrets.token_hex(16)
USER = [{"role": "user", "content": "hello there"}]


@dataclass
class Grid:
    """The running node as its clients see it, the backend behind it and the receiver of its webhooks."""

    env: dict[str, str]
    fake: FakeBackend
    receiver: Receiver
    worker: ModeProcess

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.env['HTTP_PORT']}"

    def admin(self) -> str:
        """A fresh super_admin key (each test its own, so that no key reaches its 60 requests a minute)."""
        return create_key(self.env, "super_admin")

    def team(self, admin: str, *roles: str, **fields: Any) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        """A new tenant and, per role, a user of it with a key: (tenant, [(user id, key), ...])."""
        row = tenant(self.url, admin, "t" + secrets.token_hex(4), **fields)
        return row, [user_with_key(self.url, admin, row["id"], role) for role in roles]

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/oai/v1", api_key=key, max_retries=0, timeout=20)


@pytest.fixture(scope="module")
def grid(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server, fake: FakeBackend,
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    tmp_path = tmp_path_factory.mktemp("parity")
    receiver = Receiver().start()
    with shared_env(mariadb, redis_server, s3_server) as env:
        # The documented 60 requests a minute per key; the other levels out of the way of a test module's traffic.
        env.update({"RATE_LIMIT_KEY_RPM": "60", "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true",
                    "SCAIKEY_WEBHOOK_SECRET": SCAIKEY_SECRET, "STORAGE_CAPABILITY_SECRET": secrets.token_hex(32),
                    "USAGE_FLUSH_INTERVAL_S": "1"})
        # The operator's catalogue (docs/api.md, `scaigrid admin apply`): what the documented requests are served by.
        costs = {"cost_input_per_mtok": COST_IN, "cost_output_per_mtok": COST_OUT}
        prices = {"price_input_per_mtok": PRICE_IN, "price_output_per_mtok": PRICE_OUT}
        apply(env, tmp_path / "catalogue.toml", [
            backend("plain", fake, "ok", **costs), backend("broken", fake, "fail"),
            backend("cutting", fake, "cut-2"), backend("slow", fake, "slow-3", timeout_s=1),
            backend("busy", fake, "ratelimit-7"), backend("garbled", fake, "garbage"),
        ], [
            chat_model("parity/chat", [("plain", 1, 1)], display_name="Parity chat", context_window=4096,
                       max_output_tokens=50, **prices),
            {"slug": "parity/embed", "modality": "embedding", "routes": [{"backend": "plain"}]},
            {"slug": "parity/painter", "modality": "image", "price_per_image": "0.04",
             "routes": [{"backend": "plain"}]},
            {"slug": "parity/whisper", "modality": "audio", "price_per_audio_second": "0.0001",
             "price_per_mchar": "15", "routes": [{"backend": "plain"}]},
            chat_model("parity/broken", [("broken", 1, 1)]), chat_model("parity/cut", [("cutting", 1, 1)]),
            chat_model("parity/slow", [("slow", 1, 1)]), chat_model("parity/busy", [("busy", 1, 1)]),
            chat_model("parity/garbled", [("garbled", 1, 1)]), chat_model("parity/unrouted", []),
        ])
        url = f"http://127.0.0.1:{env['HTTP_PORT']}"
        with mode_process("http", env, tmp_path / "http.log", lambda: http_ok(url + "/health/ready")), \
                mode_process("worker", env, tmp_path / "worker.log", lambda: True) as worker:
            yield Grid(env, fake, receiver, worker)
    receiver.stop()


def problems(reply: Reply) -> list[str]:
    """The fields a VALIDATION_ERROR names."""
    assert (reply.status, reply.code) == (422, "VALIDATION_ERROR"), reply.body
    return [detail["field"] for detail in reply.body["error"]["details"]]


def native(grid: Grid, method: str, path: str, key: str, **kwargs: Any) -> httpx2.Response:
    """One request to the native API as an HTTP client library sends it (multipart forms, streams, headers)."""
    with httpx2.Client(base_url=grid.url, headers={"Authorization": f"Bearer {key}"}, timeout=20) as client:
        return client.request(method, path, **kwargs)


def sse_events(body: str) -> list[tuple[str, str]]:
    """(event, data) of each server-sent event; the event is `message` unless named."""
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event", "message"), lines["data"]))
    return events


def service_token(env: dict[str, str], scope: str) -> str:
    made = scaigrid("admin", "service-token", "--name", f"parity-{scope}", "--scope", scope, env=env)
    assert made.returncode == 0, made.stderr
    return made.stdout.strip()


# --- envelope and errors ---

def test_envelope_error_codes_and_request_id(grid: Grid) -> None:
    admin = grid.admin()
    _, [(_, viewer)] = grid.team(admin, "tenant_viewer")

    with httpx2.Client(base_url=grid.url) as client:
        missing = client.get("/v1/me")
    body = missing.json()
    assert missing.status_code == 401
    assert body["status"] == "error" and set(body) == {"status", "error", "meta"}
    assert body["error"]["code"] == "AUTH_TOKEN_MISSING" and body["error"]["message"]
    assert body["meta"]["request_id"].startswith("req_")
    assert missing.headers["X-Request-ID"] == body["meta"]["request_id"]  # "also returned in a response header"

    assert call(grid.url, "GET", "/v1/me", "sgk_" + secrets.token_urlsafe(32)).code == "AUTH_TOKEN_INVALID"
    assert call(grid.url, "GET", "/v1/me", "sst_not.a.token").code == "SERVICE_TOKEN_INVALID"
    refused = call(grid.url, "GET", "/v1/me", service_token(grid.env, "scaiinfer-node"))
    assert (refused.status, refused.code) == (403, "AUTH_INSUFFICIENT_SCOPE")
    denied = call(grid.url, "POST", "/v1/webhooks", viewer, {"url": "https://hooks.example/x", "events": []})
    assert (denied.status, denied.code) == (403, "AUTHZ_PERMISSION_DENIED")

    invalid = call(grid.url, "POST", "/v1/api-keys", admin, {"expires_at": "soon"})
    assert set(problems(invalid)) == {"name", "expires_at"}
    assert all(detail["message"] for detail in invalid.body["error"]["details"])
    assert problems(call(grid.url, "GET", "/v1/api-keys?colour=red", admin)) == ["colour"]  # never ignored

    body = {"id": "twice", "provider": "custom", "base_url": grid.fake.url, "model": "ok"}
    assert call(grid.url, "POST", "/v1/backends", admin, body).status == 201
    conflict = call(grid.url, "POST", "/v1/backends", admin, body)
    assert (conflict.status, conflict.code) == (409, "SLUG_CONFLICT")
    unknown = call(grid.url, "GET", "/v1/backends/nowhere/health", admin)
    assert (unknown.status, unknown.code) == (404, "BACKEND_NOT_FOUND")


def test_inference_error_codes(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")

    def chat(model: str) -> Reply:
        return call(grid.url, "POST", "/v1/inference/chat", key, {"model": model, "messages": USER})

    expected = {"parity/nothing": (404, "MODEL_NOT_FOUND"), "parity/broken": (502, "BACKEND_ERROR"),
                "parity/slow": (504, "BACKEND_TIMEOUT"), "parity/busy": (429, "BACKEND_RATE_LIMITED"),
                "parity/garbled": (502, "UPSTREAM_SHAPE_MISMATCH"), "parity/unrouted": (503, "MODEL_UNAVAILABLE")}
    for model, outcome in expected.items():
        reply = chat(model)
        assert (reply.status, reply.code) == outcome, (model, reply.body)
    with httpx2.Client(base_url=grid.url, headers={"Authorization": f"Bearer {key}"}) as client:
        limited = client.post("/v1/inference/chat", json={"model": "parity/busy", "messages": USER})
    assert limited.json()["error"]["retry_after"] >= 1 and int(limited.headers["Retry-After"]) >= 1

    # Mid-stream failure: `event: error` + `data: {"code": "BACKEND_ERROR", ...}`, then `data: [DONE]`.
    cut = native(grid, "POST", "/v1/inference/chat", key, json={"model": "parity/cut", "messages": USER,
                                                                  "stream": True})
    assert cut.status_code == 200 and cut.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(cut.text)
    assert events[-1] == ("message", "[DONE]")
    assert events[-2][0] == "error" and json.loads(events[-2][1])["code"] == "BACKEND_ERROR"


# --- health and monitoring ---

def test_health_endpoints(grid: Grid) -> None:
    admin = grid.admin()
    _, [(_, tenant_admin)] = grid.team(admin, "tenant_admin")
    assert http_get(grid.url + "/health")[0] == 200
    assert json.loads(http_get(grid.url + "/health")[2]) == {"status": "ok"}
    status, _, body = http_get(grid.url + "/health/ready")
    assert (status, json.loads(body)) == (200, {"status": "ready", "checks": {
        "database": "ok", "redis": "ok", "modules": "ok"}})
    assert call(grid.url, "GET", "/health/detailed").status == 401
    assert call(grid.url, "GET", "/health/detailed", tenant_admin).status == 403  # admin (platform) only
    detailed = call(grid.url, "GET", "/health/detailed", admin).body
    assert detailed["dependencies"]["database"]["status"] == "ok"
    assert isinstance(detailed["dependencies"]["redis"]["latency_ms"], float)  # ping latency
    assert {module["id"] for module in detailed["modules"]} >= {"core", "scaibunker"}  # module init status
    eventually(lambda: call(grid.url, "GET", "/health/detailed", admin).body["workers"], "a worker heartbeat")
    assert detailed["nodes"] == []  # last heartbeat of ScaiInfer nodes (none here)


def test_metric_names(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    streamed = native(grid, "POST", "/v1/inference/chat", key, json={"model": "parity/chat", "messages": USER,
                                                                      "stream": True})
    assert streamed.status_code == 200
    status, headers, body = http_get(grid.url + "/metrics")  # no auth by default
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name, labels in (("scaigrid_requests_total", ("model", "status", "protocol")),
                         ("scaigrid_request_duration_seconds_bucket", ("model", "backend")),
                         ("scaigrid_tokens_total", ("model", "direction", "tenant_id")),
                         ("scaigrid_time_to_first_token_seconds_bucket", ("model",)),
                         ("scaigrid_backend_health", ("backend_id",)),
                         ("scaigrid_backend_inflight_requests", ("backend_id",)),
                         ("scaigrid_circuit_breaker_state", ("backend_id",))):
        lines = [line for line in text.splitlines() if line.startswith(name + "{")]
        assert lines, name
        assert all(f'{label}="' in lines[0] for label in labels), lines[0]
    [requests] = [line for line in text.splitlines()
                  if line.startswith("scaigrid_requests_total{") and 'model="parity/chat"' in line
                  and 'protocol="native"' in line and 'status="ok"' in line]
    assert float(requests.rsplit(" ", 1)[1]) >= 1


# --- identity: /v1/me, API keys, users ---

def test_me_and_auth_me(grid: Grid) -> None:
    team, members = grid.team(grid.admin(), "tenant_viewer", "tenant_user", "tenant_admin")
    documented = {
        "tenant_viewer": {"models:list", "accounting:view_own"},
        "tenant_user": {"models:list", "accounting:view_own", "models:use", "api_keys:manage", "modules:use"}}
    documented["tenant_admin"] = documented["tenant_user"] | {
        "routing:view", "accounting:view_tenant", "accounting:manage_budgets", "users:manage", "webhooks:manage",
        "modules:manage", "admin:access"}
    for (user_id, key), role in zip(members, ("tenant_viewer", "tenant_user", "tenant_admin"), strict=True):
        me = call(grid.url, "GET", "/v1/me", key).data
        assert call(grid.url, "GET", "/v1/auth/me", key).data == me
        assert (me["id"], me["role"], me["tenant_id"]) == (user_id, role, team["id"])
        assert me["email"] and me["status"] == "active"
        if role == "tenant_admin":  # plus the permissions of the loaded modules
            assert set(me["permissions"]) >= documented[role]
        else:
            assert set(me["permissions"]) == documented[role]


def test_api_keys(grid: Grid) -> None:
    admin = grid.admin()
    _, [(admin_id, tenant_admin), (user_id, _)] = grid.team(admin, "tenant_admin", "tenant_user")
    expires = (datetime.now(UTC) + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    made = call(grid.url, "POST", "/v1/api-keys", tenant_admin,
                {"name": "ci", "expires_at": expires, "assigned_user_id": user_id})
    assert made.status == 201, made.body
    key = made.data
    assert key["key"].startswith("sgk_") and len(key["key"]) >= 4 + 32
    assert key["name"] == "ci" and key["id"] and key["key"].startswith(key["prefix"])
    assert key["assigned_user_id"] == user_id
    assert call(grid.url, "GET", "/v1/me", key["key"]).data["id"] == user_id

    # GET lists the caller's own keys, never the key itself.
    own = call(grid.url, "GET", "/v1/api-keys", tenant_admin).data["items"]
    assert {item["assigned_user_id"] for item in own} == {admin_id} and all("key" not in item for item in own)
    theirs = call(grid.url, "GET", "/v1/api-keys", key["key"]).data["items"]
    assert key["id"] in {item["id"] for item in theirs}

    revoked = call(grid.url, "DELETE", f"/v1/api-keys/{key['id']}", tenant_admin)
    assert revoked.status == 200, revoked.body
    assert call(grid.url, "GET", "/v1/me", key["key"]).code == "AUTH_TOKEN_INVALID"  # immediate


def test_users(grid: Grid) -> None:
    admin = grid.admin()
    _, [(_, tenant_admin), (user_id, user_key), (other_id, _)] = grid.team(
        admin, "tenant_admin", "tenant_user", "tenant_viewer")
    assert call(grid.url, "PATCH", f"/v1/users/{other_id}", tenant_admin, {"status": "suspended"}).status == 200

    page = call(grid.url, "GET", "/v1/users?limit=2", tenant_admin).data
    assert len(page["items"]) == 2 and page["pagination"]["has_more"] is True
    rest = call(grid.url, "GET", "/v1/users?" + urlencode({"limit": 2, "cursor": page["pagination"]["next_cursor"]}),
                tenant_admin).data
    assert len(rest["items"]) == 1 and rest["pagination"] == {"has_more": False, "next_cursor": None}
    active = call(grid.url, "GET", "/v1/users?status=active", tenant_admin).data["items"]
    assert other_id not in {item["id"] for item in active} and user_id in {item["id"] for item in active}
    suspended = call(grid.url, "GET", "/v1/users?status=suspended", tenant_admin).data["items"]
    assert [item["id"] for item in suspended] == [other_id]

    one = call(grid.url, "GET", f"/v1/users/{user_id}", tenant_admin).data
    assert (one["id"], one["status"]) == (user_id, "active")
    assert call(grid.url, "DELETE", f"/v1/users/{user_id}", tenant_admin).status == 200
    assert call(grid.url, "GET", "/v1/me", user_key).code == "AUTH_TOKEN_INVALID"  # soft delete revokes the keys
    assert call(grid.url, "GET", f"/v1/users/{user_id}", tenant_admin).status == 200  # kept, not removed


# --- models and backends ---

def test_backends_and_provider_types(grid: Grid) -> None:
    admin = grid.admin()
    common = {"cost_input_per_mtok": "0.10", "cost_output_per_mtok": "0.20"}
    for provider, extra in (("openai", {"base_url": "https://api.openai.com/v1"}),
                            ("custom", {"base_url": grid.fake.url}),
                            ("anthropic", {}),
                            ("azure", {"base_url": "https://acme.openai.azure.com", "deployment": "gpt4o"}),
                            ("scaiinfer", {})):
        made = call(grid.url, "POST", "/v1/backends", admin, {
            "id": f"p-{provider}", "provider": provider,
            "model": "node-eu-01/llama" if provider == "scaiinfer" else "gpt-4o", **common, **extra})
        assert made.status == 201, made.body
        costs = (Decimal(made.data["cost_input_per_mtok"]), Decimal(made.data["cost_output_per_mtok"]))
        assert costs == (Decimal("0.10"), Decimal("0.20"))  # decimal strings (the node writes them normalised)
    health = call(grid.url, "GET", "/v1/backends/plain/health", admin).data
    assert health["backend_id"] == "plain" and health["state"] in ("closed", "half_open", "open")
    # Differs: mistral, qwen and google are OpenAI-compatible endpoints, `custom` backends on the node.
    for provider in ("mistral", "qwen", "google"):
        refused = call(grid.url, "POST", "/v1/backends", admin, {
            "id": f"p-{provider}", "provider": provider, "base_url": "https://api.example/v1", "model": "m"})
        assert problems(refused) == ["provider"]


def test_models_listing(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_viewer")
    listing = call(grid.url, "GET", "/v1/models", key).data
    assert set(listing["pagination"]) == {"has_more", "next_cursor"}
    [chat] = [item for item in listing["items"] if item["slug"] == "parity/chat"]
    assert (chat["display_name"], chat["modality"], chat["context_window"], chat["max_output_tokens"]) == (
        "Parity chat", "chat", 4096, 50)
    assert chat["status"] == "active" and chat["default_params"] in ({}, None)
    assert {item["modality"] for item in listing["items"]} == {"chat", "embedding", "image", "audio"}
    assert call(grid.url, "GET", "/v1/models/parity/chat", key).data["slug"] == "parity/chat"
    assert call(grid.url, "GET", "/v1/models/parity/none", key).code == "MODEL_NOT_FOUND"


def test_models_as_documented(grid: Grid) -> None:
    """Documented model fields and listing."""
    admin = grid.admin()
    _, [(_, viewer)] = grid.team(admin, "tenant_viewer")
    body = {"slug": "parity/documented", "display_name": "Documented", "description": "As the docs say",
            "modality": "chat", "context_window": 8192, "max_output_tokens": 1024, "input_price_per_mtok": "2.50",
            "output_price_per_mtok": "10.00", "default_params": {"temperature": 0.7}, "status": "active"}
    made = call(grid.url, "POST", "/v1/models", admin, body)
    assert made.status == 201, made.body
    prices = ("input_price_per_mtok", "output_price_per_mtok")
    assert {name: made.data[name] for name in body if name not in prices} == {
        name: value for name, value in body.items() if name not in prices} and made.data["id"]
    assert [Decimal(made.data[name]) for name in prices] == [Decimal("2.50"), Decimal("10.00")]
    routed = call(grid.url, "PUT", "/v1/routing/parity/documented", admin,
                  {"routes": [{"backend": "plain", "weight": 1, "priority": 1}]})
    assert routed.status == 200, routed.body

    page = call(grid.url, "GET", "/v1/models?" + urlencode({"limit": 1, "modality": "chat", "status": "active"}),
                viewer).data
    assert len(page["items"]) == 1 and page["pagination"]["has_more"] is True and page["items"][0]["modality"] == "chat"
    found: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        query = {"limit": 2, "modality": "chat", **({"cursor": cursor} if cursor else {})}
        page = call(grid.url, "GET", "/v1/models?" + urlencode(query), viewer).data
        found += page["items"]
        if not page["pagination"]["has_more"]:
            break
        cursor = page["pagination"]["next_cursor"]
    [item] = [item for item in found if item["slug"] == "parity/documented"]
    assert item["description"] == "As the docs say" and Decimal(item["input_price_per_mtok"]) == Decimal("2.5")
    assert (item["health_status"], item["active_backend_count"], item["total_backend_count"]) == ("healthy", 1, 1)
    assert "capabilities" in item
    embeddings = call(grid.url, "GET", "/v1/models?modality=embedding", viewer).data["items"]
    assert [model["slug"] for model in embeddings] == ["parity/embed"]
    assert call(grid.url, "GET", "/v1/models?status=deprecated", viewer).data["items"] == []

    assert call(grid.url, "DELETE", "/v1/models/parity/documented", admin).status == 409  # mappings remain
    assert call(grid.url, "PUT", "/v1/routing/parity/documented", admin, {"routes": []}).status == 200
    assert call(grid.url, "DELETE", "/v1/models/parity/documented", admin).status == 200


# --- native inference ---

def test_native_chat(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    grid.fake.received.clear()
    reply = call(grid.url, "POST", "/v1/inference/chat", key, {
        "model": "parity/chat", "messages": [{"role": "system", "content": "be brief"}, *USER],
        "max_tokens": 4000, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n"], "seed": 7,
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "tool_choice": "auto", "metadata": {"trace": "t1"}})
    assert reply.status == 200, reply.body
    assert reply.data["choices"][0]["message"]["content"] == "hello there" and reply.data["model"] == "parity/chat"
    [sent] = grid.fake.received
    assert sent.body["max_tokens"] == 50  # capped by the model's max_output_tokens
    assert problems(call(grid.url, "POST", "/v1/inference/chat", key, {
        "model": "parity/chat", "messages": USER, "temperature": 2.5})) == ["temperature"]

    streamed = native(grid, "POST", "/v1/inference/chat", key,
                      json={"model": "parity/chat", "messages": USER, "stream": True})
    assert streamed.headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(streamed.text)
    assert events[-1] == ("message", "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "tok0 tok1 tok2 "


def test_native_embed_and_generate(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    for path in ("/v1/inference/embed", "/v1/inference/embeddings"):
        reply = call(grid.url, "POST", path, key, {"model": "parity/embed", "input": ["one", "two"],
                                                   "dimensions": 3})
        assert reply.status == 200, reply.body
        assert [len(item["embedding"]) for item in reply.data["data"]] == [3, 3]
    single = call(grid.url, "POST", "/v1/inference/embed", key, {"model": "parity/embed", "input": "one"})
    assert len(single.data["data"]) == 1

    generated = call(grid.url, "POST", "/v1/inference/generate", key, {
        "prompt": "Say hello", "model": "parity/chat", "max_tokens": 20, "temperature": 0.2, "stop": ["."],
        "seed": 1})
    assert generated.status == 200, generated.body
    assert generated.data["choices"][0]["text"] == "hello there"


def test_native_images_and_audio(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    images = call(grid.url, "POST", "/v1/inference/images/generate", key, {
        "model": "parity/painter", "prompt": "a lighthouse", "n": 2, "size": "1024x1024", "quality": "standard",
        "style": "vivid", "response_format": "url"})
    assert images.status == 200, images.body
    assert len(images.data["data"]) == 2 and images.data["data"][0]["url"]

    form = {"model": "parity/whisper", "language": "en", "temperature": "0", "prompt": "greeting"}
    for response_format in ("json", "verbose_json"):
        answer = native(grid, "POST", "/v1/inference/audio/transcribe", key,
                        data={**form, "response_format": response_format}, files={"file": ("a.wav", wav(2))})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["text"] == TRANSCRIPT
    for response_format in ("text", "srt", "vtt"):
        answer = native(grid, "POST", "/v1/inference/audio/transcribe", key,
                        data={**form, "response_format": response_format}, files={"file": ("a.wav", wav(2))})
        assert answer.status_code == 200 and TRANSCRIPT in answer.text, answer.text

    spoken = native(grid, "POST", "/v1/inference/audio/synthesize", key,
                    json={"model": "parity/whisper", "input": "good morning", "voice": "alloy"})
    assert spoken.status_code == 200 and spoken.content == speech_bytes("good morning")  # raw bytes, no envelope
    assert spoken.headers["Content-Type"].startswith("audio/")


# --- the OpenAI-compatible surface, through the official SDK ---

def test_openai_sdk_surface(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    with grid.openai(key) as client:
        answer = client.chat.completions.create(model="parity/chat", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "hello there"
        tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        assert client.chat.completions.create(model="parity/chat", messages=USER, tools=tools,  # type: ignore
                                              tool_choice="auto").choices[0].finish_reason == "stop"
        text = "".join(chunk.choices[0].delta.content or "" for chunk in client.chat.completions.create(
            model="parity/chat", messages=USER, stream=True) if chunk.choices)  # type: ignore[arg-type]
        assert text == "tok0 tok1 tok2 "

        listed = {model.id: model for model in client.models.list()}
        assert {"parity/chat", "parity/embed"} <= set(listed)
        model = client.models.retrieve("parity/chat")
        assert (model.model_extra or {}).get("context_window") == 4096
        assert (model.model_extra or {}).get("max_output_tokens") == 50

        embedded = client.embeddings.create(model="parity/embed", input=["a", "b"])
        assert len(embedded.data) == 2
        image = client.images.generate(model="parity/painter", prompt="a lighthouse", n=1)
        assert image.data and image.data[0].url
        transcript = client.audio.transcriptions.create(model="parity/whisper", file=("a.wav", wav(2)))
        assert transcript.text == TRANSCRIPT
        speech = client.audio.speech.create(model="parity/whisper", input="good morning", voice="alloy")
        assert speech.content == speech_bytes("good morning")

        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("parity/none")
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="parity/chat", messages=USER, temperature=3)  # type: ignore
        assert refused.value.param == "temperature"
    with grid.openai("sgk_" + secrets.token_urlsafe(32)) as stranger, pytest.raises(openai.AuthenticationError):
        stranger.models.list()


# --- rate limits ---

def test_rate_limit_headers(grid: Grid) -> None:
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    with httpx2.Client(base_url=grid.url, headers={"Authorization": f"Bearer {key}"}) as client:
        first = client.get("/v1/me")
        assert first.headers["X-Scaigrid-Ratelimit-Limit"] == "60"  # per API key, the most restrictive level
        assert first.headers["X-Scaigrid-Ratelimit-Remaining"] == "59"
        assert abs(int(first.headers["X-Scaigrid-Ratelimit-Reset"]) - time.time()) <= 61  # unix time
        for _ in range(59):
            assert client.get("/v1/me").status_code == 200
        limited = client.get("/v1/me")
    assert limited.status_code == 429 and limited.json()["error"]["code"] == "RATE_LIMITED"
    assert int(limited.headers["Retry-After"]) >= 1 and limited.json()["error"]["retry_after"] >= 1
    assert limited.headers["X-Scaigrid-Ratelimit-Remaining"] == "0"


# --- usage, summary, export ---

def _used(grid: Grid) -> tuple[dict[str, Any], str, str, str]:
    """A tenant whose user made two chat requests and one embedding request, flushed: (tenant, user id, user's key,
    admin's key)."""
    admin = grid.admin()
    team, [(user_id, key), (_, tenant_admin)] = grid.team(admin, "tenant_user", "tenant_admin")
    for body in ({"model": "parity/chat", "messages": USER}, {"model": "parity/chat", "messages": USER}):
        assert call(grid.url, "POST", "/v1/inference/chat", key, body).status == 200
    assert call(grid.url, "POST", "/v1/inference/embed", key, {"model": "parity/embed", "input": "x"}).status == 200

    def flushed() -> bool:
        return len(call(grid.url, "GET", "/v1/accounting/usage", key).data["items"]) == 3

    eventually(flushed, "usage flushed by the worker")
    return team, user_id, key, tenant_admin


def test_usage_listing(grid: Grid) -> None:
    team, user_id, key, tenant_admin = _used(grid)
    start = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    end = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    query = {"start": start, "end": end, "model": "parity/chat", "user_id": user_id, "tenant_id": team["id"],
             "limit": 1}
    page = call(grid.url, "GET", "/v1/accounting/usage?" + urlencode(query), tenant_admin).data
    assert len(page["items"]) == 1 and page["pagination"]["has_more"] is True
    rest = call(grid.url, "GET", "/v1/accounting/usage?" + urlencode(
        {**query, "cursor": page["pagination"]["next_cursor"]}), tenant_admin).data
    assert len(rest["items"]) == 1 and rest["pagination"]["has_more"] is False
    item = page["items"][0]
    assert {"model", "backend_id", "user_id", "tenant_id", "tokens_in", "tokens_out", "cost", "latency_ms",
            "created_at"} <= set(item)
    assert (item["model"], item["backend_id"], item["user_id"], item["tenant_id"]) == (
        "parity/chat", "plain", user_id, team["id"])
    assert (item["tokens_in"], item["tokens_out"], Decimal(item["cost"])) == (PROMPT_TOKENS, 2, CHAT_COST)
    assert problems(call(grid.url, "GET", "/v1/accounting/usage?limit=1001", key)) == ["limit"]


def test_usage_summary_and_export_as_documented(grid: Grid) -> None:
    """Usage item id, period and backend_id, summary rows and /v1/accounting/export ."""
    team, user_id, key, tenant_admin = _used(grid)
    items = call(grid.url, "GET", "/v1/accounting/usage?" + urlencode(
        {"period": "day", "backend_id": "plain", "tenant_id": team["id"]}), tenant_admin).data["items"]
    assert len(items) == 3 and all(item["id"] for item in items)

    summary = call(grid.url, "GET", "/v1/accounting/usage/summary?period=day&group_by=model", tenant_admin).data
    rows = {row["group_key"]: row for row in summary["items"]}
    chat = rows["parity/chat"]
    assert (chat["request_count"], chat["input_tokens"], chat["output_tokens"], chat["total_tokens"]) == (
        2, 2 * PROMPT_TOKENS, 4, 2 * PROMPT_TOKENS + 4)
    assert (Decimal(chat["total_cost"]), Decimal(chat["backend_cost"])) == (2 * CHAT_COST, 2 * CHAT_BACKEND_COST)
    for group_by, group_key in (("user", user_id), ("backend", "plain"), ("tenant", team["id"])):
        grouped = call(grid.url, "GET", f"/v1/accounting/usage/summary?group_by={group_by}", tenant_admin).data
        assert [row["group_key"] for row in grouped["items"]] == [group_key], group_by

    window = {"start": (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "end": (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")}
    as_csv = native(grid, "GET", "/v1/accounting/export?" + urlencode({**window, "format": "csv"}), key)
    assert as_csv.status_code == 200, as_csv.text
    assert len(list(csv.DictReader(io.StringIO(as_csv.text)))) == 3
    as_ndjson = native(grid, "GET", "/v1/accounting/export?" + urlencode({**window, "format": "ndjson"}), key)
    assert sorted(json.loads(line)["model"] for line in as_ndjson.text.splitlines()) == [
        "parity/chat", "parity/chat", "parity/embed"]
    as_json = native(grid, "GET", "/v1/accounting/export?" + urlencode({**window, "format": "json"}), key)
    assert len(as_json.json()) == 3
    assert problems(call(grid.url, "GET", "/v1/accounting/export?format=xml", key)) == ["format"]


# --- budgets ---

def test_budgets_as_documented(grid: Grid) -> None:
    """The documented budget body and BUDGET_EXCEEDED."""
    _, [(_, tenant_admin), (_, key)] = grid.team(grid.admin(), "tenant_admin", "tenant_user")
    refused = call(grid.url, "POST", "/v1/accounting/budgets", tenant_admin, {"scope": "tenant", "period": "monthly"})
    assert refused.status == 422  # at least one of cost_limit, token_limit, request_limit

    made = call(grid.url, "POST", "/v1/accounting/budgets", tenant_admin, {
        "scope": "tenant", "period": "monthly", "cost_limit": "100.00", "token_limit": 1_000_000,
        "request_limit": 1, "hard_action": "block", "soft_limit_pct": 0.8})
    assert made.status == 201, made.body
    budget = made.data
    assert (budget["scope"], budget["period"], budget["hard_action"]) == ("tenant", "monthly", "block")
    assert Decimal(str(budget["soft_limit_pct"])) == Decimal("0.8")  # the node answers a decimal string
    assert (Decimal(budget["cost_limit"]), budget["token_limit"], budget["request_limit"]) == (
        Decimal("100"), 1_000_000, 1)
    listed = call(grid.url, "GET", "/v1/accounting/budgets", tenant_admin).data["items"]
    assert [item["id"] for item in listed] == [budget["id"]]

    assert call(grid.url, "POST", "/v1/inference/chat", key, {"model": "parity/chat", "messages": USER}).status == 200

    def blocked() -> bool:
        reply = call(grid.url, "POST", "/v1/inference/chat", key, {"model": "parity/chat", "messages": USER})
        return (reply.status, reply.body.get("error", {}).get("code")) == (429, "BUDGET_EXCEEDED")

    eventually(blocked, "the request limit reached")
    state = call(grid.url, "GET", f"/v1/accounting/budgets/{budget['id']}", tenant_admin).data
    assert state["id"] == budget["id"] and state["current"]  # usage and enforcement state


# --- webhooks ---

def test_webhooks(grid: Grid) -> None:
    admin = grid.admin()
    team, [(_, tenant_admin), (_, key)] = grid.team(admin, "tenant_admin", "tenant_user",
                                                    scaikey_id="sk-" + secrets.token_hex(4))
    name, secret = "hook-" + secrets.token_hex(4), secrets.token_hex(32)  # client-chosen, 64 hex characters
    grid.receiver.secrets[name] = secret
    events = ["request.completed", "request.failed", "budget.soft_limit_reached", "budget.hard_limit_reached",
              "webhook.auto_disabled", "scaikey.user.created", "scaikey.user.updated"]
    made = call(grid.url, "POST", "/v1/webhooks", tenant_admin, {
        "url": grid.receiver.url(name), "events": events, "secret": secret, "status": "active"})
    assert made.status == 201, made.body
    hook = made.data
    assert (hook["status"], hook["max_retries"], sorted(hook["events"])) == ("active", 5, sorted(events))
    assert problems(call(grid.url, "POST", "/v1/webhooks", tenant_admin, {
        "url": grid.receiver.url(name), "events": events, "secret": "short"})) == ["secret"]

    assert [item["id"] for item in call(grid.url, "GET", "/v1/webhooks", tenant_admin).data["items"]] == [hook["id"]]
    assert call(grid.url, "GET", f"/v1/webhooks/{hook['id']}", tenant_admin).data["url"] == grid.receiver.url(name)
    paused = call(grid.url, "PUT", f"/v1/webhooks/{hook['id']}", tenant_admin, {"status": "inactive"})
    assert paused.data["status"] == "inactive"
    assert call(grid.url, "PUT", f"/v1/webhooks/{hook['id']}", tenant_admin, {"status": "active"}).status == 200

    since = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    tested = call(grid.url, "POST", f"/v1/webhooks/{hook['id']}/test", tenant_admin)
    assert tested.status == 200, tested.body
    result = tested.data
    assert (result["status_code"], result["error"]) == (200, None)
    assert result["delivery_id"] and isinstance(result["duration_ms"], int)
    [arrival] = grid.receiver.arrived(name)  # synchronous: there before the answer
    # X-ScaiGrid-Signature: sha256=<hex HMAC-SHA256 of the raw body>, checked by the receiver with the chosen secret.
    assert arrival.signature_valid and arrival.headers["X-ScaiGrid-Signature"].startswith("sha256=")

    def deliveries(**query: Any) -> list[str]:
        path = f"/v1/webhooks/{hook['id']}/deliveries?" + urlencode(query)
        return [item["id"] for item in call(grid.url, "GET", path, tenant_admin).data["items"]]

    assert deliveries(status="success", since=since, limit=10) == [result["delivery_id"]]
    assert deliveries(status="failed") == deliveries(status="pending") == []
    assert deliveries(since="2999-01-01T00:00:00Z") == []

    # A request's event, once the worker has flushed its usage; an identity change from ScaiKey.
    assert call(grid.url, "POST", "/v1/inference/chat", key, {"model": "parity/chat", "messages": USER}).status == 200
    body, headers = webhook(SCAIKEY_SECRET, "user.created", "sk-u-" + secrets.token_hex(4),
                            {"email": "new@example.com", "role": "tenant_user"}, tenant_id=team["scaikey_id"])
    assert call(grid.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body).data["applied"] is True

    def types() -> set[str]:
        return {str(a.event["event_type"]) for a in grid.receiver.arrived(name)}

    grid.receiver.wait_for(lambda: {"request.completed", "scaikey.user.created"} <= types(), "both events")
    for arrival in grid.receiver.arrived(name):
        assert arrival.signature_valid
        assert {"event_id", "event_type", "source", "tenant_id", "partner_id", "payload", "timestamp"} <= set(
            arrival.event)

    assert call(grid.url, "DELETE", f"/v1/webhooks/{hook['id']}", tenant_admin).status == 200
    assert call(grid.url, "GET", f"/v1/webhooks/{hook['id']}", tenant_admin).status == 404


# --- modules, audit log, browsers ---

def test_modules_as_documented(grid: Grid) -> None:
    """GET /v1/modules, enable/disable per tenant, MODULE_NOT_ENABLED."""
    _, [(_, tenant_admin)] = grid.team(grid.admin(), "tenant_admin")
    listing = call(grid.url, "GET", "/v1/modules", tenant_admin)
    assert listing.status == 200, listing.body
    [bunker] = [item for item in listing.data["items"] if item["module_id"] == "scaibunker"]
    assert {"id", "module_id", "display_name", "version", "description", "status", "permissions",
            "dependencies"} <= set(bunker)
    assert bunker["status"] == "active" and isinstance(bunker["dependencies"], list)
    assert all({"key", "display_name", "description"} <= set(p) for p in bunker["permissions"])
    assert call(grid.url, "GET", "/v1/modules/scaibunker", tenant_admin).data["module_id"] == "scaibunker"

    mint = {"prefix": "sandboxes/sb-1/", "verbs": ["GET"]}
    assert call(grid.url, "POST", "/v1/modules/scaibunker/storage/capabilities", tenant_admin, mint).status == 201
    assert call(grid.url, "POST", "/v1/modules/scaibunker/disable", tenant_admin).status == 200
    refused = call(grid.url, "POST", "/v1/modules/scaibunker/storage/capabilities", tenant_admin, mint)
    assert (refused.status, refused.code) == (403, "MODULE_NOT_ENABLED")
    assert call(grid.url, "GET", "/v1/modules/scaibunker", tenant_admin).data["status"] == "disabled"
    assert call(grid.url, "POST", "/v1/modules/scaibunker/enable", tenant_admin).status == 200
    assert call(grid.url, "POST", "/v1/modules/scaibunker/storage/capabilities", tenant_admin, mint).status == 201


def test_audit_log_as_documented(grid: Grid) -> None:
    """Every admin change recorded, GET /v1/audit-log and its export."""
    _, [(admin_id, tenant_admin)] = grid.team(grid.admin(), "tenant_admin")
    with httpx2.Client(base_url=grid.url, headers={"Authorization": f"Bearer {tenant_admin}",
                                                  "User-Agent": "parity-client/1.0"}) as client:
        made = client.post("/v1/api-keys", json={"name": "audited"})
    assert made.status_code == 201
    key_id = made.json()["data"]["id"]
    query = {"action": "api_key.create", "actor_id": admin_id, "resource_type": "api_key", "resource_id": key_id,
             "status": "SUCCESS", "limit": 10}
    reply = call(grid.url, "GET", "/v1/audit-log?" + urlencode(query), tenant_admin)
    assert reply.status == 200, reply.body
    [entry] = reply.data["items"]
    assert (entry["action"], entry["resource_type"], entry["resource_id"], entry["status"]) == (
        "api_key.create", "api_key", key_id, "SUCCESS")
    assert (entry["actor_id"], entry["actor_type"]) == (admin_id, "user")
    assert entry["request_id"] == made.headers["X-Request-ID"] and entry["user_agent"] == "parity-client/1.0"
    exported = native(grid, "GET", "/v1/audit-log/export", tenant_admin)
    assert exported.status_code == 200 and key_id in exported.text


def test_cors_as_documented(grid: Grid, start_mode: Any, tmp_path: Path) -> None:
    """CORS for the operator's origins (CORS_ALLOWED_ORIGINS)."""
    env = {**grid.env, "HTTP_PORT": str(devstack.free_port()), "CORS_ALLOWED_ORIGINS": "https://app.example"}
    process = start_mode("http", env)
    url = f"http://127.0.0.1:{env['HTTP_PORT']}"
    process.wait_for(lambda: http_ok(url + "/health/ready"), what="readiness")
    with httpx2.Client(base_url=url) as client:
        preflight = client.options("/v1/me", headers={
            "Origin": "https://app.example", "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization"})
        assert preflight.status_code in (200, 204), preflight.text
        assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
        assert "authorization" in preflight.headers["Access-Control-Allow-Headers"].lower()
        answer = client.get("/v1/me", headers={"Origin": "https://app.example"})
        assert answer.headers["Access-Control-Allow-Origin"] == "https://app.example"
        stranger = client.get("/v1/me", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in stranger.headers


def test_openai_batches_are_not_on_the_node(grid: Grid) -> None:
    """Differs: /oai/v1/batches is the managed product's; the node answers 404 in OpenAI's error shape."""
    _, [(_, key)] = grid.team(grid.admin(), "tenant_user")
    with grid.openai(key) as client, pytest.raises(openai.NotFoundError):
        client.batches.list()
