"""Modules admin on real http processes: the listing, switching a module off and on per tenant and per partner
(MODULE_NOT_ENABLED on its routes, on every process at once, data kept), and who may switch what."""

import secrets

import pytest

from appliance import devstack
from tests.identity import call, tenant, user_with_key
from tests.support.env import Node, create_key
from tests.support.processes import start_http
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)

WHOAMI = "/v1/modules/probe/whoami"


@pytest.fixture
def probe_node(migrated_env, start_mode) -> Node:
    """Probe enabled, ScaiBunker left out (so it is `available`)."""
    env = {**migrated_env, "SCAIGRID_MODULES": "tests.modules.probe:MODULE"}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


def _by_id(items: list[dict[str, object]]) -> dict[object, dict[str, object]]:
    return {item["module_id"]: item for item in items}


def test_the_listing_describes_every_module_the_node_knows(probe_node):
    node = probe_node
    team = tenant(node.url, node.admin_key, "team")
    _, user = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    reply = call(node.url, "GET", "/v1/modules", user)
    assert reply.status == 200
    modules = _by_id(reply.data["items"])
    assert modules["probe"] == {
        "id": "probe", "module_id": "probe", "display_name": "Probe", "version": "0.1.0",
        "description": "test module: counts worker ticks, streams slowly, answers signed-in callers",
        "status": "active", "disabled_by": None, "tenant_id": team["id"],
        "permissions": [{"key": "probe:ticks:manage", "display_name": "Manage ticks",
                         "description": "count the worker's ticks"}],
        "dependencies": []}
    bunker = modules["scaibunker"]
    assert bunker["status"] == "available" and bunker["display_name"] == "ScaiBunker"
    assert [p["key"] for p in bunker["permissions"]] == ["scaibunker:images:manage"]
    assert call(node.url, "GET", "/v1/modules/probe", user).data == modules["probe"]
    assert call(node.url, "GET", "/v1/modules/nothing", user).status == 404
    # Only the operator adds a module to the node; a tenant cannot switch on what the node does not run.
    refused = call(node.url, "POST", "/v1/modules/scaibunker/enable", node.admin_key)
    assert (refused.status, refused.code) == (409, "MODULE_NOT_AVAILABLE")
    viewer = user_with_key(node.url, node.admin_key, team["id"], "tenant_viewer")[1]
    assert call(node.url, "GET", "/v1/modules", viewer).code == "AUTHZ_PERMISSION_DENIED"


def test_a_tenant_switches_a_module_off_and_on_on_every_process(probe_node, start_mode):
    node = probe_node
    other_env = {**node.env, "HTTP_PORT": str(devstack.free_ports(1)[0])}
    second = f"http://127.0.0.1:{other_env['HTTP_PORT']}"
    start_http(start_mode, other_env)
    team, others = tenant(node.url, node.admin_key, "team"), tenant(node.url, node.admin_key, "others")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    _, user = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")
    _, other_user = user_with_key(node.url, node.admin_key, others["id"], "tenant_user")
    for url in (node.url, second):  # both processes have loaded the switches: later changes must reach them
        assert call(url, "GET", WHOAMI, user).data == {"tenant_id": team["id"]}

    off = call(node.url, "POST", "/v1/modules/probe/disable", admin)
    assert off.status == 200
    assert (off.data["status"], off.data["disabled_by"], off.data["scope"], off.data["scope_id"]) == (
        "disabled", "tenant", "tenant", team["id"])
    for url in (node.url, second):
        eventually(lambda url=url: call(url, "GET", WHOAMI, user).status == 403, "the module is off for the tenant")
        refused = call(url, "GET", WHOAMI, user)
        assert refused.code == "MODULE_NOT_ENABLED" and refused.body["meta"]["request_id"].startswith("req_")
        assert call(url, "GET", WHOAMI, other_user).status == 200  # another tenant keeps it
    listed = _by_id(call(second, "GET", "/v1/modules", user).data["items"])["probe"]
    assert (listed["status"], listed["disabled_by"]) == ("disabled", "tenant")

    assert call(second, "POST", "/v1/modules/probe/enable", admin, {}).data["status"] == "active"
    for url in (node.url, second):
        eventually(lambda url=url: call(url, "GET", WHOAMI, user).status == 200, "the module is back on")


