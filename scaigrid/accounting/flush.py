"""The worker's side of accounting: buffered usage into MariaDB, and budget counters completed from it.

The flush reads a batch from the head of the Redis buffer, inserts it idempotently (on request id) and
commits, and only then trims the batch from the buffer. A worker killed at any point therefore loses
nothing (untrimmed records stay) and doubles nothing (a replayed record is ignored by its primary key).
Each trim counts the entries it removes (usage.TRIMMED_KEY): the http processes then drop them from the journals
they keep in case Redis loses its data before a flush (service.py).

Budget counters live only in Redis; `record` counts into those of the budgets its process knows. With
each flush, every budget whose counter for the current period is not yet `seeded` gets once the usage
MariaDB holds that the counter could not have counted: for a new budget (or a new period), the period's
usage from before the budget was created; after Redis lost its data (the COUNTERS_SINCE_KEY
mark is gone with it), all of the period's usage in MariaDB.
"""

import contextlib
import functools
import logging
from datetime import UTC, datetime
from decimal import Decimal

from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockError
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid.accounting import scripts, usage
from scaigrid.accounting.budgets import Budget, Period, counter_key, current_period, load_budgets, split_cost
from scaigrid.accounting.records import UsageRecord
from scaigrid.db import in_transaction
from scaigrid.db.tables import usage_records
from scaigrid.hybrid import outbox as hybrid_outbox
from scaigrid.webhooks import outbox
from scaigrid.worker.jobs import JobContext

logger = logging.getLogger(__name__)

FLUSH_LOCK_KEY = "scaigrid:usage:flush_lock"
# Renewed after every batch (which takes well under a second): a worker killed mid-flush holds up the next flush
# this long at most. A batch slower than that lets another worker in, which costs time but no correctness.
LOCK_TTL_S = 5
BATCH = 1000
UNDECODABLE_KEY = "scaigrid:usage:undecodable"  # entries that are not usage records, kept for a human to look at
COUNTERS_SINCE_KEY = "scaigrid:budget:counters_since"

USAGE_FLUSHED = Counter("scaigrid_usage_flushed_total", "usage records moved from Redis to MariaDB")


async def flush_usage(ctx: JobContext) -> None:
    """Runs every USAGE_FLUSH_INTERVAL_S, on one worker: usage reaches MariaDB (and the usage API) that often.

    Ticks of different workers may overlap when a flush runs long; the lock keeps them from doing the
    same work twice (which would be harmless, only wasted).
    """
    lock = ctx.redis.lock(FLUSH_LOCK_KEY, timeout=LOCK_TTL_S, blocking=False)
    if not await lock.acquire():
        logger.info("another worker is still flushing usage; this tick skips", extra={"event": "flush_skipped"})
        return
    try:
        now = datetime.now(UTC)
        if not await ctx.redis.exists(COUNTERS_SINCE_KEY):
            # Redis lost the counters (or this is the first run): all of MariaDB's usage is missing from them,
            # and none of what was buffered since is in MariaDB yet, so seed before flushing.
            await seed_budget_counters(ctx.engine, ctx.redis, now, whole_period=True)
            await ctx.redis.set(COUNTERS_SINCE_KEY, now.isoformat())
            await lock.reacquire()
        flushed = await flush_buffer(ctx.engine, ctx.redis, lock, to_link=ctx.settings.hybrid.role == "node")
        if flushed:
            logger.info("flushed %d usage record(s)", flushed, extra={"event": "usage_flushed", "count": flushed})
        # After the flush, so that usage from just before a budget's creation is in MariaDB to be counted.
        await seed_budget_counters(ctx.engine, ctx.redis, now, whole_period=False)
    finally:
        with contextlib.suppress(LockError):  # expired meanwhile: nothing left to release
            await lock.release()


