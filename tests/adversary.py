"""The adversarial suite's machinery: callers, the route table, the expected outcome each caller gets, raw HTTP.

The table (`ROWS`) has one row per registered (method, route); what a caller gets is derived from the route's own
access declaration (permission, metered, scopes, reach) and the role's permissions (scaigrid.auth.roles), combined
with where the target object lives (the caller's own tenant, another tenant of its partner, another partner's), as
the trust model states it (docs: DESIGN.md "Trust model", issue 13). Rank and ownership rules that a declaration
cannot express are in `RANK_CASES`, spelled out.
"""

import contextlib
import http.client
import json
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from scaigrid.access import Access
from scaigrid.auth import service_tokens
from scaigrid.auth.roles import REACHES, ROLE_REACH, ROLES, role_can
from scaigrid.settings import Secret

# --- outcomes: each a set of statuses a caller may get, and why ---

OK = "ok"

SCOPES = service_tokens.SCOPES
# A managed identity is at most a tenant_user on a node (scaigrid/hybrid/mirror.py ROLE_ON_NODE).
MIRRORED_ROLE = "tenant_user"


@dataclass(frozen=True)
class Outcome:
    statuses: frozenset[int]
    why: str

    def __str__(self) -> str:
        return f"{'|'.join(map(str, sorted(self.statuses)))} ({self.why})"


def outcome(why: str, *statuses: int) -> Outcome:
    return Outcome(frozenset(statuses), why)


# --- callers ---

@dataclass(frozen=True)
class Caller:
    """Who calls, and against which tenant's objects (its own, a sibling under its partner, another partner's)."""

    name: str
    kind: str  # anonymous | bad-token | role | scope | mirrored
    role: str | None = None  # the role it acts with (a mirrored user: the role it has on the node)
    target: str = "t1"  # the tenant whose objects it is pointed at: t1, t2 (t1's sibling), t3 (other partner), m
    home: str | None = "t1"  # its own tenant; None for callers without one
    scope: str | None = None

    @property
    def group(self) -> str:
        return {"anonymous": "anonymous", "bad-token": "anonymous", "role": "roles", "scope": "scopes",
                "mirrored": "mirrored"}[self.kind]


POSITIONS = {"own": "t1", "sibling": "t2", "foreign": "t3"}
CALLERS: tuple[Caller, ...] = (
    Caller("unauthenticated", "anonymous", home=None),
    Caller("bad-token", "bad-token", home=None),
    *(Caller(f"{role}@{position}", "role", role, target) for role in ROLES for position, target in POSITIONS.items()),
    *(Caller(f"scope:{scope}", "scope", target="t1", home=None, scope=scope) for scope in SCOPES),
    Caller("mirrored-tenant_admin", "mirrored", MIRRORED_ROLE, target="m", home="m"),
)
GROUPS = ("anonymous", "roles", "scopes", "mirrored")


def mint_scoped(secret: Secret, name: str, scope: str) -> str:
    """A service token of that scope (the scopes part of issue 13 adds the keyword; before it this raises TypeError)."""
    mint: Callable[..., str] = service_tokens.mint
    return mint(secret, name, 3600, scope=scope)


# --- the table ---

@dataclass
class Target:
    """One tenant's objects, each a route's target: made once per suite (DELETE routes get a fresh one per case)."""

    key: str
    tenant_id: str
    slug: str
    name: str
    partner_id: str
    user_id: str = ""
    key_id: str = ""
    backend_id: str = ""
    chat_model: str = ""
    embed_model: str = ""
    image_model: str = ""
    audio_model: str = ""  # transcription and speech alike
    webhook_id: str = ""
    budget_id: str = ""
    setter_key: str = ""  # a tenant_admin of this tenant: it sets the tenant's own budgets


