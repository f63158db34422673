"""Rank on a real node: acting on a person (keys, role, status, budgets, rate limits) needs that the person does not
outrank the caller, tenants and partners are changed only from above, and a budget set from above holds below."""

from typing import Any

from tests.identity import Reply, call, tenant, user_with_key, users_with_keys
from tests.support.env import Node

MONTHLY_COST = {"scope": "tenant", "period": "monthly", "limit_type": "cost", "limit_value": "100"}


def refused(reply: Reply, role: str) -> bool:
    """403 AUTHZ_PERMISSION_DENIED naming the role that outranks the caller."""
    return (reply.status, reply.code) == (403, "AUTHZ_PERMISSION_DENIED") and role in reply.body["error"]["message"]


def keys_of(node: Node, token: str, user_id: str) -> list[dict[str, Any]]:
    return list(call(node.url, "GET", f"/v1/api-keys?user_id={user_id}", token).data["items"])


def operator_user_id(node: Node, role: str) -> str:
    """The user `scaigrid admin create-key --role ROLE` binds its keys to, in the default tenant."""
    users = call(node.url, "GET", "/v1/users?limit=100", node.admin_key).data["items"]
    [found] = [u["id"] for u in users if u["email"] == f"{role}@default.local"]
    return str(found)


def test_a_tenant_admin_cannot_key_list_or_revoke_the_bootstrap_super_admin(node):
    admin = node.key("tenant_admin")  # of the default tenant, as the bootstrap super_admin user is
    boss = operator_user_id(node, "super_admin")
    boss_keys = keys_of(node, node.admin_key, boss)
    assert boss_keys

    # The exploit: a key bound to the super_admin, then the "own key" rule on that user's keys.
    for body in ({"name": "mine", "user_id": boss, "role": "tenant_admin"}, {"name": "mine", "user_id": boss}):
        assert refused(call(node.url, "POST", "/v1/api-keys", admin, body), "super_admin")
    assert keys_of(node, admin, boss) == []
    assert refused(call(node.url, "DELETE", f"/v1/api-keys/{boss_keys[0]['id']}", admin), "super_admin")
    assert refused(call(node.url, "PATCH", f"/v1/users/{boss}", admin, {"status": "suspended"}), "super_admin")
    assert refused(call(node.url, "PUT", f"/v1/rate-limits/user/{boss}", admin, {"rpm": 1}), "super_admin")
    # Nothing happened to the super_admin: its keys work.
    after = keys_of(node, node.admin_key, boss)
    assert [(k["id"], k["revoked_at"]) for k in after] == [(k["id"], None) for k in boss_keys]
    assert call(node.url, "GET", "/v1/users", node.admin_key).status == 200


def test_a_tenant_admin_cannot_act_on_its_partner_admin(node):
    team = tenant(node.url, node.admin_key, "team")
    (partner_id, partner_key), (_, admin) = users_with_keys(node, team, "partner_admin", "tenant_admin")
    # A weaker key of the partner admin, made from above: its role is within the tenant admin's, its user is not.
    weak = call(node.url, "POST", "/v1/api-keys", node.admin_key,
                {"name": "weak", "user_id": partner_id, "role": "tenant_user"}).data

    minted = call(node.url, "POST", "/v1/api-keys", admin, {"name": "mine", "user_id": partner_id,
                                                             "role": "tenant_admin"})
    assert refused(minted, "partner_admin")
    assert keys_of(node, admin, partner_id) == []
    assert refused(call(node.url, "DELETE", f"/v1/api-keys/{weak['id']}", admin), "partner_admin")
    assert refused(call(node.url, "PUT", f"/v1/rate-limits/key/{weak['id']}", admin, {"rpm": 1}), "partner_admin")
    assert refused(call(node.url, "PATCH", f"/v1/users/{partner_id}", admin, {"status": "suspended"}),
                   "partner_admin")
    assert refused(call(node.url, "PATCH", f"/v1/users/{partner_id}", admin, {"display_name": "Demoted"}),
                   "partner_admin")
    assert refused(call(node.url, "POST", "/v1/accounting/budgets", admin,
                        {**MONTHLY_COST, "scope": "user", "scope_id": partner_id}), "partner_admin")
    # Both of the partner admin's keys still work.
    assert {k["revoked_at"] for k in keys_of(node, partner_key, partner_id)} == {None}
    assert call(node.url, "GET", "/v1/users", partner_key).status == 200
    assert call(node.url, "GET", "/v1/api-keys", weak["key"]).status == 200


def test_a_tenant_admin_promotes_and_suspends_no_one_above_itself(node):
    team = tenant(node.url, node.admin_key, "team")
    (_, admin), (user_id, _) = users_with_keys(node, team, "tenant_admin", "tenant_user")
    boss, _ = user_with_key(node.url, node.admin_key, team["id"], "super_admin")
    for role in ("partner_admin", "super_admin", "partner_viewer"):
        assert refused(call(node.url, "POST", "/v1/users", admin, {"email": f"{role}@team.test", "role": role}),
                       role)
        assert refused(call(node.url, "PATCH", f"/v1/users/{user_id}", admin, {"role": role}), role)
    assert refused(call(node.url, "PATCH", f"/v1/users/{boss}", admin, {"status": "suspended"}), "super_admin")
    users = {u["id"]: u for u in call(node.url, "GET", "/v1/users", node.admin_key).data["items"]}
    assert (users[user_id]["role"], users[boss]["status"]) == ("tenant_user", "active")
    # Its own tenant's record is changed from above only: status, name and rate limit.
    assert refused(call(node.url, "PATCH", f"/v1/tenants/{team['id']}", admin, {"name": "Ours now"}), "partner")
    assert refused(call(node.url, "PUT", f"/v1/rate-limits/tenant/{team['id']}", admin, {"rpm": 10**6}), "partner")
    assert call(node.url, "GET", f"/v1/tenants/{team['id']}", admin).data["name"] == "Team"


