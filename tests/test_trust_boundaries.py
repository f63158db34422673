"""The adversarial suite (issue 13 point 8): every registered route x every kind of caller against a real http
process, the rank rules spelled out, and property-based fuzzing of every body and header (no 5xx, always the
documented error shape). The table is in tests/adversary.py; a route without a row fails
`test_every_registered_route_has_a_row`."""

import asyncio
import hashlib
import json
import secrets
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography.fernet import Fernet
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import create_async_engine

from appliance import devstack
from scaigrid.access import Access, access_of
from scaigrid.api.app import create_app
from scaigrid.auth import keys
from scaigrid.db.tables import new_id
from scaigrid.hybrid import mirror, snapshot_schema
from scaigrid.settings import Secret, load_settings
from tests.adversary import (
    CALLERS,
    GROUPS,
    MAKE_BELIEVE_URL,
    RANK_CASES,
    ROWS,
    SCOPES,
    SHARED_BACKEND,
    Answer,
    Caller,
    RankCase,
    Row,
    Target,
    World,
    declared_scopes,
    envelope_problem,
    expected,
    mint_scoped,
    redacted,
    send,
    with_heads,
)
from tests.backends import (  # noqa: F401 (fake_fixture: the fixture `fake`)
    FakeBackend,
    apply,
    backend,
    fake_fixture,
    http_process,
    shared_env,
)
from tests.support.env import create_key
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(120)


# --- the routes the app registers, read without starting it (create_app does no I/O) ---

def _registered() -> dict[tuple[str, str], Access | None]:
    env = {"APP_ENV": "test", "DATABASE_URL": "mysql+asyncmy://u:p@127.0.0.1:9/none",
           "REDIS_URL": "redis://127.0.0.1:9/0", "JWT_SIGNING_SECRET": "j" * 64,
           "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode(), "SERVICE_TOKEN_SECRET": "s" * 64,
           "S3_ENDPOINT_URL": "http://127.0.0.1:9", "S3_ACCESS_KEY_ID": "a", "S3_SECRET_ACCESS_KEY": "b",
           "S3_BUCKET": "c"}
    app = create_app(load_settings(env, env_file=None))
    return {(route.method, route.resource.canonical): access_of(route.handler)
            for route in app.router.routes() if route.resource is not None}


REGISTERED = _registered()
TABLE = with_heads(ROWS, set(REGISTERED))
CASE_COUNT = len(TABLE) * len(CALLERS)


def _access(row: Row) -> Access:
    access = REGISTERED.get((row.method, row.path))
    assert access is not None, f"{row.id} is not registered, or declares no access rule"
    return access


# --- the node: one http process, partners, tenants, a user per role, targets per tenant ---

def _ok(answer: Answer, what: str) -> Any:
    assert 200 <= answer.status < 300, f"{what}: {answer.status} {answer.raw[:300]!r}"
    return answer.body["data"]