async def flush_buffer(engine: AsyncEngine, redis: Redis, lock: Lock, *, to_link: bool = False) -> int:
    """Moves what the buffer held when it started into MariaDB, batch by batch; returns how many entries.

    to_link (a hybrid node): the records also go into the usage outbox the link sends to the managed side.
    """
    trim = redis.register_script(scripts.TRIM)
    pending = await redis.llen(usage.BUFFER_KEY)  # later arrivals wait for the next tick: a run always ends
    done = 0
    while done < pending:
        entries = await redis.lrange(usage.BUFFER_KEY, 0, BATCH - 1)
        if not entries:
            break
        records: list[UsageRecord] = []
        undecodable = []
        for entry in entries:
            try:
                records.append(usage.decode(entry))
            except (ValueError, TypeError, KeyError, ArithmeticError):
                undecodable.append(entry)
        if records:
            await in_transaction(engine, functools.partial(_store_batch, records=records, to_link=to_link))
        if undecodable:
            logger.error("%d buffered entries are not usage records; moved to %s", len(undecodable),
                         UNDECODABLE_KEY, extra={"event": "usage_undecodable", "count": len(undecodable)})
            await redis.rpush(UNDECODABLE_KEY, *undecodable)
        if not await trim([usage.BUFFER_KEY, usage.TRIMMED_KEY], [len(entries), entries[-1]]):
            logger.warning("the usage buffer changed under the flush (Redis restarted?); the next run goes on",
                           extra={"event": "usage_buffer_changed"})
            break
        USAGE_FLUSHED.inc(len(records))
        done += len(entries)
        await lock.reacquire()
    return done


async def _store_batch(conn: AsyncConnection, *, records: list[UsageRecord], to_link: bool) -> None:
    await usage.store(conn, records)
    await outbox.emit_usage(conn, records)  # request.* webhook events, committed with the usage
    if to_link:  # in the same transaction: a record is stored and queued for the link, or neither
        await hybrid_outbox.enqueue(conn, records)


async def seed_budget_counters(engine: AsyncEngine, redis: Redis, now: datetime, *, whole_period: bool) -> None:
    """Adds to each budget counter of the current period not yet seeded the usage in MariaDB it lacks, once.

    whole_period: all of the period's usage; otherwise only what came before the budget was created.
    """
    current = [(budget, current_period(budget.period, now)) for budget in await load_budgets(engine)]
    async with redis.pipeline(transaction=False) as pipe:
        for budget, period in current:
            pipe.hexists(counter_key(budget.id, period), "seeded")
        seeded = await pipe.execute()
    seed = redis.register_script(scripts.SEED)
    async with engine.connect() as conn:
        for (budget, period), done in zip(current, seeded, strict=True):
            if done:
                continue
            until = None if whole_period else budget.created_at
            requests, tokens, cost = await _usage_before(conn, budget, period, until)
            units, picos = split_cost(cost)
            await seed([counter_key(budget.id, period), COUNTERS_SINCE_KEY],
                       [period.ttl_s or 0, requests, tokens, units, picos, int(whole_period)])


async def _usage_before(conn: AsyncConnection, budget: Budget, period: Period, until: datetime | None
                        ) -> tuple[int, int, Decimal]:
    """(requests, tokens, cost) of the budget's scope in the period, before `until` (None: everything)."""
    if until is not None and period.start is not None and until <= period.start:
        return 0, 0, Decimal(0)
    scope_column = {"partner": usage_records.c.partner_id, "tenant": usage_records.c.tenant_id,
                    "user": usage_records.c.user_id}[budget.scope]
    query = select(func.count(), func.sum(usage_records.c.tokens_in + usage_records.c.tokens_out),
                   func.sum(usage_records.c.cost)).where(scope_column == budget.scope_id)
    if period.start is not None:
        query = query.where(usage_records.c.created_at >= period.start)
    if until is not None:
        query = query.where(usage_records.c.created_at < until)
    row = (await conn.execute(query)).one()
    return int(row[0]), int(row[1] or 0), Decimal(row[2] or 0)
