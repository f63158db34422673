"""Helpers of the catalogue tests: more tenants than the default one, and a look at what the database holds."""

import asyncio
import json
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from scaigrid.db.tables import new_id
from tests.backends import http_call


def sql(env: dict[str, str], statement: str, **params: Any) -> list[Any]:
    """Runs one statement on the test's database and returns its rows (none for writes)."""
    async def run() -> list[Any]:
        engine = create_async_engine(env["DATABASE_URL"])
        try:
            async with engine.begin() as conn:
                result = await conn.execute(text(statement), params)
                return list(result.all()) if result.returns_rows else []
        finally:
            await engine.dispose()

    return asyncio.run(run())


def add_tenant(env: dict[str, str], slug: str, partner: str = "default") -> None:
    """A tenant (and its partner, if new), as ScaiKey's webhooks would create them."""
    if not sql(env, "SELECT id FROM partners WHERE slug = :slug", slug=partner):
        sql(env, "INSERT INTO partners (id, slug, name) VALUES (:id, :slug, :slug)", id=new_id("prt"), slug=partner)
    sql(env, "INSERT INTO tenants (id, partner_id, slug, name) "
             "SELECT :id, id, :slug, :slug FROM partners WHERE slug = :partner",
        id=new_id("ten"), slug=slug, partner=partner)


def call(node_url: str, method: str, path: str, key: str, body: Any = None, raw: bytes | None = None
         ) -> tuple[int, dict[str, Any]]:
    """One /v1/ request with an API key; returns (status, decoded envelope) for errors too."""
    status, _, data = http_call(method, node_url + path, key, body, timeout_s=10, raw=raw)
    return status, json.loads(data)
