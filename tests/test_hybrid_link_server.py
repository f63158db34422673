"""The managed end of the hybrid link: a real grpc mode (HYBRID_ROLE=managed) and http mode; the test plays the node
with a grpc.aio client speaking link.proto, and the http processes' side of TunnelRelay with a relay token."""

import asyncio
import contextlib
import hashlib
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

import scaigrid
from appliance import devstack
from scaigrid.accounting import usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.auth import service_tokens
from scaigrid.auth.service_tokens import HYBRID_LINK, HYBRID_RELAY, OPERATOR, SCAIINFER_NODE
from scaigrid.errors import ScaigridError
from scaigrid.hybrid import assertion, protocol, registry
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.settings import Secret
from tests.backends import http_process, mode_process, shared_env
from tests.support.env import create_key
from tests.support.http import http_get
from tests.support.processes import ModeProcess
from tests.support.waiting import eventually, eventually_async

INTERVAL_S = 1  # the heartbeat interval the managed side hands out: a silent link is dropped after 3 s
MANAGED_SETTINGS = {"HYBRID_ROLE": "managed", "HYBRID_HEARTBEAT_INTERVAL_S": str(INTERVAL_S),
                    "HYBRID_CONFIG_REFRESH_S": "0.3"}
READ_TIMEOUT_S = 20.0
ERROR_CODE_KEY = "scaigrid-error-code"


# --- the managed side: one grpc and one http process for the module ---

def grpc_process(env: dict[str, str], log_path: Path) -> AbstractContextManager[ModeProcess]:
    """A grpc mode process, SERVING; killed at the end if still running."""
    return mode_process("grpc", env, log_path, lambda: _health(
        f"127.0.0.1:{env['GRPC_PORT']}") == health_pb2.HealthCheckResponse.SERVING)


def _health(target: str) -> int:
    with grpc.insecure_channel(target) as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status)


