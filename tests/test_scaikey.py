"""ScaiKey JWTs against a real node and a real JWKS server: what is accepted, every confusion refused, rotation."""

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Iterator

import pytest
from jose import jwt

from appliance import devstack
from tests.accounting_fixtures import start_worker
from tests.identity import call, tenant, user_with_key, webhook
from tests.scaikey import AUDIENCE, ISSUER, ScaiKey, make_key
from tests.support.env import Node, create_key
from tests.support.processes import start_http
from tests.webhook_receiver import Receiver

MIN_REFETCH_S = 2
LEEWAY_S = 30


@pytest.fixture
def scaikey() -> Iterator[ScaiKey]:
    server = ScaiKey().start()
    yield server
    server.stop()


@pytest.fixture
def sk_node(migrated_env, start_mode, scaikey) -> Node:
    env = {**migrated_env, "SCAIKEY_JWKS_URL": scaikey.jwks_url, "SCAIKEY_AUDIENCE": AUDIENCE,
           "SCAIKEY_ISSUER": ISSUER, "SCAIKEY_JWKS_MIN_REFETCH_S": str(MIN_REFETCH_S),
           "SCAIKEY_JWT_LEEWAY_S": str(LEEWAY_S)}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


@pytest.fixture
def acme(sk_node) -> dict[str, str]:
    """A tenant linked to ScaiKey's tenant `sk-acme`, with a user linked to ScaiKey's subject `sk-alice`."""
    team = tenant(sk_node.url, sk_node.admin_key, "acme", scaikey_id="sk-acme")
    alice, _ = user_with_key(sk_node.url, sk_node.admin_key, team["id"], "tenant_user", scaikey_id="sk-alice")
    return {"tenant_id": team["id"], "user_id": alice}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, object], claims: dict[str, object]) -> str:
    return _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())


def _refused(node: Node, token: str) -> str:
    reply = call(node.url, "GET", "/v1/api-keys", token)
    assert (reply.status, reply.code) == (401, "AUTH_TOKEN_INVALID"), reply.body
    return str(reply.body["error"]["message"])


def test_a_scaikey_user_acts_as_its_local_user(sk_node, scaikey, acme):
    token = scaikey.token("sk-alice")
    created = call(sk_node.url, "POST", "/v1/api-keys", token, {"name": "from the portal"})
    assert created.status == 201
    assert (created.data["user_id"], created.data["tenant_id"], created.data["role"]) == (
        acme["user_id"], acme["tenant_id"], "tenant_user")
    assert call(sk_node.url, "GET", "/v1/users", token).code == "AUTHZ_PERMISSION_DENIED"  # a tenant_user


def test_an_unknown_user_is_created_on_first_sight_only_for_a_known_tenant(sk_node, scaikey, acme):
    token = scaikey.token("sk-bob", tenant_id="sk-acme", role="tenant_admin", email="bob@acme.test", name="Bob")
    assert call(sk_node.url, "GET", "/v1/users", token).status == 200  # tenant_admin at once
    users = call(sk_node.url, "GET", f"/v1/users?tenant_id={acme['tenant_id']}", sk_node.admin_key).data["items"]
    bob = [user for user in users if user["scaikey_id"] == "sk-bob"]
    assert [(u["email"], u["role"], u["display_name"]) for u in bob] == [("bob@acme.test", "tenant_admin", "Bob")]
    assert "tenant" in _refused(sk_node, scaikey.token("sk-carol"))
    assert "tenant" in _refused(sk_node, scaikey.token("sk-carol", tenant_id="sk-nowhere"))
    assert "role" in _refused(sk_node, scaikey.token("sk-dave", tenant_id="sk-acme", role="emperor"))
    # A sign-in never creates a partner or platform admin: those roles are granted on the node.
    for role in ("super_admin", "partner_admin", "partner_viewer"):
        assert "first sign-in" in _refused(sk_node, scaikey.token("sk-eve", tenant_id="sk-acme", role=role))


def test_claims_are_checked_with_leeway(sk_node, scaikey, acme):
    assert "aud" in _refused(sk_node, scaikey.token("sk-alice", aud="someone-else"))
    assert "iss" in _refused(sk_node, scaikey.token("sk-alice", iss="https://evil.test"))
    _refused(sk_node, scaikey.token("sk-alice", iss=None))  # SCAIKEY_ISSUER is set: a token without `iss` is refused
    assert "expired" in _refused(sk_node, scaikey.token("sk-alice", ttl_s=-LEEWAY_S - 60))
    _refused(sk_node, scaikey.token("sk-alice", nbf=int(time.time()) + LEEWAY_S + 60))
    _refused(sk_node, scaikey.token("sk-alice", exp=None))
    _refused(sk_node, scaikey.token("sk-alice", aud=None))
    # Within the leeway: a clock a little behind ScaiKey's is not the user's fault.
    assert call(sk_node.url, "GET", "/v1/api-keys", scaikey.token("sk-alice", ttl_s=-5)).status == 200


