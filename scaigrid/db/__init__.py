"""Relational schema (SQLAlchemy Core tables) and the small queries shared by modes."""

from sqlalchemy import Delete
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncEngine

PURGE_BATCH = 5000
# The MySQL client's errors for a server it cannot reach or that went away: CR_CONNECTION_ERROR,
# CR_CONN_HOST_ERROR, CR_SERVER_GONE_ERROR, CR_SERVER_LOST.
_UNREACHABLE = frozenset({2002, 2003, 2006, 2013})


def unreachable(exc: BaseException) -> bool:
    """Whether a database error means MariaDB could not be reached, rather than that a statement was wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    args: tuple[object, ...] = getattr(getattr(exc, "orig", None), "args", ())
    return isinstance(exc, OperationalError) and bool(args) and args[0] in _UNREACHABLE


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