def test_a_partner_admin_cannot_act_on_a_super_admin(node):
    team = tenant(node.url, node.admin_key, "team")
    [(_, partner_admin)] = users_with_keys(node, team, "partner_admin")
    boss, boss_key = user_with_key(node.url, node.admin_key, team["id"], "super_admin")
    [boss_key_row] = keys_of(node, node.admin_key, boss)

    assert refused(call(node.url, "POST", "/v1/api-keys", partner_admin,
                        {"name": "mine", "user_id": boss, "role": "tenant_user"}), "super_admin")
    assert keys_of(node, partner_admin, boss) == []
    assert refused(call(node.url, "DELETE", f"/v1/api-keys/{boss_key_row['id']}", partner_admin), "super_admin")
    assert refused(call(node.url, "PATCH", f"/v1/users/{boss}", partner_admin, {"status": "suspended"}),
                   "super_admin")
    assert refused(call(node.url, "PUT", f"/v1/rate-limits/user/{boss}", partner_admin, {"rpm": 1}), "super_admin")
    assert refused(call(node.url, "POST", "/v1/accounting/budgets", partner_admin,
                        {**MONTHLY_COST, "scope": "user", "scope_id": boss}), "super_admin")
    assert refused(call(node.url, "PUT", f"/v1/rate-limits/partner/{team['partner_id']}", partner_admin,
                        {"rpm": 10**6}), "platform")
    assert call(node.url, "GET", "/v1/users", boss_key).status == 200


def test_equal_rank_is_allowed(node):
    team = tenant(node.url, node.admin_key, "team")
    (_, admin), (peer_id, peer_key) = users_with_keys(node, team, "tenant_admin", "tenant_admin")
    made = call(node.url, "POST", "/v1/api-keys", admin, {"name": "for a peer", "user_id": peer_id})
    assert made.status == 201 and made.data["role"] == "tenant_admin"
    assert {k["id"] for k in keys_of(node, admin, peer_id)} >= {made.data["id"]}
    assert call(node.url, "PUT", f"/v1/rate-limits/user/{peer_id}", admin, {"rpm": 30}).status == 200
    budget = call(node.url, "POST", "/v1/accounting/budgets", admin,
                  {**MONTHLY_COST, "scope": "user", "scope_id": peer_id})
    assert budget.status == 201 and budget.data["set_by_reach"] == "tenant"
    assert call(node.url, "PUT", f"/v1/accounting/budgets/{budget.data['id']}", peer_key,
                {"limit_value": "200"}).data["limit_value"] == "200"
    assert call(node.url, "DELETE", f"/v1/api-keys/{made.data['id']}", admin).data["revoked_at"] is not None
    assert call(node.url, "PATCH", f"/v1/users/{peer_id}", admin, {"status": "suspended"}).data[
        "status"] == "suspended"
    assert call(node.url, "GET", "/v1/users", peer_key).code == "AUTH_TOKEN_INVALID"


def test_a_budget_set_from_above_holds_below(node):
    team = tenant(node.url, node.admin_key, "team")
    [(_, partner_admin), (_, admin)] = users_with_keys(node, team, "partner_admin", "tenant_admin")

    from_above = call(node.url, "POST", "/v1/accounting/budgets", partner_admin, {**MONTHLY_COST,
                                                                                   "scope_id": team["id"]})
    assert from_above.status == 201
    path = f"/v1/accounting/budgets/{from_above.data['id']}"
    assert call(node.url, "GET", path, admin).data["limit_value"] == "100"  # it may read it
    for method, body in (("PUT", {"limit_value": "1000000"}), ("PUT", {"hard_action": "notify"}), ("DELETE", None)):
        assert refused(call(node.url, method, path, admin, body), "partner"), (method, body)
    kept = call(node.url, "GET", path, partner_admin).data
    assert (kept["limit_value"], kept["hard_action"], kept["set_by_reach"]) == ("100", "block", "partner")

    # The tenant's own budget is its own to change, until its partner changes it.
    own = call(node.url, "POST", "/v1/accounting/budgets", admin, MONTHLY_COST).data
    own_path = f"/v1/accounting/budgets/{own['id']}"
    assert call(node.url, "PUT", own_path, admin, {"limit_value": "150"}).data["set_by_reach"] == "tenant"
    lowered = call(node.url, "PUT", own_path, partner_admin, {"limit_value": "50"}).data
    assert (lowered["limit_value"], lowered["set_by_reach"]) == ("50", "partner")
    assert refused(call(node.url, "PUT", own_path, admin, {"limit_value": "150"}), "partner")
    assert call(node.url, "DELETE", path, partner_admin).data == {"id": from_above.data["id"], "deleted": True}
