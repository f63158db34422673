"""Backends cannot be turned against the node (issue 13, point 2): no key from the node's own environment, no
tenant's backend on a non-global address (at validation and at connect), no redirects, no upstream words below
platform reach, no URL credentials or shared URLs shown. Every request stays on loopback: the fakes listen there,
and the addresses refused at validation are never connected to."""

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from appliance import devstack
from tests.backends import (  # noqa: F401
    REFUSAL_TEXT,
    FakeBackend,
    chat_call,
    fake_fixture,
    models_listed,
    shared_env,
    two_http_processes,
)
from tests.catalogue_fixtures import call, sql
from tests.support.env import create_key
from tests.support.waiting import eventually

PUBLIC_URL = "http://93.184.216.34/v1"  # a global address: passes the guard (never called: no model routes to it)


@dataclass
class Guarded:
    """Two http processes of one node: `strict` with the default settings, `allowing` with
    BACKEND_ALLOW_PRIVATE_TARGETS=true (where a tenant's backend on loopback can be saved and served)."""

    env: dict[str, str]
    strict: str
    allowing: str
    admin: str  # super_admin
    partner_admin: str  # partner "default"
    tenant_admin: str
    user: str

    def chat(self, url: str, model: str, key: str | None = None) -> tuple[int, str]:
        status, body = chat_call(url, key or self.user, model)
        return status, body.decode()

    def served(self, model: str) -> None:
        for url in (self.strict, self.allowing):
            eventually(lambda url=url: model in models_listed(url, self.user), f"{model} served at {url}")

    def health(self, backend_id: str, key: str) -> dict[str, Any]:
        status, reply = call(self.strict, "GET", f"/v1/backends/{backend_id}/health", key)
        assert status == 200, reply
        return reply["data"]


@pytest.fixture(scope="module")
def guarded_node(mariadb: devstack.MariaDB, redis_server: devstack.Redis, s3_server: devstack.S3Server,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guarded]:
    tmp_path = tmp_path_factory.mktemp("guard")
    with (shared_env(mariadb, redis_server, s3_server) as env,
          two_http_processes(env, tmp_path, BACKEND_ALLOW_PRIVATE_TARGETS="true") as (strict, allowing)):
        yield Guarded(env, strict, allowing, create_key(env, "super_admin"), create_key(env, "partner_admin"),
                      create_key(env, "tenant_admin"), create_key(env, "tenant_user"))


@pytest.fixture
def node(guarded_node: Guarded, fake: FakeBackend) -> Guarded:
    fake.received.clear()
    return guarded_node


@pytest.fixture(scope="module")
def elsewhere() -> Iterator[FakeBackend]:
    """A second fake on loopback: where a redirect would lead."""
    server = FakeBackend().start()
    yield server
    server.stop()


def refused_fields(reply: tuple[int, dict[str, Any]]) -> dict[str, str]:
    status, envelope = reply
    assert (status, envelope["error"]["code"]) == (422, "VALIDATION_ERROR"), envelope
    return {detail["field"]: detail["message"] for detail in envelope["error"]["details"]}


def tenant_backend(backend_id: str, base_url: str, model: str = "ok", **extra: Any) -> dict[str, Any]:
    return {"id": backend_id, "provider": "custom", "base_url": base_url, "model": model, "tenant": "default", **extra}


def test_a_backend_key_comes_only_from_the_operators_variables(node: Guarded, fake: FakeBackend) -> None:
    shared = {"id": "env-key", "provider": "custom", "base_url": PUBLIC_URL, "model": "m"}
    for name in ("SERVICE_TOKEN_SECRET", "DATABASE_URL", "SCAIGRID_ENCRYPTION_KEY", "scaigrid_backend_key_x"):
        for key, body in ((node.partner_admin, tenant_backend("env-key", PUBLIC_URL)), (node.admin, shared)):
            fields = refused_fields(call(node.strict, "POST", "/v1/backends", key, {**body, "api_key_env": name}))
            assert list(fields) == ["api_key_env"] and "SCAIGRID_BACKEND_KEY_" in fields["api_key_env"]
    assert sql(node.env, "SELECT id FROM backends WHERE id = 'env-key' OR id LIKE 'env-key@%'") == []
    assert call(node.strict, "POST", "/v1/backends", node.partner_admin, tenant_backend(
        "env-key", PUBLIC_URL, api_key_env="SCAIGRID_BACKEND_KEY_ACME"))[0] == 201

    # A row stored before the rule is never read from the environment: the backend gets no key, not the secret.
    sql(node.env, "INSERT INTO backends (id, provider, base_url, model, api_key_env) "
                  "VALUES ('legacy-env', 'custom', :url, 'ok', 'SERVICE_TOKEN_SECRET')", url=fake.url)
    assert call(node.strict, "POST", "/v1/models", node.admin, {
        "slug": "g/legacy", "modality": "chat", "routes": [{"backend": "legacy-env"}]})[0] == 201
    node.served("g/legacy")
    assert node.chat(node.strict, "g/legacy")[0] == 200
    [received] = fake.received
    assert received.authorization is None
    assert node.env["SERVICE_TOKEN_SECRET"] not in str(received)