@dataclass(frozen=True)
class Row:
    """One (method, route): how to call it against a tenant's objects, and what only the trust model says of it.

    Fields the declaration cannot carry:
      public        what every caller gets from a route that authenticates itself (or is open)
      platform      the trust model reserves it to platform reach (issue 13 point 5, hybrid administration)
      min_reach     reach needed besides the permission; checked before the target is looked up when `create`
      tenant_surface  the inference surface: what the caller's own tenant may use, whatever its reach
      hidden        what a target out of reach answers (404; a tenant named in a body may be a validation error)
      other_person  a permission needed to act on someone else than the caller, and the status without it
      fresh         the target is consumed (deleted): made anew for each case
    """

    method: str
    path: str
    url: Callable[["World", Target], str]
    body: Callable[["World", Target], Any] | None = None
    target: bool = False
    success: int = 200
    public: Outcome | None = None
    platform: bool = False
    min_reach: str | None = None
    create: bool = False
    tenant_surface: bool = False
    hidden: frozenset[int] = frozenset({404})
    other_person: tuple[str, int] | None = None
    fresh: str | None = None  # key | user | backend | model | budget | webhook | node

    @property
    def id(self) -> str:
        return f"{self.method} {self.path}"


class World:
    """What the running node holds for the table: its URL, tokens per caller, targets per tenant (filled by the
    test module's fixture)."""

    url: str
    admin_key: str
    targets: dict[str, Target]
    tokens: dict[str, str | None]
    token_errors: dict[str, str]
    node_id: str
    fresh: Callable[[str, Target], str]

    def unique(self, prefix: str) -> str:
        return f"{prefix}-{secrets.token_hex(4)}"


def _static(path: str) -> Callable[[World, Target], str]:
    return lambda world, target: path


PUBLIC_OK = outcome("public", 200)
SELF_AUTHENTICATED = outcome("authenticates itself; a bearer token is not its credential", 401)
MAKE_BELIEVE_URL = "https://8.8.8.8/v1"  # a global address nothing here ever calls: no model routes to it


def _chat(world: World, t: Target) -> dict[str, Any]:
    return {"model": t.chat_model, "messages": [{"role": "user", "content": "hi"}]}


def _embed(world: World, t: Target) -> dict[str, Any]:
    return {"model": t.embed_model, "input": "hi"}


class Form(dict[str, str]):
    """A multipart/form-data body for `send`: each item a text field, but `file`, sent as a file part (audio.wav).
    Fuzzing sees a dict like any other body, and sends it as JSON: a form route answers that with a 422."""


def _form_bytes(form: Form) -> tuple[bytes, str]:
    boundary = "adversary" + secrets.token_hex(8)
    parts = []
    for name, value in form.items():
        filename = '; filename="audio.wav"\r\nContent-Type: audio/wav' if name == "file" else ""
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"{filename}\r\n\r\n{value}\r\n')
    return "".join([*parts, f"--{boundary}--\r\n"]).encode(), f"multipart/form-data; boundary={boundary}"


def _transcription(world: World, t: Target) -> Form:
    return Form(model=t.audio_model, file="RIFF-not-really-audio")


def _image(world: World, t: Target) -> dict[str, Any]:
    return {"model": t.image_model, "prompt": "hi"}


def _speech(world: World, t: Target) -> dict[str, Any]:
    return {"model": t.audio_model, "voice": "alloy", "input": "hi"}


