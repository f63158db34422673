"""The catalogue as the request path reads it: every model, route and backend in process, reloaded when announced.

Requests never query MariaDB for the catalogue. A snapshot is loaded at start and replaced whenever a writer
announces the topic "catalogue" on the invalidation bus (and after the bus reconnects, when a change may have been
missed). A failed reload keeps the previous snapshot and is retried.
"""

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC
from decimal import Decimal
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine
from yarl import URL

from scaigrid import errors, netguard
from scaigrid.cache import InvalidationBus
from scaigrid.crypto import UndecryptableCredential, decrypt
from scaigrid.db.tables import backends, hybrid_node_tenants, hybrid_nodes, model_routes, models, tenants
from scaigrid.lifecycle import background
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

TOPIC_CATALOGUE = "catalogue"
RELOAD_RETRY_S = 2.0
OFFERED_STATUSES = frozenset({"active", "deprecated"})  # a deprecated model still serves; clients should move on
SCAIINFER = "scaiinfer"  # the provider whose backends are ScaiInfer nodes, reached over gRPC
HYBRID = "hybrid"  # managed side: a linked node's model, reached through the tunnel on its link
MANAGED = "managed"  # node side: a model of the managed gateway (HYBRID_MANAGED_URL), reached over HTTPS
ANTHROPIC = "anthropic"  # Anthropic's Messages API, translated to and from OpenAI's (dispatch/anthropic.py)
AZURE = "azure"  # Azure OpenAI: OpenAI's protocol at a deployment's URL, with an api-version and an api-key header
PROVIDERS = ("openai", "custom", ANTHROPIC, AZURE, SCAIINFER, HYBRID, MANAGED)
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
# What a backend stores when it gives no api_version: the versions the translation and the stand-ins follow.
DEFAULT_API_VERSIONS = {ANTHROPIC: "2023-06-01", AZURE: "2024-10-21"}
BACKEND_STATUSES = ("active", "disabled")
MODALITIES = ("chat", "embedding", "image", "audio")
MODEL_STATUSES = ("active", "deprecated")
BACKEND_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SEGMENT = r"[a-z0-9][a-z0-9._:-]*"
MODEL_SLUG = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
MANAGED_API_ROOT = "/oai/v1"  # under HYBRID_MANAGED_URL
OWNER_SEPARATOR = "@"  # never in a backend's name (BACKEND_ID)


def backend_key(name: str, tenant_id: str | None) -> str:
    """A backend's primary key: its name qualified by its owner, so that two owners' names never meet.

    A platform backend's key is its bare name (what metrics and usage records show for most backends); a tenant's is
    "<name>@<tenant id>". Names are unique per owner, and one owner's names neither block nor reveal another's.
    """
    return name if tenant_id is None else f"{name}{OWNER_SEPARATOR}{tenant_id}"


def backend_name(key: str) -> str:
    """The name a backend is known by in the API (its `id` there), from its key."""
    return key.partition(OWNER_SEPARATOR)[0]


# The only environment variables a backend's `api_key_env` may name: the operator's, never the node's own secrets.
API_KEY_ENV_PREFIX = "SCAIGRID_BACKEND_KEY_"


