"""The single-tenant default: exactly one partner and one tenant, both with the slug `default`."""

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid.db.tables import new_id, partners, tenants

DEFAULT_SLUG = "default"


async def ensure_default_tenant(conn: AsyncConnection) -> bool:
    """Creates the default partner and tenant if missing; returns True when it created anything."""
    created = False
    partner_id = await conn.scalar(select(partners.c.id).where(partners.c.slug == DEFAULT_SLUG))
    if partner_id is None:
        partner_id = new_id("prt")
        await conn.execute(insert(partners).values(id=partner_id, slug=DEFAULT_SLUG, name="Default partner"))
        created = True
    if await conn.scalar(select(tenants.c.id).where(tenants.c.slug == DEFAULT_SLUG)) is None:
        await conn.execute(
            insert(tenants).values(id=new_id("ten"), partner_id=partner_id, slug=DEFAULT_SLUG, name="Default tenant"))
        created = True
    return created
