"""Budgets: the admin API with its reach rules, the counters `record` keeps and `admit` checks (block, notify,
throttle, soft limit), counters completed from MariaDB by the worker, and a chat refused once the budget is spent."""

import logging
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis as sync_redis
from aiohttp.test_utils import make_mocked_request
from prometheus_client import REGISTRY

from scaigrid.accounting.budgets import TOPIC_BUDGETS
from scaigrid.accounting.records import RateState
from scaigrid.appkeys import RATE_STATE
from scaigrid.auth.principal import Principal, RateLimits
from scaigrid.errors import ScaigridError
from tests.accounting_fixtures import Ledger, ledger_fixture, start_worker, usage  # noqa: F401
from tests.backends import FakeBackend, apply, backend, chat_model
from tests.identity import call, tenant, user_with_key, users_with_keys
from tests.support.env import create_key
from tests.support.processes import ModeProcess, start_http
from tests.support.waiting import eventually_async

MONTHLY_COST = {"scope": "tenant", "period": "monthly", "limit_type": "cost", "limit_value": "100.50"}


def test_budgets_are_managed_within_reach_and_validated(node):
    acme = tenant(node.url, node.admin_key, "acme")
    other = tenant(node.url, node.admin_key, "other")
    (alice_id, alice), (_, admin) = users_with_keys(node, acme, "tenant_user", "tenant_admin")
    (_, other_admin), (stranger_id, _) = users_with_keys(node, other, "tenant_admin", "tenant_user")
    [(_, partner_admin)] = users_with_keys(node, acme, "partner_admin")

    created = call(node.url, "POST", "/v1/accounting/budgets", admin, MONTHLY_COST)
    assert created.status == 201, created.body
    budget = created.data
    assert {key: budget[key] for key in ("scope", "scope_id", "tenant_id", "partner_id", "limit_value",
                                         "hard_action", "soft_limit_pct")} == {
        "scope": "tenant", "scope_id": acme["id"], "tenant_id": acme["id"], "partner_id": acme["partner_id"],
        "limit_value": "100.5", "hard_action": "block", "soft_limit_pct": "0.8"}
    assert budget["id"].startswith("bud_")
    assert {key: budget[key] for key in ("cost_limit", "token_limit", "request_limit", "limit_type")} == {
        "cost_limit": "100.5", "token_limit": None, "request_limit": None, "limit_type": "cost"}
    now = datetime.now(UTC)
    assert budget["current"] == {
        "period": now.strftime("%Y-%m"), "period_start": now.strftime("%Y-%m-01T00:00:00Z"),
        "period_end": f"{now.year + now.month // 12}-{now.month % 12 + 1:02d}-01T00:00:00Z", "used": "0",
        "cost": "0", "tokens": 0, "requests": 0, "state": "ok", "enforcement": "none"}
    per_user = call(node.url, "POST", "/v1/accounting/budgets", admin, {
        "scope": "user", "scope_id": alice_id, "period": "daily", "limit_type": "tokens", "limit_value": 5000,
        "hard_action": "notify", "soft_limit_pct": 0.5})
    assert per_user.status == 201 and per_user.data["soft_limit_pct"] == "0.5"
    # What a tenant admin does not reach does not exist for it.
    for body in ({**MONTHLY_COST, "scope": "user", "scope_id": stranger_id},
                 {**MONTHLY_COST, "scope_id": other["id"]}, {**MONTHLY_COST, "scope": "partner"}):
        assert call(node.url, "POST", "/v1/accounting/budgets", admin, body).code == "NOT_FOUND"
    partner_budget = call(node.url, "POST", "/v1/accounting/budgets", partner_admin,
                          {**MONTHLY_COST, "scope": "partner", "period": "total"})
    assert partner_budget.status == 201 and partner_budget.data["tenant_id"] is None

    def listed(token: str) -> set[str]:
        return {item["id"] for item in call(node.url, "GET", "/v1/accounting/budgets", token).data["items"]}

    assert listed(admin) == {budget["id"], per_user.data["id"]}
    assert listed(other_admin) == set()
    assert listed(partner_admin) == {budget["id"], per_user.data["id"], partner_budget.data["id"]}
    assert call(node.url, "GET", f"/v1/accounting/budgets/{budget['id']}", other_admin).code == "NOT_FOUND"
    assert call(node.url, "GET", f"/v1/accounting/budgets/{partner_budget.data['id']}", admin).code == "NOT_FOUND"
    assert call(node.url, "GET", "/v1/accounting/budgets", alice).code == "AUTHZ_PERMISSION_DENIED"

    def problems(method: str, path: str, body: dict[str, Any]) -> set[str]:
        reply = call(node.url, method, path, admin, body)
        assert (reply.status, reply.code) == (422, "VALIDATION_ERROR"), reply.body
        return {detail["field"] for detail in reply.body["error"]["details"]}

    assert problems("POST", "/v1/accounting/budgets", {
        "scope": "galaxy", "period": "yearly", "limit_type": "cost", "limit_value": 1.5, "hard_action": "panic",
        "soft_limit_pct": 1.5, "colour": "red"}) == {
        "scope", "period", "limit_value", "hard_action", "soft_limit_pct", "colour"}
    for bad_value in ("-1", "0", "abc", "1e13", "0.0000000000001", True, None):
        assert problems("POST", "/v1/accounting/budgets", {**MONTHLY_COST, "limit_value": bad_value}) == {
            "limit_value"}, bad_value
    assert problems("POST", "/v1/accounting/budgets", {**MONTHLY_COST, "limit_type": "tokens",
                                                       "limit_value": "1.5"}) == {"limit_value"}
    assert problems("POST", "/v1/accounting/budgets", {**MONTHLY_COST, "scope": "user"}) == {"scope_id"}
    path = f"/v1/accounting/budgets/{budget['id']}"
    assert problems("PUT", path, {"period": "daily", "scope_id": "x"}) == {"period", "scope_id"}
    assert problems("PUT", path, {"limit_type": "requests"}) == {"limit_value"}  # 100.5 requests make no sense

    changed = call(node.url, "PUT", path, admin, {"limit_type": "requests", "limit_value": "250",
                                                   "hard_action": "throttle"})
    assert changed.status == 200, changed.body
    assert (changed.data["limit_type"], changed.data["limit_value"], changed.data["hard_action"],
            changed.data["period"]) == ("requests", "250", "throttle", "monthly")
    assert (changed.data["cost_limit"], changed.data["request_limit"]) == (None, 250)  # one limit, in place of all
    assert call(node.url, "PUT", path, other_admin, {"limit_value": "1"}).code == "NOT_FOUND"
    assert call(node.url, "GET", path, admin).data["limit_value"] == "250"
    assert call(node.url, "DELETE", path, other_admin).code == "NOT_FOUND"
    assert call(node.url, "DELETE", path, admin).data == {"id": budget["id"], "deleted": True}
    assert call(node.url, "GET", path, admin).code == "NOT_FOUND"