def test_a_partner_switch_wins_over_its_tenants(probe_node):
    node = probe_node
    team = tenant(node.url, node.admin_key, "team")
    _, partner_admin = user_with_key(node.url, node.admin_key, team["id"], "partner_admin")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    _, user = user_with_key(node.url, node.admin_key, team["id"], "tenant_user")

    off = call(node.url, "POST", "/v1/modules/probe/disable", partner_admin, {"scope": "partner"})
    assert (off.status, off.data["scope"], off.data["disabled_by"]) == (200, "partner", "partner")
    eventually(lambda: call(node.url, "GET", WHOAMI, user).status == 403, "the partner's switch applies")
    # The tenant's own switch cannot lift its partner's, and a tenant admin has no partner scope.
    on = call(node.url, "POST", "/v1/modules/probe/enable", admin)
    assert (on.status, on.data["status"], on.data["disabled_by"]) == (200, "disabled", "partner")
    assert call(node.url, "GET", WHOAMI, user).code == "MODULE_NOT_ENABLED"
    lifted = call(node.url, "POST", "/v1/modules/probe/enable", admin, {"scope": "partner"})
    assert (lifted.status, lifted.code) == (403, "AUTHZ_PERMISSION_DENIED")

    assert call(node.url, "POST", "/v1/modules/probe/enable", partner_admin, {"scope": "partner"}).status == 200
    eventually(lambda: call(node.url, "GET", WHOAMI, user).status == 200, "the partner switched it back on")
    bad = call(node.url, "POST", "/v1/modules/probe/disable", admin, {"scope": "everyone", "extra": 1})
    assert (bad.status, {d["field"] for d in bad.body["error"]["details"]}) == (422, {"scope", "extra"})
    assert call(node.url, "GET", WHOAMI, user).status == 200  # a refused body changed nothing


def test_no_one_switches_a_module_for_a_tenant_or_partner_out_of_reach(probe_node):
    node = probe_node
    other_partner = call(node.url, "POST", "/v1/partners", node.admin_key,
                         {"slug": "other-" + secrets.token_hex(3), "name": "Other"}).data
    victim = tenant(node.url, node.admin_key, "victim")
    sibling = tenant(node.url, node.admin_key, "sibling")
    foreign = tenant(node.url, node.admin_key, "foreign", partner_id=other_partner["id"])
    _, victim_user = user_with_key(node.url, node.admin_key, victim["id"], "tenant_user")
    _, sibling_admin = user_with_key(node.url, node.admin_key, sibling["id"], "tenant_admin")
    _, foreign_partner_admin = user_with_key(node.url, node.admin_key, foreign["id"], "partner_admin")
    _, victim_tenant_user = user_with_key(node.url, node.admin_key, victim["id"], "tenant_user")

    for key, body, status in (
            (sibling_admin, {"tenant_id": victim["id"]}, 404),
            (foreign_partner_admin, {"tenant_id": victim["id"]}, 404),
            (foreign_partner_admin, {"scope": "partner", "partner_id": victim["partner_id"]}, 404),
            (sibling_admin, {"scope": "partner"}, 403),
            (victim_tenant_user, {}, 403)):
        assert call(node.url, "POST", "/v1/modules/probe/disable", key, body).status == status, body
    assert call(node.url, "GET", f"/v1/modules?tenant_id={victim['id']}", sibling_admin).status == 404
    assert call(node.url, "GET", WHOAMI, victim_user).status == 200


def test_storage_capabilities_are_not_minted_for_a_tenant_that_switched_scaibunker_off(migrated_env, start_mode):
    env = {**migrated_env, "STORAGE_CAPABILITY_SECRET": secrets.token_hex(32)}
    node = Node(env, start_http(start_mode, env), create_key(env, "super_admin"))
    team = tenant(node.url, node.admin_key, "team")
    _, admin = user_with_key(node.url, node.admin_key, team["id"], "tenant_admin")
    mint = "/v1/modules/scaibunker/storage/capabilities"
    minted = call(node.url, "POST", mint, admin, {"prefix": "", "verbs": ["PUT", "GET"]})
    assert minted.status == 201
    assert call(node.url, "POST", "/v1/modules/scaibunker/disable", admin).status == 200
    eventually(lambda: call(node.url, "POST", mint, admin, {"prefix": "", "verbs": ["GET"]}).status == 403,
               "minting is refused")
    assert call(node.url, "POST", mint, admin, {"prefix": "", "verbs": ["GET"]}).code == "MODULE_NOT_ENABLED"
    # From above too: the platform minting for that tenant is refused, for its own tenant it is not.
    for_team = call(node.url, "POST", mint, node.admin_key, {"prefix": "", "verbs": ["GET"], "tenant_id": team["id"]})
    assert (for_team.status, for_team.code) == (403, "MODULE_NOT_ENABLED")
    assert call(node.url, "POST", mint, node.admin_key, {"prefix": "", "verbs": ["GET"]}).status == 201
    assert call(node.url, "POST", "/v1/modules/scaibunker/enable", admin).status == 200
    eventually(lambda: call(node.url, "POST", mint, admin, {"prefix": "", "verbs": ["GET"]}).status == 201,
               "minting is back")
