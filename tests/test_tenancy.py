"""Tenancy on a real node: administration routes with reach and role checks, isolation between tenants, and the
ScaiKey webhook receiver (signatures, window, idempotence, suspension taking effect at once)."""

import secrets
import time

import pytest

from tests.identity import call, tenant, user_with_key, webhook
from tests.support.env import Node, create_key
from tests.support.processes import start_http

WEBHOOK_SECRET = "whsec_" + secrets.token_hex(16)


@pytest.fixture
def wh_node(migrated_env, start_mode) -> Node:
    env = {**migrated_env, "SCAIKEY_WEBHOOK_SECRET": WEBHOOK_SECRET}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


def deliver(node: Node, event_type: str, resource_id: str, data: dict[str, object] | None = None, **kwargs: object):
    body, headers = webhook(WEBHOOK_SECRET, event_type, resource_id, data, **kwargs)  # type: ignore[arg-type]
    return call(node.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body)


def by_scaikey_id(node: Node, path: str, scaikey_id: str) -> dict[str, object]:
    items = call(node.url, "GET", f"{path}?limit=100", node.admin_key).data["items"]
    [found] = [item for item in items if item["scaikey_id"] == scaikey_id]
    return dict(found)


# --- administration routes ---

def test_partners_are_a_platform_matter(node):
    created = call(node.url, "POST", "/v1/partners", node.admin_key, {"slug": "reseller", "name": "Reseller"})
    assert created.status == 201 and created.data["status"] == "active"
    clash = call(node.url, "POST", "/v1/partners", node.admin_key, {"slug": "reseller", "name": "Again"})
    assert (clash.status, clash.code) == (409, "SLUG_CONFLICT")
    bad = call(node.url, "POST", "/v1/partners", node.admin_key, {"slug": "Not A Slug!"})
    assert (bad.status, bad.code) == (422, "VALIDATION_ERROR")
    assert {d["field"] for d in bad.body["error"]["details"]} == {"slug", "name"}
    slugs = {p["slug"] for p in call(node.url, "GET", "/v1/partners", node.admin_key).data["items"]}
    assert slugs == {"default", "reseller"}

    team = tenant(node.url, node.admin_key, "team")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    for method, body in (("GET", None), ("POST", {"slug": "mine", "name": "Mine"})):
        assert call(node.url, method, "/v1/partners", admin, body).code == "AUTHZ_PERMISSION_DENIED"


def test_slugs_names_and_emails_are_matched_whole_and_refuse_control_characters(node):
    """Exploit: "default\\n" was accepted as a slug (re.match with ^...$), for tenants and partners alike."""
    team = tenant(node.url, node.admin_key, "team")
    before = {path: call(node.url, "GET", path, node.admin_key).data["items"]
              for path in ("/v1/partners", "/v1/tenants", "/v1/users")}
    for path, body, field in (
            ("/v1/partners", {"slug": "default\n", "name": "Again"}, "slug"),
            ("/v1/partners", {"slug": "fresh\n", "name": "Fresh"}, "slug"),
            ("/v1/partners", {"slug": "fresh", "name": "Fresh\r\nX-Injected: 1"}, "name"),
            ("/v1/tenants", {"slug": "team\n", "name": "Team"}, "slug"),
            ("/v1/tenants", {"slug": "other\n", "name": "Other"}, "slug"),
            ("/v1/tenants", {"slug": "other", "name": "Other\x00"}, "name"),
            ("/v1/users", {"email": "ann@example.com\n", "tenant_id": team["id"]}, "email"),
            ("/v1/users", {"email": "ann@example.com", "display_name": "Ann\u2028", "tenant_id": team["id"]},
             "display_name")):
        reply = call(node.url, "POST", path, node.admin_key, body)
        assert (reply.status, [d["field"] for d in reply.body["error"]["details"]]) == (422, [field]), (body, reply)
    reply = call(node.url, "PATCH", f"/v1/tenants/{team['id']}", node.admin_key, {"name": "Renamed\n"})
    assert (reply.status, [d["field"] for d in reply.body["error"]["details"]]) == (422, ["name"])
    for path, items in before.items():
        assert call(node.url, "GET", path, node.admin_key).data["items"] == items, path


