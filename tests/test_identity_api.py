"""The identity API as the public ScaiGrid documents it, against real http processes: `GET /v1/me` (= `/v1/auth/me`)
for every kind of caller, API keys by `assigned_user_id` and listed as the caller's own, users listed by status, read
one by one and deleted softly (their keys stop working on every process at once)."""

import time
from collections.abc import Iterator

import pytest

from appliance import devstack
from scaigrid.auth import service_tokens
from scaigrid.auth.roles import PERMISSIONS, ROLE_PERMISSIONS, ROLES
from scaigrid.auth.service_tokens import OPERATOR, SCAIINFER_NODE
from scaigrid.settings import Secret
from tests.identity import call, tenant, user_with_key
from tests.scaikey import AUDIENCE, ISSUER, ScaiKey
from tests.support.env import Node, create_key
from tests.support.processes import start_http
from tests.support.waiting import eventually

ME_PATHS = ("/v1/me", "/v1/auth/me")


def me(node: Node, token: str | None) -> dict[str, object]:
    """The caller's profile, the same on both paths."""
    first, second = (call(node.url, "GET", path, token) for path in ME_PATHS)
    assert first.status == 200, first.body
    assert first.body == second.body
    return dict(first.data)


def operator(node: Node, scope: str = OPERATOR) -> str:
    return service_tokens.mint(Secret(node.env["SERVICE_TOKEN_SECRET"]), "ops-script", 600, scope=scope)


# --- GET /v1/me ---

def test_every_role_sees_its_own_profile_permissions_and_key(node):
    team = tenant(node.url, node.admin_key, "team")
    partner = next(p for p in call(node.url, "GET", "/v1/partners", node.admin_key).data["items"]
                   if p["id"] == team["partner_id"])
    for role in ROLES:
        created = call(node.url, "POST", "/v1/users", node.admin_key, {
            "email": f"{role}@team.test", "role": role, "display_name": role.title(), "tenant_id": team["id"]})
        made = call(node.url, "POST", "/v1/api-keys", node.admin_key, {
            "name": f"{role} laptop", "assigned_user_id": created.data["id"], "expires_at": "2040-01-01T00:00:00Z"})
        key = made.data["key"]
        profile = me(node, key)
        assert (profile["id"], profile["email"], profile["display_name"], profile["role"], profile["status"]) == (
            created.data["id"], f"{role}@team.test", role.title(), role, "active"), role
        assert profile["tenant"] == {"id": team["id"], "slug": "team", "name": "Team"}
        assert profile["partner"] == {"id": partner["id"], "slug": partner["slug"], "name": partner["name"]}
        permissions = profile["permissions"]
        assert isinstance(permissions, list) and permissions == sorted(permissions)
        assert [p for p in permissions if p in PERMISSIONS] == sorted(ROLE_PERMISSIONS[role]), role
        # A module's own permissions come with modules:manage, as they are enforced (auth/roles.py).
        assert "modules:manage" in permissions or set(permissions) <= set(PERMISSIONS), role
        assert profile["auth_type"] == "api_key" and profile["service"] is None
        api_key = profile["api_key"]
        assert isinstance(api_key, dict)
        assert (api_key["id"], api_key["name"], api_key["prefix"], api_key["expires_at"]) == (
            made.data["id"], f"{role} laptop", key[:12], "2040-01-01T00:00:00Z")
        assert api_key["created_at"] and "key" not in api_key and key not in str(profile)


def test_a_key_below_its_user_shows_the_role_it_acts_with(node):
    team = tenant(node.url, node.admin_key, "team")
    admin_id, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    weak = call(node.url, "POST", "/v1/api-keys", admin, {"name": "ci", "role": "tenant_viewer"}).data["key"]
    profile = me(node, weak)
    assert (profile["id"], profile["role"]) == (admin_id, "tenant_viewer")
    assert profile["permissions"] == sorted(ROLE_PERMISSIONS["tenant_viewer"])
    assert call(node.url, "GET", "/v1/users", weak).code == "AUTHZ_PERMISSION_DENIED"  # as /v1/me said


