"""The /v1/ catalogue admin API: backends, models and routing policies, with permissions and tenancy."""

import json
from typing import Any

import pytest
import redis as sync_redis
from cryptography.fernet import Fernet

from scaigrid.cache import CHANNEL
from tests.catalogue_fixtures import add_tenant, call, sql
from tests.support.env import Node
from tests.support.waiting import eventually

SECRET = "sk-upstream-secret-0123456789"


@pytest.fixture
def env(env: dict[str, str]) -> dict[str, str]:
    """Tenants' backends here name 127.0.0.1:9 and are never called: the operator allows private targets."""
    return {**env, "BACKEND_ALLOW_PRIVATE_TARGETS": "true"}


def backend(backend_id: str, **fields: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "custom", "base_url": "http://127.0.0.1:9/v1", "model": "llama", **fields}


def model(slug: str, *backend_ids: str, **fields: Any) -> dict[str, Any]:
    return {"slug": slug, "modality": "chat", "routes": [{"backend": b} for b in backend_ids], **fields}


def error_of(reply: tuple[int, dict[str, Any]]) -> tuple[int, str]:
    status, envelope = reply
    assert envelope["status"] == ("ok" if status < 400 else "error"), envelope
    return status, envelope["error"]["code"] if status >= 400 else "ok"


def test_backends_are_managed_and_their_key_is_never_shown(node: Node) -> None:
    admin = node.admin_key
    status, reply = call(node.url, "POST", "/v1/backends", admin, backend(
        "vllm-a", api_key=SECRET, cost_input_per_mtok="0.10", timeout_s=30))
    assert status == 201, reply
    assert reply["data"] == {
        "id": "vllm-a", "provider": "custom", "base_url": "http://127.0.0.1:9/v1", "model": "llama",
        "has_api_key": True, "api_key_env": None, "cost_input_per_mtok": "0.1", "cost_output_per_mtok": "0",
        "timeout_s": 30.0, "tenant": None, "status": "active", "deployment": None, "api_version": None}
    status, listing = call(node.url, "GET", "/v1/backends", admin)
    assert status == 200 and [b["id"] for b in listing["data"]["items"]] == ["vllm-a"]
    assert listing["data"]["pagination"] == {"has_more": False, "next_cursor": None}
    assert SECRET not in str(listing)

    # PUT changes what it names and keeps the rest, the stored key included.
    status, reply = call(node.url, "PUT", "/v1/backends/vllm-a", admin, {"cost_output_per_mtok": "0.30",
                                                                         "status": "disabled"})
    assert status == 200, reply
    assert (reply["data"]["cost_output_per_mtok"], reply["data"]["status"], reply["data"]["has_api_key"],
            reply["data"]["timeout_s"]) == ("0.3", "disabled", True, 30.0)
    token = sql(node.env, "SELECT api_key_encrypted FROM backends WHERE id = 'vllm-a'")[0][0]
    assert Fernet(node.env["SCAIGRID_ENCRYPTION_KEY"].encode()).decrypt(token.encode()).decode() == SECRET
    status, reply = call(node.url, "PUT", "/v1/backends/vllm-a", admin, {"api_key_env": "SCAIGRID_BACKEND_KEY_VLLM"})
    assert status == 200 and reply["data"]["has_api_key"] is False
    assert reply["data"]["api_key_env"] == "SCAIGRID_BACKEND_KEY_VLLM"
    assert sql(node.env, "SELECT api_key_encrypted FROM backends WHERE id = 'vllm-a'")[0][0] is None
    status, reply = call(node.url, "PUT", "/v1/backends/vllm-a", admin, {"api_key": SECRET})
    assert (reply["data"]["has_api_key"], reply["data"]["api_key_env"]) == (True, None)
    status, reply = call(node.url, "PUT", "/v1/backends/vllm-a", admin, {"api_key": None})
    assert (reply["data"]["has_api_key"], reply["data"]["api_key_env"]) == (False, None)

    assert error_of(call(node.url, "POST", "/v1/backends", admin, backend("vllm-a"))) == (409, "SLUG_CONFLICT")
    assert error_of(call(node.url, "PUT", "/v1/backends/vllm-a", admin, {"id": "other"})) == (422, "VALIDATION_ERROR")
    assert error_of(call(node.url, "DELETE", "/v1/backends/vllm-a", admin)) == (200, "ok")
    for method in ("GET", "PUT", "DELETE"):
        assert error_of(call(node.url, method, "/v1/backends/vllm-a", admin, {} if method == "PUT" else None)) == (
            404, "BACKEND_NOT_FOUND")


