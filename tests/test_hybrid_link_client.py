"""The link mode, the node's end of the hybrid link, as a real subprocess against a fake managed side over TLS.

One migrated node per module (an http process serving fake backends) and one fake managed side
(tests/fake_managed.py); each test starts its own link process. What is checked is what the managed side and an
operator see: the hello, heartbeats, refusals and retries, reconnection, snapshots applied or rejected, usage sent
and deleted only once acked, tunnelled streams (intact, cancelled, sharing the link fairly), state and metrics.
"""

import asyncio
import json
import secrets
import signal
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
import redis.asyncio as aioredis
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid import __version__
from scaigrid.accounting.records import UsageRecord
from scaigrid.auth import keys
from scaigrid.db.tables import hybrid_mirrored
from scaigrid.hybrid import mirror, outbox, protocol, snapshot_schema
from scaigrid.hybrid.assertion import Caller
from scaigrid.modes.link import EXIT_STOP_FORCED
from tests.backends import (
    FakeBackend,
    apply,
    backend,
    chat_model,
    fake_fixture,  # noqa: F401  # the module's FakeBackend
    http_call,
    http_process,
    shared_env,
)
from tests.fake_managed import NODE_ID, FakeManaged, make_certificates
from tests.support.env import create_key
from tests.support.http import http_get
from tests.support.processes import ModeProcess, scaigrid

CREDENTIAL = "sgn_" + secrets.token_urlsafe(32)
CHAT = "/oai/v1/chat/completions"
# model slug on the node -> the FakeBackend behaviour serving it
# The caller of the tunnels below: a user and key of the tenant the site's snapshot mirrored (_snapshot_body).
MIRRORED = Caller(node_id="", request_id="", tenant_id="ten_linktest", partner_id="prt_linktest",
                  user_id="usr_linktest", api_key_id="key_linktest", role="tenant_user")
LOCAL_MODELS = {"local-chat": "ok", "local-gated": "gated-3", "local-paced": "paced-6-40", "local-slow": "slow-30"}


@dataclass
class Site:
    """The node the link belongs to: its settings, its http process, and a tenant_user key of its own."""

    env: dict[str, str]
    http: ModeProcess
    key: str


@pytest.fixture(scope="module")
def fake_managed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeManaged]:
    server = FakeManaged(tmp_path_factory.mktemp("managed"), CREDENTIAL).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
         s3_server: devstack.S3Server, fake: FakeBackend) -> Iterator[Site]:
    directory = tmp_path_factory.mktemp("node")
    with shared_env(mariadb, redis_server, s3_server) as env:
        # The http process verifies tunnelled callers with the node's credential, against what a snapshot mirrored.
        env.update(HYBRID_NODE_ID=NODE_ID, HYBRID_NODE_CREDENTIAL=CREDENTIAL)
        apply(env, directory / "catalogue.toml",
              [backend(f"be-{slug}", fake, behaviour) for slug, behaviour in LOCAL_MODELS.items()],
              [chat_model(slug, [(f"be-{slug}", 1, 1)]) for slug in LOCAL_MODELS])
        body = _snapshot_body(keys.generate())

        async def mirror_snapshot(engine: Any) -> None:
            redis = aioredis.Redis.from_url(env["REDIS_URL"])
            try:
                await mirror.apply(engine, NODE_ID, 1, body, snapshot_schema.digest(body), redis=redis)
            finally:
                await redis.aclose()

        on_database(env, mirror_snapshot)
        with http_process(env, directory / "http.log") as http:
            yield Site(env, http, create_key(env, "tenant_user"))


@pytest.fixture
def managed(fake_managed: FakeManaged) -> FakeManaged:
    """The fake managed side, serving, with nothing recorded or scripted."""
    fake_managed.reset()
    fake_managed.start()  # a test may have left it stopped
    return fake_managed


@pytest.fixture
def link_env(site: Site, managed: FakeManaged, fake: FakeBackend) -> dict[str, str]:
    fake.received.clear()
    return {**site.env, "HYBRID_ROLE": "node", "HYBRID_LINK_TARGET": managed.target, "HYBRID_NODE_ID": NODE_ID,
            "HYBRID_NODE_CREDENTIAL": CREDENTIAL, "HYBRID_CA_FILE": str(managed.ca_file),
            "HYBRID_BACKOFF_MAX_S": "2", "LINK_METRICS_PORT": str(devstack.free_port()),
            # A stop then takes at most 5 s of tunnel grace plus the link mode's margin, inside ModeProcess.stop's 30.
            "HTTP_DRAIN_GRACE_S": "5"}


