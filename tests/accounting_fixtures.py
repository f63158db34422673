"""Accounting driven in process, against the test's real MariaDB and Redis, next to real http and worker processes."""

import asyncio
import contextlib
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.accounting.records import UsageRecord
from scaigrid.accounting.service import Accounting
from scaigrid.cache import InvalidationBus
from scaigrid.db.tables import usage_records
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import load_settings
from tests.support.processes import ModeProcess
from tests.support.waiting import eventually_async

T = TypeVar("T")


@dataclass
class Ledger:
    """An http process's Accounting, built the way create_app builds it, on the test's database and Redis."""

    accounting: Accounting
    engine: AsyncEngine
    redis: Redis
    bus: InvalidationBus
    heard: Counter[str] = field(default_factory=Counter)  # announcements on the invalidation bus, by topic

    async def announced(self, topic: str, change: Callable[[], T]) -> T:
        """Makes a change (an API call) and returns its outcome once its announcement on `topic` has reached this
        process: counted by a handler registered after Accounting's, so its caches have dropped what changed."""
        if topic not in self.heard:
            self.heard[topic] = 0
            self.bus.on(topic, lambda _key: self.heard.update([topic]))
        seen = self.heard[topic]
        outcome = change()
        await eventually_async(lambda: self.heard[topic] > seen, f"the {topic} change announced")
        return outcome

    async def stored(self) -> tuple[int, Decimal, int]:
        """(rows, total cost, total tokens) in usage_records."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(
                func.count(), func.sum(usage_records.c.cost),
                func.sum(usage_records.c.tokens_in + usage_records.c.tokens_out)))).one()
        return int(row[0]), Decimal(row[1] or 0), int(row[2] or 0)

    async def has_rows(self, rows: int) -> bool:
        return (await self.stored())[0] == rows


@contextlib.asynccontextmanager
async def ledger_for(env: dict[str, str]) -> AsyncIterator[Ledger]:
    settings = load_settings(env, env_file=None)
    async with database_ctx(settings) as engine, redis_ctx(settings) as redis:
        bus = InvalidationBus()
        listening = asyncio.create_task(bus.listen(redis))
        await asyncio.wait_for(bus.subscribed.wait(), 5)
        try:
            yield Ledger(Accounting(settings, engine, redis, bus), engine, redis, bus)
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening


@pytest.fixture(name="ledger")
async def ledger_fixture(migrated_env: dict[str, str]) -> AsyncIterator[Ledger]:
    async with ledger_for(migrated_env) as found:
        yield found


def usage(owner: dict[str, Any], *, cost: str = "0.000123456789", tokens_in: int = 10, tokens_out: int = 20,
          model: str = "acme/chat", backend_id: str | None = "mock-1", created_at_unix: float | None = None,
          backend_cost: str = "0") -> UsageRecord:
    """One usage record of `owner` ({partner_id, tenant_id, user_id}), as dispatch hands it to `record`."""
    return UsageRecord(
        request_id="req_" + secrets.token_hex(12), created_at_unix=created_at_unix or time.time(),
        partner_id=owner["partner_id"], tenant_id=owner["tenant_id"], user_id=owner.get("user_id"),
        api_key_id=None, model=model, backend_id=backend_id, protocol="native", status="ok",
        tokens_in=tokens_in, tokens_out=tokens_out, latency_ms=12, cost=Decimal(cost),
        backend_cost=Decimal(backend_cost))


def start_worker(start_mode: Callable[..., ModeProcess], env: dict[str, str], flush_interval_s: int = 1
                 ) -> ModeProcess:
    return start_mode("worker", {**env, "USAGE_FLUSH_INTERVAL_S": str(flush_interval_s)})