def test_bad_bodies_are_refused_field_by_field(node: Node) -> None:
    status, reply = call(node.url, "POST", "/v1/backends", node.admin_key, {
        "id": "-x", "provider": "bedrock", "base_url": "localhost:8000", "cost_input_per_mtok": 0.5, "colour": "red"})
    assert status == 422 and reply["error"]["code"] == "VALIDATION_ERROR"
    fields = {d["field"]: d["message"] for d in reply["error"]["details"]}
    assert set(fields) == {"id", "provider", "base_url", "model", "cost_input_per_mtok", "colour"}
    assert fields["model"] == "required" and fields["colour"].startswith("unknown field")
    status, reply = call(node.url, "POST", "/v1/models", node.admin_key, raw=b"not json")
    assert status == 422 and reply["error"]["details"] == [{"field": "body", "message": "expected a JSON object"}]
    status, reply = call(node.url, "POST", "/v1/models", node.admin_key, {
        "slug": "Acme Chat", "modality": "chat", "routes": [{"backend": "x", "weight": 0}, {"priority": "1"}]})
    assert status == 422
    assert {d["field"] for d in reply["error"]["details"]} == {
        "slug", "routes[0].weight", "routes[1].backend", "routes[1].priority"}
    assert sql(node.env, "SELECT COUNT(*) FROM backends")[0][0] == 0


def test_values_the_catalogue_could_not_load_are_refused(node: Node) -> None:
    # One stored backend whose URL cannot be called would stop every process from loading the catalogue.
    for base_url in ("http://127.0.0.1:99999/v1", "http://127.0.0.1:port/v1", "http://[::1/v1"):
        status, reply = call(node.url, "POST", "/v1/backends", node.admin_key, backend("bad", base_url=base_url))
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["base_url"]), reply
    status, reply = call(node.url, "POST", "/v1/backends", node.admin_key,
                         backend("bad", cost_input_per_mtok="1e999999999999"))
    assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["cost_input_per_mtok"]), reply
    assert sql(node.env, "SELECT COUNT(*) FROM backends")[0][0] == 0
    assert call(node.url, "POST", "/v1/backends", node.admin_key, backend("good"))[0] == 201
    assert call(node.url, "POST", "/v1/models", node.admin_key, model("acme/after", "good"))[0] == 201
    eventually(lambda: "acme/after" in {
        m["slug"] for m in call(node.url, "GET", "/v1/models", node.admin_key)[1]["data"]["items"]},
        "the catalogue reloaded with acme/after", 5)


def nested(levels: int) -> dict[str, Any]:
    """A JSON object `levels` deep: {"a": {"a": ... {}}}."""
    value: dict[str, Any] = {}
    for _ in range(levels - 1):
        value = {"a": value}
    return value