@pytest.fixture
def start_link(start_mode: Callable[..., ModeProcess], link_env: dict[str, str]) -> Callable[..., ModeProcess]:
    def start(**overrides: str) -> ModeProcess:
        return start_mode("link", {**link_env, **overrides})

    return start


# --- helpers ---

def events(link: ModeProcess, event: str) -> list[dict[str, Any]]:
    return [line for line in link.log_lines() if line.get("event") == event]


def metric(env: dict[str, str], name: str) -> float:
    _, _, body = http_get(f"http://127.0.0.1:{env['LINK_METRICS_PORT']}/metrics")
    for line in body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the link's metrics")


def node_state(env: dict[str, str]) -> dict[str, Any] | None:
    with sync_redis.Redis.from_url(env["REDIS_URL"]) as client:
        raw = client.get(protocol.NODE_STATE_KEY)
    return None if raw is None else dict(json.loads(raw))


def on_database(env: dict[str, str], work: Callable[[Any], Any]) -> Any:
    """Runs `work(engine)` (a coroutine function) against the node's database."""
    async def run() -> Any:
        engine = create_async_engine(env["DATABASE_URL"])
        try:
            return await work(engine)
        finally:
            await engine.dispose()

    return asyncio.run(run())


def chat_body(model: str) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi there"}], "stream": True,
                       "stream_options": {"include_usage": True}}).encode()


def sse_content(body: bytes) -> tuple[str, bool]:
    """The streamed answer's text, and whether it ended with [DONE]."""
    events_ = [block.removeprefix(b"data: ") for block in body.split(b"\n\n") if block.strip()]
    text = "".join(choice["delta"].get("content") or "" for event in events_ if event != b"[DONE]"
                   for choice in json.loads(event)["choices"])
    return text, events_[-1] == b"[DONE]"


def tunnel_id() -> str:
    return "req_" + secrets.token_hex(12)  # a managed request id


def linked(managed: FakeManaged, hellos: int = 1) -> Callable[[], bool]:
    return lambda: managed.linked and len(managed.hellos) >= hellos and managed.attempts[-1] == "welcomed"


# --- configuration ---

def test_the_link_mode_names_what_it_lacks(link_env: dict[str, str]):
    lacking = {key: value for key, value in link_env.items() if key != "HYBRID_LINK_TARGET"}
    result = scaigrid("run", "--mode", "link", env=lacking)
    assert result.returncode == 2
    assert result.stderr.strip() == ("scaigrid: configuration error: "
                                     "HYBRID_LINK_TARGET: required by mode link, but not set")
    result = scaigrid("run", "--mode", "link", env={**link_env, "HYBRID_ROLE": "managed"})
    assert result.returncode == 2 and "HYBRID_ROLE: mode link needs node, but it is managed" in result.stderr


# --- hello, heartbeats, state ---

def test_hello_heartbeats_state_and_metrics(start_link, managed: FakeManaged, link_env: dict[str, str]):
    link = start_link()
    managed.wait_for(linked(managed), "a welcomed hello")
    hello = managed.hellos[0]
    assert hello.protocol_version == protocol.LINK_PROTOCOL_VERSION and hello.software_version == __version__
    assert sorted(hello.models) == sorted(LOCAL_MODELS)
    assert dict(hello.health) == {"database": "ok", "redis": "ok"}
    applied = on_database(link_env, mirror.applied) or (0, "")
    assert (hello.config_version, hello.config_hash) == applied

    managed.wait_for(lambda: len(managed.heartbeats) >= 3, "three heartbeats")
    assert [beat.seq for beat in managed.heartbeats[:3]] == [1, 2, 3]
    link.wait_for(lambda: (node_state(link_env) or {}).get("last_heartbeat_unix") is not None, what="state")
    state = node_state(link_env)
    assert state is not None and state["connected"] and state["node_id"] == NODE_ID
    assert state["target"] == managed.target and state["last_error"] is None
    assert metric(link_env, "scaigrid_link_connected") == 1
    assert metric(link_env, "scaigrid_link_last_heartbeat_age_seconds") < 30

    assert link.stop() == 0
    assert managed.closed_by_node == 1  # it closed its side of the stream, rather than just vanish
    assert node_state(link_env) is None  # a link program that stopped is "not running", not "disconnected"
    assert events(link, "stopped")[0]["message"] == "stopped: 0 tunnel(s) finished, 0 cut; link closed"
    assert CREDENTIAL not in link.log_path.read_text()