@dataclass(frozen=True, slots=True)
class Backend:
    id: str  # backend_key(name, tenant_id): what breakers, metrics and usage records name it by
    tenant_id: str | None  # None = shared by every tenant
    partner_id: str | None  # the owning tenant's partner
    provider: str
    base_url: str
    model: str  # the upstream's own model name
    timeout_s: float  # the answer, or the first streamed event
    status: str  # active | disabled
    cost_input_per_mtok: Decimal
    cost_output_per_mtok: Decimal
    chat_url: URL
    embeddings_url: URL
    headers: Mapping[str, str] = field(repr=False)  # carries the upstream credential
    # providers "scaiinfer" and "hybrid": model is "<node_id>/<node_model>"; a ScaiInfer node's id, or a linked
    # node's (hn_...). Neither has a base_url.
    node_id: str | None = None
    node_model: str = ""
    # provider "hybrid": the tenants allowed on its node (PUT /v1/hybrid/nodes/{id}/tenants); no other tenant's
    # request is sent there, since the node knows only these tenants' users (docs/hybrid.md, "Tunnel").
    node_tenant_ids: frozenset[str] = frozenset()
    # A tenant's backend connects through scaigrid.netguard unless BACKEND_ALLOW_PRIVATE_TARGETS; `refused` says why
    # its IP-literal host (which no resolver sees) may not be called.
    guarded: bool = False
    refused: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    backend: Backend
    weight: int
    priority: int  # lower is tried first


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    slug: str
    tenant_id: str | None  # None = offered to every tenant
    owned_by: str  # "scaigrid", or the slug of the tenant that owns a private model
    display_name: str | None
    modality: str
    context_window: int | None
    max_output_tokens: int | None
    price_input_per_mtok: Decimal
    price_output_per_mtok: Decimal
    default_params: Mapping[str, Any]
    status: str
    created_unix: int
    # Routes to active backends, grouped by priority, lowest number first.
    groups: tuple[tuple[Route, ...], ...]
    # Per unit, for image and audio models (dispatch/media.py); a request pays its tokens and its units.
    price_per_image: Decimal = Decimal(0)
    price_per_audio_second: Decimal = Decimal(0)
    price_per_mchar: Decimal = Decimal(0)  # per million characters of text turned into speech
    description: str | None = None
    route_count: int = 0  # every route, to disabled backends too (the groups hold only active ones)

    def cost(self, tokens_in: int, tokens_out: int) -> Decimal:
        """Exact price of a call: tokens times the price per million tokens."""
        return (tokens_in * self.price_input_per_mtok + tokens_out * self.price_output_per_mtok) / 1_000_000


class Catalogue:
    """An immutable snapshot: lookups are dictionary reads."""

    def __init__(self, all_models: Iterable[Model], all_backends: Iterable[Backend]) -> None:
        # Slugs are unique per owner (a tenant, or None for the platform), not across owners.
        self._models = {(model.tenant_id, model.slug): model for model in all_models}
        self._sorted = sorted(self._models.values(), key=lambda model: model.slug)
        self._backends = {backend.id: backend for backend in all_backends}
        self.backend_ids = tuple(self._backends)
        self.node_ids = frozenset(b.node_id for b in self._backends.values()
                                  if b.node_id is not None and b.provider == SCAIINFER)
        self.linked_node_ids = frozenset(b.node_id for b in self._backends.values()
                                         if b.node_id is not None and b.provider == HYBRID)
        self.model_count = len(self._models)

    def model(self, slug: str, tenant_id: str) -> Model:
        """The model `slug` as this tenant sees it: its own model of that slug, else the platform's (which its own
        shadows); another tenant's model does not exist for it."""
        model = self._models.get((tenant_id, slug)) or self._models.get((None, slug))
        if model is None:
            raise errors.model_not_found(slug)
        return model

    def models_for(self, tenant_id: str) -> list[Model]:
        """Every model the tenant sees, by slug: a platform model its own model shadows is left out."""
        return [model for model in self._sorted if model.tenant_id == tenant_id
                or (model.tenant_id is None and (tenant_id, model.slug) not in self._models)]

    def backend(self, key: str) -> Backend | None:
        """The backend of that key (`backend_key`), not of that name."""
        return self._backends.get(key)