async def test_documented_budgets_hold_several_limits_each_enforced(node, ledger: Ledger):
    acme = tenant(node.url, node.admin_key, "acme")
    user_id, _ = user_with_key(node.url, node.admin_key, acme["id"], "tenant_user")
    owner = {"partner_id": acme["partner_id"], "tenant_id": acme["id"], "user_id": user_id}
    principal = principal_of(owner)
    documented = {"scope": "tenant", "scope_id": acme["id"], "period": "daily", "token_limit": 100,
                  "request_limit": "5", "hard_action": "block"}

    def problems(method: str, path: str, body: dict[str, Any]) -> dict[str, str]:
        reply = call(node.url, method, path, node.admin_key, body)
        assert (reply.status, reply.code) == (422, "VALIDATION_ERROR"), reply.body
        return {detail["field"]: detail["message"] for detail in reply.body["error"]["details"]}

    refused = problems("POST", "/v1/accounting/budgets", {**documented, "scope": "group", "scope_id": "grp_1"})
    assert list(refused) == ["scope"] and "not mirrored" in refused["scope"]
    assert list(problems("POST", "/v1/accounting/budgets", {"scope": "tenant", "period": "daily"})) == ["cost_limit"]
    assert set(problems("POST", "/v1/accounting/budgets", {**documented, "limit_type": "tokens",
                                                           "limit_value": "5"})) == {"limit_type", "limit_value"}
    assert set(problems("POST", "/v1/accounting/budgets", {
        **documented, "token_limit": "1.5", "cost_limit": "-1", "soft_limit_pct": 1.01})) == {
        "token_limit", "cost_limit", "soft_limit_pct"}
    assert list(problems("POST", "/v1/accounting/budgets", {
        **documented, "token_limit": None, "request_limit": None})) == ["token_limit"]

    created = await ledger.announced(TOPIC_BUDGETS, lambda: call(
        node.url, "POST", "/v1/accounting/budgets", node.admin_key, documented))
    assert created.status == 201, created.body
    path = f"/v1/accounting/budgets/{created.data['id']}"
    assert {key: created.data[key] for key in ("cost_limit", "token_limit", "request_limit", "hard_action",
                                               "soft_limit_pct", "limit_type", "limit_value")} == {
        "cost_limit": None, "token_limit": 100, "request_limit": 5, "hard_action": "block", "soft_limit_pct": "0.8",
        "limit_type": "tokens", "limit_value": "100"}

    def current() -> dict[str, Any]:
        return dict(call(node.url, "GET", path, node.admin_key).data["current"])

    for _ in range(3):
        await ledger.accounting.record(usage(owner, tokens_in=10, tokens_out=20))
    assert (await admit(ledger, principal))[1] is None
    assert {key: current()[key] for key in ("tokens", "requests", "state", "enforcement")} == {
        "tokens": 90, "requests": 3, "state": "soft_limit", "enforcement": "none"}
    await ledger.accounting.record(usage(owner, tokens_in=10, tokens_out=20))
    refusal = (await admit(ledger, principal))[1]
    assert refusal is not None and refusal.code == "BUDGET_EXCEEDED" and "tokens limit" in refusal.message
    assert {key: current()[key] for key in ("tokens", "requests", "used", "state", "enforcement")} == {
        "tokens": 120, "requests": 4, "used": "120", "state": "exceeded", "enforcement": "blocked"}

    # Without the token limit the request limit still holds: 4 of 5 made, one more, then none.
    lifted = await ledger.announced(TOPIC_BUDGETS, lambda: call(
        node.url, "PUT", path, node.admin_key, {"token_limit": None}))
    assert (lifted.data["token_limit"], lifted.data["request_limit"], lifted.data["limit_type"]) == (
        None, 5, "requests")
    assert (await admit(ledger, principal))[1] is None
    await ledger.accounting.record(usage(owner))
    refusal = (await admit(ledger, principal))[1]
    assert refusal is not None and refusal.code == "BUDGET_EXCEEDED" and "requests limit" in refusal.message
    assert list(problems("PUT", path, {"request_limit": None})) == ["request_limit"]  # a budget keeps one limit
    # The node's former shape sets one limit in place of all.
    former = await ledger.announced(TOPIC_BUDGETS, lambda: call(
        node.url, "PUT", path, node.admin_key, {"limit_type": "cost", "limit_value": "10", "soft_limit_pct": 0}))
    assert {key: former.data[key] for key in ("cost_limit", "token_limit", "request_limit", "soft_limit_pct")} == {
        "cost_limit": "10", "token_limit": None, "request_limit": None, "soft_limit_pct": "0"}
    assert (await admit(ledger, principal))[1] is None
    assert current()["state"] == "soft_limit"  # a soft limit of 0: any use at all