@pytest.mark.parametrize("refusal", ["HYBRID_VERSION_SKEW", "NODE_CREDENTIAL_INVALID"])
def test_a_refused_link_is_logged_and_retried_with_growing_backoff(start_link, managed: FakeManaged, refusal: str):
    if refusal == "HYBRID_VERSION_SKEW":
        managed.refusal = (refusal, "the node runs 0.1.0, the managed side 1.0.0: upgrade the managed side first")
        link = start_link()
    else:
        link = start_link(HYBRID_NODE_CREDENTIAL="sgn_" + secrets.token_urlsafe(32))
    managed.wait_for(lambda: len(managed.attempts) >= 4, "four refused attempts")
    link.wait_for(lambda: len(events(link, "link_failed")) >= 4, what="four logged failures")
    failures = events(link, "link_failed")[:4]
    assert {line["level"] for line in failures} == {"error"}
    assert {line["error_code"] for line in failures} == {refusal}
    assert [line["attempt"] for line in failures] == [1, 2, 3, 4]
    assert [line["backoff_cap_s"] for line in failures] == [0.5, 1.0, 2.0, 2.0]  # doubling, capped at 2 s
    message = "upgrade the managed side first" if refusal == "HYBRID_VERSION_SKEW" else "credential is not valid"
    assert message in failures[0]["reason"]
    assert set(managed.attempts) == {refusal} and not managed.linked

    assert link.process.poll() is None  # refused, the link process keeps running and retrying

    if refusal == "HYBRID_VERSION_SKEW":
        # Nobody touches the node: once the managed side lets it in (after its upgrade), it links by itself.
        managed.refusal = None
        managed.wait_for(linked(managed), "a welcomed hello after the refusals")
    assert link.stop() == 0
    assert "sgn_" not in link.log_path.read_text()  # neither credential is ever logged


def test_a_link_dropped_right_after_its_first_ack_still_backs_off(start_link, managed: FakeManaged):
    """Say a second appliance with this credential keeps replacing the link: without a heartbeat interval held, the
    backoff must keep growing, not start over at each (immediate) first ack."""
    managed.drop_after_ack = True
    link = start_link()
    link.wait_for(lambda: len(events(link, "link_failed")) >= 4, what="four dropped links")
    assert [line["backoff_cap_s"] for line in events(link, "link_failed")[:4]] == [0.5, 1.0, 2.0, 2.0]
    assert set(managed.attempts) == {"welcomed"}
    assert link.stop() == 0


def test_a_managed_side_the_ca_did_not_sign_is_never_linked_to(start_link, managed: FakeManaged, tmp_path: Path):
    other_ca, _, _ = make_certificates(tmp_path / "other-ca")
    link = start_link(HYBRID_CA_FILE=str(other_ca))
    link.wait_for(lambda: len(events(link, "link_failed")) >= 2, what="two failed attempts")
    assert managed.hellos == []  # the TLS handshake failed before the node said anything
    failure = events(link, "link_failed")[0]
    assert failure["error_code"] == "" and "handshake" in failure["reason"].lower()
    assert link.stop() == 0


def test_reconnects_after_a_drop_a_restart_and_silence(start_link, managed: FakeManaged, link_env: dict[str, str]):
    link = start_link()
    managed.wait_for(linked(managed), "the first link")

    managed.drop()
    managed.wait_for(linked(managed, hellos=2), "a hello after the stream was dropped")
    assert metric(link_env, "scaigrid_link_reconnects_total") >= 1
    link.wait_for(lambda: (node_state(link_env) or {}).get("connected", False), what="state: connected")

    managed.stop()
    link.wait_for(lambda: not (node_state(link_env) or {}).get("connected", True), what="state: disconnected")
    state = node_state(link_env)
    assert state is not None and state["last_error"]
    assert metric(link_env, "scaigrid_link_connected") == 0
    managed.start()
    managed.wait_for(linked(managed, hellos=3), "a hello after the managed side restarted")
    link.wait_for(lambda: (node_state(link_env) or {}).get("connected", False), what="state: connected")

    # A managed side that stops answering is given up after three heartbeat intervals, then linked again.
    managed.ack_heartbeats = False
    link.wait_for(lambda: any("no message from the managed side" in line["reason"]
                              for line in events(link, "link_failed")), what="the silence noticed")
    managed.ack_heartbeats = True
    managed.wait_for(linked(managed, hellos=4), "a hello after the silence")
    assert link.stop() == 0


