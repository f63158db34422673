"""Usage accounting end to end: `record` buffers in Redis, a real worker flushes to MariaDB (exactly once, even
when killed -9 mid-flush), and the usage API shows each caller what it may see; /health/detailed."""

import asyncio
import csv
import io
import json
import re
import time
import urllib.error
import urllib.request
from decimal import Decimal
from urllib.parse import urlencode

from redis.asyncio import Redis

from appliance import devstack
from scaigrid.accounting import flush, routes
from scaigrid.accounting import usage as usage_codec
from scaigrid.accounting.service import Accounting
from scaigrid.cache import InvalidationBus
from scaigrid.settings import load_settings
from tests.accounting_fixtures import Ledger, ledger_fixture, start_worker, usage  # noqa: F401
from tests.identity import call, tenant, users_with_keys
from tests.support.env import create_key
from tests.support.processes import start_http
from tests.support.waiting import eventually_async

SUMMARY_KEYS = ("group_key", "request_count", "input_tokens", "output_tokens", "total_tokens", "total_cost",
                "backend_cost")


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
    assert first["id"] == first["request_id"] and first["latency_ms"] == 12 and first["backend_cost"] == "0"
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
    assert [{key: item[key] for key in SUMMARY_KEYS} for item in by_model["items"]] == [
        {"group_key": "m/b", "request_count": 1, "input_tokens": 1000, "output_tokens": 1, "total_tokens": 1001,
         "total_cost": "12.345678901234", "backend_cost": "0"},
        {"group_key": "m/a", "request_count": 3, "input_tokens": 9, "output_tokens": 12, "total_tokens": 21,
         "total_cost": "0.300000000001", "backend_cost": "0"},
    ]
    # The node's former names stay, for its existing clients.
    assert {key: by_model["items"][0][key] for key in ("model", "requests", "tokens_in", "tokens_out", "cost")} == {
        "model": "m/b", "requests": 1, "tokens_in": 1000, "tokens_out": 1, "cost": "12.345678901234"}
    assert {key: by_model["total"][key] for key in ("request_count", "total_tokens", "total_cost", "requests")} == {
        "request_count": 4, "total_tokens": 1022, "total_cost": "12.645678901235", "requests": 4}
    by_tenant = summary(node.admin_key, "tenant")
    assert {item["group_key"]: item["total_cost"] for item in by_tenant["items"]} == {
        acme["id"]: "12.645678901235", globex["id"]: "7"}
    assert {item["group_key"] for item in summary(acme_admin, "backend")["items"]} == {"mock-1", "mock-2"}
    assert [item["group_key"] for item in summary(alice, "user")["items"]] == [owners["alice"]["user_id"]]

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

    # An export of them all, read from MariaDB a page at a time: each once, oldest first.
    start_http(start_mode, migrated_env)
    status, _, body = download(f"http://127.0.0.1:{migrated_env['HTTP_PORT']}", "/v1/accounting/export?format=ndjson",
                               create_key(migrated_env, "super_admin"))
    exported = [json.loads(line) for line in body.decode().splitlines()]
    assert status == 200 and len(exported) == count + 1 > 10 * routes.EXPORT_PAGE
    assert {item["id"] for item in exported} == {r.request_id for r in records} | {exported[-1]["id"]}
    assert [item["created_at"] for item in exported] == sorted(item["created_at"] for item in exported)


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