def principal_of(owner: dict[str, str], key_rpm: int = 60) -> Principal:
    return Principal(kind="api_key", role="tenant_user", partner_id=owner["partner_id"], tenant_id=owner["tenant_id"],
                     user_id=owner["user_id"], api_key_id="key_" + owner["user_id"],
                     limits=RateLimits(key=key_rpm, user=1000, tenant=1000, partner=1000))


async def admit(ledger: Ledger, principal: Principal, *, metered: bool = True
                ) -> tuple[RateState, ScaigridError | None]:
    """Admits one request in process as the gateway does: the rate state it sets, and the refusal if any."""
    request = make_mocked_request("POST", "/v1/inference/chat")
    refusal = None
    try:
        await ledger.accounting.admit(request, principal, metered=metered)
    except ScaigridError as exc:
        refusal = exc
    return request[RATE_STATE], refusal


def budget_events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.event for record in caplog.records if getattr(record, "event", "").startswith("budget_")]


def thresholds(threshold: str, action: str) -> float:
    return REGISTRY.get_sample_value("scaigrid_budget_thresholds_total",
                                     {"threshold": threshold, "hard_action": action}) or 0.0


async def test_budgets_block_notify_and_throttle(node, ledger: Ledger, caplog: pytest.LogCaptureFixture):
    acme = tenant(node.url, node.admin_key, "acme")
    user_id, _ = user_with_key(node.url, node.admin_key, acme["id"], "tenant_user")
    owner = {"partner_id": acme["partner_id"], "tenant_id": acme["id"], "user_id": user_id}
    principal = principal_of(owner)
    assert (await admit(ledger, principal))[1] is None  # loads the budgets (none) before any exists

    budget = {"scope": "tenant", "scope_id": acme["id"], "period": "daily", "limit_type": "requests",
              "limit_value": "5"}
    # Each change is announced; the in-process cache drops its definitions before the next admission.
    created = await ledger.announced(
        TOPIC_BUDGETS, lambda: call(node.url, "POST", "/v1/accounting/budgets", node.admin_key, budget))
    budget_path = f"/v1/accounting/budgets/{created.data['id']}"
    soft_before, hard_before = thresholds("soft", "block"), thresholds("hard", "block")
    caplog.set_level(logging.WARNING, "scaigrid.accounting")
    for _ in range(4):
        await ledger.accounting.record(usage(owner))
        assert (await admit(ledger, principal))[1] is None
    assert budget_events(caplog) == ["budget_soft_limit"]  # 4 of 5 is past 80 %: said once
    await ledger.accounting.record(usage(owner))
    state, refused = await admit(ledger, principal)
    assert refused is not None and (refused.code, refused.status) == ("BUDGET_EXCEEDED", 429)
    assert created.data["id"] in refused.message
    assert (state.limit, state.remaining) == (60, 55)  # headers still say where the caller stands
    assert (await admit(ledger, principal, metered=False))[1] is None  # only metered requests are refused
    for _ in range(3):  # requests in flight when it ran out still finish, and are recorded
        await ledger.accounting.record(usage(owner))
    assert budget_events(caplog) == ["budget_soft_limit", "budget_hard_limit"]
    assert "refused" in caplog.records[-1].getMessage()
    assert (thresholds("soft", "block") - soft_before, thresholds("hard", "block") - hard_before) == (1, 1)
    assert call(node.url, "GET", budget_path, node.admin_key).data["current"]["used"] == "8"

    # notify: served; the crossing is reported again because the limit changed.
    assert (await ledger.announced(TOPIC_BUDGETS, lambda: call(node.url, "PUT", budget_path, node.admin_key, {
        "hard_action": "notify", "limit_value": "7"}))).status == 200
    assert (await admit(ledger, principal))[1] is None
    await ledger.accounting.record(usage(owner))
    assert budget_events(caplog)[-1] == "budget_hard_limit" and "still served" in caplog.records[-1].getMessage()

    # throttle: served, under a tenth of the usual rate limits (this key has used 7 of its 6 now).
    await ledger.announced(TOPIC_BUDGETS, lambda: call(node.url, "PUT", budget_path, node.admin_key,
                                                      {"hard_action": "throttle"}))
    state, throttled = await admit(ledger, principal)
    assert throttled is not None and throttled.code == "RATE_LIMITED"
    assert (state.limit, state.remaining) == (6, 0)
    assert (await admit(ledger, principal, metered=False))[0].limit == 60  # not metered: not throttled

    # Once deleted, it limits nothing.
    await ledger.announced(TOPIC_BUDGETS, lambda: call(node.url, "DELETE", budget_path, node.admin_key))
    state, refusal = await admit(ledger, principal)
    assert refusal is None and state.limit == 60


