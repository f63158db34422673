"""The hybrid link's backends, each against a real other side: `managed` (a node's upstream: an OpenAI server over
TLS with a CA the test made) and `hybrid` (the tunnel: a real gRPC server speaking TunnelRelay, found through the
registry); the tunnel's request id on the node; the link in /health/detailed."""

import asyncio
import hashlib
import json
import secrets
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import grpc
import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from aiohttp import web
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid.auth import service_tokens
from scaigrid.auth.service_tokens import HYBRID_LINK, HYBRID_RELAY, OPERATOR, SCAIINFER_NODE
from scaigrid.db.tables import api_keys, hybrid_mirrored, hybrid_node_tenants, hybrid_nodes, tenants
from scaigrid.hybrid import assertion, protocol, registry
from scaigrid.hybrid.assertion import ASSERTION_HEADER
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.settings import Secret
from tests.backends import (
    CREATED,
    FakeBackend,
    Gateway,
    Received,
    apply,
    chat_model,
    http_call,
    http_process,
    shared_env,
)
from tests.fake_managed import make_certificates
from tests.support.env import create_key
from tests.support.processes import ModeProcess, start_http
from tests.support.waiting import eventually
from tests.test_inference import buffered_usage

NODE = "hn_" + "0" * 31 + "1"
UNLINKED = "hn_" + "0" * 31 + "2"
SERVES_NOBODY = "hn_" + "0" * 31 + "3"  # linked, but no tenant is allowed on it
# The http process plays a node too, for the tunnelled requests it receives (the node side of the tunnel).
SELF_NODE, SELF_CREDENTIAL = "hn_" + "0" * 31 + "4", "sgn_" + secrets.token_urlsafe(32)
USER = [{"role": "user", "content": "three words here"}]
RELAY_PROMPT_TOKENS = 5


class ManagedSide(FakeBackend):
    """The managed gateway as a node sees it: the OpenAI API under /oai/v1/, over TLS."""

    name = "managed-side"

    def __init__(self) -> None:
        super().__init__()
        self.node_request_ids: list[str | None] = []

    async def _record(self, request: web.Request) -> tuple[Received, str]:
        self.node_request_ids.append(request.headers.get(protocol.NODE_REQUEST_ID_HEADER))
        return await super()._record(request)

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/oai/v1/chat/completions", self._chat), web.post("/oai/v1/embeddings", self._embeddings)]


def _sse(payload: Any) -> bytes:
    return b"data: " + json.dumps(payload).encode() + b"\n\n"


