"""Usage accounting end to end: `record` buffers in Redis, a real worker flushes to MariaDB (exactly once, even
when killed -9 mid-flush), and the usage API shows each caller what it may see; /health/detailed."""

import asyncio
from decimal import Decimal
from urllib.parse import urlencode

from redis.asyncio import Redis

from appliance import devstack
from scaigrid.accounting import flush
from scaigrid.accounting import usage as usage_codec
from scaigrid.accounting.service import Accounting
from scaigrid.cache import InvalidationBus
from scaigrid.settings import load_settings
from tests.accounting_fixtures import Ledger, ledger_fixture, start_worker, usage  # noqa: F401
from tests.identity import call, tenant, users_with_keys
from tests.support.waiting import eventually_async


def owner_of(node, key: str) -> dict[str, str]:
    """partner, tenant and user of a key, from the key's own view of itself."""
    [own] = call(node.url, "GET", "/v1/api-keys", key).data["items"]
    [found] = [t for t in call(node.url, "GET", "/v1/tenants?limit=100", node.admin_key).data["items"]
               if t["id"] == own["tenant_id"]]
    return {"partner_id": found["partner_id"], "tenant_id": own["tenant_id"], "user_id": own["user_id"]}


async def test_usage_flows_to_the_api_and_each_caller_sees_only_its_share(node, start_mode, ledger: Ledger):
    acme = tenant(node.url, node.admin_key, "acme")
    globex = tenant(node.url, node.admin_key, "globex")
    (_, alice), (_, bob), (_, acme_admin) = users_with_keys(node, acme, "tenant_user", "tenant_user", "tenant_admin")
    (_, globex_admin), (_, carol), (_, partner_viewer) = users_with_keys(
        node, globex, "tenant_admin", "tenant_user", "partner_viewer")
    owners = {name: owner_of(node, key) for name, key in (("alice", alice), ("bob", bob), ("carol", carol))}
    records = [
        usage(owners["alice"], cost="0.000000000001", model="m/a", tokens_in=1, tokens_out=2),
        usage(owners["alice"], cost="12.345678901234", model="m/b", tokens_in=1000, tokens_out=1),
        usage(owners["alice"], cost="0.1", model="m/a", tokens_in=3, tokens_out=4),
        usage(owners["bob"], cost="0.2", model="m/a", tokens_in=5, tokens_out=6, backend_id="mock-2"),
        usage(owners["carol"], cost="7", model="m/c", tokens_in=7, tokens_out=8),
    ]
    for record in records:
        await ledger.accounting.record(record)
    assert await ledger.stored() == (0, Decimal(0), 0)  # buffered in Redis, not yet in MariaDB

    worker = start_worker(start_mode, node.env)

    def listed(token: str, **params: object) -> list[dict[str, object]]:
        reply = call(node.url, "GET", f"/v1/accounting/usage?{urlencode(params)}", token)
        assert reply.status == 200, reply.body
        return list(reply.data["items"])

    await eventually_async(lambda: ledger.has_rows(5), "usage flushed")
    assert len(listed(node.admin_key)) == 5
    ids = {name: {r.request_id for r in records if r.user_id == owners[name]["user_id"]} for name in owners}
    assert {item["request_id"] for item in listed(alice)} == ids["alice"]  # view_own: the caller's own
    assert {item["request_id"] for item in listed(acme_admin)} == ids["alice"] | ids["bob"]  # view_tenant
    assert {item["request_id"] for item in listed(globex_admin)} == ids["carol"]  # not acme's
    assert listed(globex_admin, tenant_id=acme["id"]) == []  # asking for it does not help
    assert listed(alice, user_id=owners["bob"]["user_id"]) == []
    assert len(listed(partner_viewer)) == 5  # view_partner: every tenant of its partner

    [first] = listed(alice, model="m/b")
    assert first["cost"] == "12.345678901234" and (first["tokens_in"], first["tokens_out"]) == (1000, 1)
    assert first["tenant_id"] == acme["id"] and first["backend_id"] == "mock-1" and first["created_at"].endswith("Z")

    # Newest first, in pages, none lost or repeated.
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        body = call(node.url, "GET", f"/v1/accounting/usage?{urlencode(params)}", node.admin_key).body
        seen += [item["request_id"] for item in body["data"]["items"]]
        if not body["data"]["pagination"]["has_more"]:
            break
        cursor = body["data"]["pagination"]["next_cursor"]
    assert sorted(seen) == sorted(r.request_id for r in records) and len(seen) == 5
    assert seen == [r.request_id for r in sorted(records, key=lambda r: r.created_at_unix, reverse=True)]

    def summary(token: str, group_by: str) -> dict[str, object]:
        reply = call(node.url, "GET", f"/v1/accounting/usage/summary?group_by={group_by}", token)
        assert reply.status == 200, reply.body
        return dict(reply.data)

    by_model = summary(acme_admin, "model")
    assert by_model["items"] == [
        {"model": "m/b", "requests": 1, "tokens_in": 1000, "tokens_out": 1, "cost": "12.345678901234"},
        {"model": "m/a", "requests": 3, "tokens_in": 9, "tokens_out": 12, "cost": "0.300000000001"},
    ]
    assert by_model["total"] == {"requests": 4, "tokens_in": 1009, "tokens_out": 13, "cost": "12.645678901235"}
    by_tenant = summary(node.admin_key, "tenant")
    assert {item["tenant_id"]: item["cost"] for item in by_tenant["items"]} == {
        acme["id"]: "12.645678901235", globex["id"]: "7"}
    assert {item["backend_id"] for item in summary(acme_admin, "backend")["items"]} == {"mock-1", "mock-2"}
    assert [item["user_id"] for item in summary(alice, "user")["items"]] == [owners["alice"]["user_id"]]

    for query, field in (("start=yesterday", "start"), ("limit=1001", "limit"), ("limit=0", "limit"),
                         ("cursor=garbage", "cursor")):
        reply = call(node.url, "GET", f"/v1/accounting/usage?{query}", node.admin_key)
        assert (reply.status, reply.code) == (422, "VALIDATION_ERROR"), query
        assert [d["field"] for d in reply.body["error"]["details"]] == [field]
    reply = call(node.url, "GET", "/v1/accounting/usage/summary?group_by=colour", node.admin_key)
    assert (reply.status, reply.body["error"]["details"][0]["field"]) == (422, "group_by")
    assert listed(node.admin_key, start="2999-01-01T00:00:00Z") == []
    assert len(listed(node.admin_key, start="2000-01-01", end="2999-01-01T00:00:00+02:00")) == 5

    # The operator's view of the node: dependencies, schemas, the worker's heartbeat.
    reply = call(node.url, "GET", "/health/detailed", node.admin_key)
    health = reply.body
    assert reply.status == 200 and health["status"] == "ok", health
    for dependency in ("database", "redis"):
        assert health["dependencies"][dependency]["status"] == "ok"
        assert isinstance(health["dependencies"][dependency]["latency_ms"], float)
    assert [(m["id"], m["status"]) for m in health["modules"]] == [("core", "ok"), ("scaibunker", "ok")]
    assert health["modules"][0]["revision"] == health["modules"][0]["head"]
    assert len(health["workers"]) == 1 and health["workers"][0]["heartbeat_age_s"] < 30
    assert call(node.url, "GET", "/health/detailed", alice).status == 403
    assert call(node.url, "GET", "/health/detailed").status == 401
    assert worker.stop() == 0
    health = call(node.url, "GET", "/health/detailed", node.admin_key).body
    assert (health["status"], health["workers"]) == ("degraded", [])  # nobody flushes usage now