def _credential(settings: Settings, row: Any) -> str | None:
    if row.api_key_encrypted is not None:
        try:
            return decrypt(settings, row.api_key_encrypted)
        except UndecryptableCredential as exc:
            logger.error("backend %s: %s", row.id, exc, extra={"event": "backend_key_unreadable", "backend_id": row.id})
            return None
    if row.api_key_env and not row.api_key_env.startswith(API_KEY_ENV_PREFIX):
        # Stored before the prefix rule: reading it could send one of the node's own secrets to the backend.
        logger.error("backend %s: api_key_env %s lacks the prefix %s; calling it without a key", row.id,
                     row.api_key_env, API_KEY_ENV_PREFIX, extra={"event": "backend_key_env_refused",
                                                                 "backend_id": row.id})
        return None
    if row.api_key_env:
        key = os.environ.get(row.api_key_env)
        if key is None:
            logger.warning("backend %s: environment variable %s is not set; calling it without a key", row.id,
                           row.api_key_env, extra={"event": "backend_key_missing", "backend_id": row.id})
        return key
    return None


def _endpoints(row: Any, root: str, key: str | None) -> tuple[URL, URL, dict[str, str]]:
    """(chat URL, embeddings URL, headers) of a backend: where each provider wants its requests and its key."""
    headers = {"Content-Type": "application/json"}
    version = row.api_version or DEFAULT_API_VERSIONS.get(row.provider, "")
    if row.provider == ANTHROPIC:
        if key:
            headers["x-api-key"] = key
        headers["anthropic-version"] = version
        return URL(root + "/v1/messages"), URL(root + "/v1/messages"), headers  # Anthropic has no embeddings
    if row.provider == AZURE:
        if key:
            headers["api-key"] = key
        deployment = f"{root}/openai/deployments/{row.deployment}"
        query = {"api-version": version}
        return (URL(deployment + "/chat/completions").with_query(query),
                URL(deployment + "/embeddings").with_query(query), headers)
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return URL(root + "/chat/completions"), URL(root + "/embeddings"), headers


def _backend(settings: Settings, row: Any, node_tenants: Mapping[str, frozenset[str]]) -> Backend:
    root = row.base_url.rstrip("/")
    if row.provider == MANAGED:  # unset: the transport says such a backend is unavailable
        root = (settings.hybrid.managed_url or "").rstrip("/") + MANAGED_API_ROOT
    chat_url, embeddings_url, headers = _endpoints(row, root, _credential(settings, row))
    node_id, _, node_model = row.model.partition("/") if row.provider in (SCAIINFER, HYBRID) else (None, "", "")
    # Shared backends are the platform's own (an on-prem vLLM on 10.x is normal); a tenant's stays on global addresses.
    guarded = row.tenant_id is not None and bool(row.base_url) and not settings.dispatch.allow_private_targets
    return Backend(
        id=row.id, tenant_id=row.tenant_id, partner_id=row.partner_id, provider=row.provider, base_url=root,
        model=row.model, timeout_s=row.timeout_s or settings.dispatch.timeout_s, status=row.status,
        cost_input_per_mtok=row.cost_input_per_mtok, cost_output_per_mtok=row.cost_output_per_mtok,
        chat_url=chat_url, embeddings_url=embeddings_url, headers=headers,
        node_id=node_id, node_model=node_model, guarded=guarded,
        refused=netguard.literal_refusal(root) if guarded else None,
        node_tenant_ids=node_tenants.get(node_id or "", frozenset()) if row.provider == HYBRID else frozenset())