def test_a_tenants_backend_on_a_non_global_address_is_refused_when_saved(node: Guarded) -> None:
    own_port = node.strict.rsplit(":", 1)[1]
    for url in ("http://169.254.169.254/latest", "http://10.0.0.1/v1", "http://[::1]:8000/v1", "http://0.0.0.0/v1",
                "http://100.64.0.1/v1", "http://[2002:7f00:1::]/v1", "http://[::ffff:127.0.0.1]/v1",
                f"http://127.0.0.1:{own_port}/v1", f"http://localhost:{own_port}/v1", "http://[fd00::1]/v1"):
        fields = refused_fields(call(node.strict, "POST", "/v1/backends", node.partner_admin,
                                     tenant_backend("inside", url)))
        assert list(fields) == ["base_url"] and "BACKEND_ALLOW_PRIVATE_TARGETS" in fields["base_url"], (url, fields)
    # The owner decides, not the writer: a tenant's backend is guarded whoever saves it.
    fields = refused_fields(call(node.strict, "POST", "/v1/backends", node.admin,
                                 tenant_backend("inside", "http://10.0.0.1/v1")))
    assert "10.0.0.1 is a private address" in fields["base_url"]
    assert sql(node.env, "SELECT id FROM backends WHERE id = 'inside' OR id LIKE 'inside@%'") == []

    # Changing a saved backend to such an address is refused too, and the stored one stays.
    outside = tenant_backend("outside", PUBLIC_URL)
    assert call(node.strict, "POST", "/v1/backends", node.partner_admin, outside)[0] == 201
    refused_fields(call(node.strict, "PUT", "/v1/backends/outside", node.partner_admin,
                        {"base_url": "http://169.254.169.254/v1"}))
    assert sql(node.env, "SELECT base_url FROM backends WHERE id LIKE 'outside@%'")[0][0] == PUBLIC_URL

    # Credentials in a URL are refused for everyone: a key goes in api_key, encrypted and never shown.
    fields = refused_fields(call(node.strict, "POST", "/v1/backends", node.admin, {
        "id": "creds", "provider": "custom", "base_url": "http://ops:hunter2@10.0.0.7/v1", "model": "m"}))
    assert "credentials" in fields["base_url"]

    # The platform's shared backends may be on the site network (an on-prem vLLM on 10.x); an operator who allows
    # private targets lets tenants' backends be there too.
    assert call(node.strict, "POST", "/v1/backends", node.admin, {
        "id": "onprem", "provider": "custom", "base_url": "http://10.0.0.1:8000/v1", "model": "m"})[0] == 201
    assert call(node.allowing, "POST", "/v1/backends", node.partner_admin,
                tenant_backend("inside", "http://10.0.0.1/v1"))[0] == 201


def test_a_tenants_backend_is_guarded_again_when_connecting(node: Guarded, fake: FakeBackend) -> None:
    """Saved while private targets were allowed, served by a process where they are not: a name resolving to
    loopback (through the guarded resolver) and a loopback IP literal are both refused, and the fake gets nothing."""
    for backend_id, host in (("site-name", "localhost"), ("site-literal", "127.0.0.1")):
        assert call(node.allowing, "POST", "/v1/backends", node.partner_admin,
                    tenant_backend(backend_id, f"http://{host}:{fake.port}/v1"))[0] == 201
    assert call(node.allowing, "POST", "/v1/models", node.partner_admin, {
        "slug": "site/chat", "modality": "chat", "tenant": "default",
        "routes": [{"backend": "site-name", "priority": 1}, {"backend": "site-literal", "priority": 2}]})[0] == 201
    node.served("site/chat")

    status, body = node.chat(node.strict, "site/chat")
    assert status == 502 and '"BACKEND_ERROR"' in body, body
    assert fake.received == []
    for backend_id in ("site-name", "site-literal"):
        assert node.health(backend_id, node.partner_admin)["last_error"] == "connect: refused target"
        full = node.health(backend_id, node.admin)["last_error"]
        assert full.startswith("connect: refused target: ") and "loopback" in full, full

    # The same backends, where the operator allows private targets: served (the refusal above was the guard's).
    assert node.chat(node.allowing, "site/chat")[0] == 200
    assert len(fake.received) == 1


