"""Config snapshots, node side: mirroring a received snapshot into this node's tables (`apply`) and taking the
mirror back once the node left the managed side (`forget`).

The node validates a snapshot completely (`snapshot_schema.parse`) before it writes anything, then mirrors it in one
transaction, so its whole pipeline authenticates and limits managed keys, and serves from them when the link is
down. docs/hybrid.md, "Config snapshots and the usage outbox", says what is mirrored and how.
"""

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import Table, delete, func, select, update
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid.auth.authenticator import TOPIC_IDENTITY
from scaigrid.auth.tenancy import SLUG_MAX
from scaigrid.cache import announce
from scaigrid.clock import utc_now
from scaigrid.db.tables import (
    api_keys,
    backends,
    hybrid_applied_snapshot,
    hybrid_mirrored,
    hybrid_usage_outbox,
    model_routes,
    models,
    new_id,
    partners,
    tenants,
    users,
)
from scaigrid.fields import naive_utc
from scaigrid.hybrid.outbox import MANAGED_BACKEND_PREFIX, MIRRORED_TENANT
from scaigrid.hybrid.snapshot_schema import SnapshotRejected, parse
from scaigrid.routing.catalogue import MANAGED, TOPIC_CATALOGUE, backend_key

logger = logging.getLogger(__name__)

DISABLED = "disabled"  # the status of a mirrored partner, tenant or user the managed side no longer sends
MIRRORED_SLUG_SUFFIX = "-managed"  # a mirrored partner or tenant whose slug a local one holds gets this suffix
# A managed identity is at most a tenant_user on a node: a managed tenant_admin must not send webhooks from inside the
# customer's network, read /health/detailed or manage modules there. The appliance's own admin is its only admin.
ROLE_ON_NODE = {"tenant_admin": "tenant_user"}
_APPLIED_ROW = 1


def managed_backend_id(slug: str) -> str:
    """The node's backend for a managed model: stable per slug, and recognisable (the outbox skips its usage)."""
    return MANAGED_BACKEND_PREFIX + hashlib.sha1(slug.encode()).hexdigest()[:12]  # noqa: S324  # a name, not a security hash


def _managed_backend_key(model: Mapping[str, Any]) -> str:
    return backend_key(managed_backend_id(model["slug"]), model["tenant_id"])


_KINDS = {"partners": ("partner", partners), "tenants": (MIRRORED_TENANT, tenants), "users": ("user", users),
          "api_keys": ("api_key", api_keys)}


@dataclass(frozen=True)
class Forgotten:
    """What `forget` did."""

    node_id: str | None  # whose snapshot was applied; None when none was
    version: int | None
    switched_off: dict[str, int]  # kind (partner, tenant, user, api_key) -> rows disabled, or keys revoked, now
    models_deleted: int
    backends_disabled: int
    outbox_left: int  # usage records still waiting in the outbox: kept