async def test_counters_are_completed_from_mariadb(node, start_mode, ledger: Ledger):
    acme = tenant(node.url, node.admin_key, "acme")
    owner = {"partner_id": acme["partner_id"], "tenant_id": acme["id"], "user_id": None}
    for _ in range(3):
        await ledger.accounting.record(usage(owner, cost="1.25"))
    worker = start_worker(start_mode, node.env)
    await eventually_async(lambda: ledger.has_rows(3), "usage flushed")

    # A budget created now still counts the month's usage so far, once the worker has added it.
    created = call(node.url, "POST", "/v1/accounting/budgets", node.admin_key,
                   {**MONTHLY_COST, "scope_id": acme["id"], "limit_value": "10"})
    path = f"/v1/accounting/budgets/{created.data['id']}"
    assert created.data["current"]["used"] == "0"
    await eventually_async(lambda: _used(node, path, "3.75"), "counter seeded", interval_s=0.25)
    await ledger.accounting.record(usage(owner, cost="0.000000000001"))
    assert call(node.url, "GET", path, node.admin_key).data["current"]["used"] == "3.750000000001"

    # Redis loses everything: the counter restarts empty, then gets all of MariaDB's share back.
    await eventually_async(lambda: ledger.has_rows(4), "usage flushed")
    await ledger.redis.flushall()
    await ledger.accounting.record(usage(owner, cost="2"))
    await eventually_async(lambda: _used(node, path, "5.750000000001"), "counter rebuilt", interval_s=0.25)
    await eventually_async(lambda: ledger.has_rows(5), "usage flushed")
    runs = flush_runs(worker)
    await eventually_async(lambda: flush_runs(worker) >= runs + 2, "two more flushes")  # nothing is counted twice
    assert call(node.url, "GET", path, node.admin_key).data["current"]["used"] == "5.750000000001"