# --- config snapshots ---

def _snapshot_body(key: str, tenant_status: str = "active") -> str:
    return snapshot_schema.canonical({
        "schema": snapshot_schema.SCHEMA,
        "partners": [{"id": "prt_linktest", "slug": "managed-partner", "name": "Managed partner",
                      "status": "active", "rpm_limit": None}],
        "tenants": [{"id": "ten_linktest", "partner_id": "prt_linktest", "slug": "managed-tenant",
                     "name": "Managed tenant", "status": tenant_status, "rpm_limit": None}],
        "users": [{"id": "usr_linktest", "tenant_id": "ten_linktest", "email": "someone@managed.example",
                   "display_name": None, "role": "tenant_user", "status": "active", "rpm_limit": None}],
        "api_keys": [{"id": "key_linktest", "tenant_id": "ten_linktest", "user_id": "usr_linktest",
                      "name": "from the managed side", "key_hash": keys.hash_key(key), "key_prefix": key[:12],
                      "role": "tenant_user", "rpm_limit": None, "expires_at": None, "revoked_at": None}],
        "managed_models": [],
    })


def test_a_valid_snapshot_is_applied_and_an_invalid_one_rejected(start_link, managed: FakeManaged, site: Site,
                                                                link_env: dict[str, str]):
    link = start_link()
    managed.wait_for(linked(managed), "a link")
    version = ((on_database(link_env, mirror.applied) or (0, ""))[0]) + 1
    managed_key = keys.generate()
    chat = json.loads(chat_body("local-chat")) | {"stream": False}
    assert http_call("POST", f"http://127.0.0.1:{site.env['HTTP_PORT']}{CHAT}", managed_key, chat)[0] == 401

    body = _snapshot_body(managed_key)
    managed.push_snapshot(version, body, snapshot_schema.digest(body))
    managed.wait_for(lambda: len(managed.applied) == 1, "ConfigApplied")
    assert (managed.applied[0].version, managed.applied[0].ok, managed.applied[0].error) == (version, True, "")
    # The managed side's key now works on the node's own API.
    status, _, answer = http_call("POST", f"http://127.0.0.1:{site.env['HTTP_PORT']}{CHAT}", managed_key, chat)
    assert status == 200, answer
    link.wait_for(lambda: (node_state(link_env) or {}).get("config_version") == version, what="state: version")
    assert metric(link_env, "scaigrid_link_config_version") == version

    # Damaged on its way: rejected with the reason, and the applied snapshot stays in force.
    damaged = _snapshot_body(managed_key, tenant_status="disabled")
    managed.push_snapshot(version + 1, damaged, snapshot_schema.digest(body))
    managed.wait_for(lambda: len(managed.applied) == 2, "a second ConfigApplied")
    rejected = managed.applied[1]
    assert (rejected.version, rejected.ok) == (version + 1, False) and "sha256" in rejected.error
    assert on_database(link_env, mirror.applied) == (version, snapshot_schema.digest(body))
    assert http_call("POST", f"http://127.0.0.1:{site.env['HTTP_PORT']}{CHAT}", managed_key, chat)[0] == 200
    assert any(line["level"] == "error" for line in events(link, "config_rejected"))

    # The next hello reports what is applied.
    managed.drop()
    managed.wait_for(linked(managed, hellos=2), "a hello after the drop")
    assert (managed.hellos[1].config_version, managed.hellos[1].config_hash) == (version, snapshot_schema.digest(body))
    assert link.stop() == 0


# --- usage ---

def _usage_record() -> UsageRecord:
    return UsageRecord(request_id="req_" + secrets.token_hex(12), created_at_unix=time.time(),
                       partner_id="prt_linktest", tenant_id="ten_linktest", user_id=None, api_key_id=None,
                       model="local-chat", backend_id="be-local-chat", protocol="oai", status="ok", tokens_in=3,
                       tokens_out=4, latency_ms=12, cost=Decimal("0.000001"))


def _queue(env: dict[str, str], records: list[UsageRecord]) -> None:
    """Queues the records on the node, as its usage flush does; their tenant is one a snapshot mirrored."""
    async def enqueue(engine: Any) -> None:
        async with engine.begin() as conn:
            mirrored = insert(hybrid_mirrored).values(kind=outbox.MIRRORED_TENANT, row_id="ten_linktest")
            await conn.execute(mirrored.on_duplicate_key_update(kind=mirrored.inserted.kind))
            assert await outbox.enqueue(conn, records) == len(records)

    on_database(env, enqueue)