def test_algorithm_confusion_is_refused(sk_node, scaikey, acme):
    genuine = scaikey.keys[-1]
    claims = jwt.get_unverified_claims(scaikey.token("sk-alice"))
    # alg none, with and without a signature part
    unsigned = _unsigned({"alg": "none", "kid": genuine.kid}, claims)
    for token in (unsigned + ".", unsigned + ".c2ln"):
        assert "RS256" in _refused(sk_node, token)
    # HS256 with the public key (which anyone may fetch) as the shared secret
    signing_input = _unsigned({"alg": "HS256", "kid": genuine.kid, "typ": "JWT"}, claims)
    mac = hmac.new(genuine.public_pem.encode(), signing_input.encode(), hashlib.sha256).digest()
    assert "RS256" in _refused(sk_node, signing_input + "." + _b64(mac))
    # Another RSA algorithm with the genuine key, and a forged key that names the genuine kid or embeds itself
    _refused(sk_node, jwt.encode(claims, genuine.private_pem, algorithm="RS384", headers={"kid": genuine.kid}))
    forger = make_key(genuine.kid)
    assert "signature" in _refused(sk_node, scaikey.token("sk-alice", key=forger))
    assert "signature" in _refused(sk_node, scaikey.token("sk-alice", key=forger, headers={"jwk": forger.jwk}))
    # A genuine signature over a modified payload
    header, _, rest = scaikey.token("sk-alice").partition(".")
    _, _, signature = rest.partition(".")
    tampered = header + "." + _b64(json.dumps({**claims, "sub": "sk-bob"}).encode()) + "." + signature
    assert "signature" in _refused(sk_node, tampered)


def test_key_rotation_refetches_the_jwks_sparingly(sk_node, scaikey, acme):
    assert call(sk_node.url, "GET", "/v1/api-keys", scaikey.token("sk-alice")).status == 200
    assert scaikey.fetches == 1
    stranger = make_key("k-unknown")
    for _ in range(5):  # unknown kids right after a fetch: refused without asking ScaiKey again
        _refused(sk_node, scaikey.token("sk-alice", key=stranger))
    assert scaikey.fetches == 1

    new_key = scaikey.rotate("k2")
    time.sleep(MIN_REFETCH_S)  # waits out the JWKS refetch interval, the behaviour under test
    assert call(sk_node.url, "GET", "/v1/api-keys", scaikey.token("sk-alice", key=new_key)).status == 200
    assert scaikey.fetches == 2
    for _ in range(5):
        _refused(sk_node, scaikey.token("sk-alice", key=stranger))
    assert scaikey.fetches == 2


def test_suspended_users_and_tenants_are_refused(sk_node, scaikey, acme):
    token = scaikey.token("sk-alice")
    assert call(sk_node.url, "GET", "/v1/api-keys", token).status == 200  # cached now
    path = f"/v1/users/{acme['user_id']}"
    assert call(sk_node.url, "PATCH", path, sk_node.admin_key, {"status": "suspended"}).status == 200
    assert "suspended" in _refused(sk_node, token)
    assert call(sk_node.url, "PATCH", path, sk_node.admin_key, {"status": "active"}).status == 200
    assert call(sk_node.url, "GET", "/v1/api-keys", token).status == 200
    assert call(sk_node.url, "PATCH", f"/v1/tenants/{acme['tenant_id']}", sk_node.admin_key,
                {"status": "suspended"}).status == 200
    assert "tenant is suspended" in _refused(sk_node, token)


def test_only_the_platform_links_records_to_scaikey(sk_node, scaikey, acme):
    # Otherwise another tenant's admin could claim a ScaiKey subject (or tenant) not seen here yet, and its
    # owner's sign-ins would land in the claimer's tenant, prompts and all.
    rival = tenant(sk_node.url, sk_node.admin_key, "rival")
    _, rival_admin = user_with_key(sk_node.url, sk_node.admin_key, rival["id"], "tenant_admin")
    _, rival_partner_admin = user_with_key(sk_node.url, sk_node.admin_key, rival["id"], "partner_admin")
    claim = call(sk_node.url, "POST", "/v1/users", rival_admin, {"email": "trap@rival.test", "scaikey_id": "sk-erin"})
    assert (claim.status, claim.code) == (403, "AUTHZ_PERMISSION_DENIED"), claim.body
    claim = call(sk_node.url, "POST", "/v1/tenants", rival_partner_admin,
                 {"slug": "trap", "name": "Trap", "scaikey_id": "sk-elsewhere"})
    assert (claim.status, claim.code) == (403, "AUTHZ_PERMISSION_DENIED"), claim.body
    erin = call(sk_node.url, "POST", "/v1/api-keys", scaikey.token("sk-erin", tenant_id="sk-acme"), {"name": "e"})
    assert erin.status == 201 and erin.data["tenant_id"] == acme["tenant_id"]


