"""Per-object rate limits (requests per minute) on keys, users, tenants and partners: finding and changing them.

A NULL rpm_limit means the RATE_LIMIT_<LEVEL>_RPM default. Changes reach running http processes through
the `identity` topic of the invalidation bus (the limits are part of every cached principal).
"""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Table, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid.db.tables import api_keys, partners, tenants, users
from scaigrid.settings import Settings

LEVELS: dict[str, Table] = {"key": api_keys, "user": users, "tenant": tenants, "partner": partners}
RPM_MAX = 10**9  # fits the INT column; far beyond anything a single node serves


@dataclass(frozen=True)
class LimitHolder:
    level: str
    id: str
    tenant_id: str | None  # None for a partner
    partner_id: str
    role: str | None  # of a key or user: who may change its limit depends on it
    rpm: int | None
    user_role: str | None = None  # of a key's user, or the user: its rank bounds who may change the limit


def default_rpm(settings: Settings, level: str) -> int:
    limits = settings.limits
    return {"key": limits.key_rpm, "user": limits.user_rpm, "tenant": limits.tenant_rpm,
            "partner": limits.partner_rpm}[level]


async def find_holder(conn: AsyncConnection, level: str, where: ColumnElement[bool]) -> LimitHolder | None:
    """The one object of `level` matching `where` (a condition on that level's table), with its tenancy."""
    query: Any
    if level == "partner":
        query = select(partners.c.id, partners.c.id.label("partner_id"), partners.c.rpm_limit)
    elif level == "tenant":
        query = select(tenants.c.id, tenants.c.id.label("tenant_id"), tenants.c.partner_id, tenants.c.rpm_limit)
    elif level == "user":
        query = select(users.c.id, users.c.tenant_id, tenants.c.partner_id, users.c.role,
                       users.c.role.label("user_role"), users.c.rpm_limit).join(
            tenants, tenants.c.id == users.c.tenant_id)
    else:
        query = select(api_keys.c.id, api_keys.c.tenant_id, tenants.c.partner_id, api_keys.c.role,
                       users.c.role.label("user_role"), api_keys.c.rpm_limit).join(
            tenants, tenants.c.id == api_keys.c.tenant_id).join(users, users.c.id == api_keys.c.user_id)
    row = (await conn.execute(query.where(where))).mappings().first()
    if row is None:
        return None
    return LimitHolder(level, row["id"], row.get("tenant_id"), row["partner_id"], row.get("role"), row["rpm_limit"],
                       row.get("user_role"))


async def set_rpm(conn: AsyncConnection, holder: LimitHolder, rpm: int | None) -> None:
    table = LEVELS[holder.level]
    await conn.execute(update(table).where(table.c.id == holder.id).values(rpm_limit=rpm))