def test_usage_is_deleted_only_once_acked_and_sent_again_after_a_reconnect(start_link, managed: FakeManaged,
                                                                           link_env: dict[str, str]):
    records = [_usage_record() for _ in range(3)]
    _queue(link_env, records)
    managed.ack_usage = False
    link = start_link()
    managed.wait_for(lambda: len(managed.batches) == 1, "a usage batch")
    sent = managed.batches[0]
    assert sorted(json.loads(raw)["request_id"] for raw in sent.records_json) == sorted(r.request_id for r in records)
    managed.wait_for(lambda: any(beat.outbox_depth == 3 for beat in managed.heartbeats), "a heartbeat with depth 3")

    managed.stop()  # before it acked: the rows stay
    assert on_database(link_env, outbox.depth) == 3
    managed.ack_usage = True
    managed.start()
    managed.wait_for(lambda: len(managed.batches) == 2, "the batch sent again")
    assert managed.batches[1].batch_id == sent.batch_id
    assert list(managed.batches[1].records_json) == list(sent.records_json)
    link.wait_for(lambda: on_database(link_env, outbox.depth) == 0, what="the acked batch deleted")
    link.wait_for(lambda: bool(events(link, "usage_acked")), what="the ack logged")
    assert link.stop() == 0


# --- tunnels ---

def test_a_tunnelled_stream_comes_back_intact(start_link, managed: FakeManaged, site: Site):
    link = start_link()
    managed.wait_for(linked(managed), "a link")
    tunnel = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"), MIRRORED)
    managed.wait_for(lambda: tunnel.ended, "the tunnel's end")
    assert tunnel.head.status == 200 and tunnel.head.headers["content-type"].startswith("text/event-stream")
    assert tunnel.end.error_code == ""
    assert sse_content(tunnel.body) == ("tok0 tok1 tok2 ", True)
    # The node ran it as the managed side's request: one request id on both sides.
    site.http.wait_for(lambda: any(line.get("request_id") == tunnel.tunnel_id and line.get("event") == "request"
                                   for line in site.http.log_lines()), what="the node's request line")

    for path in ("/v1/admin/keys", "/oai/v1/../../v1/admin/keys", "/oai/v1/%2e%2e/%2e%2e/v1/admin/keys"):
        refused = managed.open_tunnel(tunnel_id(), path, b"{}", MIRRORED)
        managed.wait_for(lambda tunnel=refused: tunnel.ended, "the refused tunnel's end")
        assert [frame.WhichOneof("kind") for frame in refused.frames] == ["end"], path
        assert refused.end.error_code == "TUNNEL_PATH_NOT_ALLOWED", path
    assert link.stop() == 0


def test_a_tunnel_is_run_only_for_the_caller_a_valid_assertion_names(start_link, managed: FakeManaged, site: Site):
    """Whatever the link carries besides, the node's http process takes the caller from the assertion alone."""
    start_link()
    managed.wait_for(linked(managed), "a link")
    without = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"), None,
                                  headers={"authorization": f"Bearer {site.key}"})  # a key valid on the node
    other_tenant = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"),
                                       replace(MIRRORED, tenant_id="ten_unknown"))
    for refused in (without, other_tenant):
        managed.wait_for(lambda tunnel=refused: tunnel.ended, "the refused tunnel's end")
        assert refused.head.status == 401 and b"AUTH_TOKEN_INVALID" in refused.body
    admin = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"), replace(MIRRORED, role="tenant_admin"))
    managed.wait_for(lambda: admin.ended, "the tunnel's end")
    assert admin.head.status == 200  # as the mirrored key's tenant_user


def test_a_tunnel_the_node_cannot_run_ends_with_an_error_code(start_link, managed: FakeManaged, site: Site):
    link = start_link(HTTP_PORT=str(devstack.free_port()))  # nothing listens there
    managed.wait_for(linked(managed), "a link")
    tunnel = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"), MIRRORED)
    managed.wait_for(lambda: tunnel.ended, "the tunnel's end")
    assert [frame.WhichOneof("kind") for frame in tunnel.frames] == ["end"]
    assert tunnel.end.error_code == "NODE_HTTP_UNAVAILABLE"
    assert link.stop() == 0


