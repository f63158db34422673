"""The catalogue's bodies: reading and checking a backend, a model or a model's routes, alone (no database), for the
/v1/ API and `admin apply` alike. Every problem is reported at once as VALIDATION_ERROR details; `routing.store`
then checks what needs the database and writes.
"""

import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from scaigrid.dispatch.schemas import parameter_problems
from scaigrid.fields import Fields
from scaigrid.nodes.registry import NODE_ID
from scaigrid.routing.catalogue import (
    ANTHROPIC,
    ANTHROPIC_BASE_URL,
    API_KEY_ENV_PREFIX,
    AZURE,
    BACKEND_ID,
    BACKEND_STATUSES,
    DEFAULT_API_VERSIONS,
    HYBRID,
    MANAGED,
    MODALITIES,
    MODEL_SLUG,
    MODEL_STATUSES,
    PROVIDERS,
    SCAIINFER,
)
from scaigrid.urls import http_url_problem

# Only the operator's variables: never SERVICE_TOKEN_SECRET, DATABASE_URL or any other of the node's own.
ENV_NAME = re.compile(rf"{API_KEY_ENV_PREFIX}[A-Za-z0-9_]{{1,107}}")
# A scaiinfer backend names its node and the node's model: "node-eu-01/llama-3.3" (the URI scaiinfer:<node>/<model>).
NODE_MODEL = re.compile(rf"(?:{NODE_ID.pattern})/[^\s/][^\s]{{0,190}}")
# A hybrid backend names a linked node (its id from enrolment) and a model slug of that node.
LINKED_NODE_MODEL = re.compile(rf"hn_[0-9a-f]{{32}}/(?:{MODEL_SLUG.pattern})")
# Why each provider has no base_url, api_key or api_key_env (each is refused).
_KEYLESS = {
    SCAIINFER: "its node announces its endpoint by heartbeat and is called with a service token",
    HYBRID: "it is reached through the node's link, with the client's own key",
    MANAGED: "it is reached at HYBRID_MANAGED_URL, with the client's own key",
}
# A key is sent as `Authorization: Bearer <key>`: visible ASCII only, or every request to the backend would fail.
API_KEY = re.compile(r"[\x21-\x7e]+")
# An Azure deployment's name (a path segment of its URLs), and the API versions Azure and Anthropic date.
DEPLOYMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
API_VERSION = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?")

BACKEND_FIELDS = ("id", "provider", "base_url", "model", "api_key", "api_key_env", "cost_input_per_mtok",
                  "cost_output_per_mtok", "timeout_s", "tenant", "status", "deployment", "api_version")
# The documented price names, each with the node's former name (still accepted on write, and still shown).
PRICE_ALIASES = {"input_price_per_mtok": "price_input_per_mtok", "output_price_per_mtok": "price_output_per_mtok"}
UNIT_PRICES = ("price_per_image", "price_per_audio_second", "price_per_mchar")  # decimal strings, like the others
MODEL_FIELDS = ("slug", "display_name", "description", "modality", "context_window", "max_output_tokens",
                *PRICE_ALIASES, *PRICE_ALIASES.values(), *UNIT_PRICES, "default_params", "status", "tenant", "routes")
ROUTE_FIELDS = ("backend", "weight", "priority")
MODEL_DESCRIPTION_MAX = 4000  # characters (a TEXT column)


@dataclass(frozen=True)
class RouteSpec:
    backend: str
    weight: int
    priority: int  # lower is tried first


@dataclass(frozen=True)
class BackendSpec:
    id: str
    provider: str
    base_url: str
    model: str
    api_key: str | None = field(repr=False)  # plaintext, in memory only
    api_key_env: str | None
    cost_input_per_mtok: Decimal
    cost_output_per_mtok: Decimal
    timeout_s: float | None
    tenant: str | None  # slug; None = shared by every tenant
    status: str
    deployment: str | None = None  # azure only
    api_version: str | None = None  # azure and anthropic only; their DEFAULT_API_VERSIONS when not given


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    display_name: str | None
    description: str | None
    modality: str
    context_window: int | None
    max_output_tokens: int | None
    price_input_per_mtok: Decimal
    price_output_per_mtok: Decimal
    price_per_image: Decimal
    price_per_audio_second: Decimal
    price_per_mchar: Decimal
    default_params: dict[str, Any] | None
    status: str
    tenant: str | None
    routes: tuple[RouteSpec, ...] | None  # None = leave the model's routes as they are


def _base_url(fields: Fields, default: str | None = None) -> str | None:
    url = fields.string("base_url", required=default is None, max_length=1024) or default
    if url is None:
        return None
    # A URL that would not load into the catalogue, or with a query or fragment the request paths cannot follow.
    if http_url_problem(url) is not None or urlsplit(url).query or urlsplit(url).fragment:
        fields.fail("base_url", "an http:// or https:// URL of the OpenAI API root, e.g. http://10.0.0.5:8000/v1")
        return None
    if urlsplit(url).username is not None or urlsplit(url).password is not None:
        fields.fail("base_url", "must not contain credentials (user:password@); give the key in api_key")
        return None
    return url.rstrip("/")