def test_values_that_would_break_dispatch_later_are_refused_and_nothing_is_stored(node: Node) -> None:
    """Exploits: an api_key with CR/LF was stored and every chat to its model then answered 500; default_params with
    NaN or 900-deep nesting answered 500 from the database's constraint."""
    admin = node.admin_key
    assert call(node.url, "POST", "/v1/backends", admin, backend("kept", api_key=SECRET))[0] == 201
    assert call(node.url, "POST", "/v1/models", admin, model("acme/kept", "kept",
                                                             default_params={"temperature": 0.5}))[0] == 201
    for key in ("sk-abc\r\nX-Injected: 1", "sk-abc\n", "sk abc", "sk-\x00abc", "sk-ключ"):
        status, reply = call(node.url, "POST", "/v1/backends", admin, backend("broken", api_key=key))
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["api_key"]), (key, reply)
        status, reply = call(node.url, "PUT", "/v1/backends/kept", admin, {"api_key": key})
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["api_key"]), (key, reply)
    for field, value in (("model", "llama\n"), ("base_url", "http://127.0.0.1:9/v1\r\n")):
        status, reply = call(node.url, "POST", "/v1/backends", admin, backend("broken", **{field: value}))
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, [field]), reply
    token = sql(node.env, "SELECT api_key_encrypted FROM backends WHERE id = 'kept'")[0][0]
    assert Fernet(node.env["SCAIGRID_ENCRYPTION_KEY"].encode()).decrypt(token.encode()).decode() == SECRET
    assert [b["id"] for b in call(node.url, "GET", "/v1/backends", admin)[1]["data"]["items"]] == ["kept"]

    # NaN, Infinity and nesting past what any body may have are refused as the body is read.
    for raw in (b'{"slug": "acme/nan", "modality": "chat", "default_params": {"temperature": NaN}}',
                b'{"slug": "acme/inf", "modality": "chat", "default_params": {"top_p": Infinity}}',
                b'{"slug": "acme/deep", "modality": "chat", "default_params": ' + b'{"a": ' * 900 + b"{}"
                + b"}" * 901):
        status, reply = call(node.url, "POST", "/v1/models", admin, raw=raw)
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["body"]), reply
    # A JSON value deeper than the database takes, or with a parameter no backend takes, is refused by field.
    for params, field in ((nested(32), "default_params"), ({"max_tokens": 10**26}, "default_params.max_tokens"),
                          ({"temperature": 7}, "default_params.temperature"),
                          ({"blob": "x" * 70_000}, "default_params")):
        status, reply = call(node.url, "POST", "/v1/models", admin, model("acme/bad", "kept", default_params=params))
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, [field]), reply
        status, reply = call(node.url, "PUT", "/v1/models/acme/kept", admin, {"default_params": params})
        assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, [field]), reply
    assert sql(node.env, "SELECT slug FROM models") == [("acme/kept",)]
    assert json.loads(sql(node.env, "SELECT default_params FROM models")[0][0]) == {"temperature": 0.5}
    # As deep as the limit is stored, and read back as it was sent.
    status, reply = call(node.url, "PUT", "/v1/models/acme/kept", admin, {"default_params": nested(31)})
    assert status == 200 and reply["data"]["default_params"] == nested(31), reply