class Node(World):
    roles: dict[str, str]  # role -> the key of that role's user in t1
    fuzz_user_key: str  # a tenant_user of the fuzzing tenant

    def __init__(self, url: str, admin_key: str) -> None:
        self.url, self.admin_key = url, admin_key
        self.targets, self.tokens, self.token_errors = {}, {}, {}

    def admin(self, method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        return _ok(send(self.url, method, path, token=token or self.admin_key, body=body), f"{method} {path}")

    def user(self, tenant_id: str, role: str) -> tuple[str, str]:
        user = self.admin("POST", "/v1/users", {"email": f"{self.unique(role)}@example.com", "role": role,
                                                "tenant_id": tenant_id})
        key = self.admin("POST", "/v1/api-keys", {"name": role, "user_id": user["id"]})
        return user["id"], key["key"]

    def fresh(self, kind: str, t: Target) -> str:
        """A new object of that kind in t's tenant, for a case that deletes it."""
        if kind == "key":
            return str(self.admin("POST", "/v1/api-keys", {"name": "fresh", "user_id": t.user_id})["id"])
        if kind == "user":
            return self.user(t.tenant_id, "tenant_user")[0]
        if kind == "backend":
            return str(self.admin("POST", "/v1/backends", {
                "id": self.unique("adv-b"), "provider": "custom", "base_url": MAKE_BELIEVE_URL,
                "model": "never-called", "tenant": t.slug})["id"])
        if kind == "model":
            return str(self.admin("POST", "/v1/models", {"slug": f"{t.slug}/{self.unique('fresh')}",
                                                         "modality": "chat", "tenant": t.slug})["slug"])
        if kind == "budget":
            return str(self.admin("POST", "/v1/accounting/budgets", _budget(t.tenant_id), token=t.setter_key)["id"])
        if kind == "webhook":
            return str(self.admin("POST", "/v1/webhooks", _webhook(t.tenant_id, self.url))["id"])
        if kind == "node":
            token = self.admin("POST", "/v1/hybrid/enrollment-tokens", {"name": "fresh", "ttl_s": 60})["token"]
            return str(_ok(send(self.url, "POST", "/v1/hybrid/enroll", body={
                "token": token, "name": "fresh", "software_version": "1.0.0"}), "enroll")["node_id"])
        raise AssertionError(kind)

    def target(self, key: str, tenant: dict[str, Any]) -> Target:
        t = Target(key, tenant["id"], tenant["slug"], tenant["name"], tenant["partner_id"])
        _, t.setter_key = self.user(t.tenant_id, "tenant_admin")
        t.user_id, _ = self.user(t.tenant_id, "tenant_user")
        t.key_id = self.fresh("key", t)
        t.backend_id = self.fresh("backend", t)
        for attr, modality in (("chat_model", "chat"), ("embed_model", "embedding"), ("image_model", "image"),
                               ("audio_model", "audio")):
            setattr(t, attr, self.admin("POST", "/v1/models", {
                "slug": f"{t.slug}/{modality}", "modality": modality, "tenant": t.slug,
                "routes": [{"backend": SHARED_BACKEND, "weight": 1, "priority": 1}]})["slug"])
        t.webhook_id = self.fresh("webhook", t)
        t.budget_id = self.fresh("budget", t)
        self.targets[key] = t
        return t


def _budget(tenant_id: str) -> dict[str, Any]:
    return {"scope": "tenant", "scope_id": tenant_id, "period": "monthly", "limit_type": "cost",
            "limit_value": "1000", "hard_action": "notify"}


def _webhook(tenant_id: str, node_url: str) -> dict[str, Any]:
    """A webhook whose test event goes to the node itself (404 at once): on loopback, and always answering."""
    return {"url": f"{node_url}/adversary-webhook", "events": ["request.completed"], "tenant_id": tenant_id}


async def _mirror(env: dict[str, str]) -> tuple[dict[str, Any], str]:
    """A managed tenant with a tenant_admin and its key, mirrored the way a node's link applies a config snapshot:
    (the tenant as the API shows it, the key)."""
    key = keys.new_key() if hasattr(keys, "new_key") else "sgk_" + secrets.token_urlsafe(32)
    partner_id, tenant_id, user_id = new_id("prt"), new_id("ten"), new_id("usr")
    tenant = {"id": tenant_id, "partner_id": partner_id, "slug": "adv-managed", "name": "Managed",
              "status": "active", "rpm_limit": None}
    body = {"schema": snapshot_schema.SCHEMA, "managed_models": [],
            "partners": [{"id": partner_id, "slug": "adv-managed-p", "name": "Managed", "status": "active",
                          "rpm_limit": None}],
            "tenants": [tenant],
            "users": [{"id": user_id, "tenant_id": tenant_id, "email": "ada@managed.example", "display_name": None,
                       "role": "tenant_admin", "status": "active", "rpm_limit": None}],
            "api_keys": [{"id": new_id("key"), "tenant_id": tenant_id, "user_id": user_id, "name": "ada",
                          "key_hash": hashlib.sha256(key.encode()).hexdigest(), "key_prefix": key[:12],
                          "role": "tenant_admin", "rpm_limit": None, "expires_at": None, "revoked_at": None}]}
    body_json = snapshot_schema.canonical(body)
    engine = create_async_engine(env["DATABASE_URL"])
    redis = Redis.from_url(env["REDIS_URL"])
    try:
        await mirror.apply(engine, "hn_" + secrets.token_hex(16), 1, body_json, snapshot_schema.digest(body_json),
                             redis=redis)
    finally:
        await redis.aclose()
        await engine.dispose()
    return tenant, key


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
         s3_server: devstack.S3Server, fake: FakeBackend) -> Iterator[Node]:
    logs = tmp_path_factory.mktemp("trust")
    with shared_env(mariadb, redis_server, s3_server) as env:
        # Private webhook targets allowed: POST /v1/webhooks/{id}/test really sends, and must send to loopback only.
        env.update(HYBRID_ROLE="managed", SCAIKEY_WEBHOOK_SECRET=secrets.token_hex(16),
                   STORAGE_CAPABILITY_SECRET=secrets.token_hex(32), WEBHOOK_ALLOW_PRIVATE_TARGETS="true",
                   SCAIGRID_MODULES="scaibunker,tests.modules.quiet:MODULE")  # quiet: for the modules admin rows
        # The one backend that answers, on loopback, is the operator's (shared): every tenant model routes to it.
        apply(env, logs / "catalogue.toml", [backend(SHARED_BACKEND, fake, "ok")], [])
        with http_process(env, logs / "http.log"):
            world = Node(f"http://127.0.0.1:{env['HTTP_PORT']}", create_key(env, "super_admin"))
            _populate(world, env)
            yield world