def test_a_partner_admin_manages_only_its_own_tenants(node):
    other = call(node.url, "POST", "/v1/partners", node.admin_key, {"slug": "other", "name": "Other"}).data
    theirs = tenant(node.url, node.admin_key, "theirs", partner_id=other["id"])
    ours = tenant(node.url, node.admin_key, "ours")
    _, partner_admin = user_with_key(node.url, node.admin_key, ours["id"], "partner_admin")

    seen = {t["slug"] for t in call(node.url, "GET", "/v1/tenants", partner_admin).data["items"]}
    assert seen == {"default", "ours"}
    assert call(node.url, "GET", f"/v1/tenants/{theirs['id']}", partner_admin).code == "NOT_FOUND"
    refused = call(node.url, "POST", "/v1/tenants", partner_admin,
                   {"slug": "x", "name": "X", "partner_id": other["id"]})
    assert refused.code == "NOT_FOUND"
    made = call(node.url, "POST", "/v1/tenants", partner_admin, {"slug": "new-team", "name": "New team"})
    assert made.status == 201 and made.data["partner_id"] == ours["partner_id"]
    clash = call(node.url, "POST", "/v1/tenants", partner_admin, {"slug": "theirs", "name": "Theirs too"})
    assert (clash.status, clash.code) == (409, "SLUG_CONFLICT")


def test_viewers_and_users_are_refused_admin_routes(node):
    team = tenant(node.url, node.admin_key, "team")
    for role in ("tenant_viewer", "tenant_user"):
        _, key = user_with_key(node.url, node.admin_key, team["id"], role)
        for method, path in (("GET", "/v1/users"), ("POST", "/v1/users"), ("GET", "/v1/tenants"),
                             ("GET", f"/v1/tenants/{team['id']}"), ("PATCH", f"/v1/tenants/{team['id']}"),
                             ("GET", "/v1/partners")):
            reply = call(node.url, method, path, key, {} if method != "GET" else None)
            assert (reply.status, reply.code) == (403, "AUTHZ_PERMISSION_DENIED"), (role, method, path)


def test_a_tenant_admin_cannot_see_or_touch_another_tenant(node):
    a, b = tenant(node.url, node.admin_key, "tenant-a"), tenant(node.url, node.admin_key, "tenant-b")
    _, admin_a = user_with_key(node.url, node.admin_key, a["id"], "tenant_admin")
    user_b, key_b = user_with_key(node.url, node.admin_key, b["id"], "tenant_user")
    key_b_id = call(node.url, "GET", "/v1/api-keys", key_b).data["items"][0]["id"]

    keys_a = call(node.url, "GET", "/v1/api-keys", admin_a).data["items"]
    assert keys_a and {k["tenant_id"] for k in keys_a} == {a["id"]}
    assert call(node.url, "GET", f"/v1/api-keys?tenant_id={b['id']}", admin_a).data["items"] == []
    assert call(node.url, "DELETE", f"/v1/api-keys/{key_b_id}", admin_a).code == "NOT_FOUND"
    assert call(node.url, "GET", "/v1/api-keys", key_b).status == 200  # still works

    assert {u["tenant_id"] for u in call(node.url, "GET", "/v1/users", admin_a).data["items"]} == {a["id"]}
    for method, path, body in (
            ("PATCH", f"/v1/users/{user_b}", {"status": "suspended"}),
            ("GET", f"/v1/tenants/{b['id']}", None),
            ("PATCH", f"/v1/tenants/{b['id']}", {"status": "suspended"}),
            ("POST", "/v1/users", {"email": "spy@b.test", "tenant_id": b["id"]}),
            ("POST", "/v1/api-keys", {"name": "spy", "user_id": user_b})):
        reply = call(node.url, method, path, admin_a, body)
        assert (reply.status, reply.code) == (404, "NOT_FOUND"), (method, path)
    assert call(node.url, "GET", f"/v1/tenants/{a['id']}", admin_a).data["slug"] == "tenant-a"
    assert call(node.url, "PATCH", f"/v1/tenants/{a['id']}", admin_a, {"status": "suspended"}).status == 403