def test_models_and_their_routing_policy(node: Node) -> None:
    admin = node.admin_key
    for backend_id in ("vllm-a", "openai-b"):
        assert call(node.url, "POST", "/v1/backends", admin, backend(backend_id))[0] == 201
    status, reply = call(node.url, "POST", "/v1/models", admin, {
        **model("scailabs/poolnoodle-omni"), "display_name": "Poolnoodle", "context_window": 8192,
        "max_output_tokens": 1024, "price_input_per_mtok": "2.50", "default_params": {"temperature": 0.7},
        "routes": [{"backend": "vllm-a", "weight": 3, "priority": 1}, {"backend": "openai-b", "priority": 2}]})
    assert status == 201, reply
    assert reply["data"]["routes"] == [
        {"backend": "vllm-a", "weight": 3, "priority": 1}, {"backend": "openai-b", "weight": 1, "priority": 2}]
    assert (reply["data"]["price_input_per_mtok"], reply["data"]["default_params"]) == ("2.5", {"temperature": 0.7})
    assert error_of(call(node.url, "POST", "/v1/models", admin, model("scailabs/poolnoodle-omni"))) == (
        409, "SLUG_CONFLICT")

    # The slug's "/" is part of the path: PUT keeps what the body does not name (routes included).
    status, reply = call(node.url, "PUT", "/v1/models/scailabs/poolnoodle-omni", admin, {"status": "deprecated"})
    assert status == 200, reply
    assert (reply["data"]["status"], reply["data"]["context_window"], len(reply["data"]["routes"])) == (
        "deprecated", 8192, 2)
    status, reply = call(node.url, "PUT", "/v1/models/scailabs/poolnoodle-omni", admin, {"max_output_tokens": 9000})
    assert status == 422 and reply["error"]["details"][0]["field"] == "max_output_tokens"

    status, reply = call(node.url, "PUT", "/v1/routing/scailabs/poolnoodle-omni", admin,
                         {"routes": [{"backend": "openai-b", "weight": 2}]})
    assert status == 200 and reply["data"]["routes"] == [{"backend": "openai-b", "weight": 2, "priority": 1}]
    status, reply = call(node.url, "GET", "/v1/routing/scailabs/poolnoodle-omni", admin)
    assert reply["data"] == {"model": "scailabs/poolnoodle-omni",
                             "routes": [{"backend": "openai-b", "weight": 2, "priority": 1}]}
    status, reply = call(node.url, "PUT", "/v1/routing/scailabs/poolnoodle-omni", admin,
                         {"routes": [{"backend": "nowhere"}]})
    assert status == 422 and reply["error"]["details"][0]["field"] == "routes[0].backend"

    # A backend still routed cannot go: the model would silently lose it.
    status, reply = call(node.url, "DELETE", "/v1/backends/openai-b", admin)
    assert (status, reply["error"]["code"]) == (409, "BACKEND_IN_USE")
    assert "scailabs/poolnoodle-omni" in reply["error"]["message"]
    # Nor a model still mapped to backends: its routes go first (the documented order), and nothing is lost.
    status, reply = call(node.url, "DELETE", "/v1/models/scailabs/poolnoodle-omni", admin)
    assert (status, reply["error"]["code"]) == (409, "MODEL_HAS_BACKENDS")
    assert "openai-b" in reply["error"]["message"]
    assert call(node.url, "GET", "/v1/routing/scailabs/poolnoodle-omni", admin)[1]["data"]["routes"] == [
        {"backend": "openai-b", "weight": 2, "priority": 1}]
    assert error_of(call(node.url, "PUT", "/v1/routing/scailabs/poolnoodle-omni", admin, {"routes": []})) == (
        200, "ok")
    assert error_of(call(node.url, "DELETE", "/v1/models/scailabs/poolnoodle-omni", admin)) == (200, "ok")
    assert error_of(call(node.url, "DELETE", "/v1/backends/openai-b", admin)) == (200, "ok")
    for method, path in (("PUT", "/v1/models/"), ("DELETE", "/v1/models/"), ("GET", "/v1/routing/"),
                         ("PUT", "/v1/routing/")):
        body = {"routes": []} if method == "PUT" else None
        assert error_of(call(node.url, method, path + "scailabs/poolnoodle-omni", admin, body)) == (
            404, "MODEL_NOT_FOUND"), (method, path)


def test_roles_decide_who_reads_and_who_writes(node: Node) -> None:
    assert call(node.url, "POST", "/v1/backends", node.admin_key, backend("shared-1"))[0] == 201
    viewer = node.key("tenant_admin")  # routing:view, not routing:manage
    assert call(node.url, "GET", "/v1/backends/shared-1", viewer)[0] == 200
    assert error_of(call(node.url, "POST", "/v1/backends", viewer, backend("mine"))) == (403, "AUTHZ_PERMISSION_DENIED")
    assert error_of(call(node.url, "PUT", "/v1/backends/shared-1", viewer, {})) == (403, "AUTHZ_PERMISSION_DENIED")
    assert error_of(call(node.url, "POST", "/v1/models", viewer, model("x"))) == (403, "AUTHZ_PERMISSION_DENIED")
    user = node.key("tenant_user")
    assert error_of(call(node.url, "GET", "/v1/backends", user)) == (403, "AUTHZ_PERMISSION_DENIED")
    assert error_of(call(node.url, "GET", "/v1/backends", "sgk_" + "x" * 40)) == (401, "AUTH_TOKEN_INVALID")