def _populate(world: Node, env: dict[str, str]) -> None:
    partners = {name: world.admin("POST", "/v1/partners", {"slug": f"adv-{name}", "name": name.title()})
                for name in ("alpha", "beta", "fuzz")}
    tenants = {key: world.admin("POST", "/v1/tenants", {"slug": slug, "name": slug.title(),
                                                         "partner_id": partners[partner]["id"]})
               for key, slug, partner in (("t1", "alpha-one", "alpha"), ("t2", "alpha-two", "alpha"),
                                          ("t3", "beta-one", "beta"), ("f", "fuzz-one", "fuzz"))}
    roles = {role: world.user(tenants["t1"]["id"], role)[1] for role in {c.role for c in CALLERS if c.kind == "role"}}
    mirrored_tenant, mirrored_key = asyncio.run(_mirror(env))
    for key, tenant in (*tenants.items(), ("m", mirrored_tenant)):
        world.target(key, tenant)
    world.fuzz_user_key = world.user(tenants["f"]["id"], "tenant_user")[1]
    world.roles = roles
    for caller in CALLERS:
        world.tokens[caller.name] = {"anonymous": None, "bad-token": "sgk_" + "A" * 43, "mirrored": mirrored_key,
                                     "role": roles.get(caller.role or ""), "scope": None}[caller.kind]
    for scope in SCOPES:
        try:
            world.tokens[f"scope:{scope}"] = mint_scoped(Secret(env["SERVICE_TOKEN_SECRET"]), "adversary", scope)
        except TypeError as exc:  # service tokens without scopes (before issue 13)
            world.token_errors[f"scope:{scope}"] = f"cannot mint a {scope} token: {exc}"
    world.node_id = world.fresh("node", world.targets["t1"])
    # The catalogue reaches the http process by the invalidation bus: wait until each tenant's models are served.
    for t in world.targets.values():
        eventually_served(world, t)


def eventually_served(world: Node, t: Target) -> None:
    def served() -> bool:
        answer = send(world.url, "GET", "/oai/v1/models", token=t.setter_key)
        return answer.status == 200 and {t.chat_model, t.embed_model, t.image_model, t.audio_model} <= {
            m["id"] for m in answer.body["data"]}
    eventually(served, f"{t.slug}'s models served", timeout_s=30)


# --- the table ---

def test_every_registered_route_has_a_row():
    rows = {(row.method, row.path) for row in TABLE}
    missing = sorted(set(REGISTERED) - rows)
    stale = sorted(rows - set(REGISTERED))
    assert not missing, f"registered routes without a row in tests/adversary.py ROWS: {missing}"
    assert not stale, f"rows for routes the app does not register: {stale}"
    undeclared = sorted(key for key, access in REGISTERED.items() if access is None)
    assert not undeclared, f"routes that declare no access rule: {undeclared}"


