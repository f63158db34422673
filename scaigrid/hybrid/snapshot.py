"""Config snapshots, managed side: the tenants allowed on a node and what a node must know of them (`current`).

A snapshot body is canonical JSON (sorted keys, no spaces) with "schema": 1 and five sections: the partners,
tenants, users and API keys (hashes only) of the tenants allowed on the node, and the managed models offered to
them. Its version is persisted per node and bumped only when the body's sha256 changes. The body's format and its
checks are `snapshot_schema`; the node mirrors it with `mirror`. docs/hybrid.md, "Config snapshots and the usage
outbox", says what is mirrored and how.
"""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import and_, delete, not_, select, update
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid import errors
from scaigrid.auth.roles import TENANT_ROLES
from scaigrid.clock import iso, utc_now
from scaigrid.db.tables import (
    api_keys,
    backends,
    hybrid_node_snapshots,
    hybrid_node_tenants,
    hybrid_nodes,
    model_routes,
    models,
    partners,
    tenants,
    users,
)
from scaigrid.fields import decimal_text
from scaigrid.hybrid.snapshot_schema import SCHEMA, SECTIONS, canonical, digest
from scaigrid.routing.catalogue import HYBRID, OFFERED_STATUSES

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Snapshot:
    version: int
    body_json: str
    sha256: str


async def allowed_tenants(conn: AsyncConnection, node_id: str) -> list[str]:
    return list((await conn.scalars(select(hybrid_node_tenants.c.tenant_id).where(
        hybrid_node_tenants.c.node_id == node_id).order_by(hybrid_node_tenants.c.tenant_id))).all())


async def set_allowed_tenants(conn: AsyncConnection, node_id: str, tenant_ids: Sequence[str]) -> None:
    """Replaces the tenants allowed on the node (NOT_FOUND for an unknown node, VALIDATION_ERROR naming an unknown
    tenant). The node gets the change with its next snapshot, within HYBRID_CONFIG_REFRESH_S."""
    if await conn.scalar(select(hybrid_nodes.c.id).where(hybrid_nodes.c.id == node_id)) is None:
        raise errors.not_found(f"no hybrid node {node_id!r}")
    wanted = sorted(set(tenant_ids))
    known = set((await conn.scalars(select(tenants.c.id).where(tenants.c.id.in_(wanted)))).all())
    unknown = [tenant_id for tenant_id in wanted if tenant_id not in known]
    if unknown:
        raise errors.validation_error([errors.FieldError("tenant_ids", f"no tenant {tenant_id!r}")
                                       for tenant_id in unknown])
    await conn.execute(delete(hybrid_node_tenants).where(hybrid_node_tenants.c.node_id == node_id))
    if wanted:
        await conn.execute(insert(hybrid_node_tenants), [{"node_id": node_id, "tenant_id": t} for t in wanted])


async def current(engine: AsyncEngine, node_id: str) -> Snapshot:
    """The node's snapshot as of now; its version goes up only when the body changed since the last call.

    The node's version row is locked before the body is read, so concurrent callers (several grpc replicas) take
    turns: each version ever handed out has exactly one body, and a later version never has older content.
    """
    async with engine.begin() as conn:
        # Only locking reads until the lock is held: InnoDB takes a transaction's read view at its first plain
        # read, and a view older than the lock could turn the newest version back to older content.
        locked = select(hybrid_node_snapshots.c.version, hybrid_node_snapshots.c.sha256).where(
            hybrid_node_snapshots.c.node_id == node_id).with_for_update()
        stored = (await conn.execute(locked)).first()
        if stored is None:  # version 0 stands for "never computed": the row must exist to be locked
            node = select(hybrid_nodes.c.id).where(hybrid_nodes.c.id == node_id).with_for_update(read=True)
            if await conn.scalar(node) is None:
                raise errors.not_found(f"no hybrid node {node_id!r}")
            create = insert(hybrid_node_snapshots).values(node_id=node_id, version=0, sha256="", updated_at=utc_now())
            await conn.execute(create.on_duplicate_key_update(node_id=create.inserted.node_id))
            stored = (await conn.execute(locked)).one()
        body_json = canonical(await _body(conn, node_id))
        sha256 = digest(body_json)
        if sha256 == stored.sha256:
            return Snapshot(stored.version, body_json, sha256)
        version = stored.version + 1
        await conn.execute(update(hybrid_node_snapshots).where(hybrid_node_snapshots.c.node_id == node_id).values(
            version=version, sha256=sha256, updated_at=utc_now()))
    logger.info("config snapshot %d of node %s computed", version, node_id,
                extra={"event": "hybrid_snapshot_version", "node_id": node_id, "version": version})
    return Snapshot(version, body_json, sha256)