def test_a_tenant_neither_sees_nor_uses_another_tenants_backends_and_models(node: Node) -> None:
    add_tenant(node.env, "acme")  # partner "default"
    add_tenant(node.env, "globex", partner="globex-partner")
    admin = node.admin_key
    for body in (backend("shared-1"), backend("acme-gpu", tenant="acme"), backend("globex-gpu", tenant="globex"),
                 backend("globex-box", tenant="globex")):
        assert call(node.url, "POST", "/v1/backends", admin, body)[0] == 201
    assert call(node.url, "POST", "/v1/models", admin, model("globex/chat", "globex-gpu", tenant="globex"))[0] == 201

    acme_admin = node.key("tenant_admin", "acme")
    status, listing = call(node.url, "GET", "/v1/backends", acme_admin)
    assert sorted(b["id"] for b in listing["data"]["items"]) == ["acme-gpu", "shared-1"]
    assert error_of(call(node.url, "GET", "/v1/backends/globex-gpu", acme_admin)) == (404, "BACKEND_NOT_FOUND")
    assert error_of(call(node.url, "GET", "/v1/routing/globex/chat", acme_admin)) == (404, "MODEL_NOT_FOUND")

    # A partner admin manages its partner's tenants only, and shared objects not at all.
    partner_admin = node.key("partner_admin")  # partner "default": tenants default and acme
    status, listing = call(node.url, "GET", "/v1/backends", partner_admin)
    assert sorted(b["id"] for b in listing["data"]["items"]) == ["acme-gpu", "shared-1"]
    assert call(node.url, "POST", "/v1/backends", partner_admin, backend("acme-2", tenant="acme"))[0] == 201
    status, reply = call(node.url, "POST", "/v1/backends", partner_admin, backend("mine"))
    assert (status, reply["error"]["code"]) == (403, "AUTHZ_PERMISSION_DENIED")
    assert "name a tenant" in reply["error"]["message"]
    status, reply = call(node.url, "POST", "/v1/backends", partner_admin, backend("theirs", tenant="globex"))
    assert status == 422 and reply["error"]["details"][0]["field"] == "tenant"
    assert error_of(call(node.url, "PUT", "/v1/backends/shared-1", partner_admin, {"status": "disabled"})) == (
        403, "AUTHZ_PERMISSION_DENIED")
    for method in ("PUT", "DELETE"):
        assert error_of(call(node.url, method, "/v1/backends/globex-gpu", partner_admin,
                             {} if method == "PUT" else None)) == (404, "BACKEND_NOT_FOUND")
        assert error_of(call(node.url, method, "/v1/models/globex/chat", partner_admin,
                             {} if method == "PUT" else None)) == (404, "MODEL_NOT_FOUND")
    # Another tenant's id is acme's to use too: names are unique per tenant, and tell nothing across tenants.
    assert error_of(call(node.url, "POST", "/v1/backends", partner_admin, backend("globex-gpu", tenant="acme"))) == (
        201, "ok")

    # Nor can acme's model be routed to globex's server, or a shared model to acme's.
    status, reply = call(node.url, "POST", "/v1/models", partner_admin, model("acme/chat", "globex-box", tenant="acme"))
    assert status == 422 and reply["error"]["details"][0]["field"] == "routes[0].backend"
    status, reply = call(node.url, "POST", "/v1/models", partner_admin,
                         model("acme/chat", "acme-gpu", "shared-1", tenant="acme"))
    assert status == 201, reply
    status, reply = call(node.url, "POST", "/v1/models", admin, model("shared/chat", "acme-gpu"))
    assert status == 422 and reply["error"]["details"][0]["field"] == "routes[0].backend"
    # A backend's tenant is part of what it is (its id is unique within the tenant only): it never moves.
    status, reply = call(node.url, "PUT", "/v1/backends/acme-gpu?tenant=acme", admin, {"tenant": "globex"})
    assert status == 422 and reply["error"]["details"][0]["field"] == "tenant"
    owners = sql(node.env, "SELECT SUBSTRING_INDEX(b.id, '@', 1) AS name, t.slug FROM backends b "
                           "JOIN tenants t ON t.id = b.tenant_id ORDER BY t.slug, name")
    assert [tuple(row) for row in owners] == [
        ("acme-2", "acme"), ("acme-gpu", "acme"), ("globex-gpu", "acme"), ("globex-box", "globex"),
        ("globex-gpu", "globex")]