async def applied(engine: AsyncEngine) -> tuple[int, str] | None:
    """(version, sha256) of the snapshot this node last applied; None when it never applied one."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(hybrid_applied_snapshot.c.version, hybrid_applied_snapshot.c.sha256).where(
            hybrid_applied_snapshot.c.id == _APPLIED_ROW))).first()
    return None if row is None else (row.version, row.sha256)


async def apply(engine: AsyncEngine, node_id: str, snapshot_version: int, body_json: str, sha256: str, *,
                redis: Redis) -> None:
    """Mirrors the snapshot node `node_id` was sent into this node's tables in one transaction, then tells every
    process (over `redis`'s invalidation bus) to reload its catalogue and forget cached keys. SnapshotRejected leaves
    everything as it was.

    Versions count per node id: a snapshot of another node id than the applied one (the appliance enrolled again,
    and the managed side counts from 1 for its new id) may have any version.
    """
    sections = parse(body_json, sha256)
    try:
        async with engine.begin() as conn:
            # Locked: two applies (a link replaced by a newer one) take turns, and the version check holds.
            previous = (await conn.execute(select(
                hybrid_applied_snapshot.c.node_id, hybrid_applied_snapshot.c.version).where(
                hybrid_applied_snapshot.c.id == _APPLIED_ROW).with_for_update())).first()
            if previous is not None and previous.node_id == node_id and snapshot_version <= previous.version:
                raise SnapshotRejected(
                    f"version {snapshot_version} is not newer than the applied version {previous.version}")
            mirrored = await _mirrored(conn)
            await _check_collisions(conn, sections, mirrored)
            slugs = {section: await _slugs(conn, section, sections[section]) for section in ("partners", "tenants")}
            await _mirror_identities(conn, sections, mirrored, slugs)
            await _mirror_models(conn, sections["managed_models"], mirrored)
            row = {"id": _APPLIED_ROW, "node_id": node_id, "version": snapshot_version, "sha256": sha256,
                   "body_json": body_json, "applied_at": utc_now()}
            statement = insert(hybrid_applied_snapshot).values(**row)
            await conn.execute(statement.on_duplicate_key_update(
                {name: statement.inserted[name] for name in row if name != "id"}))
    except IntegrityError as exc:
        # A clash the checks above cannot foresee (a local user with a mirrored user's email in a mirrored tenant).
        raise SnapshotRejected(f"a row clashes with one on this node: {exc.orig}") from None
    logger.info("config snapshot %d applied", snapshot_version,
                extra={"event": "hybrid_snapshot_applied", "version": snapshot_version})
    await _announce(redis)


async def forget(engine: AsyncEngine, redis: Redis) -> Forgotten:
    """Takes back, in one transaction, everything the link mirrored: keys revoked, users, tenants and partners
    disabled, managed models deleted and their backends disabled, the applied snapshot dropped (so that any version
    is taken next). For an appliance that left the managed side: managed keys stop working here. What is switched
    off stays listed in hybrid_mirrored, so that a later enrolment may take it over again; the usage outbox is kept.
    """
    async with engine.begin() as conn:
        previous = (await conn.execute(select(
            hybrid_applied_snapshot.c.node_id, hybrid_applied_snapshot.c.version).where(
            hybrid_applied_snapshot.c.id == _APPLIED_ROW).with_for_update())).first()
        mirrored = await _mirrored(conn)
        switched_off = {kind: await _switch_off(conn, table, mirrored.get(kind, set()))
                        for kind, table in _KINDS.values()}
        models_deleted, backends_disabled = await _drop_models(conn, mirrored.get("model", set()),
                                                               mirrored.get("backend", set()))
        await conn.execute(delete(hybrid_applied_snapshot))
        outbox_left = int(await conn.scalar(select(func.count()).select_from(hybrid_usage_outbox)) or 0)
    forgotten = Forgotten(previous.node_id if previous else None, previous.version if previous else None,
                          switched_off, models_deleted, backends_disabled, outbox_left)
    logger.info("managed mirror forgotten (snapshot %s of node %s)", forgotten.version, forgotten.node_id,
                extra={"event": "hybrid_snapshot_forgotten", "switched_off": switched_off,
                       "models_deleted": models_deleted, "backends_disabled": backends_disabled,
                       "outbox_left": outbox_left})
    await _announce(redis)
    return forgotten


async def _announce(redis: Redis) -> None:
    await announce(redis, TOPIC_CATALOGUE)
    await announce(redis, TOPIC_IDENTITY)  # drops every cached key and identity: keys may be gone or changed


async def _mirrored(conn: AsyncConnection) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for kind, row_id in (await conn.execute(select(hybrid_mirrored.c.kind, hybrid_mirrored.c.row_id))).all():
        found.setdefault(kind, set()).add(row_id)
    return found


async def _check_collisions(conn: AsyncConnection, sections: Mapping[str, list[dict[str, Any]]],
                            mirrored: Mapping[str, set[str]]) -> None:
    """Rows of the snapshot must not take over rows this node made itself."""
    for section, (kind, table) in _KINDS.items():
        ids = [row["id"] for row in sections[section]]
        existing = set((await conn.scalars(select(table.c.id).where(table.c.id.in_(ids)))).all())
        local = sorted(existing - mirrored.get(kind, set()))
        if local:
            raise SnapshotRejected(f"{section}: {local[0]!r} exists on this node and was not made by the link")
    hashes = {row["key_hash"]: row["id"] for row in sections["api_keys"]}
    for key_id, key_hash in (await conn.execute(
            select(api_keys.c.id, api_keys.c.key_hash).where(api_keys.c.key_hash.in_(hashes)))).all():
        if hashes[key_hash] != key_id:
            raise SnapshotRejected(f"api_keys: key {hashes[key_hash]!r} is the same key as {key_id!r} on this node")


async def _slugs(conn: AsyncConnection, section: str, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The slug each mirrored partner or tenant gets here: its own, or with MIRRORED_SLUG_SUFFIX when a row the
    snapshot does not hold (one made here, or mirrored and since gone) has it."""
    table = _KINDS[section][1]
    ids = {row["id"] for row in rows}

    def suffixed(slug: str) -> str:
        return slug[:SLUG_MAX - len(MIRRORED_SLUG_SUFFIX)].rstrip("-") + MIRRORED_SLUG_SUFFIX

    candidates = {row["slug"] for row in rows} | {suffixed(row["slug"]) for row in rows}
    taken = {slug for slug, row_id in (await conn.execute(
        select(table.c.slug, table.c.id).where(table.c.slug.in_(candidates)))).all() if row_id not in ids}
    chosen: dict[str, str] = {}
    for row in rows:
        slug = row["slug"] if row["slug"] not in taken else suffixed(row["slug"])
        if slug in taken or slug in chosen.values():
            raise SnapshotRejected(f"{section}: the slugs {row['slug']!r} and {slug!r} are both taken on this node")
        chosen[row["id"]] = slug
    return chosen


async def _upsert(conn: AsyncConnection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    if rows:
        statement = insert(table)
        await conn.execute(statement.on_duplicate_key_update(
            {name: statement.inserted[name] for name in rows[0] if name != "id"}), rows)


async def _remember(conn: AsyncConnection, kind: str, row_ids: Iterable[str]) -> None:
    rows = [{"kind": kind, "row_id": row_id} for row_id in row_ids]
    if rows:
        statement = insert(hybrid_mirrored)
        await conn.execute(statement.on_duplicate_key_update(kind=statement.inserted.kind), rows)


async def _mirror_identities(conn: AsyncConnection, sections: Mapping[str, list[dict[str, Any]]],
                             mirrored: Mapping[str, set[str]], slugs: Mapping[str, Mapping[str, str]]) -> None:
    """Upserts partners, tenants, users and keys (parents first); those mirrored before and gone are switched off."""
    for section, (kind, table) in _KINDS.items():
        rows = [dict(row) for row in sections[section]]
        for row in rows:
            if section in slugs:
                row["slug"] = slugs[section][row["id"]]
            if "role" in row:
                row["role"] = ROLE_ON_NODE.get(row["role"], row["role"])
            for name in ("expires_at", "revoked_at"):
                if row.get(name) is not None:
                    row[name] = naive_utc(datetime.fromisoformat(row[name]))
        await _upsert(conn, table, rows)
        await _remember(conn, kind, (row["id"] for row in rows))
        await _switch_off(conn, table, mirrored.get(kind, set()) - {row["id"] for row in rows})


async def _switch_off(conn: AsyncConnection, table: Table, row_ids: set[str]) -> int:
    """Revokes those keys, or disables those partners, tenants or users; how many were on until now."""
    if not row_ids:
        return 0
    if table is api_keys:
        statement = update(api_keys).where(api_keys.c.id.in_(row_ids), api_keys.c.revoked_at.is_(None)).values(
            revoked_at=utc_now())
    else:
        statement = update(table).where(table.c.id.in_(row_ids), table.c.status != DISABLED).values(status=DISABLED)
    return int((await conn.execute(statement)).rowcount)


async def _mirror_models(conn: AsyncConnection, managed_models: Sequence[dict[str, Any]],
                         mirrored: Mapping[str, set[str]]) -> None:
    """A local model routed to a `managed` backend per managed model; a local model of the same slug and owner wins."""
    mirrored_models = mirrored.get("model", set())
    existing = {(row.tenant_id, row.slug): row.id for row in (await conn.execute(
        select(models.c.tenant_id, models.c.slug, models.c.id).where(
            models.c.slug.in_([model["slug"] for model in managed_models])))).all()}
    local_backends = set((await conn.scalars(select(backends.c.id).where(backends.c.id.in_(
        [_managed_backend_key(model) for model in managed_models])))).all()) - mirrored.get("backend", set())
    if local_backends:
        raise SnapshotRejected(f"backend {sorted(local_backends)[0]!r} exists on this node and was not made by the "
                               f"link: rename it so the link can route its managed model")
    kept_models, kept_backends = set(), set()
    for model in managed_models:
        model_id = existing.get((model["tenant_id"], model["slug"]))
        if model_id is not None and model_id not in mirrored_models:
            logger.warning("managed model %s is not offered here: a local model has that slug", model["slug"],
                           extra={"event": "hybrid_model_shadowed", "model": model["slug"]})
            continue
        model_id = model_id or new_id("mdl")
        backend_id = _managed_backend_key(model)
        await _upsert(conn, backends, [{
            "id": backend_id, "tenant_id": model["tenant_id"], "provider": MANAGED,
            "base_url": "",  # a managed backend has none: it is reached at HYBRID_MANAGED_URL
            "model": model["slug"], "cost_input_per_mtok": model["price_input_per_mtok"],
            "cost_output_per_mtok": model["price_output_per_mtok"], "status": "active"}])
        await _upsert(conn, models, [{
            "id": model_id, **{name: model[name] for name in (
                "slug", "tenant_id", "display_name", "modality", "context_window", "max_output_tokens", "status",
                "price_input_per_mtok", "price_output_per_mtok")}}])
        route = insert(model_routes).values(model_id=model_id, backend_id=backend_id, weight=1, priority=1)
        await conn.execute(route.on_duplicate_key_update(model_id=route.inserted.model_id))  # routes added here stay
        kept_models.add(model_id)
        kept_backends.add(backend_id)
    await _remember(conn, "model", kept_models)
    await _remember(conn, "backend", kept_backends)
    await _drop_models(conn, mirrored_models - kept_models, mirrored.get("backend", set()) - kept_backends)


async def _drop_models(conn: AsyncConnection, model_ids: set[str], backend_ids: set[str]) -> tuple[int, int]:
    """Deletes those mirrored models and disables those mirrored backends: (models deleted, backends disabled)."""
    deleted = disabled = 0
    if model_ids:  # deleted (their routes with them), so that the slug is free for a local model
        deleted = int((await conn.execute(delete(models).where(models.c.id.in_(model_ids)))).rowcount)
        await conn.execute(delete(hybrid_mirrored).where(hybrid_mirrored.c.kind == "model",
                                                         hybrid_mirrored.c.row_id.in_(model_ids)))
    if backend_ids:  # kept, disabled: a route an operator added to one here must not be lost
        disabled = int((await conn.execute(update(backends).where(
            backends.c.id.in_(backend_ids), backends.c.status != DISABLED).values(status=DISABLED))).rowcount)
    return deleted, disabled