async def test_a_worker_killed_mid_flush_loses_and_doubles_nothing(migrated_env, start_mode, ledger: Ledger):
    owner = {"partner_id": "prt_x", "tenant_id": "ten_x", "user_id": "usr_x"}
    count = 10_000
    records = [usage(owner, cost=f"0.{i:012d}", tokens_in=i % 7, tokens_out=i % 11) for i in range(1, count + 1)]
    for start in range(0, count, 500):
        await asyncio.gather(*(ledger.accounting.record(r) for r in records[start:start + 500]))  # 500 in flight
    assert await ledger.redis.llen(usage_codec.BUFFER_KEY) == count

    async def drained() -> bool:
        return await ledger.redis.llen(usage_codec.BUFFER_KEY) == 0

    async def flushing() -> bool:
        return (await ledger.stored())[0] > 0

    worker = start_worker(start_mode, migrated_env)
    await eventually_async(flushing, "the flush started")
    worker.process.kill()  # SIGKILL: no cleanup, no lock release, possibly between commit and trim
    worker.process.wait()
    assert (await ledger.stored())[0] < count, "the flush finished before the kill; nothing was tested"
    assert not await drained()

    start_worker(start_mode, migrated_env)  # waits out the dead worker's lock (5 s at most)
    await eventually_async(drained, "the buffer drained", timeout_s=40)
    expected_cost = sum((r.cost for r in records), Decimal(0))
    expected_tokens = sum(r.tokens_in + r.tokens_out for r in records)
    assert await ledger.stored() == (count, expected_cost, expected_tokens)

    # A replay of already-stored records (a kill between commit and trim) changes nothing; a new one is added;
    # an entry that is no usage record is put aside instead of blocking the buffer.
    await ledger.redis.rpush(usage_codec.BUFFER_KEY, *(usage_codec.encode(r) for r in records[:3]), "{garbage")
    await ledger.accounting.record(usage(owner, cost="1"))
    await eventually_async(drained, "the replay flushed")
    assert await ledger.stored() == (count + 1, expected_cost + 1, expected_tokens + 30)
    assert await ledger.redis.lrange(flush.UNDECODABLE_KEY, 0, -1) == [b"{garbage"]


async def test_without_redis_usage_goes_straight_to_mariadb(migrated_env, ledger: Ledger):
    settings = load_settings(migrated_env, env_file=None)
    nowhere = Redis.from_url(f"redis://127.0.0.1:{devstack.free_port()}/0", socket_connect_timeout=1)
    try:
        cut_off = Accounting(settings, ledger.engine, nowhere, InvalidationBus())
        await cut_off.record(usage({"partner_id": "p", "tenant_id": "t"}, cost="0.5"))
    finally:
        await nowhere.aclose()
    assert await ledger.stored() == (1, Decimal("0.5"), 30)
    assert await ledger.redis.llen(usage_codec.BUFFER_KEY) == 0