def test_the_table_counts_every_route_for_every_caller(capsys: pytest.CaptureFixture[str]):
    by_group = {group: [c for c in CALLERS if c.group == group] for group in GROUPS}
    assert sum(map(len, by_group.values())) == len(CALLERS)
    assert CASE_COUNT == len(TABLE) * len(CALLERS) == len(TABLE) * sum(map(len, by_group.values()))
    with capsys.disabled():
        print(f"\ntrust table: {len(TABLE)} routes x {len(CALLERS)} callers = {CASE_COUNT} cases")


def _check(world: Node, row: Row, caller: Caller) -> str | None:
    """The mismatch of one case, or None."""
    want = expected(row, _access(row), caller)
    if caller.name in world.token_errors:
        return f"{caller.name}: {world.token_errors[caller.name]}"
    target = world.targets[caller.target]
    body = row.body(world, target) if row.body else None
    path = row.url(world, target)
    answer = send(world.url, row.method, path, token=world.tokens[caller.name], body=body)
    problems = []
    if answer.status not in want.statuses:
        error = answer.body.get("error") if isinstance(answer.body, dict) else None
        problems.append(f"expected {want}, got {answer.status} {json.dumps(error)[:160] if error else ''}")
    if problem := envelope_problem(row.method, path, answer):
        problems.append(problem)
    return f"{caller.name}: {'; '.join(problems)}" if problems else None


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_route_answers_each_caller_as_the_trust_model_says(node: Node, row: Row):
    """One test per route, every caller in it (a test costs a garbage collection, and there are 98 routes)."""
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(lambda c: _check(node, row, c), CALLERS))
    mismatches = [f"[{caller.group}] {m}" for caller, m in zip(CALLERS, results, strict=True) if m]
    assert not mismatches, f"{row.id}:\n  " + "\n  ".join(mismatches)


UNKNOWN_PARAMETER = "colour"  # no route reads it


def _allowed_caller(row: Row, access: Access) -> Caller | None:
    """A caller the table lets through on this route, if any."""
    return next((c for c in CALLERS if any(200 <= status < 300 for status in expected(row, access, c).statuses)
                 and not expected(row, access, c).statuses & {401, 403}), None)


# Every authenticated route, with a caller the table admits there (public routes authenticate themselves).
ADMITTED = [(row, caller) for row in TABLE if (access := _access(row)).permission is not None
            and (caller := _allowed_caller(row, access)) is not None]


@pytest.mark.parametrize(("row", "caller"), ADMITTED, ids=[row.id for row, _ in ADMITTED])
def test_an_unknown_query_parameter_is_refused_not_ignored(node: Node, row: Row, caller: Caller):
    """A filter the route does not know would otherwise answer with unfiltered data: 422 naming it, for a caller the
    route admits, before the handler runs (so a refused DELETE deletes nothing)."""
    target = node.targets[caller.target]
    path = row.url(node, target)
    path += ("&" if "?" in path else "?") + f"{UNKNOWN_PARAMETER}=red"
    answer = send(node.url, row.method, path, token=node.tokens[caller.name],
                  body=row.body(node, target) if row.body else None)
    invalid = 400 if path.startswith("/oai/") else 422  # the OpenAI surface answers as OpenAI does
    assert answer.status == invalid, f"{row.id} as {caller.name}: {answer.status} {redacted(answer.raw[:300])}"
    assert row.method == "HEAD" or UNKNOWN_PARAMETER in answer.raw.decode(), answer.raw[:300]
    assert envelope_problem(row.method, path, answer) is None


def test_every_authenticated_route_is_tried_with_an_unknown_parameter():
    authenticated = [row for row in TABLE if _access(row).permission is not None]
    assert len(ADMITTED) == len(authenticated), sorted(
        {row.id for row in authenticated} - {row.id for row, _ in ADMITTED})