def test_names_are_unique_per_tenant_so_they_neither_block_nor_reveal_across_partners(node: Node) -> None:
    add_tenant(node.env, "acme", partner="acme-partner")
    add_tenant(node.env, "globex", partner="globex-partner")
    admin = node.admin_key  # tenant "default"
    assert call(node.url, "POST", "/v1/backends", admin, backend("vllm-1", model="platform-llama"))[0] == 201
    assert call(node.url, "POST", "/v1/models", admin, model("shared/name", "vllm-1", display_name="platform"))[0] == (
        201)
    partner_admins = {"acme": node.key("partner_admin", "acme"), "globex": node.key("partner_admin", "globex")}
    for tenant, key in partner_admins.items():
        status, reply = call(node.url, "POST", "/v1/backends", key, backend("vllm-1", tenant=tenant,
                                                                            model=f"{tenant}-llama"))
        assert (status, reply["data"]["id"], reply["data"]["tenant"]) == (201, "vllm-1", tenant), reply
        status, reply = call(node.url, "POST", "/v1/models", key, model("shared/name", "vllm-1", tenant=tenant,
                                                                        display_name=tenant))
        assert (status, reply["data"]["tenant"]) == (201, tenant), reply
        # Within one tenant (as within the platform) a name is still taken.
        assert error_of(call(node.url, "POST", "/v1/backends", key, backend("vllm-1", tenant=tenant))) == (
            409, "SLUG_CONFLICT")
        assert error_of(call(node.url, "POST", "/v1/models", key, model("shared/name", tenant=tenant))) == (
            409, "SLUG_CONFLICT")
    assert error_of(call(node.url, "POST", "/v1/backends", admin, backend("vllm-1"))) == (409, "SLUG_CONFLICT")
    assert error_of(call(node.url, "POST", "/v1/models", admin, model("shared/name"))) == (409, "SLUG_CONFLICT")

    for mine, theirs in (("acme", "globex"), ("globex", "acme")):
        key = partner_admins[mine]
        status, reply = call(node.url, "GET", "/v1/backends/vllm-1", key)  # its own tenant's, over the platform's
        assert (status, reply["data"]["model"], reply["data"]["tenant"]) == (200, f"{mine}-llama", mine)
        listing = call(node.url, "GET", "/v1/backends", key)[1]["data"]["items"]
        assert sorted((b["id"], b["tenant"] or "") for b in listing) == [("vllm-1", ""), ("vllm-1", mine)]
        assert call(node.url, "GET", "/v1/routing/shared/name", key)[1]["data"]["routes"] == [
            {"backend": "vllm-1", "weight": 1, "priority": 1}]
        # The other partner's names answer exactly as names nobody has.
        for name, missing in (("vllm-1", "no-such-backend"), ("shared/name", "no/such-model")):
            for method, path in (("GET", "/v1/backends/{}"), ("PUT", "/v1/backends/{}"), ("DELETE", "/v1/backends/{}"),
                                 ("GET", "/v1/backends/{}/health"), ("PUT", "/v1/models/{}"),
                                 ("DELETE", "/v1/models/{}"), ("GET", "/v1/routing/{}"), ("PUT", "/v1/routing/{}")):
                if ("backends" in path) != (name == "vllm-1"):
                    continue
                body = ({"routes": []} if "routing" in path else {}) if method == "PUT" else None
                taken = call(node.url, method, path.format(name) + f"?tenant={theirs}", key, body)
                free = call(node.url, method, path.format(missing) + f"?tenant={theirs}", key, body)
                assert error_of(taken) == error_of(free) == (
                    404, "BACKEND_NOT_FOUND" if "backends" in path else "MODEL_NOT_FOUND"), (method, path)
                assert taken[1]["error"]["message"] == free[1]["error"]["message"].replace(missing, name)

    # The super_admin reaches each by naming its tenant; a change to one leaves the others as they were.
    status, reply = call(node.url, "PUT", "/v1/backends/vllm-1?tenant=globex", admin, {"status": "disabled"})
    assert (status, reply["data"]["tenant"], reply["data"]["status"]) == (200, "globex", "disabled"), reply
    statuses = {(b["tenant"], b["status"]) for b in call(node.url, "GET", "/v1/backends", admin)[1]["data"]["items"]}
    assert statuses == {(None, "active"), ("acme", "active"), ("globex", "disabled")}

    # Inference: a tenant's own model shadows the platform's of the same slug, for that tenant only.
    def offered(tenant: str) -> str | None:
        status, reply = call(node.url, "GET", "/v1/models", users[tenant])
        names = [m["display_name"] for m in reply["data"]["items"] if m["slug"] == "shared/name"]
        assert status == 200 and len(names) <= 1, reply
        return names[0] if names else None

    users = {tenant: node.key("tenant_user", tenant) for tenant in ("default", "acme", "globex")}
    eventually(lambda: [offered(t) for t in users] == ["platform", "acme", "globex"], "each tenant's own model")
    status, reply = call(node.url, "GET", "/v1/models/shared/name", users["acme"])
    assert (status, reply["data"]["owned_by"]) == (200, "acme")
    assert error_of(call(node.url, "PUT", "/v1/routing/shared/name?tenant=acme", partner_admins["acme"],
                         {"routes": []})) == (200, "ok")
    assert error_of(call(node.url, "DELETE", "/v1/models/shared/name?tenant=acme", partner_admins["acme"])) == (
        200, "ok")
    eventually(lambda: [offered(t) for t in users] == ["platform", "platform", "globex"], "the platform's again")