def _chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {"id": "chatcmpl-node", "object": "chat.completion.chunk", "created": CREATED, "model": "ok",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def _frame(**kind: Any) -> link_pb2.TunnelFrame:
    return link_pb2.TunnelFrame(**kind)


def _head(status: int, content_type: str, **headers: str) -> link_pb2.TunnelFrame:
    return _frame(head=link_pb2.TunnelHead(status=status, headers={"content-type": content_type, **headers}))


@dataclass
class Opened:
    request: link_pb2.TunnelRequest
    authorization: str
    cancelled: threading.Event = field(default_factory=threading.Event)


HELD_S = 60  # how long the relay holds a "held" call open unless its caller goes


class Relay(link_pb2_grpc.TunnelRelayServicer):
    """A grpc replica's TunnelRelay as the http process calls it; the node's answer is scripted by the model the
    tunnelled body names: ok, ratelimit (429), stranger (401: the node does not know the client's key), broken
    (the link drops after one chunk), held (one chunk, then it waits for the caller to go)."""

    def __init__(self) -> None:
        self.opened: list[Opened] = []
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        link_pb2_grpc.add_TunnelRelayServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def start(self) -> "Relay":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None)

    def Open(self, request: link_pb2.TunnelRequest, context: Any) -> Iterator[link_pb2.TunnelFrame]:
        metadata = dict(context.invocation_metadata())
        opened = Opened(request, str(metadata.get("authorization", "")))
        self.opened.append(opened)
        body = json.loads(request.body)
        behaviour = body["model"]
        if behaviour == "held":
            # Recorded however the call ends: once the caller cancels, grpc stops this generator at its next yield,
            # so under load the loop below may never run. Within HELD_S only the caller can end a held call.
            context.add_callback(opened.cancelled.set)
        if behaviour == "ratelimit":
            yield _head(429, "application/json", **{"retry-after": "7"})
            yield _frame(data=json.dumps({"error": {"message": "slow down", "code": "RATE_LIMITED"}}).encode())
            yield _frame(end=link_pb2.TunnelEnd())
            return
        if behaviour == "stranger":
            yield _head(401, "application/json")
            yield _frame(data=json.dumps({"error": {"message": "the API key is not valid",
                                                    "code": "AUTH_TOKEN_INVALID"}}).encode())
            yield _frame(end=link_pb2.TunnelEnd())
            return
        if request.path == "/oai/v1/embeddings":
            yield _head(200, "application/json")
            yield _frame(data=json.dumps({"object": "list", "model": "ok", "data": [
                {"object": "embedding", "index": 0, "embedding": [0.5, 0.25]}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}).encode())
            yield _frame(end=link_pb2.TunnelEnd())
            return
        if not body.get("stream"):
            yield _head(200, "application/json")
            yield _frame(data=json.dumps({
                "id": "chatcmpl-node", "object": "chat.completion", "created": CREATED, "model": "ok",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the node"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": RELAY_PROMPT_TOKENS, "completion_tokens": 3}}).encode())
            yield _frame(end=link_pb2.TunnelEnd())
            return
        yield _head(200, "text/event-stream")
        yield _frame(data=_sse(_chunk("from ")))
        if behaviour == "broken":
            yield _frame(end=link_pb2.TunnelEnd(error_code="LINK_LOST", message="the node's link dropped"))
            return
        if behaviour == "held":
            deadline = time.monotonic() + HELD_S
            # A node holding its stream open until the gateway cancels it, the behaviour under test; not a test's wait.
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.02)
            return
        # One frame carrying two events, then an event split across two frames: the bytes arrive as they were sent.
        yield _frame(data=_sse(_chunk("the ")) + _sse(_chunk("node")))
        last = _sse(_chunk(None, "stop")) + _sse({
            "id": "chatcmpl-node", "object": "chat.completion.chunk", "created": CREATED, "model": "ok", "choices": [],
            "usage": {"prompt_tokens": RELAY_PROMPT_TOKENS, "completion_tokens": 3}}) + b"data: [DONE]\n\n"
        yield _frame(data=last[:17])
        yield _frame(data=last[17:])
        yield _frame(end=link_pb2.TunnelEnd())


@dataclass
class Managed:
    """The managed gateway's http process, serving both providers (neither depends on HYBRID_ROLE), with a
    relay holding NODE's link and an OpenAI server standing in for what `managed` backends reach."""

    gateway: Gateway
    process: ModeProcess
    relay: Relay
    upstream: ManagedSide
    admin_key: str
    caller: dict[str, str]  # the ids of the tenant_user key's tenant, partner, user and key

    def assertion(self, tunnel_id: str, credential: str = SELF_CREDENTIAL, node_id: str = SELF_NODE,
                  now_s: float | None = None, role: str = "tenant_user") -> str:
        """A caller assertion of the tenant_user key, as the managed side's relay signs it for a node."""
        return assertion.sign(assertion.credential_key(credential), assertion.Caller(
            node_id=node_id, request_id=tunnel_id, role=role, **self.caller), now_s)

    def chat(self, model: str, stream: bool = False, **headers: str) -> tuple[int, dict[str, str], bytes]:
        """(status, headers, body) of one chat request with the tenant_user key and these headers besides."""
        request = urllib.request.Request(
            self.gateway.url + "/oai/v1/chat/completions", method="POST",
            data=json.dumps({"model": model, "messages": USER, "stream": stream}).encode(),
            headers={"Authorization": f"Bearer {self.gateway.key}", "Content-Type": "application/json", **headers})
        try:
            with urllib.request.urlopen(request, timeout=20) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            return error.code, dict(error.headers), error.read()


