"""The audit log on a real node: what an admin change records (who, what, outcome, before/after, request id), what
is never recorded (secrets, reads, inference), who reads which entries, filters, pages, export and retention."""

import csv
import io
import json
import secrets
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest

from scaigrid.auth import service_tokens
from scaigrid.settings import Secret
from tests.catalogue_fixtures import sql
from tests.identity import call, tenant, user_with_key, webhook
from tests.support.env import Node, create_key
from tests.support.processes import scaigrid, start_http

pytestmark = pytest.mark.timeout(120)

SCAIKEY_SECRET = "whsec_" + secrets.token_hex(16)


@pytest.fixture
def audit_node(migrated_env, start_mode) -> Node:
    env = {**migrated_env, "SCAIKEY_WEBHOOK_SECRET": SCAIKEY_SECRET,
           "SCAIGRID_MODULES": "scaibunker,tests.modules.probe:MODULE"}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


def entries(node: Node, key: str, query: str = "") -> list[dict[str, object]]:
    reply = call(node.url, "GET", "/v1/audit-log" + query, key)
    assert reply.status == 200, reply.body
    return list(reply.data["items"])


def request_with_id(url: str, method: str, path: str, key: str, body: object) -> tuple[int, str]:
    """(status, X-Request-ID) of a JSON request sent with a User-Agent of its own."""
    request = urllib.request.Request(url + path, method=method, data=json.dumps(body).encode(), headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json", "User-Agent": "audit-test/1.0"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, response.headers["X-Request-ID"]


def test_an_admin_change_records_who_did_what_with_the_after_and_never_a_secret(audit_node):
    node = audit_node
    team = tenant(node.url, node.admin_key, "team")
    admin_id, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    email = call(node.url, "GET", f"/v1/users?tenant_id={team['id']}", node.admin_key).data["items"]
    admin_email = next(u["email"] for u in email if u["id"] == admin_id)

    status, request_id = request_with_id(node.url, "POST", "/v1/api-keys", admin, {"name": "ci"})
    assert status == 201
    # The newest of the tenant's key creations (the admin's own key, made by the platform, is in its tenant too).
    entry = entries(node, admin, "?action=api_key.create")[0]
    assert entry["request_id"] == request_id
    assert {k: entry[k] for k in ("actor_type", "actor_id", "actor_email", "actor_tenant_id", "actor_partner_id",
                                  "resource_type", "status", "http_status", "method", "path", "ip", "user_agent",
                                  "tenant_id", "partner_id")} == {
        "actor_type": "user", "actor_id": admin_id, "actor_email": admin_email, "actor_tenant_id": team["id"],
        "actor_partner_id": team["partner_id"], "resource_type": "api_key", "status": "SUCCESS", "http_status": 201,
        "method": "POST", "path": "/v1/api-keys", "ip": "127.0.0.1", "user_agent": "audit-test/1.0",
        "tenant_id": team["id"], "partner_id": team["partner_id"]}
    after = entry["after"]
    assert isinstance(after, dict) and after["name"] == "ci" and entry["resource_id"] == after["id"]
    assert "key" not in after and entry["timestamp"].endswith("Z")

    hook = call(node.url, "POST", "/v1/webhooks", admin, {"url": "https://8.8.8.8/hook",
                                                          "events": ["request.completed"]})
    assert hook.status == 201
    rotated = call(node.url, "POST", f"/v1/webhooks/{hook.data['id']}/rotate-secret", admin)
    backend = call(node.url, "POST", "/v1/backends", node.admin_key, {
        "id": "audited", "provider": "custom", "base_url": "https://8.8.8.8/v1", "model": "m",
        "api_key": "sk-upstream-" + secrets.token_hex(8)})
    assert backend.status == 201
    log = json.dumps(entries(node, node.admin_key, "?limit=1000"))
    api_key = json.dumps(call(node.url, "POST", "/v1/api-keys", admin, {"name": "second"}).data["key"])
    for secret in (hook.data["secret"], rotated.data["secret"], api_key.strip('"'), "sk-upstream-"):
        assert secret not in log and secret not in json.dumps(entries(node, node.admin_key, "?limit=1000"))
    actions = [e["action"] for e in entries(node, node.admin_key, "?limit=1000")]
    assert {"webhook.create", "webhook.rotate_secret", "backend.create", "api_key.create", "tenant.create",
            "user.create"} <= set(actions)


def test_refusals_are_recorded_reads_and_inference_are_not(audit_node):
    node = audit_node
    team = tenant(node.url, node.admin_key, "team")
    user_id, user = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    before = len(entries(node, node.admin_key, "?limit=1000"))
    assert call(node.url, "POST", "/v1/tenants", user, {"slug": "mine", "name": "Mine"}).status == 403
    assert call(node.url, "GET", "/v1/api-keys", user).status == 200
    assert call(node.url, "POST", "/v1/inference/chat", user, {"model": "none/such", "messages": []}).status >= 400
    assert call(node.url, "POST", "/v1/tenants", None, {"slug": "anon", "name": "Anon"}).status == 401
    after = entries(node, node.admin_key, "?limit=1000")
    assert len(after) == before + 1  # only the signed-in caller's refused change
    refused = after[0]
    assert (refused["action"], refused["status"], refused["http_status"], refused["error_code"],
            refused["actor_id"], refused["after"]) == (
        "tenant.create", "FAILURE", 403, "AUTHZ_PERMISSION_DENIED", user_id, None)
    failures = entries(node, node.admin_key, "?status=failure")
    assert [e["id"] for e in failures] == [refused["id"]]


def test_services_webhooks_and_module_switches_are_recorded_with_their_actor_and_before(audit_node):
    node = audit_node
    team = tenant(node.url, node.admin_key, "team")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    operator = service_tokens.mint(Secret(node.env["SERVICE_TOKEN_SECRET"]), "ops-bot", 3600, scope="operator")
    assert call(node.url, "PATCH", f"/v1/tenants/{team['id']}", operator, {"name": "Renamed"}).status == 200
    body, headers = webhook(SCAIKEY_SECRET, "user.created", "sk_user_1",
                            {"email": "new@example.com", "tenant_id": "sk_tenant_1"})
    call(node.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body)
    assert call(node.url, "POST", "/v1/modules/probe/disable", admin).status == 200

    [renamed] = entries(node, node.admin_key, "?action=tenant.update")
    assert (renamed["actor_type"], renamed["actor_id"], renamed["resource_id"], renamed["tenant_id"]) == (
        "service", "service:ops-bot", team["id"], team["id"])
    assert renamed["after"]["name"] == "Renamed"
    [received] = entries(node, node.admin_key, "?resource_type=scaikey_event")
    assert (received["actor_type"], received["actor_id"], received["action"]) == (
        "webhook", "scaikey", "scaikey_event.receive")
    [switched] = entries(node, admin, "?action=module.disable")
    assert (switched["resource_id"], switched["before"]["status"], switched["after"]["status"]) == (
        "probe", "active", "disabled")


def test_each_admin_reads_only_the_entries_in_its_reach(audit_node):
    node = audit_node
    other_partner = call(node.url, "POST", "/v1/partners", node.admin_key, {"slug": "other", "name": "Other"}).data
    ours, sibling = tenant(node.url, node.admin_key, "ours"), tenant(node.url, node.admin_key, "sibling")
    foreign = tenant(node.url, node.admin_key, "foreign", partner_id=other_partner["id"])
    _, ours_admin = user_with_key(node.url, node.admin_key, ours["id"], "tenant_admin")
    _, sibling_admin = user_with_key(node.url, node.admin_key, sibling["id"], "tenant_admin")
    _, partner_admin = user_with_key(node.url, node.admin_key, ours["id"], "partner_admin")
    _, foreign_admin = user_with_key(node.url, node.admin_key, foreign["id"], "partner_admin")
    _, ours_user = user_with_key(node.url, node.admin_key, ours["id"], "tenant_user")
    for key in (ours_admin, sibling_admin, foreign_admin):
        assert call(node.url, "POST", "/v1/api-keys", key, {"name": "mine"}).status == 201

    def tenants_seen(key: str) -> set[object]:
        return {e["tenant_id"] for e in entries(node, key, "?action=api_key.create&limit=1000")}

    assert tenants_seen(ours_admin) == {ours["id"]}
    assert tenants_seen(sibling_admin) == {sibling["id"]}
    assert tenants_seen(partner_admin) == {ours["id"], sibling["id"]}
    assert tenants_seen(foreign_admin) == {foreign["id"]}
    assert {ours["id"], sibling["id"], foreign["id"]} <= tenants_seen(node.admin_key)
    for path in ("/v1/audit-log", "/v1/audit-log/export"):
        assert call(node.url, "GET", path, ours_user).code == "AUTHZ_PERMISSION_DENIED"
    # Filtering by another tenant's object gives nothing, never its entries.
    foreign_entry = entries(node, foreign_admin, "?action=api_key.create")[0]
    assert entries(node, ours_admin, f"?resource_id={foreign_entry['resource_id']}") == []


def test_filters_pages_and_the_streamed_export(audit_node):
    node = audit_node
    for n in range(3):
        assert call(node.url, "POST", "/v1/api-keys", node.admin_key, {"name": f"k{n}"}).status == 201
    first = call(node.url, "GET", "/v1/audit-log?action=api_key.create&limit=2", node.admin_key).data
    assert len(first["items"]) == 2 and first["pagination"]["has_more"]
    rest = call(node.url, "GET", f"/v1/audit-log?action=api_key.create&limit=2&cursor="
                f"{first['pagination']['next_cursor']}", node.admin_key).data
    names = [e["after"]["name"] for e in first["items"] + rest["items"]]
    assert names == ["k2", "k1", "k0"] and not rest["pagination"]["has_more"]
    later = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert entries(node, node.admin_key, f"?start={later}") == []
    assert len(entries(node, node.admin_key, f"?end={later}&action=api_key.create")) == 3
    for query, field in (("?limit=1001", "limit"), ("?status=maybe", "status"), ("?start=yesterday", "start"),
                         ("?actor=me", "actor")):
        bad = call(node.url, "GET", "/v1/audit-log" + query, node.admin_key)
        assert (bad.status, [d["field"] for d in bad.body["error"]["details"]]) == (422, [field]), query

    def export(form: str) -> tuple[str, str]:
        request = urllib.request.Request(
            f"{node.url}/v1/audit-log/export?format={form}&action=api_key.create",
            headers={"Authorization": f"Bearer {node.admin_key}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.headers["Content-Type"], response.read().decode()

    content_type, text = export("csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert content_type.startswith("text/csv")
    assert [json.loads(r["after"])["name"] for r in rows] == ["k0", "k1", "k2"]  # oldest first
    content_type, text = export("ndjson")
    assert [json.loads(line)["after"]["name"] for line in text.splitlines()] == ["k0", "k1", "k2"]
    assert [e["after"]["name"] for e in json.loads(export("json")[1])] == ["k0", "k1", "k2"]
    bad = call(node.url, "GET", "/v1/audit-log/export?format=xml", node.admin_key)
    assert (bad.status, bad.code) == (422, "VALIDATION_ERROR")


def test_retention_deletes_only_entries_older_than_the_setting(audit_node):
    node = audit_node
    for name in ("old", "recent"):
        assert call(node.url, "POST", "/v1/api-keys", node.admin_key, {"name": name}).status == 201
    env = {**node.env, "AUDIT_RETENTION_DAYS": "30"}
    sql(env, "UPDATE audit_log SET created_at = :at WHERE JSON_VALUE(`after`, '$.name') = 'old'",
        at=datetime.now(UTC).replace(tzinfo=None) - timedelta(days=31))
    result = scaigrid("job", "run", "audit_retention", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [e["after"]["name"] for e in entries(node, node.admin_key, "?action=api_key.create")]
    assert names == ["recent"]