ROWS: tuple[Row, ...] = (
    Row("GET", "/health", _static("/health"), public=PUBLIC_OK),
    Row("GET", "/health/ready", _static("/health/ready"), public=PUBLIC_OK),
    Row("GET", "/metrics", _static("/metrics"), public=PUBLIC_OK),
    Row("GET", "/health/detailed", _static("/health/detailed"), platform=True),
    # --- identity ---
    # Any authenticated caller sees itself (operator tokens too); the other service scopes serve one method each.
    Row("GET", "/v1/me", _static("/v1/me")),
    Row("GET", "/v1/auth/me", _static("/v1/auth/me")),
    Row("GET", "/v1/api-keys", _static("/v1/api-keys")),
    Row("POST", "/v1/api-keys", _static("/v1/api-keys"), target=True, success=201,
        body=lambda w, t: {"name": "adversary", "assigned_user_id": t.user_id, "role": "tenant_user"},
        other_person=("users:manage", 403)),
    Row("DELETE", "/v1/api-keys/{id}", lambda w, t: f"/v1/api-keys/{w.fresh('key', t)}", target=True, fresh="key",
        other_person=("users:manage", 404)),
    Row("GET", "/v1/partners", _static("/v1/partners"), min_reach="partner", create=True),
    Row("POST", "/v1/partners", _static("/v1/partners"), success=201, platform=True,
        body=lambda w, t: {"slug": w.unique("adv-p"), "name": "Adversary"}),
    Row("GET", "/v1/tenants", _static("/v1/tenants")),
    Row("POST", "/v1/tenants", _static("/v1/tenants"), target=True, success=201, min_reach="partner", create=True,
        body=lambda w, t: {"slug": w.unique("adv-t"), "name": "Adversary", "partner_id": t.partner_id}),
    Row("GET", "/v1/tenants/{id}", lambda w, t: f"/v1/tenants/{t.tenant_id}", target=True),
    Row("PATCH", "/v1/tenants/{id}", lambda w, t: f"/v1/tenants/{t.tenant_id}", target=True, min_reach="partner",
        body=lambda w, t: {"name": t.name}),
    Row("GET", "/v1/users", _static("/v1/users")),
    Row("POST", "/v1/users", _static("/v1/users"), target=True, success=201,
        body=lambda w, t: {"email": f"{w.unique('adv')}@example.com", "role": "tenant_user", "tenant_id": t.tenant_id}),
    Row("GET", "/v1/users/{id}", lambda w, t: f"/v1/users/{t.user_id}", target=True),
    Row("PATCH", "/v1/users/{id}", lambda w, t: f"/v1/users/{t.user_id}", target=True,
        body=lambda w, t: {"display_name": "Target"}),
    Row("DELETE", "/v1/users/{id}", lambda w, t: f"/v1/users/{w.fresh('user', t)}", target=True, fresh="user"),
    Row("POST", "/v1/webhooks/scaikey", _static("/v1/webhooks/scaikey"), public=SELF_AUTHENTICATED,
        body=lambda w, t: {"event_id": "evt_x", "event_type": "user.created"}),
    # --- catalogue ---
    # Names are unique per owner (docs/api.md "Names belong to their owner"): a tenant's object is named with
    # ?tenant=<slug>, which the caller must reach (else 404, as for a name nobody holds).
    Row("GET", "/v1/backends", _static("/v1/backends")),
    Row("POST", "/v1/backends", _static("/v1/backends"), target=True, success=201, hidden=frozenset({404, 422}),
        body=lambda w, t: {"id": w.unique("adv-b"), "provider": "custom", "base_url": MAKE_BELIEVE_URL,
                           "model": "never-called", "tenant": t.slug}),
    Row("GET", "/v1/backends/{id}", lambda w, t: f"/v1/backends/{t.backend_id}?tenant={t.slug}", target=True),
    Row("PUT", "/v1/backends/{id}", lambda w, t: f"/v1/backends/{t.backend_id}?tenant={t.slug}", target=True,
        body=lambda w, t: {"timeout_s": 30}),
    Row("DELETE", "/v1/backends/{id}", lambda w, t: f"/v1/backends/{w.fresh('backend', t)}?tenant={t.slug}",
        target=True, fresh="backend"),
    Row("GET", "/v1/backends/{id}/health", lambda w, t: f"/v1/backends/{t.backend_id}/health?tenant={t.slug}",
        target=True),
    Row("POST", "/v1/models", _static("/v1/models"), target=True, success=201, hidden=frozenset({404, 422}),
        body=lambda w, t: {"slug": f"{t.slug}/{w.unique('adv')}", "modality": "chat", "tenant": t.slug}),
    Row("PUT", "/v1/models/{slug}", lambda w, t: f"/v1/models/{t.chat_model}?tenant={t.slug}", target=True,
        body=lambda w, t: {"display_name": "Chat"}),
    Row("DELETE", "/v1/models/{slug}", lambda w, t: f"/v1/models/{w.fresh('model', t)}?tenant={t.slug}", target=True,
        fresh="model"),
    Row("GET", "/v1/routing/{slug}", lambda w, t: f"/v1/routing/{t.chat_model}?tenant={t.slug}", target=True),
    Row("PUT", "/v1/routing/{slug}", lambda w, t: f"/v1/routing/{t.chat_model}?tenant={t.slug}", target=True,
        body=lambda w, t: {"routes": [{"backend": SHARED_BACKEND, "weight": 1, "priority": 1}]}),
    # --- inference: the caller's tenant's surface ---
    Row("POST", "/v1/inference/chat", _static("/v1/inference/chat"), target=True, tenant_surface=True, body=_chat),
    Row("POST", "/v1/inference/embed", _static("/v1/inference/embed"), target=True, tenant_surface=True,
        body=_embed),
    Row("POST", "/v1/inference/embeddings", _static("/v1/inference/embeddings"), target=True, tenant_surface=True,
        body=_embed),
    Row("POST", "/v1/inference/generate", _static("/v1/inference/generate"), target=True, tenant_surface=True,
        body=lambda w, t: {"model": t.chat_model, "prompt": "hi"}),
    Row("POST", "/v1/inference/images/generate", _static("/v1/inference/images/generate"), target=True,
        tenant_surface=True, body=_image),
    Row("POST", "/v1/inference/audio/transcribe", _static("/v1/inference/audio/transcribe"), target=True,
        tenant_surface=True, body=_transcription),
    Row("POST", "/v1/inference/audio/synthesize", _static("/v1/inference/audio/synthesize"), target=True,
        tenant_surface=True, body=_speech),
    Row("GET", "/v1/models", _static("/v1/models")),
    Row("GET", "/v1/models/{slug}", lambda w, t: f"/v1/models/{t.chat_model}", target=True, tenant_surface=True),
    Row("POST", "/oai/v1/chat/completions", _static("/oai/v1/chat/completions"), target=True, tenant_surface=True,
        body=_chat),
    Row("POST", "/oai/v1/embeddings", _static("/oai/v1/embeddings"), target=True, tenant_surface=True, body=_embed),
    Row("POST", "/oai/v1/images/generations", _static("/oai/v1/images/generations"), target=True,
        tenant_surface=True, body=_image),
    Row("POST", "/oai/v1/audio/transcriptions", _static("/oai/v1/audio/transcriptions"), target=True,
        tenant_surface=True, body=_transcription),
    Row("POST", "/oai/v1/audio/speech", _static("/oai/v1/audio/speech"), target=True, tenant_surface=True,
        body=_speech),
    Row("GET", "/oai/v1/models", _static("/oai/v1/models")),
    Row("GET", "/oai/v1/models/{slug}", lambda w, t: f"/oai/v1/models/{t.chat_model}", target=True,
        tenant_surface=True),
    # --- accounting ---
    Row("GET", "/v1/accounting/usage", _static("/v1/accounting/usage")),
    Row("GET", "/v1/accounting/usage/summary", _static("/v1/accounting/usage/summary")),
    Row("GET", "/v1/accounting/export", _static("/v1/accounting/export?format=json")),
    Row("GET", "/v1/accounting/budgets", _static("/v1/accounting/budgets")),
    Row("POST", "/v1/accounting/budgets", _static("/v1/accounting/budgets"), target=True, success=201,
        body=lambda w, t: {"scope": "tenant", "scope_id": t.tenant_id, "period": "monthly", "limit_type": "cost",
                           "limit_value": "1000", "hard_action": "notify"}),
    Row("GET", "/v1/accounting/budgets/{id}", lambda w, t: f"/v1/accounting/budgets/{t.budget_id}", target=True),
    # The same limit again, on a budget of its own per case: a change from above records the changer's reach and
    # locks the budget for lower callers (RANK_CASES test that), so a shared one would depend on the callers' order.
    Row("PUT", "/v1/accounting/budgets/{id}", lambda w, t: f"/v1/accounting/budgets/{w.fresh('budget', t)}",
        target=True, body=lambda w, t: {"limit_value": "1000"}, fresh="budget"),
    Row("DELETE", "/v1/accounting/budgets/{id}", lambda w, t: f"/v1/accounting/budgets/{w.fresh('budget', t)}",
        target=True, fresh="budget"),
    Row("GET", "/v1/rate-limits/{level}/{id}", lambda w, t: f"/v1/rate-limits/user/{t.user_id}", target=True),
    Row("PUT", "/v1/rate-limits/{level}/{id}", lambda w, t: f"/v1/rate-limits/user/{t.user_id}", target=True,
        body=lambda w, t: {"rpm": 100000}),
    # --- webhooks ---
    Row("GET", "/v1/webhooks", _static("/v1/webhooks")),
    Row("POST", "/v1/webhooks", _static("/v1/webhooks"), target=True, success=201,
        body=lambda w, t: {"url": "https://8.8.8.8/adversary", "events": ["request.completed"],
                           "tenant_id": t.tenant_id}),
    Row("GET", "/v1/webhooks/{id}", lambda w, t: f"/v1/webhooks/{t.webhook_id}", target=True),
    Row("PUT", "/v1/webhooks/{id}", lambda w, t: f"/v1/webhooks/{t.webhook_id}", target=True,
        body=lambda w, t: {"description": "target"}),
    Row("DELETE", "/v1/webhooks/{id}", lambda w, t: f"/v1/webhooks/{w.fresh('webhook', t)}", target=True,
        fresh="webhook"),
    Row("POST", "/v1/webhooks/{id}/test", lambda w, t: f"/v1/webhooks/{t.webhook_id}/test", target=True),
    Row("POST", "/v1/webhooks/{id}/rotate-secret", lambda w, t: f"/v1/webhooks/{t.webhook_id}/rotate-secret",
        target=True),
    Row("GET", "/v1/webhooks/{id}/deliveries", lambda w, t: f"/v1/webhooks/{t.webhook_id}/deliveries", target=True),
    # --- infrastructure: the platform's ---
    Row("GET", "/v1/infra/nodes", _static("/v1/infra/nodes"), platform=True),
    Row("POST", "/v1/hybrid/enrollment-tokens", _static("/v1/hybrid/enrollment-tokens"), success=201, platform=True,
        body=lambda w, t: {"name": "adversary", "ttl_s": 60}),
    Row("GET", "/v1/hybrid/nodes", _static("/v1/hybrid/nodes"), platform=True),
    Row("DELETE", "/v1/hybrid/nodes/{id}", lambda w, t: f"/v1/hybrid/nodes/{w.fresh('node', t)}", platform=True,
        fresh="node"),
    Row("GET", "/v1/hybrid/nodes/{id}/tenants", lambda w, t: f"/v1/hybrid/nodes/{w.node_id}/tenants", platform=True),
    Row("PUT", "/v1/hybrid/nodes/{id}/tenants", lambda w, t: f"/v1/hybrid/nodes/{w.node_id}/tenants", platform=True,
        body=lambda w, t: {"tenant_ids": []}),
    Row("POST", "/v1/hybrid/enroll", _static("/v1/hybrid/enroll"), public=SELF_AUTHENTICATED,
        body=lambda w, t: {"token": "sge_forged", "name": "adversary", "software_version": "1.0.0"}),
    Row("GET", "/v1/hybrid/link", _static("/v1/hybrid/link"), public=SELF_AUTHENTICATED),
    Row("POST", "/v1/hybrid/link/rotate", _static("/v1/hybrid/link/rotate"), public=SELF_AUTHENTICATED),
    Row("DELETE", "/v1/hybrid/link", _static("/v1/hybrid/link"), public=SELF_AUTHENTICATED),
    # --- modules admin: the quiet test module is switched (it has no routes, so the switches disturb no other row) ---
    Row("GET", "/v1/modules", _static("/v1/modules")),
    Row("GET", "/v1/modules/{module_id}", _static("/v1/modules/scaibunker")),
    *(Row("POST", f"/v1/modules/{{module_id}}/{verb}", _static(f"/v1/modules/quiet/{verb}"), target=True,
          body=lambda w, t: {"tenant_id": t.tenant_id}) for verb in ("enable", "disable")),
    # --- audit log: each admin reads what is in its reach (tenant, partner, all) ---
    Row("GET", "/v1/audit-log", _static("/v1/audit-log")),
    Row("GET", "/v1/audit-log/export", _static("/v1/audit-log/export?format=ndjson")),
    # --- the scaibunker module ---
    Row("POST", "/v1/modules/scaibunker/storage/capabilities", _static("/v1/modules/scaibunker/storage/capabilities"),
        target=True, success=201, body=lambda w, t: {"prefix": "", "verbs": ["GET"], "tenant_id": t.tenant_id}),
    *(Row(method, "/v1/modules/scaibunker/storage/objects/{key}",
          _static("/v1/modules/scaibunker/storage/objects/adversary.bin"), public=SELF_AUTHENTICATED,
          body=(lambda w, t: {"bytes": "x"}) if method == "PUT" else None)
      for method in ("PUT", "GET", "HEAD", "DELETE")),
    Row("GET", "/v1/modules/scaibunker/storage/objects", _static("/v1/modules/scaibunker/storage/objects"),
        public=SELF_AUTHENTICATED),
)
SHARED_BACKEND = "adv-fake"  # the operator's shared backend every tenant model routes to: the fake on loopback