def test_service_scopes_are_declared_least_privilege():
    """A node's token heartbeats (gRPC) and nothing else; a relay token opens tunnels (gRPC); no service token runs
    inference on its own, since inference is limited and accounted to a tenant."""
    problems = []
    for (method, path), access in sorted(REGISTERED.items()):
        if method == "HEAD" or access is None:
            continue
        if not hasattr(access, "scopes"):
            problems.append(f"{method} {path}: its declaration names no service scopes")
            continue
        scopes = set(declared_scopes(access))
        if unknown := scopes - set(SCOPES):
            problems.append(f"{method} {path}: unknown scopes {sorted(unknown)}")
        if scopes & {"scaiinfer-node", "hybrid-relay"}:
            problems.append(f"{method} {path}: accepts {sorted(scopes & {'scaiinfer-node', 'hybrid-relay'})}")
        if access.metered and "operator" in scopes:
            problems.append(f"{method} {path}: an operator token may run inference")
        if access.permission is None and scopes:
            problems.append(f"{method} {path}: public, yet names scopes")
    assert not problems, "\n".join(problems)


# --- rank and ownership ---

def _rank_setup(node: Node, case: RankCase) -> dict[str, str]:
    t1 = node.targets["t1"]
    if case.victim.startswith("budget:"):
        setter = case.victim.partition(":")[2]
        token = node.admin_key if setter == "super_admin" else node.roles[setter]
        return {"budget": node.admin("POST", "/v1/accounting/budgets", _budget(t1.tenant_id), token=token)["id"]}
    victim, _ = node.user(t1.tenant_id, case.victim)
    low_key = node.admin("POST", "/v1/api-keys", {"name": "low", "user_id": victim, "role": "tenant_user"})
    return {"victim": victim, "victim_key": low_key["id"]}


def _fill(value: Any, names: dict[str, str]) -> Any:
    if isinstance(value, str):
        return value.format(**names)
    if isinstance(value, dict):
        return {k: _fill(v, names) for k, v in value.items()}
    return value


@pytest.mark.parametrize("case", RANK_CASES, ids=[case.name for case in RANK_CASES])
def test_no_one_acts_on_a_person_or_budget_that_outranks_them(node: Node, case: RankCase):
    names = _rank_setup(node, case)
    path = case.path.format(**names)
    answer = send(node.url, case.method, path, token=node.roles[case.actor], body=_fill(case.body, names))
    assert answer.status in case.expect, f"{case.name}: {answer.status} {redacted(answer.raw[:300])}"
    assert envelope_problem(case.method, path, answer) is None
    if case.method == "GET":
        listed = [item for item in answer.body["data"]["items"] if item["user_id"] == names["victim"]]
        assert not listed, f"{case.name}: the outranking person's keys are listed: {listed}"


# --- fuzzing: every body and every header; no 5xx, always the documented error shape ---

FUZZED = [0]
BODY_ROWS = [row for row in TABLE if row.body is not None and row.method in ("POST", "PUT", "PATCH")]
BODY_SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
HEADER_SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None,
                           suppress_health_check=list(HealthCheck))
DEEP = 900
# Spliced into the JSON text as they are: Python's json reads NaN and Infinity, which JSON does not allow.
RAW_VALUES = ("NaN", "Infinity", "-Infinity", "1e999", "[" * DEEP + "]" * DEEP, '{"a":' * DEEP + "1" + "}" * DEEP,
              "1" + "0" * 5000, "100000000000000000000000000")
NASTY = ("x\n", "default\n", "x\r\nX-Injected: 1", "\x00", "a\u2028b", "\ud83d\ude00", "a" * 100_000, "", " ",
         10**26, -(10**26), 2**63, -1, 0, 0.1, True, None, [], {}, [[[[[]]]]], {"a": {"b": {"c": 1}}})
# The corpus: each in every place of every body (hypothesis draws from all of RAW_VALUES and NASTY besides).
KNOWN_RAW = ("NaN", "Infinity", "[" * DEEP + "]" * DEEP)
KNOWN_VALUES = ("default\n", "x\r\n", "\x00", "a" * 100_000, 10**26, [])
WHOLE_BODIES = (b"", b"not json", b"[]", b"null", b"1", b'"text"', b"\xff\xfe\x00", b'{"a": 1', b"NaN",
                ("[" * DEEP + "]" * DEEP).encode(), b'{"a":1}' * 3)