def flush_runs(worker: ModeProcess) -> int:
    """How many usage flushes the worker has logged (its log level is debug)."""
    return sum(line.get("event") == "job_ran" and line.get("job") == "usage_flush" for line in worker.log_lines())


def flushed_records(worker: ModeProcess) -> int:
    return sum(int(str(line["count"])) for line in worker.log_lines() if line.get("event") == "usage_flushed")


async def _used(node: Any, path: str, expected: str) -> bool:
    return bool(call(node.url, "GET", path, node.admin_key).data["current"]["used"] == expected)


def test_a_spent_budget_refuses_chat_with_budget_exceeded(migrated_env, start_mode, tmp_path):
    fake = FakeBackend().start()
    try:
        apply(migrated_env, tmp_path / "catalogue.toml", [
            backend("plain", fake, "ok", cost_input_per_mtok="1.5", cost_output_per_mtok="4")], [
            chat_model("acme/chat", [("plain", 1, 1)], price_input_per_mtok="2.5", price_output_per_mtok="10")])
        start_http(start_mode, migrated_env)
        worker = start_worker(start_mode, migrated_env)
        url = f"http://127.0.0.1:{migrated_env['HTTP_PORT']}"
        admin = create_key(migrated_env, "super_admin")
        key = create_key(migrated_env, "tenant_user")
        created = call(url, "POST", "/v1/accounting/budgets", admin, {
            "scope": "tenant", "period": "daily", "limit_type": "requests", "limit_value": "2"})
        assert created.status == 201, created.body
        chat = {"model": "acme/chat", "messages": [{"role": "user", "content": "hello"}]}
        first = call(url, "POST", "/v1/inference/chat", key, chat)
        assert first.status == 200, first.body
        assert call(url, "POST", "/v1/inference/chat", key, chat).status == 200
        refused = call(url, "POST", "/v1/inference/chat", key, chat)
        assert (refused.status, refused.code) == (429, "BUDGET_EXCEEDED")
        assert len(fake.received) == 2  # the refused one never reached the backend

        worker.wait_for(lambda: flushed_records(worker) == 2, what="both records flushed")
        [latest, _] = call(url, "GET", "/v1/accounting/usage", key).data["items"]
        tokens_in, tokens_out = latest["tokens_in"], latest["tokens_out"]
        assert latest["model"] == "acme/chat" and latest["backend_id"] == "plain" and tokens_in > 0
        expected = (Decimal(tokens_in) * Decimal("2.5") + Decimal(tokens_out) * 10) / 10**6
        assert Decimal(latest["cost"]) == expected
        # What the backend charges, at its own cost fields, next to what the tenant pays.
        assert Decimal(latest["backend_cost"]) == (Decimal(tokens_in) * Decimal("1.5") + tokens_out * 4) / 10**6
        [row] = call(url, "GET", "/v1/accounting/usage/summary?group_by=backend", admin).data["items"]
        assert (row["group_key"], row["request_count"]) == ("plain", 2)
        assert Decimal(row["backend_cost"]) == 2 * Decimal(latest["backend_cost"]) > 0
        with sync_redis.Redis.from_url(migrated_env["REDIS_URL"]) as client:
            assert client.llen("scaigrid:usage:buffer") == 0
    finally:
        fake.stop()