def test_an_operator_token_is_a_service_and_other_scopes_and_strangers_are_refused(node):
    profile = me(node, operator(node))
    assert profile["auth_type"] == "service" and profile["service"] == {"name": "ops-script", "scope": OPERATOR}
    assert (profile["id"], profile["tenant"], profile["partner"], profile["api_key"]) == (None, None, None, None)
    assert set(profile) == set(me(node, node.admin_key))  # the same fields for every kind of caller
    assert profile["reach"] == "platform" and set(PERMISSIONS) <= set(profile["permissions"])
    for path in ME_PATHS:
        node_token = call(node.url, "GET", path, operator(node, SCAIINFER_NODE))
        assert (node_token.status, node_token.code) == (403, "AUTH_INSUFFICIENT_SCOPE")
        assert call(node.url, "GET", path).code == "AUTH_TOKEN_MISSING"
        assert call(node.url, "GET", path, "sgk_" + "x" * 43).code == "AUTH_TOKEN_INVALID"
        unknown = call(node.url, "GET", path + "?user_id=someone", node.admin_key)
        assert (unknown.status, unknown.body["error"]["details"][0]["field"]) == (422, "user_id")


def test_a_revoked_key_is_no_longer_anyone(node):
    made = call(node.url, "POST", "/v1/api-keys", node.admin_key, {"name": "short-lived"}).data
    assert me(node, made["key"])["api_key"]["id"] == made["id"]  # type: ignore[index]
    assert call(node.url, "DELETE", f"/v1/api-keys/{made['id']}", node.admin_key).status == 200
    assert call(node.url, "GET", "/v1/me", made["key"]).code == "AUTH_TOKEN_INVALID"


@pytest.fixture
def scaikey() -> Iterator[ScaiKey]:
    server = ScaiKey().start()
    yield server
    server.stop()


def test_a_scaikey_user_sees_the_same_profile_without_a_key(migrated_env, start_mode, scaikey):
    env = {**migrated_env, "SCAIKEY_JWKS_URL": scaikey.jwks_url, "SCAIKEY_AUDIENCE": AUDIENCE,
           "SCAIKEY_ISSUER": ISSUER}
    node = Node(env, start_http(start_mode, env), create_key(env, "super_admin"))
    team = tenant(node.url, node.admin_key, "acme", scaikey_id="sk-acme")
    token = scaikey.token("sk-bob", tenant_id="sk-acme", role="tenant_admin", email="bob@acme.test", name="Bob")
    profile = me(node, token)  # the first sight creates the user
    assert (profile["email"], profile["display_name"], profile["role"], profile["scaikey_id"]) == (
        "bob@acme.test", "Bob", "tenant_admin", "sk-bob")
    assert profile["tenant"] == {"id": team["id"], "slug": "acme", "name": "Acme"}
    assert profile["auth_type"] == "jwt" and profile["api_key"] is None
    assert profile["permissions"] == sorted({*ROLE_PERMISSIONS["tenant_admin"], *profile["permissions"]})


# --- API keys ---

def test_a_key_is_assigned_by_the_documented_name_within_reach_and_rank(node):
    team, other = tenant(node.url, node.admin_key, "team"), tenant(node.url, node.admin_key, "other")
    admin_id, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    member_id, member = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    stranger_id, _ = user_with_key(node.url, node.admin_key, other["id"], "tenant_user")
    boss_id, _ = user_with_key(node.url, node.admin_key, team["id"], "super_admin")

    made = call(node.url, "POST", "/v1/api-keys", admin, {"name": "for member", "assigned_user_id": member_id})
    assert made.status == 201
    assert (made.data["assigned_user_id"], made.data["user_id"], made.data["role"]) == (
        member_id, member_id, "tenant_user")
    assert me(node, made.data["key"])["id"] == member_id
    same = call(node.url, "POST", "/v1/api-keys", admin, {"name": "both", "assigned_user_id": member_id,
                                                          "user_id": member_id})
    assert same.status == 201 and same.data["assigned_user_id"] == member_id

    before = call(node.url, "GET", f"/v1/api-keys?tenant_id={team['id']}&limit=100", node.admin_key).data["items"]
    clash = call(node.url, "POST", "/v1/api-keys", admin, {"name": "x", "assigned_user_id": member_id,
                                                           "user_id": admin_id})
    assert (clash.status, clash.code) == (422, "VALIDATION_ERROR")
    assert [d["field"] for d in clash.body["error"]["details"]] == ["user_id"]
    for token, body, status in (
            (admin, {"name": "x", "assigned_user_id": stranger_id}, 404),  # another tenant: not shown
            (admin, {"name": "x", "assigned_user_id": boss_id}, 403),  # outranks the tenant admin
            (admin, {"name": "x", "assigned_user_id": "usr_nobody"}, 404),
            (member, {"name": "x", "assigned_user_id": admin_id}, 403)):  # a tenant_user keys only itself
        refused = call(node.url, "POST", "/v1/api-keys", token, body)
        assert refused.status == status, (body, refused.body)
    after = call(node.url, "GET", f"/v1/api-keys?tenant_id={team['id']}&limit=100", node.admin_key).data["items"]
    assert after == before