def test_users_roles_never_exceed_the_admins(node):
    team = tenant(node.url, node.admin_key, "team")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    boss, _ = user_with_key(node.url, node.admin_key, team["id"], "partner_admin")
    made = call(node.url, "POST", "/v1/users", admin, {"email": "new@team.test", "display_name": "New"})
    assert made.status == 201 and (made.data["role"], made.data["tenant_id"]) == ("tenant_user", team["id"])
    twice = call(node.url, "POST", "/v1/users", admin, {"email": "new@team.test"})
    assert (twice.status, twice.code) == (409, "SLUG_CONFLICT")
    assert call(node.url, "POST", "/v1/users", admin, {"email": "x@team.test", "role": "super_admin"}).status == 403
    assert call(node.url, "PATCH", f"/v1/users/{made.data['id']}", admin, {"role": "partner_admin"}).status == 403
    assert call(node.url, "PATCH", f"/v1/users/{boss}", admin, {"status": "suspended"}).status == 403
    promoted = call(node.url, "PATCH", f"/v1/users/{made.data['id']}", admin, {"role": "tenant_admin"})
    assert promoted.status == 200 and promoted.data["role"] == "tenant_admin"
    invalid = call(node.url, "PATCH", f"/v1/users/{made.data['id']}", admin, {"status": "gone", "role": 3})
    assert invalid.status == 422 and {d["field"] for d in invalid.body["error"]["details"]} == {"status", "role"}
    assert call(node.url, "POST", "/v1/users", admin, {"email": "not-an-email"}).status == 422


def test_a_demoted_users_stronger_keys_stop_working(node):
    team = tenant(node.url, node.admin_key, "team")
    user_id, key = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    assert call(node.url, "GET", "/v1/users", key).status == 200
    assert call(node.url, "PATCH", f"/v1/users/{user_id}", node.admin_key, {"role": "tenant_user"}).status == 200
    reply = call(node.url, "GET", "/v1/api-keys", key)
    assert (reply.status, reply.code) == (401, "AUTH_TOKEN_INVALID") and "exceeds" in reply.body["error"]["message"]


def test_suspending_a_tenant_stops_its_keys_at_once_and_lifting_it_restores_them(node):
    team = tenant(node.url, node.admin_key, "team")
    _, key = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    assert call(node.url, "GET", "/v1/api-keys", key).status == 200  # cached
    path = f"/v1/tenants/{team['id']}"
    assert call(node.url, "PATCH", path, node.admin_key, {"status": "suspended"}).data["status"] == "suspended"
    assert call(node.url, "GET", "/v1/api-keys", key).code == "AUTH_TOKEN_INVALID"
    assert call(node.url, "PATCH", path, node.admin_key, {"status": "active"}).status == 200
    assert call(node.url, "GET", "/v1/api-keys", key).status == 200


def test_listings_page_with_a_cursor(node):
    for n in range(5):
        tenant(node.url, node.admin_key, f"page-{n}")
    seen, cursor = [], ""
    while True:
        page = call(node.url, "GET", f"/v1/tenants?limit=2{cursor}", node.admin_key).data
        seen += [t["slug"] for t in page["items"]]
        if not page["pagination"]["has_more"]:
            break
        cursor = f"&cursor={page['pagination']['next_cursor']}"
    assert sorted(seen) == sorted(["default", *(f"page-{n}" for n in range(5))]) and len(seen) == 6
    bad = call(node.url, "GET", "/v1/tenants?limit=0&cursor=%%%", node.admin_key)
    assert bad.status == 422 and {d["field"] for d in bad.body["error"]["details"]} == {"limit", "cursor"}