async def load_catalogue(engine: AsyncEngine, settings: Settings) -> Catalogue:
    """Reads every backend, model and route, and the tenants of each linked node (four queries)."""
    async with engine.connect() as conn:
        backend_rows = (await conn.execute(
            select(backends, tenants.c.partner_id)
            .select_from(backends.outerjoin(tenants, backends.c.tenant_id == tenants.c.id)))).all()
        model_rows = (await conn.execute(
            select(models, tenants.c.slug.label("tenant_slug"))
            .select_from(models.outerjoin(tenants, models.c.tenant_id == tenants.c.id)))).all()
        route_rows = (await conn.execute(select(model_routes))).all()
        allowed_rows = (await conn.execute(select(hybrid_node_tenants.c.node_id, hybrid_node_tenants.c.tenant_id)
                                           .join(hybrid_nodes, hybrid_nodes.c.id == hybrid_node_tenants.c.node_id)
                                           .where(hybrid_nodes.c.revoked_at.is_(None)))).all()
    node_tenants: dict[str, set[str]] = {}
    for node_id, tenant_id in allowed_rows:
        node_tenants.setdefault(node_id, set()).add(tenant_id)
    frozen = {node_id: frozenset(tenant_ids) for node_id, tenant_ids in node_tenants.items()}
    by_id = {row.id: _backend(settings, row, frozen) for row in backend_rows}
    routes_of: dict[str, list[Route]] = {}
    route_counts: dict[str, int] = {}
    for row in route_rows:
        route_counts[row.model_id] = route_counts.get(row.model_id, 0) + 1
        backend = by_id.get(row.backend_id)
        if backend is not None and backend.status == "active":
            routes_of.setdefault(row.model_id, []).append(Route(backend, row.weight, row.priority))
    loaded = []
    for row in model_rows:
        if row.status not in OFFERED_STATUSES:
            continue
        routes = sorted(routes_of.get(row.id, ()), key=lambda route: (route.priority, route.backend.id))
        groups = tuple(tuple(r for r in routes if r.priority == p) for p in sorted({r.priority for r in routes}))
        loaded.append(Model(
            id=row.id, slug=row.slug, tenant_id=row.tenant_id, owned_by=row.tenant_slug or "scaigrid",
            display_name=row.display_name, modality=row.modality, context_window=row.context_window,
            max_output_tokens=row.max_output_tokens, price_input_per_mtok=row.price_input_per_mtok,
            price_output_per_mtok=row.price_output_per_mtok, default_params=row.default_params or {},
            status=row.status, created_unix=int(row.created_at.replace(tzinfo=UTC).timestamp()), groups=groups,
            price_per_image=row.price_per_image, price_per_audio_second=row.price_per_audio_second,
            price_per_mchar=row.price_per_mchar, description=row.description, route_count=route_counts.get(row.id, 0)))
    return Catalogue(loaded, by_id.values())


class CatalogueLoader:
    """Holds the current snapshot and replaces it whenever the catalogue is announced as changed."""

    def __init__(self, engine: AsyncEngine, settings: Settings, bus: InvalidationBus) -> None:
        self._engine = engine
        self._settings = settings
        self.current = Catalogue((), ())
        self._wanted = asyncio.Event()
        self._failing = False
        self._listeners: list[Callable[[Catalogue], None]] = []
        bus.on(TOPIC_CATALOGUE, lambda _key: self._wanted.set())

    def on_load(self, listener: Callable[[Catalogue], None]) -> None:
        """`listener(catalogue)` runs after every successful load."""
        self._listeners.append(listener)

    async def load(self) -> None:
        self.current = await load_catalogue(self._engine, self._settings)
        for listener in self._listeners:
            listener(self.current)
        logger.info("catalogue loaded: %d model(s), %d backend(s)", self.current.model_count,
                    len(self.current.backend_ids), extra={"event": "catalogue_loaded"})

    async def _try_load(self) -> bool:
        try:
            await self.load()
        except Exception as exc:
            # Once per outage (a node started before `scaigrid migrate` would otherwise log every retry).
            if not self._failing:
                logger.warning("catalogue load failed (%s); serving the previous one, retrying every %g s",
                               type(exc).__name__, RELOAD_RETRY_S, extra={"event": "catalogue_load_failed"})
            self._failing = True
            return False
        self._failing = False
        return True

    async def _follow(self) -> None:
        """Reloads on every announcement; several announcements during one load cause one more load."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            if not await self._try_load():
                await asyncio.sleep(RELOAD_RETRY_S)
                self._wanted.set()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator["CatalogueLoader"]:
        """Loads before serving; a node whose schema is not migrated yet still starts, and keeps trying."""
        if not await self._try_load():
            self._wanted.set()
        async with background(self._follow(), "catalogue-loader"):
            yield self