@dataclass
class Managed:
    env: dict[str, str]
    grpc: ModeProcess
    admin_key: str

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.env['GRPC_PORT']}"

    def api(self, method: str, path: str, body: Any = None, bearer: str | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {bearer or self.admin_key}"}
        request = urllib.request.Request(f"http://127.0.0.1:{self.env['HTTP_PORT']}{path}", method=method,
                                         headers=headers, data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def enroll(self) -> tuple[str, str]:
        """A new node, enrolled through the routes an appliance uses: (node id, credential)."""
        status, minted = self.api("POST", "/v1/hybrid/enrollment-tokens", {})
        assert status == 201, minted
        status, enrolled = self.api("POST", "/v1/hybrid/enroll", {
            "token": minted["data"]["token"], "name": "site", "software_version": "0.0.1"})
        assert status == 201, enrolled
        return enrolled["data"]["node_id"], enrolled["data"]["credential"]

    def listed(self, node_id: str) -> dict[str, Any]:
        status, answer = self.api("GET", "/v1/hybrid/nodes?limit=100")
        assert status == 200, answer
        [item] = [item for item in answer["data"]["items"] if item["id"] == node_id]
        return dict(item)

    def relay_metadata(self, scope: str = HYBRID_RELAY, name: str = "hybrid-relay") -> tuple[tuple[str, str], ...]:
        token = service_tokens.mint(Secret(self.env["SERVICE_TOKEN_SECRET"]), name, 600, scope=scope)
        return (("authorization", f"Bearer {token}"),)

    def metric(self, name: str) -> float:
        _, _, body = http_get(f"http://127.0.0.1:{self.env['GRPC_METRICS_PORT']}/metrics")
        [value] = [line.split()[1] for line in body.decode().splitlines() if line.startswith(name + " ")]
        return float(value)

    async def sql(self, statement: str, **params: Any) -> list[Any]:
        engine = create_async_engine(self.env["DATABASE_URL"])
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return list(result.mappings().all()) if result.returns_rows else []
        finally:
            await engine.dispose()


@pytest.fixture(scope="module")
def managed(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Managed]:
    tmp_path = tmp_path_factory.mktemp("link")
    with shared_env(mariadb, redis_server, s3_server) as env:
        env.update(MANAGED_SETTINGS, HYBRID_RELAY_ADDRESS=f"127.0.0.1:{env['GRPC_PORT']}")
        with grpc_process(env, tmp_path / "grpc.log") as grpc_mode, http_process(env, tmp_path / "http.log"):
            yield Managed(env, grpc_mode, create_key(env, "super_admin"))


@contextlib.asynccontextmanager
async def redis_client(managed: Managed) -> AsyncIterator["aioredis.Redis"]:
    client = aioredis.Redis.from_url(managed.env["REDIS_URL"])
    try:
        yield client
    finally:
        await client.aclose()


# --- the test as a node ---

class NodeLink:
    """One Connect call, as a node's link process makes it."""

    def __init__(self, channel: grpc.aio.Channel, credential: str) -> None:
        self.credential = credential
        self.call = link_pb2_grpc.HybridLinkStub(channel).Connect(
            metadata=(("authorization", f"Bearer {credential}"),))
        self.stash: list[link_pb2.ManagedMessage] = []  # read while waiting for another kind
        self.config_version = 0
        self.outbox_depth = 0
        self._writing = asyncio.Lock()
        self._beating: asyncio.Task[None] | None = None

    async def send(self, **message: Any) -> None:
        async with self._writing:  # the heartbeat task writes too
            await self.call.write(link_pb2.NodeMessage(**message))

    async def hello(self, software_version: str = scaigrid.__version__, **fields: Any) -> link_pb2.Welcome:
        await self.send(hello=link_pb2.Hello(protocol_version=protocol.LINK_PROTOCOL_VERSION,
                                             software_version=software_version, **fields))
        welcome: link_pb2.Welcome = (await self.expect("welcome")).welcome
        return welcome

    def heartbeat(self) -> None:
        """Heartbeats every half interval from now on, reporting the applied config version and outbox depth."""
        async def beat() -> None:
            seq = 0
            while True:
                seq += 1
                await self.send(heartbeat=link_pb2.Heartbeat(seq=seq, outbox_depth=self.outbox_depth,
                                                             config_version=self.config_version))
                await asyncio.sleep(INTERVAL_S / 2)  # a node's heartbeat pace, not an ordering wait
        self._beating = asyncio.create_task(beat())

    async def expect(self, kind: str) -> link_pb2.ManagedMessage:
        """The next message of that kind; messages of other kinds read meanwhile are kept for later."""
        for index, message in enumerate(self.stash):
            if message.WhichOneof("kind") == kind:
                return self.stash.pop(index)
        while True:
            message = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
            if message is grpc.aio.EOF:
                raise AssertionError(f"the link ended before a {kind} message")
            if message.WhichOneof("kind") == kind:
                return message
            self.stash.append(message)

    async def ended(self) -> grpc.aio.AioRpcError:
        """How the managed side ended the link (reading on until it does)."""
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            while await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S) is not grpc.aio.EOF:
                pass
        return ended.value

    def drop(self) -> None:
        if self._beating is not None:
            self._beating.cancel()
        self.call.cancel()


def error_code(error: grpc.aio.AioRpcError) -> str | None:
    return dict(error.trailing_metadata() or ()).get(ERROR_CODE_KEY)


@contextlib.asynccontextmanager
async def channel_to(target: str, options: tuple[tuple[str, Any], ...] = ()) -> AsyncIterator[grpc.aio.Channel]:
    channel = grpc.aio.insecure_channel(target, options=options)
    try:
        yield channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def linked(managed: Managed, target: str | None = None, credential: str | None = None
                 ) -> AsyncIterator[tuple[str, NodeLink]]:
    """A newly enrolled node (or the one `credential` is of), linked and heartbeating: (node id, its link)."""
    node_id = None
    if credential is None:
        node_id, credential = managed.enroll()
    async with channel_to(target or managed.grpc_target) as channel:
        node = NodeLink(channel, credential)
        try:
            welcome = await node.hello()
            node.heartbeat()
            yield welcome.node_id, node
        finally:
            node.drop()
    assert node_id in (None, welcome.node_id)


# --- refusals ---

async def test_a_wrong_or_revoked_credential_and_a_first_message_other_than_hello_are_refused(
        managed: Managed) -> None:
    node_id, credential = managed.enroll()
    async with channel_to(managed.grpc_target) as channel:
        for wrong in ("sgn_" + "x" * 43, "sst_not-a-node-credential", ""):
            node = NodeLink(channel, wrong)
            await node.send(hello=link_pb2.Hello(protocol_version=1, software_version=scaigrid.__version__))
            refused = await node.ended()
            assert refused.code() == grpc.StatusCode.UNAUTHENTICATED
            assert error_code(refused) == "NODE_CREDENTIAL_INVALID"

        node = NodeLink(channel, credential)
        await node.send(heartbeat=link_pb2.Heartbeat(seq=1))
        refused = await node.ended()
        assert (refused.code(), error_code(refused)) == (grpc.StatusCode.INVALID_ARGUMENT, "VALIDATION_ERROR")
        assert "first message must be Hello" in str(refused.details())

        assert managed.api("DELETE", f"/v1/hybrid/nodes/{node_id}")[0] == 200
        node = NodeLink(channel, credential)
        await node.send(hello=link_pb2.Hello(protocol_version=1, software_version=scaigrid.__version__))
        refused = await node.ended()
        assert (refused.code(), error_code(refused)) == (grpc.StatusCode.UNAUTHENTICATED, "NODE_CREDENTIAL_INVALID")
    refusals = [line for line in managed.grpc.log_lines() if line.get("event") == "hybrid_link_refused"]
    assert {line.get("node_id") for line in refusals} >= {None, node_id}
    assert not any(credential in json.dumps(line) for line in managed.grpc.log_lines())


async def test_a_node_on_another_major_version_is_refused_naming_both_versions(managed: Managed) -> None:
    _, credential = managed.enroll()
    async with channel_to(managed.grpc_target) as channel:
        node = NodeLink(channel, credential)
        await node.send(hello=link_pb2.Hello(protocol_version=1, software_version="99.0.0"))
        refused = await node.ended()
    assert (refused.code(), error_code(refused)) == (grpc.StatusCode.FAILED_PRECONDITION, "HYBRID_VERSION_SKEW")
    assert f"the node runs 99.0.0, the managed side {scaigrid.__version__}" in str(refused.details())


async def test_a_server_not_managed_refuses_a_link_with_hybrid_not_managed(
        mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server, tmp_path: Path) -> None:
    """A node pointed at a ScaiGrid whose HYBRID_ROLE is not `managed` is told so, not "Method not found"."""
    with shared_env(mariadb, redis_server, s3_server) as env, grpc_process(env, tmp_path / "grpc.log"):
        async with channel_to(f"127.0.0.1:{env['GRPC_PORT']}") as channel:
            node = NodeLink(channel, "sgn_" + "x" * 43)
            await node.send(hello=link_pb2.Hello(protocol_version=1, software_version=scaigrid.__version__))
            refused = await node.ended()
    assert (refused.code(), error_code(refused)) == (grpc.StatusCode.NOT_FOUND, "HYBRID_NOT_MANAGED")
    assert "HYBRID_ROLE=managed" in str(refused.details())


# --- a link's life ---

async def test_a_linked_node_is_welcomed_acked_and_listed_with_its_link_state(managed: Managed) -> None:
    assert managed.listed(managed.enroll()[0])["link"]["connected"] is False
    async with linked(managed) as (node_id, node), redis_client(managed) as redis:
        node.outbox_depth = 7
        ack = await node.expect("heartbeat_ack")
        assert ack.heartbeat_ack.seq >= 1

        async def depth_listed() -> bool:
            return bool(managed.listed(node_id)["link"]["outbox_depth"] == 7)

        await eventually_async(depth_listed, "the depth a heartbeat reported is listed")
        item = managed.listed(node_id)
        assert item["software_version"] == scaigrid.__version__  # hybrid_nodes, updated from the Hello
        assert item["link"]["connected"] is True and item["link"]["software_version"] == scaigrid.__version__
        assert item["link"]["outbox_depth"] == 7 and item["link"]["last_heartbeat_at"].endswith("Z")
        holder = await registry.holder(redis, node_id)
        assert holder is not None and holder.replica == managed.env["HYBRID_RELAY_ADDRESS"]
        assert node_id in await registry.holders(redis)
        assert managed.metric("scaigrid_hybrid_links") >= 1
    async with redis_client(managed) as redis:
        await eventually_async(lambda: _gone(redis, node_id), "the registry entry is released")
    assert managed.listed(node_id)["link"]["connected"] is False
    events = [(line.get("event"), line.get("node_id")) for line in managed.grpc.log_lines()]
    assert ("hybrid_link_connected", node_id) in events and ("hybrid_link_disconnected", node_id) in events


async def test_a_rotated_in_credential_links_and_the_old_one_stops_working(managed: Managed) -> None:
    node_id, old = managed.enroll()
    status, rotated = managed.api("POST", "/v1/hybrid/link/rotate", bearer=old)
    assert status == 200
    async with linked(managed, credential=rotated["data"]["credential"]) as (linked_id, _):
        assert linked_id == node_id
    async with channel_to(managed.grpc_target) as channel:
        node = NodeLink(channel, old)
        await node.send(hello=link_pb2.Hello(protocol_version=1, software_version=scaigrid.__version__))
        assert error_code(await node.ended()) == "NODE_CREDENTIAL_INVALID"


async def test_the_config_snapshot_follows_welcome_and_every_change_and_what_the_node_applied_is_listed(
        managed: Managed) -> None:
    [tenant] = await managed.sql("SELECT id FROM tenants LIMIT 1")
    async with linked(managed) as (node_id, node):
        first = (await node.expect("config")).config
        assert first.version >= 1 and hashlib.sha256(first.body_json.encode()).hexdigest() == first.sha256
        assert tenant["id"] not in first.body_json
        await node.send(config_applied=link_pb2.ConfigApplied(version=first.version, ok=True))
        node.config_version = first.version

        assert managed.api("PUT", f"/v1/hybrid/nodes/{node_id}/tenants", {"tenant_ids": [tenant["id"]]})[0] == 200
        second = (await node.expect("config")).config
        assert second.version == first.version + 1 and tenant["id"] in second.body_json
        await node.send(config_applied=link_pb2.ConfigApplied(version=second.version, ok=False,
                                                              error="references: tenant without partner"))
        await eventually_async(lambda: _logged(managed, "hybrid_config_rejected", node_id), "the rejection is logged")
        assert managed.listed(node_id)["link"]["config_version"] == first.version
    [rejected] = [line for line in managed.grpc.log_lines()
                  if line.get("event") == "hybrid_config_rejected" and line.get("node_id") == node_id]
    assert "references: tenant without partner" in str(rejected["message"])


async def _key_row(managed: Managed, key: str) -> Any:
    [row] = await managed.sql("SELECT id, user_id, tenant_id FROM api_keys WHERE key_prefix = :prefix",
                              prefix=key[:12])
    return row


def _routed_to(managed: Managed, node_id: str, node_model: str, **model: Any) -> str:
    """A managed model routed to the node's model through a shared `hybrid` backend; returns its slug."""
    suffix = node_id[-8:] + node_model.replace("/", "-")
    status, answer = managed.api("POST", "/v1/backends", {"id": f"tun-{suffix}", "provider": "hybrid",
                                                         "model": f"{node_id}/{node_model}"})
    assert status == 201, answer
    slug = f"onprem/{suffix}"
    status, answer = managed.api("POST", "/v1/models", {"slug": slug, "modality": "chat",
                                                       "routes": [{"backend": f"tun-{suffix}"}], **model})
    assert status == 201, answer
    # The http process reloads its catalogue when the change is announced, a moment after it answered.
    eventually(lambda: managed.api("GET", f"/v1/models/{slug}")[0] == 200, f"{slug} in the catalogue")
    return slug


async def test_node_usage_is_stored_once_for_its_users_at_managed_prices_and_never_under_a_relayed_id(
        managed: Managed) -> None:
    [tenant] = await managed.sql("SELECT id, partner_id FROM tenants WHERE slug = 'default'")
    key = await _key_row(managed, create_key(managed.env, "tenant_user"))

    def record(request_id: str, tenant_id: str = tenant["id"], user_id: str = key["user_id"],
               api_key_id: str | None = key["id"]) -> str:
        return usage.encode(UsageRecord(
            request_id=request_id, created_at_unix=time.time(), partner_id=tenant["partner_id"], tenant_id=tenant_id,
            user_id=user_id, api_key_id=api_key_id, model="site/llama", backend_id="vllm", protocol="oai",
            status="ok", tokens_in=12, tokens_out=30, latency_ms=80, cost=Decimal("999")))

    ingested_before = managed.metric("scaigrid_hybrid_usage_ingested_total")
    async with linked(managed) as (node_id, node), channel_to(managed.grpc_target) as channel:
        assert managed.api("PUT", f"/v1/hybrid/nodes/{node_id}/tenants", {"tenant_ids": [tenant["id"]]})[0] == 200
        await asyncio.to_thread(_routed_to, managed, node_id, "site/llama", price_input_per_mtok="1000",
                                price_output_per_mtok="2000")
        # A request the managed side relays: the node learns its id, and may not account for it.
        relayed = link_pb2_grpc.TunnelRelayStub(channel).Open(tunnel_request(node_id, "req_relayed_here"),
                                                              metadata=managed.relay_metadata())
        assert (await node.expect("tunnel_request")).tunnel_request.tunnel_id == "req_relayed_here"
        batch = [record("req_node_served"), record("req_not_ours", tenant_id="ten_of_another_node"),
                 record("req_relayed_here"), record("req_no_such_user", user_id="usr_nobody"),
                 record("req_no_such_key", api_key_id="key_nobody"), record("req_no_user", user_id=None)]
        acks = []
        for _ in range(2):  # the second time as after a reconnect that lost the first ack
            await node.send(usage=link_pb2.UsageBatch(batch_id="1-6", records_json=batch))
            acks.append((await node.expect("usage_ack")).usage_ack)
        relayed.cancel()
    assert [(ack.batch_id, ack.stored) for ack in acks] == [("1-6", 1), ("1-6", 0)]  # acked whole, stored in part
    rows = await managed.sql("SELECT request_id, tokens_out, cost FROM usage_records WHERE request_id IN "
                             "('req_node_served', 'req_not_ours', 'req_relayed_here', 'req_no_such_user', "
                             "'req_no_such_key', 'req_no_user')")
    # The managed side's price (12 x 1000 + 30 x 2000 per million tokens), never the node's cost.
    assert [(row["request_id"], row["tokens_out"], row["cost"]) for row in rows] == [
        ("req_node_served", 30, Decimal("0.072"))]
    assert managed.metric("scaigrid_hybrid_usage_ingested_total") == ingested_before + 1
    refused = [line["message"] for line in managed.grpc.log_lines()
               if line.get("event") == "hybrid_usage_foreign" and line.get("node_id") == node_id]
    assert any("relayed" in str(message) for message in refused)


async def test_a_hybrid_backend_reaches_only_an_enrolled_node_that_serves_its_tenant(managed: Managed) -> None:
    node_id, _ = managed.enroll()
    partner_admin = create_key(managed.env, "partner_admin")
    [tenant] = await managed.sql("SELECT id FROM tenants WHERE slug = 'default'")
    for model in (f"{node_id}/site/llama", "hn_" + "f" * 32 + "/site/llama"):
        status, answer = managed.api("POST", "/v1/backends", {
            "id": "pa-tunnel", "provider": "hybrid", "model": model, "tenant": "default"}, bearer=partner_admin)
        assert (status, answer["error"]["code"]) == (422, "VALIDATION_ERROR"), answer
        assert answer["error"]["details"][0]["field"] == "model"
    assert await managed.sql("SELECT id FROM backends WHERE id = 'pa-tunnel'") == []
    assert managed.api("PUT", f"/v1/hybrid/nodes/{node_id}/tenants", {"tenant_ids": [tenant["id"]]})[0] == 200
    status, answer = managed.api("POST", "/v1/backends", {
        "id": "pa-tunnel", "provider": "hybrid", "model": f"{node_id}/site/llama", "tenant": "default"},
        bearer=partner_admin)
    assert status == 201, answer


def _chat(managed: Managed, key: str, model: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{managed.env['HTTP_PORT']}/oai/v1/chat/completions", method="POST",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


ANSWER = json.dumps({"id": "chatcmpl-node", "object": "chat.completion", "created": 1, "model": "site/llama",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "from the node"},
                                  "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()


async def _answer(node: NodeLink, tunnel_id: str) -> None:
    for kind in ({"head": link_pb2.TunnelHead(status=200, headers={"content-type": "application/json"})},
                 {"data": ANSWER}, {"end": link_pb2.TunnelEnd()}):
        await node.send(tunnel=frame(tunnel_id, **kind))


async def test_the_clients_credential_never_goes_down_the_link_and_the_managed_record_wins(
        managed: Managed) -> None:
    """Through the real http process and relay: the node gets who the caller is, never the caller's key."""
    [tenant] = await managed.sql("SELECT id, partner_id FROM tenants WHERE slug = 'default'")
    client_keys = {role: create_key(managed.env, role) for role in ("tenant_user", "tenant_admin", "super_admin")}
    async with linked(managed) as (node_id, node):
        assert managed.api("PUT", f"/v1/hybrid/nodes/{node_id}/tenants", {"tenant_ids": [tenant["id"]]})[0] == 200
        slug = await asyncio.to_thread(_routed_to, managed, node_id, "site/llama")
        for role, client_key in client_keys.items():
            row = await _key_row(managed, client_key)
            chat = asyncio.create_task(asyncio.to_thread(_chat, managed, client_key, slug))
            request = (await node.expect("tunnel_request")).tunnel_request
            on_the_link = request.SerializeToString()
            assert client_key.encode() not in on_the_link and client_key[:12].encode() not in on_the_link
            assert b"Bearer" not in on_the_link and "authorization" not in request.headers
            caller = assertion.verify(assertion.credential_key(node.credential), request.assertion,
                                      node_id=node_id, request_id=request.tunnel_id)
            assert (caller.tenant_id, caller.user_id, caller.api_key_id, caller.role) == (
                tenant["id"], row["user_id"], row["id"], role)
            # The node knows the id now: a record it reports under it, even before the managed side's own record
            # is stored, is refused.
            await node.send(usage=link_pb2.UsageBatch(batch_id=f"x-{role}", records_json=[usage.encode(UsageRecord(
                request_id=request.tunnel_id, created_at_unix=time.time(), partner_id=tenant["partner_id"],
                tenant_id=tenant["id"], user_id=row["user_id"], api_key_id=row["id"], model="site/llama",
                backend_id="vllm", protocol="oai", status="ok", tokens_in=1, tokens_out=1, latency_ms=1,
                cost=Decimal(0)))]))
            assert (await node.expect("usage_ack")).usage_ack.stored == 0
            await _answer(node, request.tunnel_id)
            status, body = await chat
            assert status == 200 and json.loads(body)["choices"][0]["message"]["content"] == "from the node"
            assert await managed.sql("SELECT request_id FROM usage_records WHERE request_id = :request_id",
                                     request_id=request.tunnel_id) == []
            async with redis_client(managed) as redis:
                waiting = [usage.decode(raw) for raw in await redis.lrange(usage.BUFFER_KEY, 0, -1)]
            # The managed side's own record, from what it relayed, is the one on its way to the usage table.
            [own] = [record for record in waiting if record.request_id == request.tunnel_id]
            assert (own.api_key_id, own.model, own.tokens_in, own.tokens_out) == (row["id"], slug, 3, 4)


async def test_a_caller_whose_tenant_the_node_does_not_serve_is_not_sent_there(managed: Managed) -> None:
    client_key = create_key(managed.env, "tenant_user")  # before linking: it blocks, and the link must heartbeat
    async with linked(managed) as (node_id, node):
        slug = await asyncio.to_thread(_routed_to, managed, node_id, "site/other")  # shared; the node serves none
        status, body = await asyncio.to_thread(_chat, managed, client_key, slug)
        assert (status, json.loads(body)["error"]["code"]) == (403, "MODEL_ACCESS_DENIED")
        await node.expect("heartbeat_ack")
        assert not any(message.WhichOneof("kind") == "tunnel_request" for message in node.stash)


# --- tunnels ---

CALLER = link_pb2.Caller(tenant_id="ten_a", partner_id="prt_a", user_id="usr_a", api_key_id="key_a",
                         role="tenant_user")


def tunnel_request(node_id: str, tunnel_id: str, credit: int = 4) -> link_pb2.TunnelRequest:
    # An authorization header the http process never sends, to show that the relay would not pass one on either.
    return link_pb2.TunnelRequest(
        tunnel_id=tunnel_id, node_id=node_id, method="POST", path="/oai/v1/chat/completions",
        headers={"authorization": "Bearer sgk_client", "content-type": "application/json"},
        body=b'{"model":"llama","stream":true}', credit=credit, caller=CALLER)


def frame(tunnel_id: str, **kind: Any) -> link_pb2.TunnelFrame:
    return link_pb2.TunnelFrame(tunnel_id=tunnel_id, **kind)


async def credit_for(node: NodeLink, tunnel_id: str) -> int:
    """Frames of credit the relay gives the node for that tunnel next (credit for other tunnels is passed over)."""
    while (credit := (await node.expect("tunnel_credit")).tunnel_credit).tunnel_id != tunnel_id:
        pass
    return int(credit.frames)


# No BDP probing, so the caller's flow-control window stays at 64 KiB: a caller that does not read really stalls.
SMALL_WINDOW = (("grpc.http2.bdp_probe", 0),)


async def test_a_tunnel_is_relayed_with_credit_and_a_stalled_one_holds_up_nothing(managed: Managed) -> None:
    async with linked(managed) as (node_id, node), channel_to(managed.grpc_target, SMALL_WINDOW) as channel:
        relay = link_pb2_grpc.TunnelRelayStub(channel)
        stalled = relay.Open(tunnel_request(node_id, "req_stalled"), metadata=managed.relay_metadata())
        assert (await node.expect("tunnel_request")).tunnel_request.tunnel_id == "req_stalled"
        for _ in range(4):  # its whole credit, far more bytes than its caller (who never reads) takes in
            await node.send(tunnel=frame("req_stalled", data=b"x" * 256 * 1024))

        call = relay.Open(tunnel_request(node_id, "req_1"), metadata=managed.relay_metadata())
        request = (await node.expect("tunnel_request")).tunnel_request
        assert (request.tunnel_id, request.path, request.credit) == ("req_1", "/oai/v1/chat/completions", 4)
        assert dict(request.headers) == {"content-type": "application/json"} and request.body.startswith(b'{"model"')
        # The caller, as an assertion this node (and only it) verifies, for this request only.
        key = assertion.credential_key(node.credential)
        caller = assertion.verify(key, request.assertion, node_id=node_id, request_id="req_1")
        assert (caller.tenant_id, caller.partner_id, caller.user_id, caller.api_key_id, caller.role) == (
            "ten_a", "prt_a", "usr_a", "key_a", "tenant_user")
        assert not request.HasField("caller")
        for wrong_key, for_node, request_id in ((key, node_id, "req_stalled"), (key, "hn_other", "req_1"),
                                                (assertion.credential_key("sgn_another"), node_id, "req_1")):
            with pytest.raises(ScaigridError) as refused:
                assertion.verify(wrong_key, request.assertion, node_id=for_node, request_id=request_id)
            assert refused.value.code == "AUTH_TOKEN_INVALID"
        assert managed.metric("scaigrid_hybrid_tunnel_streams") == 2

        chunks = [b"data: %d\n\n" % index for index in range(9)]
        sent = [frame("req_1", head=link_pb2.TunnelHead(status=200, headers={"content-type": "text/event-stream"}))]
        sent += [frame("req_1", data=chunk) for chunk in chunks]
        received: list[link_pb2.TunnelFrame] = []
        credit = request.credit
        for outgoing in sent:
            if credit == 0:  # the node may send no more until the relay's caller has taken some
                received += [await call.read() for _ in range(2)]
                credit += await credit_for(node, "req_1")
            await node.send(tunnel=outgoing)
            credit -= 1
        await node.send(tunnel=frame("req_1", end=link_pb2.TunnelEnd()))
        while (read := await call.read()) is not grpc.aio.EOF:
            received.append(read)
        assert await call.code() == grpc.StatusCode.OK
        assert received[0].head.status == 200 and received[0].head.headers["content-type"] == "text/event-stream"
        assert [item.data for item in received[1:-1]] == chunks
        assert received[-1].WhichOneof("kind") == "end" and received[-1].end.error_code == ""
        await node.expect("heartbeat_ack")  # the link carried on all along
        assert not any(message.WhichOneof("kind") == "tunnel_cancel" for message in node.stash)

        stalled.cancel()
        assert (await node.expect("tunnel_cancel")).tunnel_cancel.tunnel_id == "req_stalled"
    await eventually_async(lambda: _zero(managed, "scaigrid_hybrid_tunnel_streams"), "no tunnel open")


async def test_a_link_that_drops_ends_its_open_tunnels_with_link_lost(managed: Managed) -> None:
    async with linked(managed) as (node_id, node), channel_to(managed.grpc_target) as channel:
        call = link_pb2_grpc.TunnelRelayStub(channel).Open(tunnel_request(node_id, "req_2"),
                                                           metadata=managed.relay_metadata())
        await node.expect("tunnel_request")
        await node.send(tunnel=frame("req_2", head=link_pb2.TunnelHead(status=200)))
        assert (await call.read()).head.status == 200
        node.drop()
        end = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
        assert end.WhichOneof("kind") == "end" and end.end.error_code == "LINK_LOST"
        assert await call.read() is grpc.aio.EOF

        again = link_pb2_grpc.TunnelRelayStub(channel).Open(tunnel_request(node_id, "req_3"),
                                                            metadata=managed.relay_metadata())
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await again.read()
    assert (refused.value.code(), error_code(refused.value)) == (grpc.StatusCode.UNAVAILABLE, "LINK_LOST")
    assert f"node {node_id!r} has no link to this grpc replica" in str(refused.value.details())


async def test_open_needs_the_relay_token(managed: Managed) -> None:
    async with linked(managed) as (node_id, node), channel_to(managed.grpc_target) as channel:
        relay = link_pb2_grpc.TunnelRelayStub(channel)
        for metadata, code, expected in (
                ((), grpc.StatusCode.UNAUTHENTICATED, "SERVICE_TOKEN_INVALID"),
                ((("authorization", "Bearer sst_forged.signature"),), grpc.StatusCode.UNAUTHENTICATED,
                 "SERVICE_TOKEN_INVALID"),
                # Any other scope, whatever the token's name: a ScaiInfer node must not reach hybrid nodes.
                *((managed.relay_metadata(scope), grpc.StatusCode.PERMISSION_DENIED, "AUTH_INSUFFICIENT_SCOPE")
                  for scope in (SCAIINFER_NODE, OPERATOR, HYBRID_LINK))):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await relay.Open(tunnel_request(node_id, "req_4"), metadata=metadata).read()
            assert (refused.value.code(), error_code(refused.value)) == (code, expected), metadata
        # And the relay's token opens tunnels only: no heartbeat as a ScaiInfer node.
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await scaiinfer_pb2_grpc.HeartbeatServiceStub(channel).Heartbeat(
                scaiinfer_pb2.HeartbeatRequest(node_id="a", endpoint="127.0.0.1:1"),
                metadata=managed.relay_metadata(name="scaiinfer-a"))
        assert (refused.value.code(), error_code(refused.value)) == (grpc.StatusCode.PERMISSION_DENIED,
                                                                     "AUTH_INSUFFICIENT_SCOPE")
        await node.expect("heartbeat_ack")
        assert not any(message.WhichOneof("kind") == "tunnel_request" for message in node.stash)


# --- links that end ---

async def test_a_revoked_node_is_dropped_at_the_next_config_refresh(managed: Managed) -> None:
    async with linked(managed) as (node_id, node):
        await node.expect("config")
        assert managed.api("DELETE", f"/v1/hybrid/nodes/{node_id}")[0] == 200
        ended = await node.ended()
    assert (ended.code(), error_code(ended)) == (grpc.StatusCode.UNAUTHENTICATED, "NODE_CREDENTIAL_INVALID")


async def test_a_silent_link_is_dropped_after_three_intervals(managed: Managed) -> None:
    _, credential = managed.enroll()
    async with channel_to(managed.grpc_target) as channel:
        node = NodeLink(channel, credential)
        await node.hello()
        ended = await node.ended()  # no heartbeat ever
    assert (ended.code(), error_code(ended)) == (grpc.StatusCode.UNAVAILABLE, "LINK_LOST")
    assert f"no message from the node for {3 * INTERVAL_S} s" in str(ended.details())


@pytest.mark.timeout(180)  # a second grpc replica starts (~3 s) and stops within its grace
async def test_a_newer_link_replaces_the_older_one_across_replicas_and_sigterm_ends_links(
        managed: Managed, tmp_path: Path) -> None:
    second_env = {**managed.env, **dict(zip(("GRPC_PORT", "GRPC_METRICS_PORT"), map(str, devstack.free_ports(2)),
                                            strict=True))}
    second_env["HYBRID_RELAY_ADDRESS"] = f"127.0.0.1:{second_env['GRPC_PORT']}"
    node_id, credential = managed.enroll()
    with grpc_process(second_env, tmp_path / "grpc-2.log") as second:
        async with linked(managed, credential=credential) as (_, first), redis_client(managed) as redis:
            await first.expect("heartbeat_ack")
            async with linked(managed, f"127.0.0.1:{second_env['GRPC_PORT']}", credential) as (_, newer):
                replaced = await first.ended()  # at the first replica's next registry refresh
                assert (replaced.code(), error_code(replaced)) == (grpc.StatusCode.UNAVAILABLE, "LINK_LOST")
                holder = await registry.holder(redis, node_id)
                assert holder is not None and holder.replica == second_env["HYBRID_RELAY_ADDRESS"]

                second.send(signal.SIGTERM)
                ended = await newer.ended()
                assert (ended.code(), error_code(ended)) == (grpc.StatusCode.UNAVAILABLE, "LINK_LOST")
                assert "stopping" in str(ended.details())
            assert second.stop() == 0
            assert await registry.holder(redis, node_id) is None
    [stopped] = [line for line in second.log_lines() if line.get("event") == "stopped"]
    assert stopped["hybrid_links"] == 1


# --- helpers ---

async def _gone(redis: "aioredis.Redis", node_id: str) -> bool:
    return await registry.holder(redis, node_id) is None


async def _logged(managed: Managed, event: str, node_id: str) -> bool:
    return any(line.get("event") == event and line.get("node_id") == node_id for line in managed.grpc.log_lines())


async def _zero(managed: Managed, metric: str) -> bool:
    return managed.metric(metric) == 0