def _enrol(env: dict[str, str], key: str) -> dict[str, str]:
    """The nodes this module routes to, enrolled, the default tenant allowed on NODE and UNLINKED; and, as a node
    whose snapshot mirrored them, the default tenant, the user of `key` and `key`. Returns those rows' ids."""
    async def write() -> dict[str, str]:
        engine = create_async_engine(env["DATABASE_URL"])
        try:
            async with engine.begin() as conn:
                row = (await conn.execute(select(api_keys.c.id, api_keys.c.user_id, api_keys.c.tenant_id,
                                                 tenants.c.partner_id).join(
                    tenants, tenants.c.id == api_keys.c.tenant_id).where(api_keys.c.key_prefix == key[:12]))).one()
                await conn.execute(insert(hybrid_nodes), [
                    {"id": node_id, "name": node_id, "credential_hash": hashlib.sha256(node_id.encode()).hexdigest(),
                     "software_version": "0.1.0", "created_at": datetime.now(UTC).replace(tzinfo=None)}
                    for node_id in (NODE, UNLINKED, SERVES_NOBODY)])
                await conn.execute(insert(hybrid_node_tenants), [
                    {"node_id": node_id, "tenant_id": row.tenant_id} for node_id in (NODE, UNLINKED)])
                await conn.execute(insert(hybrid_mirrored), [
                    {"kind": "tenant", "row_id": row.tenant_id}, {"kind": "user", "row_id": row.user_id},
                    {"kind": "api_key", "row_id": row.id}])
            return {"tenant_id": row.tenant_id, "partner_id": row.partner_id, "user_id": row.user_id,
                    "api_key_id": row.id}
        finally:
            await engine.dispose()

    return asyncio.run(write())


def _claim(redis_url: str, node_id: str, replica: str) -> None:
    async def claim() -> None:
        redis = aioredis.from_url(redis_url)
        try:
            now = time.time()
            await registry.claim(redis, registry.LinkHolder(
                node_id=node_id, replica=replica, session=secrets.token_hex(8), connected_since_unix=now,
                last_heartbeat_unix=now, software_version="0.1.0", config_version=3, outbox_depth=0,
                tunnels_in_flight=0, models=("ok",)), ttl_s=3600)
        finally:
            await redis.aclose()

    asyncio.run(claim())


@pytest.fixture(scope="module")
def managed(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Managed]:
    tmp_path = tmp_path_factory.mktemp("hybrid-transport")
    ca_file, cert_pem, key_pem = make_certificates(tmp_path / "tls")
    (tmp_path / "tls" / "server.pem").write_bytes(cert_pem)
    (tmp_path / "tls" / "server.key").write_bytes(key_pem)
    upstream = ManagedSide()
    upstream.ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream.ssl_context.load_cert_chain(tmp_path / "tls" / "server.pem", tmp_path / "tls" / "server.key")
    upstream.start()
    relay = Relay().start()
    try:
        with shared_env(mariadb, redis_server, s3_server) as env:
            # A heartbeat interval longer than the module: the link written below stays held without refreshes.
            env.update(HYBRID_ROLE="managed", HYBRID_HEARTBEAT_INTERVAL_S="3600",
                       HYBRID_MANAGED_URL=f"https://127.0.0.1:{upstream.port}", HYBRID_CA_FILE=str(ca_file))
            env.update(HYBRID_NODE_ID=SELF_NODE, HYBRID_NODE_CREDENTIAL=SELF_CREDENTIAL)
            key = create_key(env, "tenant_user")
            caller = _enrol(env, key)
            for node_id in (NODE, SERVES_NOBODY):
                _claim(env["REDIS_URL"], node_id, f"127.0.0.1:{relay.port}")
            tunnelled = [(f"tun-{name}", f"{NODE}/{name}")
                         for name in ("ok", "ratelimit", "stranger", "broken", "held")]
            apply(env, tmp_path / "catalogue.toml", [
                {"id": "up", "provider": "managed", "model": "ok"},
                *({"id": backend_id, "provider": "hybrid", "model": model} for backend_id, model in tunnelled),
                {"id": "tun-unlinked", "provider": "hybrid", "model": f"{UNLINKED}/ok"},
                {"id": "tun-nobody", "provider": "hybrid", "model": f"{SERVES_NOBODY}/ok"},
            ], [
                chat_model("up/chat", [("up", 1, 1)]),
                {"slug": "up/embed", "modality": "embedding",
                 "routes": [{"backend": "up", "weight": 1, "priority": 1}]},
                chat_model("node/chat", [("tun-ok", 1, 1)], price_input_per_mtok="1", price_output_per_mtok="2"),
                {"slug": "node/embed", "modality": "embedding",
                 "routes": [{"backend": "tun-ok", "weight": 1, "priority": 1}]},
                chat_model("node/busy", [("tun-ratelimit", 1, 1)]),
                chat_model("node/stranger", [("tun-stranger", 1, 1)]),
                chat_model("node/broken", [("tun-broken", 1, 1)]),
                chat_model("node/held", [("tun-held", 1, 1)]),
                chat_model("node/unlinked", [("tun-unlinked", 1, 1)]),
                chat_model("node/nobody", [("tun-nobody", 1, 1)]),
                chat_model("node/fallback", [("tun-nobody", 1, 1), ("up", 1, 2)]),
            ])
            with http_process(env, tmp_path / "http.log") as process:
                yield Managed(Gateway(env, key), process, relay, upstream, create_key(env, "super_admin"), caller)
    finally:
        relay.stop()
        upstream.stop()