# --- ScaiKey webhooks ---

def test_webhooks_need_a_configured_secret(node):
    body, headers = webhook("anything", "partner.created", "sk-p1", {"name": "P1"})
    reply = call(node.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body)
    assert (reply.status, reply.code) == (503, "WEBHOOKS_NOT_CONFIGURED")


def test_webhook_signatures_are_checked(wh_node):
    body, headers = webhook(WEBHOOK_SECRET, "partner.created", "sk-p1", {"name": "P1"})
    cases = {
        "wrong secret": webhook("not-the-secret", "partner.created", "sk-p1", {"name": "P1"}),
        "tampered body": (body.replace(b"P1", b"P2"), headers),
        "no signature": (body, {k: v for k, v in headers.items() if k != "X-ScaiKey-Signature"}),
        "garbled": (body, {**headers, "X-ScaiKey-Signature": "v1=abc"}),
        "time past int()": (body, {**headers, "X-ScaiKey-Signature": "t=" + "9" * 5000 + ",v1=abc"}),
        "time not ASCII": (body, {**headers, "X-ScaiKey-Signature": "t=\xc2\xb2,v1=abc"}),  # "²" in UTF-8
        "too old": webhook(WEBHOOK_SECRET, "partner.created", "sk-p1", signed_at=int(time.time()) - 301),
        # A minute past the 300 s tolerance: every case is signed before the first is sent, and on a loaded machine
        # the sends before this one took long enough to bring a time 301 s ahead back inside the tolerance.
        "from the future": webhook(WEBHOOK_SECRET, "partner.created", "sk-p1", signed_at=int(time.time()) + 360),
    }
    for what, (raw, hdrs) in cases.items():
        reply = call(wh_node.url, "POST", "/v1/webhooks/scaikey", headers=hdrs, raw=raw)
        assert (reply.status, reply.code) == (401, "WEBHOOK_SIGNATURE_INVALID"), what
    assert call(wh_node.url, "GET", "/v1/partners", wh_node.admin_key).data["items"][0]["slug"] == "default"
    assert len(call(wh_node.url, "GET", "/v1/partners", wh_node.admin_key).data["items"]) == 1
    mismatch = call(wh_node.url, "POST", "/v1/webhooks/scaikey", raw=body,
                    headers={**headers, "X-ScaiKey-Event-Type": "partner.deleted"})
    assert (mismatch.status, mismatch.code) == (422, "VALIDATION_ERROR")
    accepted = call(wh_node.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body)
    assert accepted.status == 200 and accepted.data["applied"] is True