def test_a_cancelled_tunnel_and_a_lost_link_close_the_backend_request(start_link, managed: FakeManaged, site: Site,
                                                                      fake: FakeBackend):
    link = start_link()
    managed.wait_for(linked(managed), "a link")
    cancelled = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-gated"), MIRRORED)
    managed.wait_for(lambda: len(cancelled.frames) >= 2, "the head and a first chunk")
    managed.cancel(cancelled.tunnel_id)
    assert fake.requests_for("gated-3")[0].gone.wait(10), "the backend saw its client go"
    assert not cancelled.ended

    cut = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-gated"), MIRRORED)
    managed.wait_for(lambda: len(cut.frames) >= 2, "the head and a first chunk")
    managed.drop()
    assert fake.requests_for("gated-3")[1].gone.wait(10), "the backend saw its client go with the link"
    link.wait_for(lambda: bool(events(link, "tunnels_cut")), what="the cut logged")
    assert events(link, "tunnels_cut")[0]["cut"] == 1
    assert link.stop() == 0


def test_a_tunnel_without_credit_does_not_hold_back_the_others(start_link, managed: FakeManaged, site: Site):
    link = start_link()
    managed.wait_for(linked(managed), "a link")
    stalled = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-paced"), MIRRORED, credit=2,
                                  auto_credit=False)
    flowing = [managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-paced"), MIRRORED)
               for _ in range(3)]
    managed.wait_for(lambda: all(tunnel.ended for tunnel in flowing), "the tunnels with credit done")
    for tunnel in flowing:
        assert sse_content(tunnel.body) == ("tok0 tok1 tok2 tok3 tok4 tok5 ", True)
    # Under load the stalled tunnel's frames may come after the others have ended.
    managed.wait_for(lambda: len(stalled.frames) >= 2, "the stalled tunnel's credit used")
    assert len(stalled.frames) == 2 and not stalled.ended  # its credit, not a frame more

    managed.credit(stalled.tunnel_id, 100)
    managed.wait_for(lambda: stalled.ended, "the stalled tunnel done once credited")
    assert sse_content(stalled.body) == ("tok0 tok1 tok2 tok3 tok4 tok5 ", True)
    assert link.stop() == 0


def test_sigterm_lets_open_tunnels_finish_within_the_grace_and_cuts_the_rest(start_link, managed: FakeManaged,
                                                                             site: Site, fake: FakeBackend):
    link = start_link(HTTP_DRAIN_GRACE_S="4")
    managed.wait_for(linked(managed), "a link")
    finishing = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-gated"), MIRRORED)
    hanging = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-slow"), MIRRORED)
    managed.wait_for(lambda: len(finishing.frames) >= 2 and len(fake.requests_for("slow-30")) == 1,
                     "both tunnels under way")
    link.send(signal.SIGTERM)
    link.wait_for(lambda: bool(events(link, "stopping")), what="the stop signal taken")
    late = managed.open_tunnel(tunnel_id(), CHAT, chat_body("local-chat"), MIRRORED)
    managed.wait_for(lambda: late.ended, "the late tunnel refused")
    assert late.end.error_code == "NODE_STOPPING"
    fake.gate.set()  # the gated stream may go on now
    try:
        managed.wait_for(lambda: finishing.ended, "the gated tunnel finished")
    finally:
        fake.gate.clear()
    assert finishing.end.error_code == "" and sse_content(finishing.body)[1]
    assert link.stop() == 0
    [stopped] = events(link, "stopped")
    assert (stopped["finished"], stopped["cut"]) == (1, 1)
    assert not events(link, "stop_forced")
    assert fake.requests_for("slow-30")[0].gone.wait(10)
    assert not hanging.ended  # cut with the link; the managed side ends it (LINK_LOST)


def test_a_stop_past_its_deadline_is_forced_logged_and_exits_non_zero(start_link, managed: FakeManaged):
    """A Redis that takes connections and never answers holds the removal of the link state for the client's socket
    timeout (5 s): past the tunnels' grace and HYBRID_LINK_STOP_MARGIN_S (3 s here) the stop is cut, one line says
    which step was cut, and the exit status tells the supervisor that the stop was not clean. The steps before the
    removal get 2 s of margin: closing the gRPC link was seen taking over 0.5 s on a loaded machine."""
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel completes connections; nobody reads them
        link = start_link(REDIS_URL=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", HTTP_DRAIN_GRACE_S="1",
                          HYBRID_LINK_STOP_MARGIN_S="2")
        managed.wait_for(linked(managed), "a link")
        assert link.stop() == EXIT_STOP_FORCED != 0
    [forced] = events(link, "stop_forced")
    assert (forced["step"], forced["tunnels_open"]) == ("removing the link state", 0)
    assert not events(link, "stopped")
