"""scaiinfer.v1 end to end: real test nodes (tests/scaiinfer_node.py) heartbeat to the grpc mode and serve inference
that the http process dispatches to them; node health, gRPC authentication and error mapping, the generated code."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import select

from appliance import devstack
from scaigrid.access import Access, access_of
from scaigrid.api.app import create_app
from scaigrid.auth import service_tokens
from scaigrid.auth.service_tokens import HYBRID_RELAY, OPERATOR, SCAIINFER_NODE
from scaigrid.db.tables import infra_nodes
from scaigrid.resources import database_ctx
from scaigrid.rpc import codegen
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.rpc.interceptors import ServiceInterceptor
from scaigrid.settings import Secret, load_settings
from tests.backends import (  # noqa: F401 (fake_fixture: the fixture `fake`)
    FakeBackend,
    Gateway,
    backend,
    chat_model,
    fake_fixture,
    http_call,
    http_process,
    serving,
    shared_env,
)
from tests.support.env import create_key
from tests.support.processes import REPO, ModeProcess, command_env, scaigrid
from tests.support.waiting import eventually
from tests.test_inference import buffered_usage
from tests.tls import TestCA

USER = [{"role": "user", "content": "three words here"}]
# Small thresholds so that health transitions take seconds (the directory rereads every 2 s on top).
NODE_SETTINGS = {"NODE_HEARTBEAT_INTERVAL_S": "0.3", "NODE_WARNING_AFTER_S": "1.5", "NODE_STALE_AFTER_S": "3",
                 "BREAKER_FAILURE_THRESHOLD": "2"}
# What node-a announces as loaded: the behaviours of tests/scaiinfer_node.py that its backends name.
NODE_A_MODELS = "ok,fail-UNAVAILABLE,fail-INTERNAL,fail-INVALID_ARGUMENT,fail-RESOURCE_EXHAUSTED,cut-2,short-2,slow-5"
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}
GATEWAY_CN = "scaigrid-gateway"  # the gateway's client certificate (SCAIINFER_CLIENT_CERT_FILE)
PICTURE = [{"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]


def test_committed_code_matches_the_protos(tmp_path: Path) -> None:
    generated = codegen.generate(tmp_path)
    assert {path.name for path in generated} == {"scaiinfer_pb2.py", "scaiinfer_pb2.pyi", "scaiinfer_pb2_grpc.py",
                                                  "link_pb2.py", "link_pb2.pyi", "link_pb2_grpc.py"}
    for path in generated:
        assert (tmp_path / path).read_bytes() == (REPO / path).read_bytes(), (
            f"{path} differs from the protos: run `python -m scaigrid.rpc.codegen` and commit the result")


# --- the cluster: grpc mode, http mode, test nodes ---

@contextmanager
def running(args: list[str], env: dict[str, str], log_path: Path, name: str) -> Iterator[ModeProcess]:
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, *args], env=command_env(env), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
    proc = ModeProcess(name, process, log_path)
    try:
        yield proc
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@dataclass
class Cluster:
    env: dict[str, str]
    gateway: Gateway
    admin_key: str
    calls: Path
    tmp_path: Path
    grpc_target: str
    fake: FakeBackend  # an HTTP backend next to the nodes
    ca: TestCA  # signs the nodes' certificates (SCAIINFER_CA_FILE) and the gateway's client certificate

    def node(self, node_id: str, models: str, *extra: str, tls: str = "ca") -> Any:
        """A node serving TLS with a certificate of the cluster's CA and requiring the gateway's client certificate;
        tls="other-ca": a certificate another CA signed; tls="plaintext": no TLS at all."""
        port = devstack.free_ports(1)[0]
        token = node_token(self.env, f"scaiinfer-{node_id}", 3600)
        if tls == "plaintext":
            tls_args: list[str] = []
        else:
            ca = self.ca if tls == "ca" else TestCA(self.tmp_path / f"{node_id}-ca", "another CA")
            cert, key = ca.issue(node_id)
            tls_args = ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(self.ca.ca_file)]
        return running(["-m", "tests.scaiinfer_node", "--port", str(port), "--gateway", self.grpc_target,
                        "--node-id", node_id, "--models", models, "--calls", str(self.calls), *tls_args, *extra],
                       {**self.env, "SCAIINFER_NODE_TOKEN": token}, self.tmp_path / f"{node_id}.log", node_id)

    def listed(self) -> dict[str, dict[str, Any]]:
        status, _, body = http_call("GET", self.gateway.url + "/v1/infra/nodes", self.admin_key)
        assert status == 200, body
        return {item["id"]: item for item in json.loads(body)["data"]["items"]}

    def node_calls(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.calls.read_text().splitlines()] if self.calls.exists() else []

    def node_request_ids(self) -> set[str]:
        return {call["request_id"] for call in self.node_calls()}

    def breaker(self, backend_id: str) -> dict[str, Any]:
        _, _, body = http_call("GET", f"{self.gateway.url}/v1/backends/{backend_id}/health", self.admin_key)
        return dict(json.loads(body)["data"])


def node_token(env: dict[str, str], name: str, ttl_s: int = 60, scope: str = SCAIINFER_NODE) -> str:
    """What a node operator holds: `scaigrid admin service-token --name scaiinfer-<id> --scope scaiinfer-node`."""
    return service_tokens.mint(Secret(env["SERVICE_TOKEN_SECRET"]), name, ttl_s, scope=scope)


def node_backend(backend_id: str, node_model: str, **extra: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "scaiinfer", "model": node_model, **extra}


def serving_node(proc: ModeProcess) -> None:
    proc.wait_for(lambda: "serving" in proc.log_path.read_text(), what="the node's first heartbeat")


@pytest.fixture(scope="module")
def cluster(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
            tmp_path_factory: pytest.TempPathFactory, fake: FakeBackend) -> Iterator[Cluster]:
    tmp_path = tmp_path_factory.mktemp("scaiinfer")
    ca = TestCA(tmp_path / "tls")
    client_cert, client_key = ca.issue(GATEWAY_CN, client=True)
    with shared_env(mariadb, redis_server, s3_server) as env:
        env.update(NODE_SETTINGS, SCAIINFER_CA_FILE=str(ca.ca_file), SCAIINFER_CLIENT_CERT_FILE=str(client_cert),
                   SCAIINFER_CLIENT_KEY_FILE=str(client_key))
        grpc_target = f"127.0.0.1:{env['GRPC_PORT']}"
        with running(["-m", "scaigrid", "run", "--mode", "grpc"], env, tmp_path / "grpc.log", "grpc") as grpc_mode:
            grpc_mode.wait_for(lambda: _health(grpc_target) == health_pb2.HealthCheckResponse.SERVING, what="SERVING")
            cluster = Cluster(env, None, "", tmp_path / "calls.jsonl", tmp_path, grpc_target,  # type: ignore[arg-type]
                              fake, ca)
            with cluster.node("node-a", NODE_A_MODELS) as node_a:
                serving_node(node_a)
                backends = [
                    node_backend("a-ok", "node-a/ok"), node_backend("a-ok2", "node-a/ok"),
                    node_backend("a-ok3", "node-a/ok"), node_backend("a-unavailable", "node-a/fail-UNAVAILABLE"),
                    node_backend("a-internal", "node-a/fail-INTERNAL"),
                    node_backend("a-refuse", "node-a/fail-INVALID_ARGUMENT"),
                    node_backend("a-busy", "node-a/fail-RESOURCE_EXHAUSTED"),
                    node_backend("a-cut", "node-a/cut-2"), node_backend("a-slow", "node-a/slow-5", timeout_s=1),
                    node_backend("a-short", "node-a/short-2"), node_backend("a-unloaded", "node-a/not-loaded"),
                    node_backend("x-unknown", "node-x/ok"), node_backend("c-ok", "node-c/ok"),
                    node_backend("m-ok", "node-m/ok"), backend("h-ok", fake, "ok"),
                    node_backend("p-ok", "node-p/ok"), node_backend("o-ok", "node-o/ok"),
                    node_backend("q-ok", "node-q/ok")]
                models = [
                    chat_model("local/chat", [("a-ok", 1, 1)], price_input_per_mtok="1", price_output_per_mtok="2"),
                    chat_model("local/failover", [("a-unavailable", 1, 1), ("a-ok2", 1, 2)]),
                    chat_model("local/breaker", [("a-internal", 1, 1)]),
                    chat_model("local/refuse", [("a-refuse", 1, 1)]),
                    chat_model("local/busy", [("a-busy", 1, 1)]),
                    chat_model("local/cut", [("a-cut", 1, 1)]),
                    chat_model("local/slow", [("a-slow", 1, 1)]),
                    chat_model("local/unknown-first", [("x-unknown", 1, 1), ("a-ok3", 1, 2)]),
                    chat_model("local/node-c", [("c-ok", 1, 1)]),
                    chat_model("local/short", [("a-short", 1, 1)]),
                    chat_model("local/unloaded-first", [("a-unloaded", 1, 1), ("a-ok", 1, 2)]),
                    chat_model("local/unloaded", [("a-unloaded", 1, 1)]),
                    chat_model("local/moving", [("m-ok", 1, 1)]),
                    chat_model("local/mixed", [("a-ok", 1, 1), ("h-ok", 1, 2)]),
                    chat_model("local/plaintext-node", [("p-ok", 1, 1)]),
                    chat_model("local/other-ca-node", [("o-ok", 1, 1)]),
                    chat_model("local/plaintext-opt-in", [("q-ok", 1, 1)]),
                    {"slug": "local/embed", "modality": "embedding", "routes": [
                        {"backend": "a-ok", "weight": 1, "priority": 1}]},
                    {"slug": "local/embed-mixed", "modality": "embedding", "routes": [
                        {"backend": "a-ok", "weight": 1, "priority": 1},
                        {"backend": "h-ok", "weight": 1, "priority": 2}]},
                ]
                with serving(env, tmp_path, backends, models) as gateway:
                    cluster.gateway = gateway
                    cluster.admin_key = create_key(env, "super_admin")
                    yield cluster
                    gateway.close_clients()


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)


def chat(cluster: Cluster, model: str, stream: bool = False, **extra: Any) -> tuple[int, dict[str, str], bytes]:
    return http_call("POST", cluster.gateway.url + "/v1/inference/chat", cluster.gateway.key,
                     {"model": model, "messages": USER, "stream": stream, **extra})


def sse_events(body: bytes) -> list[tuple[str | None, str]]:
    events = []
    for block in body.decode().split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        events.append((name, "\n".join(data)))
    return events


# --- heartbeats, health, the node list ---

def test_heartbeats_register_the_node_and_it_is_listed_for_platform_operators(cluster: Cluster) -> None:
    node = cluster.listed()["node-a"]
    assert node["health"] == "healthy"
    assert node["endpoint"].startswith("127.0.0.1:")
    assert node["models"] == NODE_A_MODELS.split(",")
    assert (node["capacity"], node["load"], node["version"]) == (8, 1, "test-node 1.0")
    assert node["heartbeat_age_s"] < 1.5
    first = node["last_heartbeat_at"]
    eventually(lambda: cluster.listed()["node-a"]["last_heartbeat_at"] != first, "a later heartbeat stored")

    # Nodes are shared infrastructure: a tenant admin (who holds admin:access for its tenant) may not list them.
    status, _, body = http_call("GET", cluster.gateway.url + "/v1/infra/nodes", create_key(cluster.env, "tenant_admin"))
    assert (status, json.loads(body)["error"]["code"]) == (403, "AUTHZ_PERMISSION_DENIED")
    status, _, _ = http_call("GET", cluster.gateway.url + "/v1/infra/nodes", cluster.gateway.key)
    assert status == 403

    status, _, body = http_call("GET", cluster.gateway.url + "/health/detailed", cluster.admin_key)
    assert status in (200, 503)
    detailed = {item["id"]: item for item in json.loads(body)["nodes"]}
    assert detailed["node-a"]["health"] == "healthy"


async def test_a_node_that_stops_heartbeating_turns_warning_then_stale_and_is_skipped(cluster: Cluster) -> None:
    with cluster.node("node-c", "ok") as node_c:
        await asyncio.to_thread(serving_node, node_c)
        await asyncio.to_thread(eventually, lambda: chat(cluster, "local/node-c")[0] == 200,
                                "node-c reachable through the gateway")
        node_c.process.send_signal(signal.SIGSTOP)  # alive, but silent: no heartbeat, no answer
        try:
            await asyncio.to_thread(eventually, lambda: cluster.listed()["node-c"]["health"] == "warning",
                                    "node-c warning", 5)
            await asyncio.to_thread(eventually, lambda: cluster.listed()["node-c"]["health"] == "stale",
                                    "node-c stale", 6)
            # Once the directory has seen it stale, it is not called at all: MODEL_UNAVAILABLE, not a timeout,
            # and its breaker counts nothing.
            await asyncio.to_thread(eventually, lambda: chat(cluster, "local/node-c")[0] == 503, "node-c skipped", 5)
            status, _, body = chat(cluster, "local/node-c")
            assert (status, json.loads(body)["error"]["code"]) == (503, "MODEL_UNAVAILABLE")
            assert cluster.breaker("c-ok")["consecutive_failures"] == 0

            # The worker's sweep records the transition and logs it; an operator can run it at once.
            result = await asyncio.to_thread(scaigrid, "job", "run", "node_staleness_sweep", env=cluster.env)
        finally:
            node_c.process.send_signal(signal.SIGCONT)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[-1] == "node_staleness_sweep: ok"
    transitions = [line for line in map(json.loads, lines[:-1])
                   if line["event"] == "node_status_changed" and line["node_id"] == "node-c"]
    assert [(line["from"], line["to"]) for line in transitions] == [("healthy", "stale")]
    async with database_ctx(load_settings(cluster.env, env_file=None)) as engine, engine.connect() as conn:
        stored = dict((await conn.execute(select(infra_nodes.c.id, infra_nodes.c.status))).all())
    assert stored["node-c"] == "stale"


def test_a_node_that_restarts_on_another_port_is_called_there(cluster: Cluster) -> None:
    with cluster.node("node-m", "ok") as first:
        serving_node(first)
        eventually(lambda: chat(cluster, "local/moving")[0] == 200, "node-m reachable through the gateway")
        first_endpoint = cluster.listed()["node-m"]["endpoint"]
    # Gone (killed): once stale it is skipped, so no request tries the dead endpoint meanwhile.
    eventually(lambda: cluster.listed()["node-m"]["health"] == "stale", "node-m stale", 6)
    with cluster.node("node-m", "ok") as second:
        serving_node(second)
        assert cluster.listed()["node-m"]["endpoint"] != first_endpoint
        eventually(lambda: chat(cluster, "local/moving")[0] == 200, "node-m reachable on its new port")
        status, headers, body = chat(cluster, "local/moving", stream=True)
        assert status == 200 and sse_events(body)[-1] == (None, "[DONE]")
    assert headers["X-Request-ID"] in cluster.node_request_ids()
    assert cluster.breaker("m-ok")["consecutive_failures"] == 0


# --- gRPC authentication and error mapping ---

def _heartbeat(cluster: Cluster, metadata: tuple[tuple[str, str], ...] = (), **fields: Any) -> Any:
    request = {"node_id": "node-z", "endpoint": "127.0.0.1:1", "models": ["m"], **fields}
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        return scaiinfer_pb2_grpc.HeartbeatServiceStub(channel).Heartbeat(
            scaiinfer_pb2.HeartbeatRequest(**request), metadata=metadata, timeout=5)


def _error_code(error: grpc.RpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get("scaigrid-error-code")  # type: ignore[attr-defined]


def test_grpc_callers_need_a_service_token_and_domain_errors_map_to_status_codes(cluster: Cluster) -> None:
    secret = Secret(cluster.env["SERVICE_TOKEN_SECRET"])
    for metadata in ((), (("authorization", "Bearer sst_forged.token"),),
                     (("authorization", "Bearer " + service_tokens.mint(Secret("another-secret"), "x", 60,
                                                                        scope=SCAIINFER_NODE)),),
                     (("authorization", "Basic " + service_tokens.mint(secret, "x", 60, scope=SCAIINFER_NODE)),)):
        with pytest.raises(grpc.RpcError) as refused:
            _heartbeat(cluster, metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        assert _error_code(refused.value) == "SERVICE_TOKEN_INVALID"
    expired = service_tokens.mint(secret, "x", 1, now_s=time.time() - 10, scope=SCAIINFER_NODE)
    with pytest.raises(grpc.RpcError) as refused:
        _heartbeat(cluster, (("authorization", f"Bearer {expired}"),))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]

    # Probes hold no token: health is exempt.
    assert _health(cluster.grpc_target) == health_pb2.HealthCheckResponse.SERVING

    # A domain error (VALIDATION_ERROR, 422) becomes INVALID_ARGUMENT, naming every field.
    token = (("authorization", "Bearer " + node_token(cluster.env, "scaiinfer-node-z")),)
    with pytest.raises(grpc.RpcError) as invalid:
        _heartbeat(cluster, token, node_id="", endpoint="no-port", capacity=2**32 - 1)
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert _error_code(invalid.value) == "VALIDATION_ERROR"
    for field in ("node_id", "endpoint", "capacity"):
        assert field in invalid.value.details()  # type: ignore[attr-defined]
    assert "node-z" not in cluster.listed()

    # A valid token of another node may not speak for node-z: 403 becomes PERMISSION_DENIED.
    other = (("authorization", "Bearer " + node_token(cluster.env, "scaiinfer-node-a")),)
    with pytest.raises(grpc.RpcError) as denied:
        _heartbeat(cluster, other)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    assert _error_code(denied.value) == "AUTHZ_PERMISSION_DENIED"
    assert "node-z" not in cluster.listed()

    reply = _heartbeat(cluster, token)
    assert reply.heartbeat_interval_s == pytest.approx(0.3)
    assert cluster.listed()["node-z"]["endpoint"] == "127.0.0.1:1"
    # The reply tells the node how the gateway's calls will authenticate: a credential of its own, which is
    # neither a service token nor the same for another node.
    other_reply = _heartbeat(cluster, other, node_id="node-a")
    assert reply.gateway_token.startswith("sgc_") and other_reply.gateway_token.startswith("sgc_")
    assert reply.gateway_token != other_reply.gateway_token
    with pytest.raises(grpc.RpcError) as as_service_token:
        _heartbeat(cluster, (("authorization", f"Bearer {reply.gateway_token}"),))
    assert as_service_token.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


async def test_a_grpc_method_that_declares_no_callers_is_refused_whatever_the_token() -> None:
    """The interceptor fails closed: a servicer method without @accepts or @node_credential is refused."""
    class Undeclared(scaiinfer_pb2_grpc.HeartbeatServiceServicer):
        async def Heartbeat(self, request: Any, context: Any) -> Any:
            return scaiinfer_pb2.HeartbeatResponse(heartbeat_interval_s=1)

    secret = Secret("s3cret")
    server = grpc.aio.server(interceptors=[ServiceInterceptor(secret)])
    scaiinfer_pb2_grpc.add_HeartbeatServiceServicer_to_server(Undeclared(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for scope in service_tokens.SCOPES:
                token = service_tokens.mint(secret, "scaiinfer-node-z", 60, scope=scope)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await scaiinfer_pb2_grpc.HeartbeatServiceStub(channel).Heartbeat(
                        scaiinfer_pb2.HeartbeatRequest(node_id="node-z"),
                        metadata=(("authorization", f"Bearer {token}"),), timeout=5)
                assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, scope
                assert _error_code(refused.value) == "AUTHZ_PERMISSION_DENIED", scope
    finally:
        await server.stop(None)


def test_a_node_token_can_heartbeat_and_nothing_else(cluster: Cluster) -> None:
    """Exploit 1 of issue 13: the token a node operator holds was super_admin on the HTTP API (it listed tenants,
    created super_admin users and keys, and ran inference accounted to no tenant)."""
    node = node_token(cluster.env, "scaiinfer-node-n1")
    assert _heartbeat(cluster, (("authorization", f"Bearer {node}"),), node_id="node-n1").gateway_token
    # Named after the node but of another scope: Heartbeat accepts scaiinfer-node only.
    for scope in (OPERATOR, HYBRID_RELAY):
        wrong = node_token(cluster.env, "scaiinfer-node-n1", scope=scope)
        with pytest.raises(grpc.RpcError) as refused:
            _heartbeat(cluster, (("authorization", f"Bearer {wrong}"),), node_id="node-n1")
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, scope  # type: ignore[attr-defined]
        assert _error_code(refused.value) == "AUTH_INSUFFICIENT_SCOPE", scope

    url = cluster.gateway.url
    calls_before, usage_before = len(cluster.node_calls()), set(buffered_usage(cluster.gateway))
    exploits = [("GET", "/v1/tenants", None), ("GET", "/v1/users", None), ("GET", "/v1/api-keys", None),
                ("POST", "/v1/users", {"email": "root@evil.example", "role": "super_admin", "tenant_id": "x"}),
                ("POST", "/v1/api-keys", {"name": "root", "role": "super_admin", "user_id": "x"}),
                ("POST", "/oai/v1/chat/completions", {"model": "local/chat", "messages": USER}),
                ("POST", "/v1/inference/chat", {"model": "local/chat", "messages": USER}),
                ("GET", "/health/detailed", None), ("GET", "/v1/infra/nodes", None)]
    # Every authenticated route the http process serves, from its own declarations, so a new one is covered too.
    app = create_app(load_settings(cluster.env))
    declared = {(route.method, re.sub(r"{[^}]*}", "x", route.resource.canonical), None)
                for route in app.router.routes() if route.method != "HEAD" and route.resource is not None
                and (access_of(route.handler) or Access(None)).permission is not None}
    assert len(declared) > 40
    for method, path, body in [*exploits, *sorted(declared)]:
        status, _, answer = http_call(method, url + path, node, {} if body is None and method != "GET" else body)
        assert (status, json.loads(answer)["error"]["code"]) == (403, "AUTH_INSUFFICIENT_SCOPE"), (method, path)
    assert len(cluster.node_calls()) == calls_before  # no inference ran
    assert set(buffered_usage(cluster.gateway)) == usage_before  # and none was recorded
    status, _, answer = http_call("GET", url + "/v1/users", cluster.admin_key)
    assert status == 200 and "root@evil.example" not in answer.decode()


def test_a_node_with_a_wrong_token_is_refused_and_never_listed(cluster: Cluster) -> None:
    with cluster.node("node-w", "ok", "--wrong-token") as node_w:
        serving_node(node_w)
        assert "heartbeat refused: UNAUTHENTICATED" in node_w.log_path.read_text()
    assert "node-w" not in cluster.listed()


# --- TLS to the nodes ---

def test_calls_to_a_node_are_tls_and_present_the_gateways_client_certificate(cluster: Cluster) -> None:
    status, headers, body = chat(cluster, "local/chat")
    assert status == 200, body
    call = {call["request_id"]: call for call in cluster.node_calls()}[headers["X-Request-ID"]]
    assert (call["authorized"], call["client_cn"]) == (True, GATEWAY_CN)  # node-a requires the client certificate


@pytest.mark.parametrize(("node_id", "tls", "model", "backend_id"), [
    ("node-p", "plaintext", "local/plaintext-node", "p-ok"),
    ("node-o", "other-ca", "local/other-ca-node", "o-ok")])
def test_a_node_without_tls_or_with_a_certificate_of_another_ca_is_never_sent_a_call(
        cluster: Cluster, node_id: str, tls: str, model: str, backend_id: str) -> None:
    with cluster.node(node_id, "ok", tls=tls) as node:
        serving_node(node)
        # Until the gateway's directory has read the node's heartbeat, the model has no usable backend (503).
        eventually(lambda: chat(cluster, model)[0] != 503, f"{node_id} known to the gateway")
        status, _, body = chat(cluster, model)
    # The handshake fails before any request is written: the call and its node credential never leave the gateway.
    assert (status, json.loads(body)["error"]["code"]) == (502, "BACKEND_ERROR"), body
    assert cluster.breaker(backend_id)["last_error"].startswith("connect: gRPC UNAVAILABLE")
    assert [call for call in cluster.node_calls() if call["node"] == node_id] == []


def test_plaintext_to_nodes_takes_the_explicit_opt_in_and_says_so_in_the_log(cluster: Cluster, tmp_path: Path) -> None:
    env = {name: value for name, value in cluster.env.items() if not name.startswith("SCAIINFER_")}
    env.update(SCAIINFER_PLAINTEXT="true", HTTP_PORT=str(devstack.free_ports(1)[0]))
    url = f"http://127.0.0.1:{env['HTTP_PORT']}/v1/inference/chat"
    body = {"model": "local/plaintext-opt-in", "messages": USER}
    with (cluster.node("node-q", "ok", tls="plaintext") as node, http_process(env, tmp_path / "http.log") as http):
        serving_node(node)
        eventually(lambda: http_call("POST", url, cluster.gateway.key, body)[0] == 200, "node-q called in plaintext")
    assert [call["client_cn"] for call in cluster.node_calls() if call["node"] == "node-q"] == [None]
    warnings = [line for line in http.log_path.read_text().splitlines() if '"scaiinfer_plaintext"' in line]
    assert len(warnings) == 1 and "in clear" in warnings[0]


# --- dispatch to scaiinfer backends ---

def test_streamed_and_whole_answers_from_a_node_natively_with_usage_from_the_node(cluster: Cluster) -> None:
    status, headers, body = chat(cluster, "local/chat", stream=True)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = sse_events(body)
    assert events[-1] == (None, "[DONE]")
    chunks = [json.loads(data) for _, data in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {"local/chat"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "tok0 tok1 tok2 "
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    streamed_id = headers["X-Request-ID"]

    status, headers, body = chat(cluster, "local/chat", max_tokens=50)
    assert status == 200, body
    answer = json.loads(body)["data"]
    assert answer["object"] == "chat.completion" and answer["model"] == "local/chat"
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 "}
    assert answer["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    whole_id = headers["X-Request-ID"]

    # The node got the request under its own model name, with the credential its heartbeats gave it.
    calls = {call["request_id"]: call for call in cluster.node_calls()}
    assert calls[whole_id]["model"] == "ok" and calls[whole_id]["authorized"] is True
    assert calls[whole_id]["max_tokens"] == 50 and calls[whole_id]["messages"] == [["user", "three words here"]]

    eventually(lambda: {streamed_id, whole_id} <= set(buffered_usage(cluster.gateway)), "usage records")
    records = buffered_usage(cluster.gateway)
    for request_id in (streamed_id, whole_id):
        record = records[request_id]
        assert (record.backend_id, record.status, record.tokens_in, record.tokens_out) == ("a-ok", "ok", 3, 3)
        assert str(record.cost) == "0.000009"  # 3 in at 1/Mtok + 3 out at 2/Mtok


def test_the_openai_sdk_streams_and_completes_through_a_node(cluster: Cluster) -> None:
    client = cluster.gateway.client()
    completion = client.chat.completions.create(model="local/chat", messages=USER)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "tok0 tok1 tok2 "
    assert completion.usage is not None and completion.usage.completion_tokens == 3
    stream = client.chat.completions.create(model="local/chat", messages=USER, stream=True,  # type: ignore[arg-type]
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 tok2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 3

    # A stream that breaks after its first chunk: the SDK raises on the error event (the gateway sent [DONE] too).
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="local/cut", messages=USER, stream=True))  # type: ignore[arg-type]


def test_a_failing_node_fails_over_and_errors_map_like_http_backends(cluster: Cluster) -> None:
    # UNAVAILABLE is a connection failure: the next backend answers, the client never knows.
    status, _, body = chat(cluster, "local/failover")
    assert status == 200, body
    _, _, body = http_call("GET", cluster.gateway.url + "/v1/backends/a-unavailable/health", cluster.admin_key)
    assert json.loads(body)["data"]["last_error"].startswith("connect: gRPC UNAVAILABLE")

    # INVALID_ARGUMENT: the request is wrong, not the node: 422, no failover.
    status, _, body = chat(cluster, "local/refuse")
    assert (status, json.loads(body)["error"]["code"]) == (422, "VALIDATION_ERROR")
    # RESOURCE_EXHAUSTED: rate limited, with Retry-After.
    status, headers, body = chat(cluster, "local/busy")
    assert (status, json.loads(body)["error"]["code"]) == (429, "BACKEND_RATE_LIMITED")
    assert int(headers["Retry-After"]) >= 1
    # A first token later than the backend's timeout_s.
    status, _, body = chat(cluster, "local/slow", stream=True)
    assert (status, json.loads(body)["error"]["code"]) == (504, "BACKEND_TIMEOUT")

    # Cut after the first chunk: an error event, then [DONE].
    status, _, body = chat(cluster, "local/cut", stream=True)
    assert status == 200
    events = sse_events(body)
    assert [json.loads(d)["choices"][0]["delta"].get("content") for n, d in events[:2]] == ["tok0 ", "tok1 "]
    assert events[-2][0] == "error" and json.loads(events[-2][1])["code"] == "BACKEND_ERROR"
    assert events[-1] == (None, "[DONE]")


def test_a_node_stream_that_ends_without_a_finish_reason_is_a_cut_stream(cluster: Cluster) -> None:
    status, _, body = chat(cluster, "local/short", stream=True)
    assert status == 200
    events = sse_events(body)
    assert [json.loads(d)["choices"][0]["delta"].get("content") for n, d in events[:2]] == ["tok0 ", "tok1 "]
    assert events[-2][0] == "error" and json.loads(events[-2][1])["code"] == "BACKEND_ERROR"
    assert events[-1] == (None, "[DONE]")
    # Not streamed, the gathered answer would be missing its end: no answer rather than a truncated one.
    status, _, body = chat(cluster, "local/short")
    assert (status, json.loads(body)["error"]["code"]) == (502, "BACKEND_ERROR")
    breaker = cluster.breaker("a-short")
    assert breaker["state"] == "open" and breaker["last_error"].startswith("cut: ")  # 2 failures: the threshold


def test_a_request_a_node_cannot_carry_goes_to_a_backend_of_the_model_that_can(cluster: Cluster) -> None:
    cluster.fake.received.clear()
    # Plain text: the node, first in priority.
    status, headers, _ = chat(cluster, "local/mixed")
    assert status == 200 and headers["X-Request-ID"] in cluster.node_request_ids()
    assert cluster.fake.received == []

    # Tools or a picture: the HTTP backend of priority 2, and the node never hears of it.
    for extra in ({"tools": [TOOL]}, {"tools": [TOOL], "stream": True}, {"messages": PICTURE}):
        status, headers, body = chat(cluster, "local/mixed", **extra)
        assert status == 200, body
        assert headers["X-Request-ID"] not in cluster.node_request_ids()
    assert [r.body.get("tools") for r in cluster.fake.received] == [[TOOL], [TOOL], None]
    assert cluster.fake.received[2].body["messages"] == PICTURE
    status, _, body = http_call("POST", cluster.gateway.url + "/v1/inference/embed", cluster.gateway.key,
                                {"model": "local/embed-mixed", "input": "hello"})
    assert status == 200, body
    assert cluster.fake.received[3].path == "/v1/embeddings"
    assert cluster.breaker("a-ok")["consecutive_failures"] == 0


def test_a_request_no_backend_of_the_model_can_carry_is_refused_naming_why(cluster: Cluster) -> None:
    before = len(cluster.node_calls())
    for extra, field, why in (({"tools": [TOOL]}, "tools", "no tool calls"),
                              ({"messages": PICTURE, "stream": True}, "messages", "text only")):
        status, _, body = chat(cluster, "local/chat", **extra)
        error = json.loads(body)["error"]
        assert (status, error["code"]) == (422, "VALIDATION_ERROR")
        assert [detail["field"] for detail in error["details"]] == [field]
        assert why in error["details"][0]["message"]
    status, _, body = http_call("POST", cluster.gateway.url + "/v1/inference/embed", cluster.gateway.key,
                                {"model": "local/embed", "input": "hello"})
    error = json.loads(body)["error"]
    assert (status, error["code"], error["details"][0]["field"]) == (422, "VALIDATION_ERROR", "model")
    assert "no embeddings call" in error["details"][0]["message"]
    assert len(cluster.node_calls()) == before


def test_a_node_backend_that_keeps_failing_opens_its_breaker(cluster: Cluster) -> None:
    before = sum(call["model"] == "fail-INTERNAL" for call in cluster.node_calls())
    for _ in range(2):  # BREAKER_FAILURE_THRESHOLD
        status, _, body = chat(cluster, "local/breaker")
        assert (status, json.loads(body)["error"]["code"]) == (502, "BACKEND_ERROR")
    status, _, body = chat(cluster, "local/breaker")
    assert (status, json.loads(body)["error"]["code"]) == (503, "MODEL_UNAVAILABLE")
    assert sum(call["model"] == "fail-INTERNAL" for call in cluster.node_calls()) - before == 2  # not called again
    _, _, body = http_call("GET", cluster.gateway.url + "/v1/backends/a-internal/health", cluster.admin_key)
    assert json.loads(body)["data"]["state"] == "open"


def test_a_backend_on_an_unknown_node_or_a_model_the_node_has_not_loaded_is_skipped_without_a_failure(
        cluster: Cluster) -> None:
    for _ in range(3):
        status, _, body = chat(cluster, "local/unknown-first")
        assert status == 200, body
        status, headers, body = chat(cluster, "local/unloaded-first")
        assert status == 200, body
        calls = {call["request_id"]: call for call in cluster.node_calls()}
        assert calls[headers["X-Request-ID"]]["model"] == "ok"
    status, _, body = chat(cluster, "local/unloaded")
    assert (status, json.loads(body)["error"]["code"]) == (503, "MODEL_UNAVAILABLE")
    assert "not-loaded" not in {call["model"] for call in cluster.node_calls()}
    for backend_id in ("x-unknown", "a-unloaded"):
        health = cluster.breaker(backend_id)
        assert (health["state"], health["consecutive_failures"]) == ("closed", 0)


def test_catalogue_validation_of_scaiinfer_backends(cluster: Cluster) -> None:
    url = cluster.gateway.url + "/v1/backends"
    status, _, body = http_call("POST", url, cluster.admin_key, {
        "id": "bad-node", "provider": "scaiinfer", "model": "no-slash", "base_url": "http://10.0.0.1/v1",
        "api_key": "sk-x"})
    assert status == 422
    fields = {detail["field"] for detail in json.loads(body)["error"]["details"]}
    assert fields == {"model", "base_url", "api_key"}
    status, _, body = http_call("POST", url, cluster.admin_key,
                                {"id": "good-node", "provider": "scaiinfer", "model": "node-b/llama-3.3"})
    assert status == 201, body
    assert json.loads(body)["data"]["base_url"] is None