def download(url: str, path: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
    """A GET read whole, whatever it answers: status, headers, body."""
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def test_usage_by_period_and_backend_summed_and_exported(node, start_mode, ledger: Ledger):
    acme = tenant(node.url, node.admin_key, "acme")
    globex = tenant(node.url, node.admin_key, "globex")
    (_, alice), (_, bob), (_, acme_admin) = users_with_keys(node, acme, "tenant_user", "tenant_user", "tenant_admin")
    [(_, carol)] = users_with_keys(node, globex, "tenant_user")
    alice_of, bob_of, carol_of = owner_of(node, alice), owner_of(node, bob), owner_of(node, carol)
    now = time.time()
    records = {
        "now": usage(alice_of, backend_id="b-1", cost="0.1", backend_cost="0.04", tokens_in=1, tokens_out=2),
        "2h": usage(alice_of, backend_id="b-2", cost="0.2", backend_cost="0.05", created_at_unix=now - 2 * 3600),
        "3d": usage(bob_of, backend_id="b-1", cost="0.3", model="m/x,\"quoted\"", created_at_unix=now - 3 * 86400),
        "40d": usage(alice_of, backend_id="b-1", cost="0.4", created_at_unix=now - 40 * 86400),
        "globex": usage(carol_of, backend_id="b-1", cost="9"),
    }
    for record in records.values():
        await ledger.accounting.record(record)
    start_worker(start_mode, node.env)
    await eventually_async(lambda: ledger.has_rows(len(records)), "usage flushed")
    ids = {name: record.request_id for name, record in records.items()}

    def listed(token: str, **params: object) -> set[str]:
        reply = call(node.url, "GET", f"/v1/accounting/usage?{urlencode(params)}", token)
        assert reply.status == 200, reply.body
        return {item["id"] for item in reply.data["items"]}

    acme_ids = {ids[name] for name in ("now", "2h", "3d", "40d")}
    assert listed(acme_admin) == acme_ids
    # ?period=: the last hour, day, week or month up to now.
    assert listed(acme_admin, period="hour") == {ids["now"]}
    assert listed(acme_admin, period="day") == {ids["now"], ids["2h"]}
    assert listed(acme_admin, period="week") == {ids["now"], ids["2h"], ids["3d"]}
    assert listed(acme_admin, period="month") == {ids["now"], ids["2h"], ids["3d"]}
    assert listed(acme_admin, backend_id="b-1") == {ids["now"], ids["3d"], ids["40d"]}
    assert listed(acme_admin, backend_id="b-1", period="day") == {ids["now"]}
    assert listed(alice, period="week") == {ids["now"], ids["2h"]}  # its own, whatever the filter
    reply = call(node.url, "GET", "/v1/accounting/usage?period=year", acme_admin)
    assert (reply.status, [d["field"] for d in reply.body["error"]["details"]]) == (422, ["period"])
    [item] = call(node.url, "GET", "/v1/accounting/usage?period=hour", acme_admin).data["items"]
    assert {key: item[key] for key in ("id", "backend_id", "tokens_in", "tokens_out", "cost", "backend_cost",
                                       "latency_ms", "tenant_id")} == {
        "id": ids["now"], "backend_id": "b-1", "tokens_in": 1, "tokens_out": 2, "cost": "0.1", "backend_cost": "0.04",
        "latency_ms": 12, "tenant_id": acme["id"]}

    # Summaries sum the backend cost too, under the same filters.
    summary = call(node.url, "GET", "/v1/accounting/usage/summary?group_by=backend&period=day", acme_admin).data
    assert (summary["group_by"], summary["period"]) == ("backend", "day")
    assert {row["group_key"]: (row["request_count"], row["total_cost"], row["backend_cost"])
            for row in summary["items"]} == {"b-1": (1, "0.1", "0.04"), "b-2": (1, "0.2", "0.05")}
    assert (summary["total"]["total_cost"], summary["total"]["backend_cost"]) == ("0.3", "0.09")

    # Export: a download of everything in reach under the filters, oldest first.
    status, headers, body = download(node.url, "/v1/accounting/export", acme_admin)
    assert status == 200 and headers["Content-Type"].startswith("text/csv")
    assert re.fullmatch(r'attachment; filename="usage-\d{8}T\d{6}Z\.csv"', headers["Content-Disposition"])
    rows = list(csv.DictReader(io.StringIO(body.decode())))
    assert [row["id"] for row in rows] == [ids[name] for name in ("40d", "3d", "2h", "now")]
    assert rows[1]["model"] == 'm/x,"quoted"' and rows[3]["backend_cost"] == "0.04" and rows[3]["user_id"]
    status, headers, body = download(node.url, "/v1/accounting/export?format=json&backend_id=b-1", acme_admin)
    assert status == 200 and headers["Content-Type"] == "application/json"
    assert [item["id"] for item in json.loads(body)] == [ids["40d"], ids["3d"], ids["now"]]
    status, headers, body = download(
        node.url, f"/v1/accounting/export?{urlencode({'format': 'ndjson', 'start': '2000-01-01'})}", alice)
    assert headers["Content-Type"] == "application/x-ndjson" and headers["Content-Disposition"].endswith('.ndjson"')
    assert [json.loads(line)["id"] for line in body.decode().splitlines()] == [ids["40d"], ids["2h"], ids["now"]]
    # Another tenant's usage is not there, even asked for; an empty export is still well formed.
    assert download(node.url, f"/v1/accounting/export?format=json&tenant_id={globex['id']}", acme_admin)[2] == b"[]"
    [header] = download(node.url, f"/v1/accounting/export?tenant_id={globex['id']}", acme_admin)[2].splitlines()
    assert header.decode().split(",")[:3] == ["id", "request_id", "created_at"]
    assert len(json.loads(download(node.url, "/v1/accounting/export?format=json", node.admin_key)[2])) == 5
    for query, field in (("format=xml", "format"), ("limit=10", "limit"), ("start=soon", "start"),
                         ("period=fortnight", "period")):
        status, _, body = download(node.url, f"/v1/accounting/export?{query}", acme_admin)
        assert status == 422, query
        assert [d["field"] for d in json.loads(body)["error"]["details"]] == [field], query
    assert download(node.url, "/v1/accounting/export", None)[0] == 401