def test_an_unreachable_jwks_is_a_503_not_a_bad_token(migrated_env, start_mode, scaikey):
    env = {**migrated_env, "SCAIKEY_JWKS_URL": f"http://127.0.0.1:{devstack.free_ports(1)[0]}/jwks.json",
           "SCAIKEY_AUDIENCE": AUDIENCE}
    start_http(start_mode, env)
    reply = call(f"http://127.0.0.1:{env['HTTP_PORT']}", "GET", "/v1/api-keys", scaikey.token("sk-alice"))
    assert (reply.status, reply.code) == (503, "IDENTITY_PROVIDER_UNAVAILABLE")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver().start()
    yield server
    server.stop()


def test_scaikey_user_events_reach_the_tenants_webhooks(migrated_env, start_mode, receiver):
    """user.created / user.updated from ScaiKey's receiver become scaikey.user.* events, once per ScaiKey event."""
    secret = secrets.token_hex(16)
    env = {**migrated_env, "SCAIKEY_WEBHOOK_SECRET": secret, "WEBHOOK_ALLOW_PRIVATE_TARGETS": "true"}
    node = Node(env, start_http(start_mode, env), create_key(env, "super_admin"))
    acme = tenant(node.url, node.admin_key, "acme", scaikey_id="sk-acme")
    globex = tenant(node.url, node.admin_key, "globex", scaikey_id="sk-globex")
    hooks = {}
    for team in (acme, globex):
        reply = call(node.url, "POST", "/v1/webhooks", node.admin_key, {
            "url": receiver.url(team["slug"]), "tenant_id": team["id"],
            "events": ["scaikey.user.created", "scaikey.user.updated"]})
        assert reply.status == 201, reply.body
        receiver.secrets[team["slug"]] = reply.data["secret"]
        hooks[team["slug"]] = reply.data["id"]
    start_worker(start_mode, env)

    def scaikey_sends(event_type: str, data: dict[str, object], event_id: str) -> dict[str, object]:
        body, headers = webhook(secret, event_type, "sk-u1", data, event_id=event_id, tenant_id="sk-acme")
        reply = call(node.url, "POST", "/v1/webhooks/scaikey", headers=headers, raw=body)
        assert reply.status == 200, reply.body
        return dict(reply.data)

    assert scaikey_sends("user.created", {"email": "u1@acme.test", "role": "tenant_admin", "name": "U One"},
                         "sk-evt-1")["applied"] is True
    assert scaikey_sends("user.updated", {"display_name": "U 1", "status": "SUSPENDED"}, "sk-evt-2")["applied"]
    assert scaikey_sends("user.created", {"email": "u1@acme.test"}, "sk-evt-1")["duplicate"] is True  # replayed

    def delivered() -> bool:
        items = call(node.url, "GET", f"/v1/webhooks/{hooks['acme']}/deliveries", node.admin_key).data["items"]
        return [item["status"] for item in items] == ["success", "success"]

    receiver.wait_for(delivered, "both user events delivered")
    [user] = [u for u in call(node.url, "GET", f"/v1/users?tenant_id={acme['id']}", node.admin_key).data["items"]
              if u["scaikey_id"] == "sk-u1"]
    arrivals = sorted(receiver.arrived("acme"), key=lambda a: str(a.event["event_type"]))  # sent concurrently
    assert [a.event["event_type"] for a in arrivals] == ["scaikey.user.created", "scaikey.user.updated"]
    assert all(a.signature_valid and a.event["tenant_id"] == acme["id"] for a in arrivals)
    assert all(a.event["partner_id"] == acme["partner_id"] for a in arrivals)
    assert [a.event["payload"] for a in arrivals] == [
        {"user_id": user["id"], "email": "u1@acme.test", "display_name": "U One", "role": "tenant_admin",
         "status": "active", "tenant_id": acme["id"], "scaikey_id": "sk-u1"},
        {"user_id": user["id"], "email": "u1@acme.test", "display_name": "U 1", "role": "tenant_admin",
         "status": "suspended", "tenant_id": acme["id"], "scaikey_id": "sk-u1"}]
    assert receiver.arrived("globex") == []  # another tenant's webhooks hear nothing of it
