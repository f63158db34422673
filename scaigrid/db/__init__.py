"""Relational schema (SQLAlchemy Core tables) and the small queries shared by modes."""

from sqlalchemy import Delete
from sqlalchemy.ext.asyncio import AsyncEngine

PURGE_BATCH = 5000


async def delete_in_batches(engine: AsyncEngine, statement: Delete) -> int:
    """Runs the DELETE in transactions of at most PURGE_BATCH rows until nothing is left; returns the rows deleted.

    Small transactions: Galera replicates each as one write set, and no table is locked for long.
    """
    limited = statement.with_dialect_options(mysql_limit=PURGE_BATCH)  # MariaDB-specific DELETE ... LIMIT
    deleted = 0
    while True:
        async with engine.begin() as conn:
            count: int = (await conn.execute(limited)).rowcount
        deleted += count
        if count < PURGE_BATCH:
            return deleted