# Fields a body may carry besides its row's minimal one, so that the corpus reaches them too.
OPTIONAL_FIELDS: dict[str, dict[str, Any]] = {
    "POST /v1/inference/chat": {"max_tokens": 16, "temperature": 1, "top_p": 1, "stop": ["x"], "seed": 1,
                                "stream": False, "metadata": {"a": "b"}, "tools": []},
    "POST /oai/v1/chat/completions": {"max_tokens": 16, "temperature": 1, "stream": False, "n": 1,
                                      "stream_options": {"include_usage": True}},
    "POST /v1/inference/embed": {"dimensions": 4},
    "POST /v1/inference/generate": {"max_tokens": 16, "temperature": 1, "stop": ["x"], "seed": 1},
    "POST /v1/inference/images/generate": {"n": 1, "size": "256x256", "quality": "standard", "style": "vivid",
                                           "response_format": "url"},
    "POST /oai/v1/images/generations": {"n": 1, "size": "256x256", "response_format": "b64_json"},
    "POST /v1/inference/audio/synthesize": {"response_format": "wav", "speed": 1},
    "POST /oai/v1/audio/speech": {"response_format": "mp3", "speed": 1},
    "POST /oai/v1/embeddings": {"dimensions": 4, "encoding_format": "float"},
    "POST /v1/models": {"display_name": "M", "context_window": 8192, "max_output_tokens": 1024,
                        "price_input_per_mtok": "0.5", "price_per_image": "0.04",
                        "default_params": {"temperature": 1}, "status": "active"},
    "PUT /v1/models/{slug}": {"default_params": {"temperature": 1}, "context_window": 8192},
    "POST /v1/backends": {"api_key": "k", "timeout_s": 30, "cost_input_per_mtok": "1"},
    "PUT /v1/backends/{id}": {"api_key": "k", "base_url": MAKE_BELIEVE_URL},
    "POST /v1/webhooks": {"description": "d", "max_retries": 3, "secret": "0f" * 32, "status": "inactive"},
    "POST /v1/accounting/budgets": {"soft_limit_pct": 0.5},
    "POST /v1/tenants": {"scaikey_id": "sk"},
}
PLACEHOLDER = "__adversary_raw__"


def _template(node: Node, row: Row) -> Any:
    assert row.body is not None
    return {**row.body(node, node.targets["f"]), **OPTIONAL_FIELDS.get(row.id, {})}


