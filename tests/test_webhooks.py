"""Outbound webhooks end to end: the API, the outbox, and delivery by real workers to a real receiver that checks
signatures; retry timing and auto-disable driven by an injectable clock against the real database."""

import asyncio
import contextlib
import json
import secrets
import signal
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from appliance import devstack
from scaigrid.accounting import flush
from scaigrid.accounting.service import Accounting
from scaigrid.auth import service_tokens
from scaigrid.cache import InvalidationBus
from scaigrid.clock import utc_now
from scaigrid.db.tables import webhook_deliveries, webhook_events, webhooks
from scaigrid.resources import database_ctx
from scaigrid.settings import Secret, Settings, load_settings
from scaigrid.webhooks import delivery, outbox
from tests.accounting_fixtures import ledger_for, start_worker, usage
from tests.backends import GATEWAY_SETTINGS, FakeBackend, backend, chat_model, http_call, serving
from tests.identity import Reply, call, tenant, user_with_key
from tests.support.env import Node, create_key
from tests.support.processes import ModeProcess, start_http
from tests.support.waiting import eventually_async
from tests.webhook_receiver import Receiver

ALLOW_PRIVATE = {"WEBHOOK_ALLOW_PRIVATE_TARGETS": "true", **GATEWAY_SETTINGS}
PUBLIC_URL = "https://93.184.216.34/hook"  # a public address: accepted without resolving anything


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


@pytest.fixture
def hooks_node(migrated_env: dict[str, str], start_mode: Callable[..., ModeProcess]) -> Node:
    """A node whose webhooks may call the receiver on 127.0.0.1 (as on an appliance), with generous rate limits."""
    env = {**migrated_env, **ALLOW_PRIVATE}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