def test_webhooks_build_partners_tenants_and_users(wh_node):
    assert deliver(wh_node, "partner.created", "sk-p1", {"name": "Partner One", "slug": "p-one"}).data["applied"]
    assert deliver(wh_node, "tenant.created", "sk-t1", {"name": "Tenant One"}, partner_id="sk-p1").status == 200
    assert deliver(wh_node, "user.created", "sk-u1", {"email": "u1@t1.test", "role": "tenant_admin", "name": "U1"},
                   tenant_id="sk-t1", partner_id="sk-p1").status == 200
    partner = by_scaikey_id(wh_node, "/v1/partners", "sk-p1")
    team = by_scaikey_id(wh_node, "/v1/tenants", "sk-t1")
    user = by_scaikey_id(wh_node, "/v1/users", "sk-u1")
    assert (partner["slug"], partner["name"]) == ("p-one", "Partner One")
    assert (team["slug"], team["partner_id"]) == ("tenant-one", partner["id"])
    assert (user["tenant_id"], user["email"], user["role"], user["display_name"]) == (
        team["id"], "u1@t1.test", "tenant_admin", "U1")
    # The same slug again gets a suffix: ScaiKey cannot resolve a clash, so we do.
    deliver(wh_node, "tenant.created", "sk-t2", {"name": "Other", "slug": "tenant-one"}, partner_id="sk-p1")
    assert by_scaikey_id(wh_node, "/v1/tenants", "sk-t2")["slug"] == "tenant-one-2"
    # A user whose tenant has not arrived yet gets a placeholder tenant that the tenant's own event fills in.
    deliver(wh_node, "user.created", "sk-u2", {"email": "u2@t3.test"}, tenant_id="sk-t3")
    deliver(wh_node, "tenant.updated", "sk-t3", {"name": "Late tenant"})
    assert by_scaikey_id(wh_node, "/v1/tenants", "sk-t3")["name"] == "Late tenant"
    assert by_scaikey_id(wh_node, "/v1/users", "sk-u2")["role"] == "tenant_user"
    group = deliver(wh_node, "group.created", "sk-g1", {"name": "Group"}, tenant_id="sk-t1")
    assert group.status == 200 and group.data["applied"] is False
    invalid = deliver(wh_node, "user.created", "sk-u9", {"email": "u9@x.test"})
    assert (invalid.status, invalid.code) == (422, "VALIDATION_ERROR")  # a user event needs its tenant


def test_a_redelivered_event_changes_nothing(wh_node):
    deliver(wh_node, "partner.created", "sk-p1", {"name": "First"}, event_id="evt-1")
    deliver(wh_node, "partner.updated", "sk-p1", {"name": "Second"}, event_id="evt-2")
    again = deliver(wh_node, "partner.created", "sk-p1", {"name": "First"}, event_id="evt-1")
    assert again.status == 200 and again.data == {"event_id": "evt-1", "applied": False, "duplicate": True}
    assert by_scaikey_id(wh_node, "/v1/partners", "sk-p1")["name"] == "Second"


def test_suspension_by_webhook_stops_keys_at_once(wh_node):
    deliver(wh_node, "tenant.created", "sk-t1", {"name": "Tenant One"})
    team = by_scaikey_id(wh_node, "/v1/tenants", "sk-t1")
    deliver(wh_node, "user.created", "sk-u1", {"email": "u1@t1.test"}, tenant_id="sk-t1")
    user = by_scaikey_id(wh_node, "/v1/users", "sk-u1")
    key = call(wh_node.url, "POST", "/v1/api-keys", wh_node.admin_key,
               {"name": "u1", "user_id": user["id"]}).data["key"]
    assert call(wh_node.url, "GET", "/v1/api-keys", key).status == 200  # cached

    deliver(wh_node, "user.suspended", "sk-u1", tenant_id="sk-t1")
    assert call(wh_node.url, "GET", "/v1/api-keys", key).code == "AUTH_TOKEN_INVALID"
    deliver(wh_node, "user.activated", "sk-u1", tenant_id="sk-t1")
    assert call(wh_node.url, "GET", "/v1/api-keys", key).status == 200

    deliver(wh_node, "tenant.updated", "sk-t1", {"status": "SUSPENDED"})
    assert by_scaikey_id(wh_node, "/v1/tenants", "sk-t1")["status"] == "suspended"
    reply = call(wh_node.url, "GET", "/v1/api-keys", key)
    assert reply.code == "AUTH_TOKEN_INVALID" and "tenant is suspended" in reply.body["error"]["message"]
    deliver(wh_node, "tenant.updated", "sk-t1", {"status": "ACTIVE"})
    assert call(wh_node.url, "GET", "/v1/api-keys", key).status == 200
    deliver(wh_node, "tenant.deleted", "sk-t1")
    assert by_scaikey_id(wh_node, "/v1/tenants", "sk-t1")["id"] == team["id"]
    assert "tenant is deleted" in call(wh_node.url, "GET", "/v1/api-keys", key).body["error"]["message"]