def with_heads(rows: tuple[Row, ...], registered: set[tuple[str, str]]) -> tuple[Row, ...]:
    """Every row, plus a HEAD row for each GET that aiohttp also answers for HEAD (same handler, no body)."""
    heads = tuple(Row(**{**row.__dict__, "method": "HEAD"}) for row in rows
                  if row.method == "GET" and ("HEAD", row.path) in registered
                  and not any(r.method == "HEAD" and r.path == row.path for r in rows))
    return rows + heads


# --- the expected outcome ---

def _reaches(reach: str, home: str | None, target: str) -> bool:
    if reach == "platform":
        return True
    if home is None:
        return False
    if reach == "partner":
        return _partner_of(home) == _partner_of(target)
    return home == target


def _partner_of(tenant: str) -> str:
    return {"t1": "p1", "t2": "p1", "t3": "p2", "m": "mp", "f": "pf"}[tenant]


def _at_least(reach: str, needed: str) -> bool:
    return REACHES.index(reach) >= REACHES.index(needed)


def declared_scopes(access: Access) -> tuple[str, ...]:
    """The service scopes a route accepts (the scopes part adds the field; before it, none)."""
    return tuple(getattr(access, "scopes", ()) or ())


def platform_only(row: Row, access: Access) -> bool:
    return row.platform or getattr(access, "reach", None) == "platform"