@contextlib.asynccontextmanager
async def engine_for(env: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    async with database_ctx(load_settings(env, env_file=None)) as engine:
        yield engine


@dataclass
class Caller:
    """Where to call and with which webhooks:manage key (a Node's admin, or a tenant admin's)."""

    url: str
    admin_key: str


def subscribe(node: Node | Caller, receiver: Receiver, name: str, events: list[str], **fields: Any) -> dict[str, Any]:
    """A webhook to the receiver's path `name`, whose secret the receiver then checks."""
    reply = call(node.url, "POST", "/v1/webhooks", node.admin_key,
                 {"url": receiver.url(name), "events": events, **fields})
    assert reply.status == 201, reply.body
    receiver.secrets[name] = reply.data["secret"]
    return dict(reply.data)


def deliveries(node: Node, webhook_id: str) -> list[dict[str, Any]]:
    reply = call(node.url, "GET", f"/v1/webhooks/{webhook_id}/deliveries?limit=100", node.admin_key)
    assert reply.status == 200, reply.body
    return list(reply.data["items"])


async def queue(env: dict[str, str], hook: dict[str, Any]) -> str:
    """One request.completed event waiting for this webhook alone, stored as the outbox stores it: its event id."""
    event = outbox.request_event(usage({"partner_id": hook["partner_id"], "tenant_id": hook["tenant_id"]}))
    async with engine_for(env) as engine, engine.begin() as conn:
        await outbox.store(conn, [(event, hook["id"])])
    return event.id


def problems(reply: Reply) -> dict[str, str]:
    assert reply.status == 422 and reply.code == "VALIDATION_ERROR", reply.body
    return {item["field"]: item["message"] for item in reply.body["error"]["details"]}


async def test_crud_validation_secret_and_tenancy(node: Node, start_mode, receiver: Receiver):
    def create(body: dict[str, Any], key: str = node.admin_key) -> Reply:
        return call(node.url, "POST", "/v1/webhooks", key, body)

    # Private and loopback targets are refused by default, as are other schemes and credentials in the URL.
    events = ["request.completed"]
    assert "loopback" in problems(create({"url": receiver.url("x"), "events": events}))["url"]
    assert "loopback" in problems(create({"url": receiver.url("x", host="localhost"), "events": events}))["url"]
    assert "private" in problems(create({"url": "http://10.1.2.3/hook", "events": events}))["url"]
    assert "link-local" in problems(create({"url": "http://169.254.169.254/latest", "events": events}))["url"]
    assert "CGNAT" in problems(create({"url": "http://100.64.0.1/hook", "events": events}))["url"]
    assert "embeds 127.0.0.1" in problems(create({"url": "http://[2002:7f00:1::]/", "events": events}))["url"]
    assert "http or https" in problems(create({"url": "ftp://93.184.216.34/x", "events": events}))["url"]
    assert "credentials" in problems(create({"url": "https://u:p@93.184.216.34/x", "events": events}))["url"]
    found = problems(create({"url": PUBLIC_URL, "events": ["request.done"], "max_retries": -1, "colour": "red"}))
    assert set(found) == {"events", "max_retries", "colour"} and "request.failed" in found["events"]

    # A secret of the client's own: 32-256 printable characters without spaces; the message never repeats it.
    short = "s3cr3t-" * 4
    found = problems(create({"url": PUBLIC_URL, "events": events, "secret": short}))
    assert set(found) == {"secret"} and "32-256" in found["secret"] and short not in str(found)
    for bad in ("with spaces " * 4, "x" * 257, "ünïcödé" * 8, 12345678901234567890123456789012345):
        assert set(problems(create({"url": PUBLIC_URL, "events": events, "secret": bad}))) == {"secret"}, bad
    assert problems(create({"url": PUBLIC_URL, "events": events, "status": "paused"})) == {
        "status": "one of: active, inactive, disabled"}
    chosen = secrets.token_hex(32)
    mine = create({"url": PUBLIC_URL, "events": events, "secret": chosen, "status": "inactive", "max_retries": 3})
    assert mine.status == 201, mine.body
    assert (mine.data["secret"], mine.data["status"], mine.data["max_retries"]) == (chosen, "inactive", 3)
    shown = call(node.url, "GET", f"/v1/webhooks/{mine.data['id']}", node.admin_key)
    assert "secret" not in shown.data and chosen not in str(shown.body)
    assert chosen not in node.process.log_path.read_text() and short not in node.process.log_path.read_text()
    assert [h["id"] for h in call(node.url, "GET", "/v1/webhooks?status=inactive", node.admin_key).data["items"]] == [
        mine.data["id"]]
    assert problems(call(node.url, "GET", "/v1/webhooks?status=paused", node.admin_key)) == {
        "status": "one of: active, inactive, disabled"}
    assert call(node.url, "DELETE", f"/v1/webhooks/{mine.data['id']}", node.admin_key).status == 200

    created = create({"url": PUBLIC_URL, "events": ["request.failed", "request.completed"], "description": "ops"})
    assert created.status == 201, created.body
    hook = created.data
    secret = hook.pop("secret")
    assert secret.startswith("whsec_") and len(secret) > 40
    assert (hook["events"], hook["max_retries"], hook["status"]) == (["request.completed", "request.failed"], 5,
                                                                     "active")
    # Shown once: never in a GET or a listing, and not stored in clear.
    got = call(node.url, "GET", f"/v1/webhooks/{hook['id']}", node.admin_key)
    assert got.data == hook and secret not in str(got.body)
    listed = call(node.url, "GET", "/v1/webhooks", node.admin_key)
    assert listed.data["items"] == [hook] and secret not in str(listed.body)
    async with engine_for(node.env) as engine, engine.connect() as conn:
        stored = (await conn.execute(select(webhooks).where(webhooks.c.id == hook["id"]))).mappings().one()
    assert secret not in str(dict(stored))

    reply = call(node.url, "PUT", f"/v1/webhooks/{hook['id']}", node.admin_key,
                 {"events": ["budget.hard_limit_reached"], "max_retries": 2, "description": None})
    assert (reply.data["events"], reply.data["max_retries"], reply.data["description"]) == (
        ["budget.hard_limit_reached"], 2, None)
    assert "private" in problems(call(node.url, "PUT", f"/v1/webhooks/{hook['id']}", node.admin_key,
                                      {"url": "http://192.168.1.10/"}))["url"]
    assert call(node.url, "GET", f"/v1/webhooks/{hook['id']}", node.admin_key).data["url"] == PUBLIC_URL

    # Tenancy: another tenant's admin neither sees nor touches it; a tenant_user may not manage webhooks.
    other = tenant(node.url, node.admin_key, "globex")
    _, other_admin = user_with_key(node.url, node.admin_key, other["id"], "tenant_admin")
    for method, path in (("GET", ""), ("PUT", ""), ("DELETE", ""), ("POST", "/test"), ("GET", "/deliveries")):
        reply = call(node.url, method, f"/v1/webhooks/{hook['id']}{path}", other_admin, {} if method == "PUT" else None)
        assert reply.status == 404 and reply.code == "NOT_FOUND", (method, path, reply.body)
    assert call(node.url, "GET", "/v1/webhooks", other_admin).data["items"] == []
    assert create({"url": PUBLIC_URL, "events": events, "tenant_id": hook["tenant_id"]}, other_admin).status == 404
    own = create({"url": PUBLIC_URL, "events": events}, other_admin)
    assert own.status == 201 and own.data["tenant_id"] == other["id"]
    # A service caller has no tenant of its own: it must name one.
    service = service_tokens.mint(Secret(node.env["SERVICE_TOKEN_SECRET"]), "billing", 600,
                                  scope=service_tokens.OPERATOR)
    assert problems(create({"url": PUBLIC_URL, "events": events}, service)) == {
        "tenant_id": "required: a service caller has no tenant of its own"}
    assert create({"url": PUBLIC_URL, "events": events, "tenant_id": other["id"]}, service).status == 201
    reply = call(node.url, "GET", "/v1/webhooks", create_key(node.env, "tenant_user"))
    assert reply.status == 403 and reply.code == "AUTHZ_PERMISSION_DENIED"

    # An operator who allows private targets (an appliance on a site network) may use them.
    allowing = {**node.env, "HTTP_PORT": str(devstack.free_ports(1)[0]), "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true"}
    start_http(start_mode, allowing)
    allowed_url = f"http://127.0.0.1:{allowing['HTTP_PORT']}"
    reply = call(allowed_url, "POST", "/v1/webhooks", node.admin_key, {"url": receiver.url("x"), "events": events})
    assert reply.status == 201, reply.body

    assert call(node.url, "DELETE", f"/v1/webhooks/{hook['id']}", node.admin_key).data["deleted"] is True
    assert call(node.url, "GET", f"/v1/webhooks/{hook['id']}", node.admin_key).status == 404


def test_test_is_sent_at_once_signed_and_recorded(hooks_node: Node, start_mode, receiver: Receiver):
    chosen = secrets.token_hex(32)
    hook = subscribe(hooks_node, receiver, "ops", ["request.failed"], secret=chosen)
    assert receiver.secrets["ops"] == chosen
    path = f"/v1/webhooks/{hook['id']}/test"
    reply = call(hooks_node.url, "POST", path, hooks_node.admin_key)
    assert reply.status == 200, reply.body
    result = reply.data
    assert (result["status_code"], result["error"]) == (200, None) and result["duration_ms"] >= 0
    [arrival] = receiver.arrived("ops")  # there before the answer: no worker runs here
    assert arrival.signature_valid
    assert arrival.headers["X-ScaiGrid-Event-ID"] == result["event_id"]
    assert arrival.headers["X-ScaiGrid-Delivery-ID"] == result["delivery_id"]
    assert arrival.headers["X-ScaiGrid-Event-Type"] == "webhook.test"
    assert arrival.headers["X-ScaiGrid-Delivery-Attempt"] == "1"
    assert arrival.event["event_type"] == "webhook.test" and arrival.event["source"] == "scaigrid"
    assert set(arrival.event) == {"event_id", "event_type", "source", "tenant_id", "partner_id", "payload",
                                  "timestamp"}
    assert arrival.event["tenant_id"] == hook["tenant_id"] and arrival.event["payload"]["webhook_id"] == hook["id"]
    [item] = deliveries(hooks_node, hook["id"])
    assert (item["id"], item["event_type"], item["status"], item["paused"], item["attempts"]) == (
        result["delivery_id"], "webhook.test", "success", False, 1)
    assert (item["last_status_code"], item["last_error"]) == (200, None)

    # A failing receiver: the test ran (200), the failure is in the answer and recorded, and not retried.
    receiver.behaviours["ops"] = "fail"
    failed = call(hooks_node.url, "POST", path, hooks_node.admin_key)
    assert failed.status == 200 and (failed.data["status_code"], failed.data["error"]) == (
        500, "HTTP 500 Internal Server Error")
    # A rotated secret signs at once: the receiver still holding the old one refuses (401).
    receiver.behaviours["ops"] = "ok"
    rotated = call(hooks_node.url, "POST", f"/v1/webhooks/{hook['id']}/rotate-secret", hooks_node.admin_key).data
    assert rotated["secret"] != chosen
    refused = call(hooks_node.url, "POST", path, hooks_node.admin_key).data
    assert (refused["status_code"], refused["error"]) == (401, "HTTP 401 Unauthorized")
    assert not receiver.arrived("ops")[-1].signature_valid
    receiver.secrets["ops"] = rotated["secret"]
    between = datetime.now(UTC)
    assert call(hooks_node.url, "POST", path, hooks_node.admin_key).data["status_code"] == 200

    # A receiver that does not answer within WEBHOOK_TIMEOUT_S: no status code, and the wait was that timeout.
    slow = {**hooks_node.env, "HTTP_PORT": str(devstack.free_ports(1)[0]), "WEBHOOK_TIMEOUT_S": "1"}
    start_http(start_mode, slow)
    receiver.behaviours["ops"] = "hang"
    late = call(f"http://127.0.0.1:{slow['HTTP_PORT']}", "POST", path, hooks_node.admin_key)
    receiver.release.set()
    assert late.status == 200 and (late.data["status_code"], late.data["error"]) == (None, "no answer within 1 s")
    assert 1000 <= late.data["duration_ms"] < 5000
    # The same address guard as every delivery: a node that allows no private targets does not call loopback.
    strict = {**hooks_node.env, "HTTP_PORT": str(devstack.free_ports(1)[0]), "WEBHOOK_ALLOW_PRIVATE_TARGETS": "false"}
    start_http(start_mode, strict)
    arrived = len(receiver.arrivals)
    guarded = call(f"http://127.0.0.1:{strict['HTTP_PORT']}", "POST", path, hooks_node.admin_key).data
    assert guarded["status_code"] is None and guarded["error"].startswith("refused target:"), guarded
    assert "loopback" in guarded["error"] and len(receiver.arrivals) == arrived

    # The record: filtered by the documented statuses (and the node's own names), by time, a page at a time.
    def listed(query: str) -> list[tuple[str, int | None]]:
        reply = call(hooks_node.url, "GET", f"/v1/webhooks/{hook['id']}/deliveries?{query}", hooks_node.admin_key)
        assert reply.status == 200, reply.body
        return [(item["status"], item["last_status_code"]) for item in reply.data["items"]]

    assert listed("status=success") == [("success", 200), ("success", 200)] == listed("status=delivered")
    assert listed("status=failed") == [("failed", None), ("failed", None), ("failed", 401), ("failed", 500)]
    assert listed("status=pending") == [] == listed("status=paused")
    assert listed(f"since={quote(between.isoformat())}") == [("failed", None), ("failed", None), ("success", 200)]
    assert listed("status=success&since=" + between.isoformat().replace("+00:00", "Z")) == [("success", 200)]
    assert listed("since=2999-01-01T00:00:00%2B02:00") == []
    first = call(hooks_node.url, "GET", f"/v1/webhooks/{hook['id']}/deliveries?status=failed&limit=3",
                 hooks_node.admin_key).data
    assert len(first["items"]) == 3 and first["pagination"]["has_more"]
    rest = listed(f"status=failed&limit=3&cursor={first['pagination']['next_cursor']}")
    assert rest == [("failed", 500)]
    for query, field in (("status=succeeded", "status"), ("since=yesterday", "since"), ("limit=0", "limit"),
                         ("sort=asc", "sort")):
        reply = call(hooks_node.url, "GET", f"/v1/webhooks/{hook['id']}/deliveries?{query}", hooks_node.admin_key)
        assert field in problems(reply), (query, reply.body)
    # Tests count toward neither retries nor auto-disable.
    assert call(hooks_node.url, "GET", f"/v1/webhooks/{hook['id']}", hooks_node.admin_key).data[
        "consecutive_failures"] == 0


async def test_inactive_pauses_and_active_resumes(hooks_node: Node, receiver: Receiver):
    settings = load_settings(hooks_node.env, env_file=None)
    hook = subscribe(hooks_node, receiver, "ops", ["request.completed"], status="inactive")
    assert hook["status"] == "inactive"
    owner = {"partner_id": hook["partner_id"], "tenant_id": hook["tenant_id"]}
    put = f"/v1/webhooks/{hook['id']}"
    clock = Clock(utc_now() + timedelta(seconds=1))
    async with engine_for(hooks_node.env) as engine, delivery.new_session(settings) as session:
        async with engine.begin() as conn:
            assert await outbox.emit_usage(conn, [usage(owner)]) == 0  # inactive: nothing is queued for it
        assert call(hooks_node.url, "PUT", put, hooks_node.admin_key, {"status": "active"}).data["status"] == "active"
        async with engine.begin() as conn:
            assert await outbox.emit_usage(conn, [usage(owner)]) == 1
        # "disabled", the node's earlier name for switching it off, is taken as inactive; the node's own
        # `disabled` (with a reason) stays the automatic state.
        off = call(hooks_node.url, "PUT", put, hooks_node.admin_key, {"status": "disabled"}).data
        assert (off["status"], off["disabled_reason"]) == ("inactive", None)
        [item] = deliveries(hooks_node, hook["id"])
        assert (item["status"], item["paused"]) == ("pending", True)
        assert await delivery.deliver_due(engine, settings, session, clock) == 0
        assert call(hooks_node.url, "PUT", put, hooks_node.admin_key, {"status": "active"}).data["status"] == "active"
        assert await delivery.deliver_due(engine, settings, session, clock) == 1
    [arrival] = receiver.arrived("ops")
    assert arrival.signature_valid and arrival.event["event_type"] == "request.completed"
    [item] = deliveries(hooks_node, hook["id"])
    assert (item["status"], item["paused"], item["attempts"]) == ("success", False, 1)


def test_request_events_arrive_after_real_inference(migrated_env, start_mode, tmp_path: Path, receiver: Receiver):
    env = {**migrated_env, **ALLOW_PRIVATE}
    fake = FakeBackend().start()
    try:
        with serving(env, tmp_path, [backend("b-ok", fake, "ok"), backend("b-down", fake, "fail")],
                     [chat_model("acme/chat", [("b-ok", 1, 1)]), chat_model("acme/broken", [("b-down", 1, 1)])]
                     ) as gateway:
            node = Caller(gateway.url, create_key(env, "tenant_admin"))
            both = subscribe(node, receiver, "both", ["request.completed", "request.failed"])
            subscribe(node, receiver, "failures", ["request.failed"])
            start_worker(start_mode, env, flush_interval_s=1)
            body = {"model": "acme/chat", "messages": [{"role": "user", "content": "hi"}]}
            status, headers, _ = http_call("POST", gateway.url + "/v1/inference/chat", gateway.key, body)
            assert status == 200
            ok_request = headers["X-Request-ID"]
            status, headers, answer = http_call("POST", gateway.url + "/v1/inference/chat", gateway.key,
                                                {**body, "model": "acme/broken"})
            assert status >= 500, answer
            failed_request = headers["X-Request-ID"]
            receiver.wait_for(lambda: len(receiver.arrived("both")) == 2 and len(receiver.arrived("failures")) == 1,
                              "request events delivered")
    finally:
        fake.stop()
    by_type = {a.event["event_type"]: a.event for a in receiver.arrived("both")}
    assert all(a.signature_valid for a in receiver.arrivals)
    completed, failed = by_type["request.completed"], by_type["request.failed"]
    assert completed["payload"]["request_id"] == ok_request and completed["payload"]["model"] == "acme/chat"
    assert completed["payload"]["tokens_in"] > 0 and completed["tenant_id"] == both["tenant_id"]
    assert failed["payload"]["request_id"] == failed_request and failed["payload"]["status"] == "error"
    assert failed["payload"]["error_code"] == json.loads(answer)["error"]["code"]
    assert receiver.arrived("failures")[0].event == failed  # the same event, to each subscriber


async def test_a_replayed_flush_stores_each_request_event_once(hooks_node: Node, receiver: Receiver):
    subscribe(hooks_node, receiver, "all", ["request.completed", "request.failed"])
    other = tenant(hooks_node.url, hooks_node.admin_key, "quiet")  # no webhook: no events
    [own] = call(hooks_node.url, "GET", "/v1/tenants?limit=100", hooks_node.admin_key).data["items"][-1:]
    default = {"partner_id": own["partner_id"], "tenant_id": own["id"]}
    assert own["slug"] == "default"
    records = [usage(default), usage(default), usage({"partner_id": other["partner_id"], "tenant_id": other["id"]})]
    async with ledger_for(hooks_node.env) as ledger:
        lock = ledger.redis.lock(flush.FLUSH_LOCK_KEY, timeout=30)
        assert await lock.acquire()
        for record in records:
            await ledger.accounting.record(record)
        await flush.flush_buffer(ledger.engine, ledger.redis, lock)
        for record in records[:2]:  # the same records buffered again, as after a flush that died before trimming
            await ledger.accounting.record(record)
        await flush.flush_buffer(ledger.engine, ledger.redis, lock)
        async with ledger.engine.connect() as conn:
            assert await conn.scalar(select(func.count()).select_from(webhook_events)) == 2
            assert await conn.scalar(select(func.count()).select_from(webhook_deliveries)) == 2
            tenants = set((await conn.scalars(select(webhook_events.c.tenant_id))).all())
    assert tenants == {own["id"]}


async def test_request_events_of_usage_written_without_redis(hooks_node: Node, receiver: Receiver):
    """With Redis down, usage goes to MariaDB directly (no flush will see it): its events go with it."""
    hook = subscribe(hooks_node, receiver, "direct", ["request.completed"])
    settings = load_settings(hooks_node.env, env_file=None)
    dead_redis = Redis.from_url(f"redis://127.0.0.1:{devstack.free_ports(1)[0]}")
    async with engine_for(hooks_node.env) as engine, delivery.new_session(settings) as session:
        accounting = Accounting(settings, engine, dead_redis, InvalidationBus())
        record = usage({"partner_id": hook["partner_id"], "tenant_id": hook["tenant_id"]})
        await accounting.record(record)
        assert await delivery.deliver_due(engine, settings, session, Clock(utc_now() + timedelta(seconds=1))) == 1
    await dead_redis.aclose()
    [arrival] = receiver.arrived("direct")
    assert arrival.signature_valid and arrival.event["payload"]["request_id"] == record.request_id


class Clock:
    """The time the delivery code sees; moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


async def hook_row(engine: AsyncEngine, webhook_id: str) -> dict[str, Any]:
    async with engine.connect() as conn:
        return dict((await conn.execute(select(webhooks).where(webhooks.c.id == webhook_id))).mappings().one())


async def delivery_rows(engine: AsyncEngine, webhook_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as conn:
        return [dict(row) for row in (await conn.execute(select(webhook_deliveries).where(
            webhook_deliveries.c.webhook_id == webhook_id))).mappings()]


async def test_retry_schedule_max_retries_and_purge(hooks_node: Node, receiver: Receiver):
    settings = load_settings(hooks_node.env, env_file=None)
    receiver.behaviours.update(five="fail", two="fail")
    five = subscribe(hooks_node, receiver, "five", ["request.failed"])
    two = subscribe(hooks_node, receiver, "two", ["request.failed"], max_retries=2)
    for hook in (five, two):
        await queue(hooks_node.env, hook)
    clock = Clock(utc_now() + timedelta(seconds=1))
    async with engine_for(hooks_node.env) as engine, delivery.new_session(settings) as session:
        assert await delivery.deliver_due(engine, settings, session, clock) == 2
        for wait_s in (30, 120, 600, 1800, 7200):
            clock.advance(wait_s - 1)
            assert await delivery.deliver_due(engine, settings, session, clock) == 0, f"sent before {wait_s} s"
            clock.advance(1)
            sent = await delivery.deliver_due(engine, settings, session, clock)
            assert sent == (2 if wait_s <= 120 else 1), wait_s
        clock.advance(86400)
        assert await delivery.deliver_due(engine, settings, session, clock) == 0
        assert len(receiver.arrived("five")) == 6 and len(receiver.arrived("two")) == 3
        assert all(a.signature_valid for a in receiver.arrivals)
        assert [a.headers["X-ScaiGrid-Delivery-Attempt"] for a in receiver.arrived("five")] == list("123456")
        [row] = await delivery_rows(engine, five["id"])
        assert (row["status"], row["attempts"], row["last_status_code"]) == ("failed", 6, 500)
        assert (await hook_row(engine, five["id"]))["consecutive_failures"] == 6
        [listed] = deliveries(hooks_node, five["id"])
        assert (listed["status"], listed["next_attempt_at"], listed["last_error"]) == (
            "failed", None, "HTTP 500 Internal Server Error")

        # A success resets the count of consecutive failures.
        receiver.behaviours["five"] = "ok"
        await queue(hooks_node.env, five)
        clock.now = utc_now() + timedelta(seconds=1)
        assert await delivery.deliver_due(engine, settings, session, clock) == 1
        assert (await hook_row(engine, five["id"]))["consecutive_failures"] == 0

        # Housekeeping: finished deliveries and their events go after the retention; pending ones stay.
        await queue(hooks_node.env, two)
        assert await delivery.purge(engine, clock.now + timedelta(days=1)) > 0
        async with engine.connect() as conn:
            left = (await conn.execute(select(webhook_deliveries.c.status))).scalars().all()
            assert left == ["pending"]
            assert await conn.scalar(select(func.count()).select_from(webhook_events)) == 1


async def test_private_targets_are_refused_at_delivery_time(hooks_node: Node, receiver: Receiver):
    """A webhook saved while allowed (or whose name resolves elsewhere later) is checked again on each attempt."""
    strict = load_settings({**hooks_node.env, "WEBHOOK_ALLOW_PRIVATE_TARGETS": "false"}, env_file=None)
    by_ip = subscribe(hooks_node, receiver, "ip", ["request.failed"])
    reply = call(hooks_node.url, "POST", "/v1/webhooks", hooks_node.admin_key,
                 {"url": receiver.url("name", host="localhost"), "events": ["request.failed"]})
    receiver.secrets["name"] = reply.data["secret"]
    for hook in (by_ip, reply.data):
        await queue(hooks_node.env, hook)
    clock = Clock(utc_now() + timedelta(seconds=1))
    async with engine_for(hooks_node.env) as engine, delivery.new_session(strict) as session:
        assert await delivery.deliver_due(engine, strict, session, clock) == 2
        for hook_id in (by_ip["id"], reply.data["id"]):
            [row] = await delivery_rows(engine, hook_id)
            assert row["status"] == "pending" and row["attempts"] == 1
            assert row["last_error"].startswith("refused target:") and "loopback" in row["last_error"], row
    assert receiver.arrivals == []


async def test_an_answer_later_than_the_timeout_is_a_failed_attempt(hooks_node: Node, receiver: Receiver):
    settings = load_settings({**hooks_node.env, "WEBHOOK_TIMEOUT_S": "1"}, env_file=None)
    receiver.behaviours["late"] = "hang"
    hook = subscribe(hooks_node, receiver, "late", ["request.failed"])
    await queue(hooks_node.env, hook)
    clock = Clock(utc_now() + timedelta(seconds=1))
    async with engine_for(hooks_node.env) as engine, delivery.new_session(settings) as session:
        assert await delivery.deliver_due(engine, settings, session, clock) == 1
        [row] = await delivery_rows(engine, hook["id"])
    receiver.release.set()
    assert (row["status"], row["last_error"], row["last_status_code"]) == ("pending", "no answer within 1 s", None)
    assert row["next_attempt_at"] == clock.now + timedelta(seconds=30) and row["lease_until"] is None


async def test_auto_disable_after_50_consecutive_failures(hooks_node: Node, receiver: Receiver):
    settings = load_settings(hooks_node.env, env_file=None)
    assert settings.webhooks.auto_disable_after == 50  # the default
    receiver.behaviours["flaky"] = "fail"
    flaky = subscribe(hooks_node, receiver, "flaky", ["request.completed"], max_retries=0)
    subscribe(hooks_node, receiver, "watcher", ["webhook.auto_disabled"])
    default = {"partner_id": flaky["partner_id"], "tenant_id": flaky["tenant_id"]}
    clock = Clock(utc_now() + timedelta(seconds=1))
    async with engine_for(hooks_node.env) as engine, delivery.new_session(settings) as session:
        async with engine.begin() as conn:
            assert await outbox.emit_usage(conn, [usage(default) for _ in range(50)]) == 50
        while await delivery.deliver_due(engine, settings, session, clock):
            pass
        hook = await hook_row(engine, flaky["id"])
        assert (hook["status"], hook["consecutive_failures"]) == ("disabled", 50)
        assert hook["disabled_reason"].startswith("50 consecutive failed deliveries")
        assert len(receiver.arrived("flaky")) == 50
        [notice] = receiver.arrived("watcher")
        assert notice.signature_valid and notice.event["event_type"] == "webhook.auto_disabled"
        assert notice.event["payload"]["webhook_id"] == flaky["id"]

        # Disabled: new events are not queued for it, and nothing more is sent.
        async with engine.begin() as conn:
            assert await outbox.emit_usage(conn, [usage(default)]) == 0
        clock.advance(86400)
        assert await delivery.deliver_due(engine, settings, session, clock) == 0

    shown = call(hooks_node.url, "GET", f"/v1/webhooks/{flaky['id']}", hooks_node.admin_key).data
    assert shown["status"] == "disabled" and shown["disabled_reason"] == hook["disabled_reason"]
    enabled = call(hooks_node.url, "PUT", f"/v1/webhooks/{flaky['id']}", hooks_node.admin_key, {"status": "active"})
    assert (enabled.data["status"], enabled.data["consecutive_failures"], enabled.data["disabled_reason"]) == (
        "active", 0, None)


def test_a_worker_killed_mid_delivery_loses_nothing(hooks_node: Node, start_mode, receiver: Receiver):
    fast = {**hooks_node.env, "WEBHOOK_TIMEOUT_S": "2"}  # lease: 2 s + 5 s slack
    receiver.behaviours["slow"] = "hang"
    hook = subscribe(hooks_node, receiver, "slow", ["request.failed"])
    first = start_worker(start_mode, fast)
    event_id = asyncio.run(queue(hooks_node.env, hook))
    receiver.wait_for(lambda: len(receiver.arrived("slow")) == 1, "first attempt hanging")
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(10)
    receiver.behaviours["slow"] = "ok"
    receiver.release.set()
    start_worker(start_mode, fast)
    receiver.wait_for(lambda: deliveries(hooks_node, hook["id"])[0]["status"] == "success", "redelivered",
                      timeout_s=30)
    arrivals = receiver.arrived("slow")
    # Not before the first attempt's lease (claimed just before it arrived) ran out.
    assert arrivals[1].at_s - arrivals[0].at_s > delivery.lease_s(load_settings(fast, env_file=None)) - 1
    assert [a.event_id for a in arrivals] == [event_id, event_id]
    assert [a.headers["X-ScaiGrid-Delivery-Attempt"] for a in arrivals] == ["1", "2"]
    assert deliveries(hooks_node, hook["id"])[0]["attempts"] == 2


def test_two_workers_never_send_the_same_attempt(hooks_node: Node, start_mode, receiver: Receiver):
    receiver.behaviours["busy"] = "slow-500"  # each batch takes a while: both workers' claims meet
    hook = subscribe(hooks_node, receiver, "busy", ["request.completed"])
    default = {"partner_id": hook["partner_id"], "tenant_id": hook["tenant_id"]}
    workers = [start_worker(start_mode, {**hooks_node.env, "WORKER_METRICS_PORT": str(port)})
               for port in devstack.free_ports(2)]
    for worker in workers:
        worker.wait_for(lambda w=worker: any(line.get("event") == "worker_started" for line in w.log_lines()),
                        what="worker started")

    async def emit() -> None:
        async with engine_for(hooks_node.env) as engine, engine.begin() as conn:
            await outbox.emit_usage(conn, [usage(default) for _ in range(60)])

    asyncio.run(emit())
    receiver.wait_for(lambda: len({a.event_id for a in receiver.arrived("busy")}) == 60, "all arrived",
                      timeout_s=40)
    receiver.wait_for(lambda: {d["status"] for d in deliveries(hooks_node, hook["id"])} == {"success"},
                      "all recorded as delivered")
    # Each claim counts an attempt and a delivered row is never claimed again: a delivered row with one attempt
    # was sent once, and nothing of it can still arrive.
    assert [d["attempts"] for d in deliveries(hooks_node, hook["id"])] == [1] * 60
    ids = [a.event_id for a in receiver.arrived("busy")]
    assert len(ids) == 60 == len(set(ids))
    assert all(a.headers["X-ScaiGrid-Delivery-Attempt"] == "1" for a in receiver.arrived("busy"))
    for worker in workers:
        assert worker.stop() == 0
    # Both took part: the claims really did meet.
    sent = [sum(line.get("event") == "webhook_delivered" for line in worker.log_lines()) for worker in workers]
    assert sum(sent) == 60 and min(sent) > 0, sent
    # Stopped cleanly: no failed run, and each worker's delivery client closed (aiohttp reports one left open).
    lines = [line for worker in workers for line in worker.log_lines()]
    assert not [line for line in lines if line.get("event") == "job_failed" or "Unclosed" in str(line)]


async def test_budget_events_are_emitted_once(hooks_node: Node, receiver: Receiver):
    settings: Settings = load_settings(hooks_node.env, env_file=None)
    hook = subscribe(hooks_node, receiver, "money", ["budget.soft_limit_reached", "budget.hard_limit_reached"])
    reply = call(hooks_node.url, "POST", "/v1/accounting/budgets", hooks_node.admin_key, {
        "scope": "tenant", "scope_id": hook["tenant_id"], "period": "monthly", "limit_type": "requests",
        "limit_value": "4", "hard_action": "notify", "soft_limit_pct": "0.5"})
    assert reply.status == 201, reply.body
    budget_id = reply.data["id"]
    owner = {"partner_id": hook["partner_id"], "tenant_id": hook["tenant_id"]}
    async with ledger_for(hooks_node.env) as ledger, delivery.new_session(settings) as session:
        for _ in range(7):
            await ledger.accounting.record(usage(owner))
        await ledger.accounting.drain()

        async def stored_types() -> list[str]:
            async with ledger.engine.connect() as conn:
                return sorted((await conn.scalars(select(webhook_events.c.event_type))).all())

        async def both_stored() -> bool:
            return await stored_types() == ["budget.hard_limit_reached", "budget.soft_limit_reached"]

        await eventually_async(both_stored, "budget events stored")
        clock = Clock(utc_now() + timedelta(seconds=1))
        assert await delivery.deliver_due(ledger.engine, settings, session, clock) == 2
    arrivals = receiver.arrived("money")
    assert sorted(a.event["event_type"] for a in arrivals) == ["budget.hard_limit_reached",
                                                               "budget.soft_limit_reached"]
    assert all(a.signature_valid and a.event["payload"]["budget_id"] == budget_id for a in arrivals)