def test_every_change_is_announced(node: Node) -> None:
    with sync_redis.Redis.from_url(node.env["REDIS_URL"]) as client, client.pubsub() as pubsub:
        pubsub.subscribe(CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        assert call(node.url, "POST", "/v1/backends", node.admin_key, backend("vllm-a"))[0] == 201
        message = pubsub.get_message(timeout=5)
        assert message is not None and message["data"] == b"catalogue:"
        assert call(node.url, "POST", "/v1/backends", node.admin_key, backend("-bad"))[0] == 422
        assert pubsub.get_message(timeout=0.5) is None  # nothing stored, nothing to reload


def test_models_take_and_show_the_documented_names_and_the_former_ones(node: Node) -> None:
    admin = node.admin_key
    assert call(node.url, "POST", "/v1/backends", admin, backend("vllm-a"))[0] == 201
    status, reply = call(node.url, "POST", "/v1/models", admin, model(
        "acme/doc", "vllm-a", description="Our chat model.\nGood at German.", input_price_per_mtok="2.50",
        output_price_per_mtok="10"))
    assert status == 201, reply
    created = reply["data"]
    assert created["id"].startswith("mdl_") and created["description"] == "Our chat model.\nGood at German."
    assert {name: created[name] for name in ("input_price_per_mtok", "output_price_per_mtok", "price_input_per_mtok",
                                             "price_output_per_mtok")} == {
        "input_price_per_mtok": "2.5", "output_price_per_mtok": "10", "price_input_per_mtok": "2.5",
        "price_output_per_mtok": "10"}

    # The former name still writes; a PUT keeps what it does not name.
    status, reply = call(node.url, "PUT", "/v1/models/acme/doc", admin, {"price_input_per_mtok": "3"})
    assert status == 200, reply
    assert (reply["data"]["input_price_per_mtok"], reply["data"]["output_price_per_mtok"],
            reply["data"]["description"], reply["data"]["id"]) == ("3", "10", created["description"], created["id"])
    # Both names alike are one price; two different prices are refused, and nothing changes.
    assert call(node.url, "PUT", "/v1/models/acme/doc", admin, {
        "input_price_per_mtok": "4.0", "price_input_per_mtok": "4"})[1]["data"]["input_price_per_mtok"] == "4"
    status, reply = call(node.url, "PUT", "/v1/models/acme/doc", admin, {
        "output_price_per_mtok": "1", "price_output_per_mtok": "2", "description": "x" * 4001})
    assert status == 422 and {d["field"] for d in reply["error"]["details"]} == {"price_output_per_mtok",
                                                                                "description"}, reply
    assert sql(node.env, "SELECT price_output_per_mtok, description FROM models")[0] == (10, created["description"])

    # Inference's view: the stable id, the description, both names, and the health of its backends.
    def shown() -> dict[str, Any]:
        status, reply = call(node.url, "GET", "/v1/models/acme/doc", node.key("tenant_user"))
        return reply["data"] if status == 200 else {}

    eventually(lambda: shown().get("input_price_per_mtok") == "4", "the catalogue reloaded", 5)
    item = shown()
    assert (item["id"], item["description"], item["price_input_per_mtok"], item["capabilities"]) == (
        created["id"], created["description"], "4", ["chat", "streaming"])
    assert (item["health_status"], item["active_backend_count"], item["total_backend_count"]) == ("healthy", 1, 1)


def test_models_are_listed_a_page_at_a_time_and_filtered(node: Node) -> None:
    admin = node.admin_key
    assert call(node.url, "POST", "/v1/backends", admin, backend("vllm-a"))[0] == 201
    for slug, modality, status in (("p/a", "chat", "active"), ("p/b", "embedding", "active"),
                                   ("p/c", "chat", "deprecated"), ("p/d", "chat", "active"),
                                   ("p/e", "image", "active")):
        assert call(node.url, "POST", "/v1/models", admin, {
            "slug": slug, "modality": modality, "status": status, "routes": []})[0] == 201
    user = node.key("tenant_user")

    def slugs(query: str) -> tuple[list[str], dict[str, Any]]:
        status, reply = call(node.url, "GET", "/v1/models" + query, user)
        assert status == 200, reply
        return [m["slug"] for m in reply["data"]["items"]], reply["data"]["pagination"]

    eventually(lambda: len(slugs("")[0]) == 5, "every model listed", 5)
    seen, cursor = [], ""
    while True:
        page, pagination = slugs(f"?limit=2{cursor}")
        seen += page
        if not pagination["has_more"]:
            break
        cursor = f"&cursor={pagination['next_cursor']}"
    assert seen == ["p/a", "p/b", "p/c", "p/d", "p/e"]
    assert slugs("?modality=chat&status=active")[0] == ["p/a", "p/d"]
    assert slugs("?status=deprecated")[0] == ["p/c"]
    page, pagination = slugs("?modality=chat&limit=1")
    assert (page, pagination["has_more"]) == (["p/a"], True)
    assert slugs(f"?modality=chat&limit=1&cursor={pagination['next_cursor']}")[0] == ["p/c"]
    # A model without routes is unavailable, and says so.
    item = call(node.url, "GET", "/v1/models/p/a", user)[1]["data"]
    assert (item["health_status"], item["active_backend_count"], item["total_backend_count"]) == ("unavailable", 0, 0)

    status, reply = call(node.url, "GET", "/v1/models?modality=video&status=retired&limit=0&cursor=%%%", user)
    assert (status, reply["error"]["code"]) == (422, "VALIDATION_ERROR")
    assert {d["field"] for d in reply["error"]["details"]} == {"modality", "status", "limit", "cursor"}
    status, reply = call(node.url, "GET", "/v1/models?provider=openai", user)
    assert (status, [d["field"] for d in reply["error"]["details"]]) == (422, ["provider"])
