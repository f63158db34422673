"""Relational schema (SQLAlchemy Core tables) and the small queries shared by modes."""

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import Counter
from sqlalchemy import Delete
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

logger = logging.getLogger(__name__)
T = TypeVar("T")

PURGE_BATCH = 5000
# The MySQL client's errors for a server it cannot reach or that went away: CR_CONNECTION_ERROR,
# CR_CONN_HOST_ERROR, CR_SERVER_GONE_ERROR, CR_SERVER_LOST.
_UNREACHABLE = frozenset({2002, 2003, 2006, 2013})
# A transaction that lost to a concurrent one and was rolled back whole: ER_LOCK_WAIT_TIMEOUT, and ER_LOCK_DEADLOCK,
# which is also how Galera reports a write set that failed certification against another node's (at COMMIT, or at
# the next statement). Running the transaction again is the documented answer to both.
_CONFLICT = frozenset({1205, 1213})
# Twelve writers on one row through two Galera nodes exhausted 5 attempts of at most 0.3 s in all (a 500 in CI): 10
# attempts, each pause up to twice the last and at most CONFLICT_BACKOFF_MAX_S, give a hot row about 5 s.
CONFLICT_ATTEMPTS = 10
CONFLICT_BACKOFF_S = 0.02  # the first pause is up to this long, each next one up to twice the last
CONFLICT_BACKOFF_MAX_S = 1.0

CONFLICTS_RETRIED = Counter("scaigrid_db_conflicts_retried_total",
                            "transactions run again after a deadlock or a Galera certification conflict")


def unreachable(exc: BaseException) -> bool:
    """Whether a database error means MariaDB could not be reached, rather than that a statement was wrong."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    args: tuple[object, ...] = getattr(getattr(exc, "orig", None), "args", ())
    return isinstance(exc, OperationalError) and bool(args) and args[0] in _UNREACHABLE


def conflicted(exc: BaseException) -> bool:
    """Whether a database error means the transaction lost to a concurrent one (and may simply run again)."""
    args: tuple[object, ...] = getattr(getattr(exc, "orig", None), "args", ())
    return isinstance(exc, DBAPIError) and bool(args) and args[0] in _CONFLICT


async def in_transaction(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]], *,
                         attempts: int = CONFLICT_ATTEMPTS) -> T:
    """`work(conn)` in a transaction, committed; run again from the start when it conflicted with another one.

    For writers whose rows other processes write too (through other Galera nodes, or the same server): the
    transaction is rolled back whole on a conflict, so `work` must do nothing outside the database that it
    could not do twice. Pauses are random (full jitter), so that two writers that collided do not collide again.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with engine.begin() as conn:
                return await work(conn)
        except DBAPIError as exc:
            if attempt == attempts or not conflicted(exc):
                raise
            CONFLICTS_RETRIED.inc()
            logger.info("transaction conflicted (%s); attempt %d of %d", getattr(exc, "orig", exc), attempt + 1,
                        attempts, extra={"event": "db_conflict_retried", "attempt": attempt})
            pause_s = min(CONFLICT_BACKOFF_MAX_S, CONFLICT_BACKOFF_S * 2 ** (attempt - 1))
            await asyncio.sleep(random.uniform(0, pause_s))  # noqa: S311
    raise AssertionError("unreachable: the last attempt returns or raises")


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