def expected(row: Row, access: Access, caller: Caller) -> Outcome:
    """What `caller` must get from `row`, from the route's declaration and the trust model."""
    if row.public is not None or access.permission is None:
        return row.public or PUBLIC_OK
    if caller.kind in ("anonymous", "bad-token"):
        return outcome("no valid credential", 401)
    success = outcome("allowed", row.success)
    if caller.kind == "scope":
        assert caller.scope is not None
        if caller.scope not in declared_scopes(access):
            return outcome(f"the route does not accept the {caller.scope} scope", 403)
        if access.metered:
            return outcome("inference is limited and accounted to a tenant; a service token has none", 401, 403)
        reach = "platform" if caller.scope == "operator" else None
        if reach is None:
            return success if not row.target else outcome("no tenant of its own", *row.hidden)
        if row.tenant_surface:
            return outcome("the inference surface is a tenant's; a service token has none", 404)
        return success
    role = caller.role
    assert role is not None
    if not role_can(role, access.permission):
        return outcome(f"{role} lacks {access.permission}", 403)
    reach = ROLE_REACH[role]
    if platform_only(row, access) and reach != "platform":
        return outcome("platform reach only", 403)
    if row.min_reach and row.create and not _at_least(reach, row.min_reach):
        return outcome(f"needs {row.min_reach} reach", 403)
    if row.tenant_surface:
        return success if caller.target == caller.home else outcome("not a model of the caller's tenant", 404)
    if row.target and not _reaches(reach, caller.home, caller.target):
        return outcome("target out of reach", *row.hidden)
    if row.min_reach and not _at_least(reach, row.min_reach):
        return outcome(f"needs {row.min_reach} reach", 403)
    if row.other_person and not role_can(role, row.other_person[0]):
        return outcome(f"acting on another person needs {row.other_person[0]}", row.other_person[1])
    return success


