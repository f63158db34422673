"""Rate limits on real http processes: four levels, most restrictive wins, exact across processes, headers,
Retry-After, the admin API and CLI that set them, and what happens when Redis goes away."""

import json
import re
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from appliance import devstack
from tests.identity import call, tenant, user_with_key, users_with_keys
from tests.support.env import Node, create_key
from tests.support.processes import scaigrid, start_http
from tests.support.waiting import eventually

# Any authenticated route counts; this one is open to every role.
PROBE = "/v1/accounting/usage?limit=1"


def probe(url: str, key: str, path: str = PROBE) -> tuple[int, dict[str, str], dict[str, Any]]:
    request = urllib.request.Request(url + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), json.loads(error.read())


def applied(url: str, key: str, limit: str) -> int:
    """Probes until the process applies `limit` (a change is announced, not awaited); returns the admitted probes."""
    admitted = 0

    def applying() -> str | None:
        nonlocal admitted
        status, headers, _ = probe(url, key)
        admitted += status == 200
        return None if headers["X-Scaigrid-Ratelimit-Limit"] != limit else limit

    eventually(applying, f"{url} applying the limit {limit}", 2, interval_s=0.01)
    return admitted


def key_id(node: Node, key: str) -> str:
    [own] = call(node.url, "GET", "/v1/api-keys", key).data["items"]
    return str(own["id"])


def test_a_key_with_rpm_10_gets_exactly_10_across_two_http_processes(node, start_mode):
    other_env = {**node.env, "HTTP_PORT": str(devstack.free_ports(1)[0])}
    start_http(start_mode, other_env)
    urls = [node.url, f"http://127.0.0.1:{other_env['HTTP_PORT']}"]
    key = node.key("tenant_user")
    assert probe(urls[0], key)[1]["X-Scaigrid-Ratelimit-Limit"] == "60"  # cached with the default

    result = scaigrid("admin", "set-limits", "--key", key, "--rpm", "10", env=node.env)
    assert result.returncode == 0, result.stderr
    assert key not in result.stdout + result.stderr  # the key is a secret: never echoed
    assert "10 requests per minute" in result.stdout
    before = 1 + sum(applied(url, key, "10") for url in urls)  # both processes dropped the cached limit

    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: probe(urls[i % 2], key), range(40)))
    admitted = [headers for status, headers, _ in replies if status == 200]
    refused = [(headers, body) for status, headers, body in replies if status == 429]
    assert before + len(admitted) == 10 and len(refused) == 40 - len(admitted)  # exactly 10 in the minute
    assert sorted(int(h["X-Scaigrid-Ratelimit-Remaining"]) for h in admitted) == list(range(len(admitted)))
    for headers, body in refused:
        assert body["error"]["code"] == "RATE_LIMITED"
        assert "API key" in body["error"]["message"]
        assert headers["X-Scaigrid-Ratelimit-Limit"] == "10" and headers["X-Scaigrid-Ratelimit-Remaining"] == "0"
        assert 1 <= int(headers["Retry-After"]) <= 60 and body["error"]["retry_after"] == int(headers["Retry-After"])


def test_headers_and_the_most_restrictive_level(node):
    key = node.key("tenant_user")
    before = int(time.time())
    seen = []
    for _ in range(3):
        status, headers, _ = probe(node.url, key)
        seen.append((status, headers["X-Scaigrid-Ratelimit-Limit"], headers["X-Scaigrid-Ratelimit-Remaining"]))
        # Reset: when the oldest request of the window leaves it, i.e. a minute after the first one.
        assert before + 59 <= int(headers["X-Scaigrid-Ratelimit-Reset"]) <= int(time.time()) + 61
    assert seen == [(200, "60", "59"), (200, "60", "58"), (200, "60", "57")]  # the key's default, 60
    # Errors after authentication carry them and count (here: a permission the key lacks); unauthenticated
    # answers do not: there is nobody to count against.
    assert call(node.url, "GET", "/v1/accounting/budgets", key).status == 403
    assert probe(node.url, key)[1]["X-Scaigrid-Ratelimit-Remaining"] == "55"
    assert "X-Scaigrid-Ratelimit-Limit" not in probe(node.url, "sgk_" + "x" * 40)[1]

    # Two keys of one user: the user's limit binds both together, below each key's own.
    user_id, first = user_with_key(node.url, node.admin_key, tenant(node.url, node.admin_key, "acme")["id"],
                                   "tenant_user")
    second = call(node.url, "POST", "/v1/api-keys", node.admin_key, {"name": "second", "user_id": user_id}).data["key"]
    assert call(node.url, "PUT", f"/v1/rate-limits/user/{user_id}", node.admin_key, {"rpm": 5}).data == {
        "level": "user", "id": user_id, "rpm": 5, "effective_rpm": 5}
    before = applied(node.url, first, "5")
    replies = [probe(node.url, (first, second)[i % 2]) for i in range(8)]
    assert [status for status, _, _ in replies] == [200] * (5 - before) + [429] * (3 + before)
    assert {headers["X-Scaigrid-Ratelimit-Limit"] for _, headers, _ in replies} == {"5"}
    assert "user" in replies[-1][2]["error"]["message"]
    # Back to the default: each key's own 60 is the tightest again.
    assert call(node.url, "PUT", f"/v1/rate-limits/user/{user_id}", node.admin_key, {"rpm": None}).data[
        "effective_rpm"] == 120
    assert applied(node.url, first, "60") == 1