@pytest.fixture
def gateway(managed: Managed) -> Iterator[Managed]:
    managed.upstream.received.clear()
    managed.relay.opened.clear()
    yield managed
    managed.gateway.close_clients()


# --- managed: the node's upstream ---

def test_a_managed_backend_reaches_the_managed_side_over_tls_with_the_clients_own_key(gateway: Managed) -> None:
    client = gateway.gateway.client()
    streamed = client.chat.completions.create(model="up/chat", messages=USER, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert text == "tok0 tok1 tok2 "
    answer = client.chat.completions.create(model="up/chat", messages=USER)
    assert (answer.model, answer.choices[0].message.content) == ("up/chat", "hello there")
    vectors = client.embeddings.create(model="up/embed", input=["a b", "c"])
    assert [item.embedding for item in vectors.data] == [[1.0] * 4, [2.0] * 4]

    received = gateway.upstream.received
    assert [r.path for r in received] == ["/oai/v1/chat/completions"] * 2 + ["/oai/v1/embeddings"]
    # The managed side authenticates, limits and accounts for the request as its own: it gets the client's key.
    assert {r.authorization for r in received} == {f"Bearer {gateway.gateway.key}"}
    assert {r.body["model"] for r in received} == {"ok"}


def test_the_request_id_travels_up_and_the_managed_side_records_and_returns_it(gateway: Managed) -> None:
    """The node names its request id to the managed side, which logs it beside its own and echoes it."""
    status, headers, _ = gateway.chat("up/chat")
    assert status == 200 and gateway.upstream.node_request_ids[-1] == headers["X-Request-ID"]
    # The managed side is a ScaiGrid http process like this node's: it keeps its own id, and records the node's.
    node_id = "req_" + secrets.token_hex(12)
    status, headers, _ = gateway.chat("up/chat", **{protocol.NODE_REQUEST_ID_HEADER: node_id})
    assert status == 200 and headers[protocol.NODE_REQUEST_ID_HEADER] == node_id
    assert headers["X-Request-ID"] != node_id
    eventually(lambda: any(line.get("node_request_id") == node_id and line.get("request_id") == headers["X-Request-ID"]
                           for line in gateway.process.log_lines()), "the request logged under both ids")


# --- hybrid: the tunnel ---

def test_a_tunnelled_stream_arrives_intact_and_the_relay_gets_what_the_node_needs(gateway: Managed) -> None:
    client = gateway.gateway.client()
    raw = client.chat.completions.with_raw_response.create(
        model="node/chat", messages=USER, stream=True)
    request_id = raw.headers["X-Request-ID"]
    chunks = list(raw.parse())
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "from the node"
    assert {chunk.model for chunk in chunks} == {"node/chat"}

    [opened] = gateway.relay.opened
    tunnel = opened.request
    assert (tunnel.tunnel_id, tunnel.node_id, tunnel.method, tunnel.path, tunnel.credit) == (
        request_id, NODE, "POST", "/oai/v1/chat/completions", protocol.TUNNEL_WINDOW)
    # Who the caller is, for the relay to sign; never the client's credential.
    assert dict(tunnel.headers) == {"content-type": "application/json"}
    assert gateway.gateway.key.encode() not in tunnel.SerializeToString()
    caller = tunnel.caller
    assert {"tenant_id": caller.tenant_id, "partner_id": caller.partner_id, "user_id": caller.user_id,
            "api_key_id": caller.api_key_id} == gateway.caller and caller.role == "tenant_user"
    assert json.loads(tunnel.body)["model"] == "ok"  # the node's own slug
    scheme, _, token = opened.authorization.partition(" ")
    secret = Secret(gateway.gateway.env["SERVICE_TOKEN_SECRET"])
    identity = service_tokens.verify(secret, token)
    assert (scheme, identity.name, identity.scope) == ("Bearer", "hybrid-relay", HYBRID_RELAY)

    # The managed side accounts for the request under the id it gave the tunnel, with the node's token counts.
    eventually(lambda: request_id in buffered_usage(gateway.gateway), "the usage record")
    record = buffered_usage(gateway.gateway)[request_id]
    assert (record.backend_id, record.status, record.error_code, record.tokens_in, record.tokens_out) == (
        "tun-ok", "ok", None, RELAY_PROMPT_TOKENS, 3)


def test_tunnelled_answers_that_are_not_streamed_and_embeddings(gateway: Managed) -> None:
    client = gateway.gateway.client()
    answer = client.chat.completions.create(model="node/chat", messages=USER)
    assert (answer.model, answer.choices[0].message.content) == ("node/chat", "from the node")
    vectors = client.embeddings.create(model="node/embed", input="a b c")
    assert [item.embedding for item in vectors.data] == [[0.5, 0.25]]
    assert [o.request.path for o in gateway.relay.opened] == ["/oai/v1/chat/completions", "/oai/v1/embeddings"]


def test_a_429_from_the_node_is_backend_rate_limited_with_its_retry_after(gateway: Managed) -> None:
    status, headers, body = gateway.chat("node/busy")
    assert (status, json.loads(body)["error"]["code"], headers["Retry-After"]) == (429, "BACKEND_RATE_LIMITED", "7")


def test_a_key_the_node_refuses_is_the_clients_problem_and_never_trips_the_breaker(gateway: Managed) -> None:
    for _ in range(6):  # more than BREAKER_FAILURE_THRESHOLD
        status, _, body = gateway.chat("node/stranger")
        error = json.loads(body)["error"]
        assert (status, error["code"]) == (400, "VALIDATION_ERROR")  # /oai/: OpenAI's shape of a 422
        assert "the API key is not valid" in error["message"]
    status, _, body = http_call("GET", gateway.gateway.url + "/v1/backends/tun-stranger/health", gateway.admin_key)
    health = json.loads(body)["data"]
    assert (health["state"], health["consecutive_failures"]) == ("closed", 0)
    assert len(gateway.relay.opened) == 6


def test_hybrid_and_managed_backends_are_validated(gateway: Managed) -> None:
    def create(body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, _, raw = http_call("POST", gateway.gateway.url + "/v1/backends", gateway.admin_key, body)
        return status, json.loads(raw)

    status, body = create({"id": "bad-tunnel", "provider": "hybrid", "model": "node-eu-01/llama",
                           "base_url": "http://10.0.0.5/v1", "api_key": "sk-x"})
    assert status == 422
    assert {d["field"] for d in body["error"]["details"]} == {"model", "base_url", "api_key"}
    status, body = create({"id": "bad-upstream", "provider": "managed", "model": "Not A Slug"})
    assert (status, [d["field"] for d in body["error"]["details"]]) == (422, ["model"])
    status, body = create({"id": "site-b", "provider": "hybrid", "model": f"{UNLINKED}/site/llama"})
    assert status == 201 and (body["data"]["base_url"], body["data"]["model"]) == (None, f"{UNLINKED}/site/llama")
    status, _, _ = http_call("DELETE", gateway.gateway.url + "/v1/backends/site-b", gateway.admin_key)
    assert status == 200


def test_a_link_lost_mid_stream_ends_the_clients_stream_with_an_error_frame_then_done(gateway: Managed) -> None:
    status, _, body = gateway.chat("node/broken", stream=True)
    assert status == 200
    frames = [block for block in body.decode().split("\n\n") if block.strip()]
    assert '"from "' in frames[0]
    assert frames[1].startswith("event: error") and "BACKEND_ERROR" in frames[1]
    assert frames[2:] == ["data: [DONE]"]


def test_a_client_that_goes_away_cancels_the_relay_call(gateway: Managed) -> None:
    client = gateway.gateway.client()
    stream = client.chat.completions.create(model="node/held", messages=USER, stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "from "
    stream.close()
    eventually(lambda: bool(gateway.relay.opened) and gateway.relay.opened[0].cancelled.is_set(),
               "the relay seeing the call cancelled", timeout_s=HELD_S / 2)


def test_a_caller_whose_tenant_the_node_does_not_serve_is_never_sent_there(gateway: Managed) -> None:
    status, _, body = gateway.chat("node/nobody")
    assert (status, json.loads(body)["error"]["code"]) == (403, "MODEL_ACCESS_DENIED")
    assert gateway.chat("node/fallback")[0] == 200  # another route of the model serves the caller instead
    assert gateway.relay.opened == []


def test_a_node_whose_link_no_replica_holds_is_model_unavailable(gateway: Managed) -> None:
    status, _, body = gateway.chat("node/unlinked")
    error = json.loads(body)["error"]
    assert (status, error["code"]) == (503, "MODEL_UNAVAILABLE")
    assert f"the link to node {UNLINKED} is down" in error["message"]  # the operator is told which link
    assert gateway.relay.opened == []


# --- the tunnel's request id, on the node ---

def test_a_tunnelled_request_keeps_the_managed_request_id_and_a_forged_token_does_not(gateway: Managed) -> None:
    env = gateway.gateway.env
    tunnel_id = "req_" + secrets.token_hex(12)
    link_token = service_tokens.mint(Secret(env["SERVICE_TOKEN_SECRET"]), protocol.LINK_SERVICE_NAME, 60,
                                     scope=HYBRID_LINK)
    status, headers, _ = gateway.chat("node/chat", **{"X-Scaigrid-Tunnel": link_token,
                                                        "X-Scaigrid-Tunnel-Id": tunnel_id,
                                                        ASSERTION_HEADER: gateway.assertion(tunnel_id)})
    assert (status, headers["X-Request-ID"]) == (200, tunnel_id)
    eventually(lambda: tunnel_id in buffered_usage(gateway.gateway), "the usage record under the tunnel id")

    forged = service_tokens.mint(Secret(secrets.token_hex(32)), protocol.LINK_SERVICE_NAME, 60, scope=HYBRID_LINK)
    # Another scope is not the link's, even under the link's name: only scope hybrid-link marks a tunnel.
    other_services = [service_tokens.mint(Secret(env["SERVICE_TOKEN_SECRET"]), protocol.LINK_SERVICE_NAME, 60,
                                          scope=scope) for scope in (OPERATOR, SCAIINFER_NODE)]
    for token in (forged, *other_services):
        chosen = "req_" + secrets.token_hex(12)
        status, headers, _ = gateway.chat("up/chat", **{"X-Scaigrid-Tunnel": token, "X-Scaigrid-Tunnel-Id": chosen})
        assert status == 200 and headers["X-Request-ID"] != chosen
        assert chosen not in buffered_usage(gateway.gateway)
    ignored = [line for line in gateway.process.log_lines() if line.get("event") == "tunnel_header_ignored"]
    assert len(ignored) == 3
    log = gateway.process.log_path.read_text()
    assert all(token not in log for token in (forged, *other_services))


def test_a_tunnelled_request_never_goes_back_up_to_the_managed_side(gateway: Managed) -> None:
    """A node model routed to a `managed` backend would loop a tunnelled request between the two sides."""
    link_token = service_tokens.mint(Secret(gateway.gateway.env["SERVICE_TOKEN_SECRET"]), protocol.LINK_SERVICE_NAME,
                                     60, scope=HYBRID_LINK)
    tunnel_id = "req_" + secrets.token_hex(12)
    status, _, body = gateway.chat("up/chat", **{"X-Scaigrid-Tunnel": link_token, "X-Scaigrid-Tunnel-Id": tunnel_id,
                                                 ASSERTION_HEADER: gateway.assertion(tunnel_id)})
    assert status == 503 and json.loads(body)["error"]["code"] == "MODEL_UNAVAILABLE"
    assert not gateway.upstream.received
    assert gateway.chat("up/chat")[0] == 200  # the same model, asked by a client of the node, goes up


def test_a_tunnelled_caller_is_only_who_a_valid_assertion_names(gateway: Managed) -> None:
    """The node authenticates a tunnelled request from the managed side's assertion: the Authorization header does
    not count, and a forged, expired, replayed or misdirected assertion is refused."""
    env = gateway.gateway.env
    link_token = service_tokens.mint(Secret(env["SERVICE_TOKEN_SECRET"]), protocol.LINK_SERVICE_NAME, 60,
                                     scope=HYBRID_LINK)

    def tunnelled(tunnel_id: str, caller: str | None) -> tuple[int, Any]:
        headers = {"X-Scaigrid-Tunnel": link_token, "X-Scaigrid-Tunnel-Id": tunnel_id}
        if caller is not None:
            headers[ASSERTION_HEADER] = caller
        status, _, body = gateway.chat("node/chat", **headers)  # with the client's own valid key besides
        return status, json.loads(body)

    tunnel_id = "req_" + secrets.token_hex(12)
    other_id = "req_" + secrets.token_hex(12)
    refused = {
        "none": tunnelled(tunnel_id, None),
        "forged": tunnelled(tunnel_id, gateway.assertion(tunnel_id, credential="sgn_" + secrets.token_urlsafe(32))),
        "expired": tunnelled(tunnel_id, gateway.assertion(tunnel_id, now_s=time.time() - assertion.ASSERTION_TTL_S)),
        "another request": tunnelled(tunnel_id, gateway.assertion(other_id)),
        "another node": tunnelled(tunnel_id, gateway.assertion(tunnel_id, node_id=NODE)),
        "platform role": tunnelled(tunnel_id, gateway.assertion(tunnel_id, role="super_admin")),
    }
    for why, (status, answer) in refused.items():
        assert (status, answer["error"]["code"]) == (401, "AUTH_TOKEN_INVALID"), why
    assert tunnel_id not in buffered_usage(gateway.gateway)
    # A tenant_admin on the managed side is no more than the mirrored key's role here.
    assert tunnelled(other_id, gateway.assertion(other_id, role="tenant_admin"))[0] == 200
    eventually(lambda: other_id in buffered_usage(gateway.gateway), "the usage record")
    assert buffered_usage(gateway.gateway)[other_id].api_key_id == gateway.caller["api_key_id"]


# --- /health/detailed ---

def test_the_managed_side_lists_the_links_its_registry_holds(gateway: Managed) -> None:
    status, _, body = http_call("GET", gateway.gateway.url + "/health/detailed", gateway.admin_key)
    link = json.loads(body)["link"]
    assert status == 200 and link["status"] == "ok"
    [held] = [entry for entry in link["links"] if entry["node_id"] == NODE]
    assert (held["node_id"], held["replica"], held["config_version"], held["models"]) == (
        NODE, f"127.0.0.1:{gateway.relay.port}", 3, ["ok"])
    assert "session" not in held


def test_a_node_shows_its_link_program_state_and_stays_ok_without_it(
        managed: Managed, start_mode: Callable[..., ModeProcess]) -> None:
    # The module's database and Redis, as a node's own processes: a fresh env would empty the shared Redis.
    http_port, metrics_port = devstack.free_ports(2)
    env = {**managed.gateway.env, "HYBRID_ROLE": "node", "HTTP_PORT": str(http_port),
           "WORKER_METRICS_PORT": str(metrics_port)}
    http = start_http(start_mode, env)
    start_mode("worker", env)
    admin_key = managed.admin_key
    url = f"http://127.0.0.1:{env['HTTP_PORT']}/health/detailed"

    def health() -> dict[str, Any]:
        status, _, body = http_call("GET", url, admin_key)
        assert status == 200, body
        return dict(json.loads(body))

    eventually(lambda: bool(health()["workers"]), "the worker's heartbeat", timeout_s=30)
    reply = health()
    assert (reply["status"], reply["link"]) == ("ok", {"status": "link program not running"})

    state = {"connected": False, "node_id": NODE, "target": "managed.example:8443", "last_heartbeat_unix": None,
             "config_version": 4, "outbox_depth": 12, "tunnels_in_flight": 0, "last_error": "connection refused",
             "updated_unix": time.time()}
    with sync_redis.Redis.from_url(env["REDIS_URL"]) as redis:
        redis.set(protocol.NODE_STATE_KEY, json.dumps(state), ex=10)
    reply = health()
    assert (reply["status"], reply["link"]) == ("ok", {**state, "status": "disconnected"})
    assert http.process.poll() is None