def parse_backend(body: Any) -> BackendSpec:
    """A backend from a body (API) or a [[backends]] table (apply); VALIDATION_ERROR lists every problem."""
    f = Fields(body, BACKEND_FIELDS)
    provider = f.string("provider", required=True, choices=PROVIDERS) or ""
    keyless = _KEYLESS.get(provider)
    spec = BackendSpec(
        id=f.string("id", required=True, max_length=64, pattern=BACKEND_ID) or "",
        provider=provider,
        base_url="" if keyless else _base_url(f, ANTHROPIC_BASE_URL if provider == ANTHROPIC else None) or "",
        model=f.string("model", required=True) or "",
        api_key=f.string("api_key", max_length=4096, pattern=API_KEY, hint="visible ASCII characters, no spaces"),
        api_key_env=f.string("api_key_env", max_length=128, pattern=ENV_NAME),
        cost_input_per_mtok=f.money("cost_input_per_mtok"),
        cost_output_per_mtok=f.money("cost_output_per_mtok"),
        timeout_s=f.seconds("timeout_s"),
        tenant=f.string("tenant", max_length=64),
        status=f.string("status", choices=BACKEND_STATUSES) or "active",
        deployment=f.string("deployment", required=provider == AZURE, max_length=64, pattern=DEPLOYMENT,
                            hint="the Azure deployment's name: letters, digits, '.', '_' or '-'"),
        api_version=f.string("api_version", max_length=32, pattern=API_VERSION,
                             hint="a dated version such as 2024-10-21 (azure) or 2023-06-01 (anthropic)")
        or DEFAULT_API_VERSIONS.get(provider),
    )
    if spec.api_key is not None and spec.api_key_env is not None:
        f.fail("api_key_env", "give api_key or api_key_env, not both")
    if provider == SCAIINFER and spec.model and not NODE_MODEL.fullmatch(spec.model):
        f.fail("model", "for a scaiinfer backend: <node id>/<model the node serves>, e.g. node-eu-01/llama-3.3")
    if provider == HYBRID and spec.model and not LINKED_NODE_MODEL.fullmatch(spec.model):
        f.fail("model", "for a hybrid backend: <node id (hn_...)>/<model slug on the node>, e.g. "
                        "hn_0123456789abcdef0123456789abcdef/acme/llama-3.3")
    if provider == MANAGED and spec.model and not MODEL_SLUG.fullmatch(spec.model):
        f.fail("model", "for a managed backend: the slug of a model of the managed gateway")
    if keyless:
        for name in ("base_url", "api_key", "api_key_env"):
            if f.body.get(name):
                f.fail(name, f"a {provider} backend has none: {keyless}")
    for name, providers in (("deployment", (AZURE,)), ("api_version", (AZURE, ANTHROPIC))):
        if f.body.get(name) is not None and provider and provider not in providers:
            f.fail(name, f"only a {' or '.join(providers)} backend has one")
    f.done()
    return spec


def _routes(f: Fields) -> tuple[RouteSpec, ...] | None:
    if "routes" not in f.body:
        return None
    raw = f.body["routes"]
    if not isinstance(raw, list):
        f.fail("routes", "a list of {backend, weight, priority}")
        return None
    routes: list[RouteSpec] = []
    for index, item in enumerate(raw):
        r = Fields(item, ROUTE_FIELDS, prefix=f"{f.where}routes[{index}].")
        route = RouteSpec(
            backend=r.string("backend", required=True, max_length=64, pattern=BACKEND_ID) or "",
            weight=r.integer("weight", maximum=1000) or 1,
            priority=r.integer("priority", maximum=1000) or 1,
        )
        if route.backend and route.backend in {seen.backend for seen in routes}:
            r.fail("backend", f"{route.backend!r} is listed twice")
        f.problems.extend(r.problems)
        routes.append(route)
    return tuple(routes)


def parse_routes(body: Any) -> tuple[RouteSpec, ...]:
    """The body of PUT /v1/routing/{slug}: {"routes": [...]}."""
    f = Fields(body, ("routes",))
    f.present("routes", True)
    routes = _routes(f)
    f.done()
    return routes or ()


def _price(f: Fields, name: str) -> Decimal:
    """A price by its documented name or the node's former one; both given must agree."""
    alias = PRICE_ALIASES[name]
    amount, former = f.money(name), f.money(alias)
    if f.body.get(alias) is None:
        return amount
    if f.body.get(name) is not None and former != amount:
        f.fail(alias, f"the former name of {name}, which gives another price; send one of the two")
    return former


def parse_model(body: Any) -> ModelSpec:
    """A frontend model from a body (API) or a [[models]] table (apply)."""
    f = Fields(body, MODEL_FIELDS)
    spec = ModelSpec(
        slug=f.string("slug", required=True, max_length=191, pattern=MODEL_SLUG) or "",
        display_name=f.string("display_name"),
        description=f.string("description", max_length=MODEL_DESCRIPTION_MAX, multiline=True),
        modality=f.string("modality", required=True, choices=MODALITIES) or "",
        context_window=f.integer("context_window"),
        max_output_tokens=f.integer("max_output_tokens"),
        price_input_per_mtok=_price(f, "input_price_per_mtok"),
        price_output_per_mtok=_price(f, "output_price_per_mtok"),
        price_per_image=f.money("price_per_image"),
        price_per_audio_second=f.money("price_per_audio_second"),
        price_per_mchar=f.money("price_per_mchar"),
        default_params=f.mapping("default_params"),
        status=f.string("status", choices=MODEL_STATUSES) or "active",
        tenant=f.string("tenant", max_length=64),
        routes=_routes(f),
    )
    if spec.context_window and spec.max_output_tokens and spec.max_output_tokens > spec.context_window:
        f.fail("max_output_tokens", f"at most context_window ({spec.context_window})")
    for problem in parameter_problems(spec.default_params or {}):  # merged under every request's parameters
        f.fail(f"default_params.{problem.field}", problem.message)
    f.done()
    return spec