def test_who_may_set_which_limit(node):
    acme = tenant(node.url, node.admin_key, "acme")
    other = tenant(node.url, node.admin_key, "other")
    (_, admin), (user_id, user_key) = users_with_keys(node, acme, "tenant_admin", "tenant_user")
    [(_, foreign_key)] = users_with_keys(node, other, "tenant_user")
    own_key_id, foreign_key_id = key_id(node, user_key), key_id(node, foreign_key)
    partner_id = acme["partner_id"]

    def put(token: str, level: str, object_id: str, rpm: Any) -> tuple[int, str | None]:
        reply = call(node.url, "PUT", f"/v1/rate-limits/{level}/{object_id}", token, {"rpm": rpm})
        return reply.status, None if reply.status == 200 else reply.code

    # A tenant admin: keys and users of its tenant, nothing else; another tenant's objects are not there.
    assert put(admin, "key", own_key_id, 30) == (200, None)
    assert put(admin, "user", user_id, 40) == (200, None)
    assert put(admin, "tenant", acme["id"], 500) == (403, "AUTHZ_PERMISSION_DENIED")
    assert put(admin, "key", foreign_key_id, 30) == (404, "NOT_FOUND")
    assert put(admin, "partner", partner_id, 500) == (403, "AUTHZ_PERMISSION_DENIED")  # its own partner's: seen
    # Without admin:access, not at all.
    assert put(user_key, "key", own_key_id, 1000) == (403, "AUTHZ_PERMISSION_DENIED")
    # The platform sets tenants' and partners' limits.
    assert put(node.admin_key, "tenant", acme["id"], 500) == (200, None)
    assert put(node.admin_key, "partner", partner_id, 4000) == (200, None)
    got = call(node.url, "GET", f"/v1/rate-limits/key/{own_key_id}", admin).data
    assert got == {"level": "key", "id": own_key_id, "rpm": 30, "effective_rpm": 30}

    for rpm in (0, -1, 1.5, "10", True, 10**10):
        reply = call(node.url, "PUT", f"/v1/rate-limits/key/{own_key_id}", admin, {"rpm": rpm})
        assert (reply.status, reply.code) == (422, "VALIDATION_ERROR"), rpm
        assert reply.body["error"]["details"][0]["field"] == "rpm"
    missing = call(node.url, "PUT", f"/v1/rate-limits/key/{own_key_id}", admin, {"rmp": 10})
    assert {d["field"] for d in missing.body["error"]["details"]} == {"rpm", "rmp"}
    assert call(node.url, "PUT", "/v1/rate-limits/team/x", admin, {"rpm": 10}).code == "NOT_FOUND"
    assert got == call(node.url, "GET", f"/v1/rate-limits/key/{own_key_id}", admin).data  # nothing changed