# --- rank and ownership: what a declaration cannot say (issue 13 point 3) ---

@dataclass(frozen=True)
class RankCase:
    """`actor` (a role in tenant t1) does `method path` on a person or budget that ranks above it: refused.

    Refused is 403 (it is visible but not the actor's to touch) or 404 (not shown to the actor at all); either closes
    the exploit, and which one is the rank rule's choice.
    """

    name: str
    actor: str
    method: str
    path: str  # may name {victim}, {victim_key}, {budget}
    victim: str  # the role of the person acted on (a user of t1), or "budget:<setter role>"
    body: Mapping[str, Any] | None = None
    expect: frozenset[int] = frozenset({403, 404})


REFUSED = frozenset({403, 404})
RANK_CASES: tuple[RankCase, ...] = (
    RankCase("tenant_admin keys the tenant's super_admin", "tenant_admin", "POST", "/v1/api-keys", "super_admin",
             {"name": "stolen", "user_id": "{victim}", "role": "tenant_admin"}),
    RankCase("tenant_admin keys a partner_admin", "tenant_admin", "POST", "/v1/api-keys", "partner_admin",
             {"name": "stolen", "user_id": "{victim}", "role": "tenant_admin"}),
    RankCase("tenant_admin keys the tenant's super_admin by the documented name", "tenant_admin", "POST",
             "/v1/api-keys", "super_admin", {"name": "stolen", "assigned_user_id": "{victim}"}),
    RankCase("tenant_admin revokes a low key of the super_admin", "tenant_admin", "DELETE",
             "/v1/api-keys/{victim_key}", "super_admin"),
    RankCase("tenant_admin lists the super_admin's keys", "tenant_admin", "GET", "/v1/api-keys?user_id={victim}",
             "super_admin", expect=frozenset({200})),  # the answer must list none of them: checked by the test
    RankCase("tenant_admin changes the super_admin", "tenant_admin", "PATCH", "/v1/users/{victim}", "super_admin",
             {"display_name": "owned"}),
    RankCase("tenant_admin deletes the super_admin", "tenant_admin", "DELETE", "/v1/users/{victim}", "super_admin"),
    RankCase("partner_admin deletes the super_admin", "partner_admin", "DELETE", "/v1/users/{victim}",
             "super_admin"),
    RankCase("tenant_admin changes a partner_admin", "tenant_admin", "PATCH", "/v1/users/{victim}", "partner_admin",
             {"display_name": "owned"}),
    RankCase("partner_admin changes the super_admin", "partner_admin", "PATCH", "/v1/users/{victim}", "super_admin",
             {"display_name": "owned"}),
    RankCase("tenant_admin limits the super_admin's rate", "tenant_admin", "PUT", "/v1/rate-limits/user/{victim}",
             "super_admin", {"rpm": 1}),
    RankCase("tenant_admin budgets the super_admin", "tenant_admin", "POST", "/v1/accounting/budgets", "super_admin",
             {"scope": "user", "scope_id": "{victim}", "period": "monthly", "limit_type": "requests",
              "limit_value": "1", "hard_action": "block"}),
    RankCase("tenant_admin raises its partner's budget", "tenant_admin", "PUT", "/v1/accounting/budgets/{budget}",
             "budget:partner_admin", {"limit_value": "999999"}),
    RankCase("tenant_admin removes its partner's budget", "tenant_admin", "DELETE", "/v1/accounting/budgets/{budget}",
             "budget:partner_admin"),
    RankCase("partner_admin raises the platform's budget", "partner_admin", "PUT", "/v1/accounting/budgets/{budget}",
             "budget:super_admin", {"limit_value": "999999"}),
    RankCase("partner_admin removes the platform's budget", "partner_admin", "DELETE",
             "/v1/accounting/budgets/{budget}", "budget:super_admin"),
)