def test_the_listing_is_the_callers_own_unless_a_user_or_tenant_is_named(node):
    team, other = tenant(node.url, node.admin_key, "team"), tenant(node.url, node.admin_key, "other")
    admin_id, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    member_id, member = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    boss_id, _ = user_with_key(node.url, node.admin_key, team["id"], "super_admin")
    user_with_key(node.url, node.admin_key, other["id"], "tenant_user")

    def holders(token: str, query: str = "") -> set[str]:
        reply = call(node.url, "GET", f"/v1/api-keys{query}", token)
        assert reply.status == 200, reply.body
        return {item["assigned_user_id"] for item in reply.data["items"]}

    assert holders(admin) == {admin_id}
    assert holders(member) == {member_id}
    assert holders(admin, f"?user_id={member_id}") == {member_id}
    assert holders(admin, f"?tenant_id={team['id']}") == {admin_id, member_id}  # not the super_admin's
    assert holders(admin, f"?user_id={boss_id}") == set()
    assert holders(admin, f"?tenant_id={other['id']}") == set()  # out of reach: nothing, not another's
    assert holders(member, f"?user_id={admin_id}") == set()  # without users:manage, only its own
    assert holders(member, f"?tenant_id={team['id']}") == {member_id}
    service = operator(node)
    assert holders(service) == set()  # a service has no keys of its own
    assert holders(service, f"?tenant_id={team['id']}") == {admin_id, member_id, boss_id}


# --- users ---

def test_users_are_listed_by_status_a_page_at_a_time(node):
    team = tenant(node.url, node.admin_key, "team")
    ids = {name: user_with_key(node.url, node.admin_key, team["id"], "tenant_user")[0]
           for name in ("ann", "bob", "cy")}
    assert call(node.url, "PATCH", f"/v1/users/{ids['bob']}", node.admin_key, {"status": "suspended"}).status == 200
    assert call(node.url, "DELETE", f"/v1/users/{ids['cy']}", node.admin_key).status == 200

    def listed(query: str) -> list[str]:
        reply = call(node.url, "GET", f"/v1/users?tenant_id={team['id']}{query}", node.admin_key)
        assert reply.status == 200, reply.body
        return [item["id"] for item in reply.data["items"]]

    assert sorted(listed("")) == sorted([ids["bob"], ids["ann"]])  # the deleted left out
    assert listed("&status=active") == [ids["ann"]]
    assert listed("&status=suspended") == [ids["bob"]]
    assert listed("&status=deleted") == [ids["cy"]]
    first = call(node.url, "GET", f"/v1/users?tenant_id={team['id']}&limit=1", node.admin_key).data
    assert len(first["items"]) == 1 and first["pagination"]["has_more"]
    rest = call(node.url, "GET", f"/v1/users?tenant_id={team['id']}&limit=1&cursor="
                f"{first['pagination']['next_cursor']}", node.admin_key).data
    assert len(rest["items"]) == 1 and not rest["pagination"]["has_more"]
    assert sorted(u["id"] for u in first["items"] + rest["items"]) == sorted(listed(""))
    for query in ("status=gone", "status=", "status=ACTIVE"):
        bad = call(node.url, "GET", f"/v1/users?{query}", node.admin_key)
        assert (bad.status, bad.body["error"]["details"][0]["field"]) == (422, "status"), query