def test_set_limits_cli(node):
    key = node.key("tenant_user")
    own_id = key_id(node, key)
    for args, effective in ((["--key", own_id, "--rpm", "7"], 7), (["--tenant", "default", "--rpm", "900"], 900),
                            (["--partner", "default", "--rpm", "default"], 5000)):
        result = scaigrid("admin", "set-limits", *args, env=node.env)
        assert result.returncode == 0, result.stderr
        assert re.search(rf": {effective} requests per minute", result.stdout), result.stdout
    applied(node.url, key, "7")  # the key was cached with 60 (key_id used it); the change reached the process
    assert call(node.url, "GET", "/v1/rate-limits/tenant/" + call(
        node.url, "GET", "/v1/tenants?limit=100", node.admin_key).data["items"][0]["id"], node.admin_key
    ).data["rpm"] == 900

    unknown = scaigrid("admin", "set-limits", "--key", "sgk_" + "y" * 43, "--rpm", "5", env=node.env)
    assert unknown.returncode == 1 and "no key" in unknown.stderr and "y" * 43 not in unknown.stderr
    two = scaigrid("admin", "set-limits", "--user", "a", "--tenant", "b", "--rpm", "5", env=node.env)
    assert two.returncode == 2 and "exactly one of" in two.stderr
    bad = scaigrid("admin", "set-limits", "--tenant", "default", "--rpm", "0", env=node.env)
    assert bad.returncode == 2 and "--rpm" in bad.stderr


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test alone, so that it can be stopped (the session's is shared)."""
    server = devstack.start_redis(tmp_path / "redis")
    yield server
    server.stop()


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_redis_down_serves_or_refuses_as_configured(migrated_env, start_mode, own_redis):
    nodes = {}
    for policy in ("serve", "refuse"):
        env = {**migrated_env, "REDIS_URL": own_redis.url, "RATE_LIMIT_ON_REDIS_FAILURE": policy,
               "HTTP_PORT": str(devstack.free_ports(1)[0])}
        nodes[policy] = (f"http://127.0.0.1:{env['HTTP_PORT']}", start_http(start_mode, env))
    key = create_key(migrated_env, "tenant_user")
    for url, _ in nodes.values():
        assert probe(url, key)[0] == 200
    own_redis.stop()

    url, process = nodes["serve"]
    for _ in range(3):
        status, headers, _ = probe(url, key)
        assert status == 200 and headers["X-Scaigrid-Ratelimit-Limit"] == "60"
    assert metric(url, 'scaigrid_redis_failures_total{operation="admit"}') == 3
    warnings = [line for line in process.log_lines() if line.get("event") == "redis_failure"]
    assert len(warnings) == 1 and warnings[0]["level"] == "warning"  # once a minute, not once a request

    url, _ = nodes["refuse"]
    status, headers, body = probe(url, key)
    assert (status, body["error"]["code"]) == (503, "LIMITS_UNAVAILABLE")
    assert headers["Retry-After"] == "5"


def test_mariadb_down_keeps_known_keys_serving_and_answers_others_database_unavailable(env, start_mode, tmp_path):
    """A key's cache entry that expires while MariaDB is away keeps its last verdict (the fault table's MariaDB kill
    once answered it 500 INTERNAL_ERROR); a key never seen gets a 503 the client may retry, and works once MariaDB is
    back."""
    cached_route = "/oai/v1/models"  # the catalogue is cached in the process: only the key needs MariaDB
    own = devstack.start_mariadb(tmp_path / "mariadb")
    try:
        env = {**env, "DATABASE_URL": own.create_database("own", "own", "own-password"), "API_KEY_CACHE_TTL_S": "1"}
        assert scaigrid("migrate", env=env).returncode == 0
        url = f"http://127.0.0.1:{env['HTTP_PORT']}"
        process = start_http(start_mode, env)
        known, unseen = create_key(env, "tenant_user"), create_key(env, "tenant_user")
        assert probe(url, known, cached_route)[0] == 200
        port = own.port
        own.stop()
        time.sleep(1.5)  # past the key's cache TTL: its next use must look it up again

        assert probe(url, known, cached_route)[0] == 200
        status, headers, body = probe(url, unseen, cached_route)
        assert (status, body["error"]["code"], headers["Retry-After"]) == (503, "DATABASE_UNAVAILABLE", "5")
        assert not [line for line in process.log_lines() if line.get("event") == "request_error"]

        own = devstack.start_mariadb(tmp_path / "mariadb", port)
        eventually(lambda: probe(url, unseen, cached_route)[0] == 200, "the unseen key once MariaDB is back", 30)
    finally:
        own.stop()