async def _body(conn: AsyncConnection, node_id: str) -> dict[str, Any]:
    tenant_ids = await allowed_tenants(conn, node_id)
    tenant_rows = (await conn.execute(select(tenants).where(tenants.c.id.in_(tenant_ids)))).mappings().all()
    partner_ids = {row["partner_id"] for row in tenant_rows}
    partner_rows = (await conn.execute(select(partners).where(partners.c.id.in_(partner_ids)))).mappings().all()
    # Platform and partner roles stay on the managed side: an appliance is administered by its own operator.
    user_rows = (await conn.execute(select(users).where(
        users.c.tenant_id.in_(tenant_ids), users.c.role.in_(TENANT_ROLES)))).mappings().all()
    key_rows = (await conn.execute(select(api_keys).where(
        api_keys.c.user_id.in_([row["id"] for row in user_rows]), api_keys.c.role.in_(TENANT_ROLES)))
    ).mappings().all()
    return {
        "schema": SCHEMA,
        "partners": sorted(({name: row[name] for name in SECTIONS["partners"]} for row in partner_rows),
                           key=lambda row: row["id"]),
        "tenants": sorted(({name: row[name] for name in SECTIONS["tenants"]} for row in tenant_rows),
                          key=lambda row: row["id"]),
        "users": sorted(({name: row[name] for name in SECTIONS["users"]} for row in user_rows),
                        key=lambda row: row["id"]),
        "api_keys": sorted(({**{name: row[name] for name in SECTIONS["api_keys"]},
                             "expires_at": iso(row["expires_at"]), "revoked_at": iso(row["revoked_at"])}
                            for row in key_rows), key=lambda row: row["id"]),
        "managed_models": await _managed_models(conn, node_id, tenant_ids) if tenant_ids else [],
    }


async def _managed_models(conn: AsyncConnection, node_id: str, tenant_ids: Sequence[str]) -> list[dict[str, Any]]:
    """Models offered to those tenants that something other than this very node serves (that would be a loop)."""
    elsewhere = and_(backends.c.status == "active", not_(and_(backends.c.provider == HYBRID,
                                                              backends.c.model.startswith(node_id + "/"))))
    served = select(model_routes.c.model_id).select_from(
        model_routes.join(backends, backends.c.id == model_routes.c.backend_id)).where(elsewhere)
    rows = (await conn.execute(select(models).where(
        models.c.status.in_(OFFERED_STATUSES), models.c.id.in_(served),
        (models.c.tenant_id.is_(None)) | models.c.tenant_id.in_(tenant_ids)).order_by(models.c.slug))
    ).mappings().all()
    return [{"slug": row["slug"], "tenant_id": row["tenant_id"], "display_name": row["display_name"],
             "modality": row["modality"], "context_window": row["context_window"],
             "max_output_tokens": row["max_output_tokens"], "status": row["status"],
             "price_input_per_mtok": decimal_text(row["price_input_per_mtok"]),
             "price_output_per_mtok": decimal_text(row["price_output_per_mtok"])} for row in rows]