# --- raw HTTP: any method, any body bytes, any header ---

@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    raw: bytes
    body: Any = field(default=None)


def send(url: str, method: str, path: str, *, token: str | None = None, body: Any = None, raw: bytes | None = None,
         headers: Mapping[str, str] | None = None, timeout_s: float = 20) -> Answer:
    """One request on its own connection; `raw` is sent as it is, else `body` as JSON."""
    host, _, port = url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    sent = dict(headers or {})
    if token is not None:
        sent.setdefault("Authorization", f"Bearer {token}")
    if isinstance(body, Form):
        raw, content_type = _form_bytes(body)
        sent.setdefault("Content-Type", content_type)
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    if data is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=data, headers=sent)
        response = connection.getresponse()
        payload = response.read()
        answer = Answer(response.status, {k.lower(): v for k, v in response.getheaders()}, payload)
    finally:
        connection.close()
    if payload:
        with contextlib.suppress(ValueError):  # not JSON: envelope_problem says so where JSON is due
            answer.body = json.loads(payload)
    return answer


def envelope_problem(method: str, path: str, answer: Answer) -> str | None:
    """What is wrong with an answer as an error the API documents (None: nothing): never a 5xx; on /v1/ the native
    envelope, on /oai/v1/ the OpenAI error shape."""
    if answer.status >= 500:
        return f"a {answer.status}"
    if answer.status < 400 or method == "HEAD":
        return None
    body = answer.body
    if path.startswith("/oai/"):
        error = body.get("error") if isinstance(body, dict) else None
        if not (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)
                and "code" in error):
            return f"not the OpenAI error shape: {answer.raw[:200]!r}"
        return None
    if not (isinstance(body, dict) and body.get("status") == "error" and isinstance(body.get("error"), dict)
            and isinstance(body["error"].get("code"), str) and isinstance(body["error"].get("message"), str)
            and isinstance(body.get("meta"), dict) and isinstance(body["meta"].get("request_id"), str)):
        return f"not the error envelope: {answer.raw[:200]!r}"
    details = body["error"].get("details")
    if details is not None and not (isinstance(details, list) and all(
            isinstance(d, dict) and isinstance(d.get("field"), str) and isinstance(d.get("message"), str)
            for d in details)):
        return f"details not [{{field, message}}]: {details!r:.200}"
    if answer.status == 422 and not details:
        return "a 422 without details"
    return None


def redacted(text: str | bytes) -> str:
    """Text for a failure message, without API keys or service tokens in it (even a test's are not printed)."""
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    return re.sub(r"(sgk_|sst_)[\w.-]{16,}", r"\1<redacted>", text)