def test_a_user_is_read_by_id_within_reach(node):
    team, other = tenant(node.url, node.admin_key, "team"), tenant(node.url, node.admin_key, "other")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    member_id, member = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    stranger_id, _ = user_with_key(node.url, node.admin_key, other["id"], "tenant_user")
    shown = call(node.url, "GET", f"/v1/users/{member_id}", admin)
    assert shown.status == 200 and (shown.data["id"], shown.data["tenant_id"], shown.data["role"],
                                    shown.data["status"]) == (member_id, team["id"], "tenant_user", "active")
    assert call(node.url, "GET", f"/v1/users/{member_id}", operator(node)).data == shown.data
    for token, user_id, status in ((admin, stranger_id, 404), (admin, "usr_nobody", 404), (member, member_id, 403)):
        assert call(node.url, "GET", f"/v1/users/{user_id}", token).status == status


def test_deleting_a_user_is_soft_and_stops_their_keys_on_every_process_at_once(node, start_mode):
    other_env = {**node.env, "HTTP_PORT": str(devstack.free_ports(1)[0])}
    start_http(start_mode, other_env)
    other_url = f"http://127.0.0.1:{other_env['HTTP_PORT']}"
    team = tenant(node.url, node.admin_key, "team")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    member_id, member = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    second = call(node.url, "POST", "/v1/api-keys", admin, {"name": "second", "assigned_user_id": member_id}
                  ).data["key"]
    for url in (node.url, other_url):  # every cache warm
        for key in (member, second):
            assert call(url, "GET", "/v1/me", key).status == 200

    deleted = call(node.url, "DELETE", f"/v1/users/{member_id}", admin)
    deleted_at = time.monotonic()
    assert deleted.status == 200 and (deleted.data["id"], deleted.data["status"]) == (member_id, "deleted")
    for url in (node.url, other_url):
        for key in (member, second):
            reply = eventually(lambda url=url, key=key: _refused(url, key), "the deleted user's key refused", 5,
                               interval_s=0.02)
            assert reply.code == "AUTH_TOKEN_INVALID"
    assert time.monotonic() - deleted_at < 1.0
    # Kept, with every key revoked: ids in usage records still name someone.
    assert call(node.url, "GET", f"/v1/users/{member_id}", admin).data["status"] == "deleted"
    keys = call(node.url, "GET", f"/v1/api-keys?user_id={member_id}", admin).data["items"]
    assert len(keys) == 2 and all(k["revoked_at"] for k in keys)
    again = call(node.url, "DELETE", f"/v1/users/{member_id}", admin)
    assert again.status == 200 and again.data["status"] == "deleted"
    # A user made active again gets no key back: each was revoked.
    assert call(node.url, "PATCH", f"/v1/users/{member_id}", admin, {"status": "active"}).status == 200
    assert call(node.url, "GET", "/v1/me", member).code == "AUTH_TOKEN_INVALID"


def _refused(url: str, key: str):  # type: ignore[no-untyped-def]
    reply = call(url, "GET", "/v1/me", key)
    return reply if reply.status == 401 else None


def test_deleting_needs_reach_rank_and_users_manage(node):
    team, other = tenant(node.url, node.admin_key, "team"), tenant(node.url, node.admin_key, "other")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    member_id, member = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    stranger_id, stranger = user_with_key(node.url, node.admin_key, other["id"], "tenant_user")
    boss_id, boss = user_with_key(node.url, node.admin_key, team["id"], "super_admin")
    for token, user_id, status in ((admin, stranger_id, 404), (admin, boss_id, 403), (member, member_id, 403),
                                   (operator(node, SCAIINFER_NODE), member_id, 403)):
        refused = call(node.url, "DELETE", f"/v1/users/{user_id}", token)
        assert refused.status == status, refused.body
    for key in (member, stranger, boss):  # nobody was touched
        assert me(node, key)["status"] == "active"
    by_operator = call(node.url, "DELETE", f"/v1/users/{stranger_id}", operator(node))
    assert by_operator.status == 200 and by_operator.data["status"] == "deleted"
    assert eventually(lambda: call(node.url, "GET", "/v1/me", stranger).status == 401, "refused", 5)


def test_an_unknown_user_listing_filter_is_named(node):
    """A filter the node does not have is refused by name, never ignored (the answer would be every user)."""
    reply = call(node.url, "GET", "/v1/users?role=tenant_admin", node.admin_key)
    assert (reply.status, [d["field"] for d in reply.body["error"]["details"]]) == (422, ["role"])
