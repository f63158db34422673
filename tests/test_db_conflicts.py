"""in_transaction on one MariaDB: a transaction that loses a deadlock runs again, whole, and its work is not lost.

Galera reports a certification conflict with the same error (1213) as InnoDB's deadlock; tests/scale/test_galera.py
provokes those through two nodes.
"""

import asyncio

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine

from scaigrid.db import conflicted, in_transaction


def retried() -> float:
    return REGISTRY.get_sample_value("scaigrid_db_conflicts_retried_total") or 0.0


@pytest.mark.timeout(60)
async def test_the_loser_of_a_deadlock_runs_again_and_both_changes_land(database_url):
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE accounts (id INT PRIMARY KEY, n INT NOT NULL) ENGINE=InnoDB"))
            await conn.execute(text("INSERT INTO accounts VALUES (1, 0), (2, 0)"))
        both_hold_one_row = asyncio.Barrier(2)
        attempts = {1: 0, 2: 0}
        retried_before = retried()

        async def touch_both(first: int, second: int) -> None:
            async def work(conn: AsyncConnection) -> None:
                attempts[first] += 1
                await conn.execute(text("UPDATE accounts SET n = n + 1 WHERE id = :id"), {"id": first})
                if attempts[first] == 1:  # first attempts only: each holds one row and wants the other's
                    await both_hold_one_row.wait()
                await conn.execute(text("UPDATE accounts SET n = n + 1 WHERE id = :id"), {"id": second})

            await in_transaction(engine, work)

        await asyncio.gather(touch_both(1, 2), touch_both(2, 1))
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, n FROM accounts ORDER BY id"))).tuples().all()
        assert rows == [(1, 2), (2, 2)]
        assert sorted(attempts.values()) == [1, 2]  # InnoDB chose one victim, which ran once more
        assert retried() == retried_before + 1
    finally:
        await engine.dispose()


async def test_other_errors_are_not_retried(database_url):
    engine = create_async_engine(database_url)
    calls = 0

    async def work(conn: AsyncConnection) -> None:
        nonlocal calls
        calls += 1
        await conn.execute(text("CREATE TABLE IF NOT EXISTS once (id INT PRIMARY KEY)"))
        await conn.execute(text("INSERT INTO once VALUES (1), (1)"))

    try:
        with pytest.raises(IntegrityError) as raised:
            await in_transaction(engine, work)
    finally:
        await engine.dispose()
    assert calls == 1
    assert isinstance(raised.value, DBAPIError) and not conflicted(raised.value)