def test_a_redirect_from_a_backend_is_not_followed(node: Guarded, fake: FakeBackend, elsewhere: FakeBackend) -> None:
    elsewhere.received.clear()
    assert call(node.strict, "POST", "/v1/backends", node.admin, {
        "id": "hopper", "provider": "custom", "base_url": fake.url, "model": f"redirect-{elsewhere.port}"})[0] == 201
    assert call(node.strict, "POST", "/v1/models", node.admin, {
        "slug": "g/hop", "modality": "chat", "routes": [{"backend": "hopper"}]})[0] == 201
    node.served("g/hop")
    status, body = node.chat(node.strict, "g/hop")
    assert status == 502 and '"BACKEND_ERROR"' in body and "HTTP 307" in body, body
    assert len(fake.received) == 1 and elsewhere.received == []
    assert node.health("hopper", node.admin)["last_error"].startswith("status: HTTP 307")


def test_upstream_words_reach_only_the_platform(node: Guarded, fake: FakeBackend) -> None:
    for backend_id, behaviour in (("site-refuse", "refuse"), ("site-fail", "fail")):
        assert call(node.allowing, "POST", "/v1/backends", node.partner_admin,
                    tenant_backend(backend_id, fake.url, behaviour))[0] == 201
        assert call(node.allowing, "POST", "/v1/models", node.partner_admin, {
            "slug": f"site/{behaviour}", "modality": "chat", "tenant": "default",
            "routes": [{"backend": backend_id}]})[0] == 201
        node.served(f"site/{behaviour}")

    # A 400 is the request's fault (422, no failover); the tenant's caller learns the status, not the words.
    status, body = node.chat(node.allowing, "site/refuse")
    assert status == 422 and '"VALIDATION_ERROR"' in body and "HTTP 400" in body, body
    assert REFUSAL_TEXT not in body
    status, body = node.chat(node.allowing, "site/refuse", node.admin)
    assert status == 422 and REFUSAL_TEXT in body, body

    status, body = node.chat(node.allowing, "site/fail")
    assert status == 502 and "HTTP 500" in body and "crashed" not in body, body
    assert node.health("site-fail", node.partner_admin)["last_error"] == "status: HTTP 500"
    assert node.health("site-fail", node.tenant_admin)["last_error"] == "status: HTTP 500"
    assert "the model crashed" in node.health("site-fail", node.admin)["last_error"]


def test_shared_urls_and_url_credentials_are_not_shown(node: Guarded) -> None:
    # Stored before credentials in URLs were refused: shown masked, even to the platform.
    sql(node.env, "INSERT INTO backends (id, provider, base_url, model) "
                  "VALUES ('old-creds', 'custom', 'http://ops:hunter2@10.0.0.7/v1', 'm')")
    status, reply = call(node.strict, "GET", "/v1/backends/old-creds", node.admin)
    assert status == 200 and reply["data"]["base_url"] == "http://***@10.0.0.7/v1"
    status, listing = call(node.strict, "GET", "/v1/backends?limit=100", node.admin)
    assert status == 200 and "hunter2" not in str(listing) and "ops:" not in str(listing)

    # A shared backend's URL names the platform's network: below platform reach it is not shown at all.
    assert call(node.strict, "POST", "/v1/backends", node.partner_admin, tenant_backend("mine", PUBLIC_URL))[0] == 201
    for key in (node.partner_admin, node.tenant_admin):
        status, reply = call(node.strict, "GET", "/v1/backends/old-creds", key)
        assert status == 200 and reply["data"]["base_url"] is None
        status, listing = call(node.strict, "GET", "/v1/backends?limit=100", key)
        items = listing["data"]["items"]
        assert [item["base_url"] for item in items if item["id"] == "mine"] == [PUBLIC_URL]
        assert all(item["base_url"] is None for item in items if item["tenant"] is None)