def _leaves(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a body a value sits: fields, and the items of nested lists and objects."""
    if isinstance(value, dict) and value:
        return [p for k, v in value.items() for p in _leaves(v, (*path, k))] + ([path] if path else [])
    if isinstance(value, list) and value:
        return [p for i, v in enumerate(value) for p in _leaves(v, (*path, i))] + ([path] if path else [])
    return [path]


def _replaced(body: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    copy = dict(body) if isinstance(body, dict) else list(body)
    copy[path[0]] = _replaced(copy[path[0]], path[1:], new)
    return copy


def _encode(body: Any, raw: str | None = None) -> bytes:
    text = json.dumps(body)
    return (text.replace(json.dumps(PLACEHOLDER), raw) if raw is not None else text).encode()


def _fuzz_send(node: Node, row: Row, path: str, *, token: str | None, raw: bytes | None,
               headers: dict[str, str] | None = None) -> None:
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if raw is not None:
        sent.setdefault("Content-Type", "application/json")
    answer = send(node.url, row.method, path, raw=raw, headers=sent)
    FUZZED[0] += 1
    problem = envelope_problem(row.method, path, answer)
    shown = {name: redacted(value) for name, value in sent.items()}
    assert problem is None, (f"{row.id} {path}: {problem}\n  sent headers {shown!r:.300}\n  sent body "
                             f"{(raw or b'')[:300]!r}")


def _path_for_fuzz(node: Node, row: Row) -> str:
    return row.url(node, node.targets["f"])  # fresh rows make one object; later examples find it gone: 404


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.one_of(st.sampled_from(NASTY), st.text(max_size=40), st.integers(), st.booleans(), st.none(),
                        st.floats(allow_nan=False, allow_infinity=False))
    return st.recursive(scalars, lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=8), children, max_size=3)), max_leaves=6)


@st.composite
def _bodies(draw: st.DrawFn, template: Any) -> bytes:
    kind = draw(st.sampled_from(("value", "raw", "unknown", "whole", "bytes")))
    if kind == "value":
        return _encode(_replaced(template, draw(st.sampled_from(_leaves(template))), draw(_json_values())))
    if kind == "raw":
        leaf = draw(st.sampled_from(_leaves(template)))
        return _encode(_replaced(template, leaf, PLACEHOLDER), draw(st.sampled_from(RAW_VALUES)))
    if kind == "unknown":
        return _encode({**template, draw(st.text(min_size=1, max_size=20)): draw(_json_values())})
    if kind == "whole":
        return draw(st.sampled_from(WHOLE_BODIES))
    return draw(st.binary(max_size=64))


HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=64)


@st.composite
def _headers(draw: st.DrawFn, token: str) -> dict[str, str]:
    """Header values HTTP itself carries (no CR/LF, under the 8 KiB line limit): CR/LF in a header is the HTTP
    parser's to refuse, before any ScaiGrid code runs."""
    headers: dict[str, str] = {}
    authorization = draw(st.one_of(st.none(), st.sampled_from((
        "", "Bearer", "Bearer ", f"bearer {token}", f"Bearer  {token}", f"Bearer {token} extra", f"Token {token}",
        "Basic Zm9vOmJhcg==", "Bearer sst_forged.c2lnbmF0dXJl", "Bearer sst_e30.", "Bearer sgk_" + "A" * 4000,
        f"Bearer {token}\t", "Bearer \u00e9t\u00e9")), HEADER_TEXT.map(lambda text: "Bearer " + text)))
    if authorization is not None:
        headers["Authorization"] = authorization
    if tunnel := draw(st.one_of(st.none(), st.sampled_from(("sst_forged.sig", "sst_e30.", "", "x" * 2000)),
                                HEADER_TEXT)):
        headers["X-Scaigrid-Tunnel"] = tunnel
        headers["X-Scaigrid-Tunnel-Id"] = draw(st.one_of(st.just("req_" + "0" * 24), HEADER_TEXT))
    if request_id := draw(st.one_of(st.none(), HEADER_TEXT, st.just("r" * 4000))):
        headers["X-Request-ID"] = request_id
    content_type = draw(st.one_of(st.none(), st.sampled_from((
        "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
        "application/json; charset=latin-1", "application/json; charset=utf-16", "application/json; charset=nope",
        "")), HEADER_TEXT))
    if content_type is not None:
        headers["Content-Type"] = content_type
    return headers


def _corpus(node: Node, row: Row, path: str) -> None:
    """The values that broke things before, in every place of the body (as a super_admin, who gets furthest)."""
    template = _template(node, row)
    sends = [_encode(_replaced(template, leaf, PLACEHOLDER), raw) for leaf in _leaves(template) for raw in KNOWN_RAW]
    sends += [_encode(_replaced(template, leaf, value)) for leaf in _leaves(template) for value in KNOWN_VALUES]
    sends += list(WHOLE_BODIES)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda raw: _fuzz_send(node, row, path, token=node.admin_key, raw=raw), sends))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_fuzzed_bodies_and_headers_answer_the_documented_error(node: Node, row: Row):
    """Known breakers in every body field, then hypothesis's bodies and headers, as a super_admin and a tenant_user."""
    path = _path_for_fuzz(node, row)
    callers = st.sampled_from([node.admin_key, node.fuzz_user_key])
    if row.body is not None:
        template = _template(node, row)
        _corpus(node, row, path)

        @BODY_SETTINGS
        @given(token=callers, body=_bodies(template))
        def fuzz_body(token: str, body: bytes) -> None:
            _fuzz_send(node, row, path, token=token, raw=body)

        fuzz_body()
    raw = _encode(_template(node, row)) if row.body is not None else None

    @HEADER_SETTINGS
    @given(headers=callers.flatmap(_headers))
    def fuzz_headers(headers: dict[str, str]) -> None:
        _fuzz_send(node, row, path, token=None, raw=raw, headers=headers)

    fuzz_headers()


def test_zz_fuzzed_request_count(capsys: pytest.CaptureFixture[str]):
    """Last in the file: how many fuzzed requests the tests above sent (in this process)."""
    with capsys.disabled():
        print(f"\nfuzzed requests sent: {FUZZED[0]}")
    assert FUZZED[0] > 0 or not BODY_ROWS

