"""Accounting as the request path sees it: admit a request (rate limits, budgets), record its usage.

Neither touches MariaDB once the budget definitions are cached. Both go to Redis in one Lua call per batch
(scripts.BATCH): whatever admissions and records queue while one call is on its way go together in the next (a
group commit), so a busy process pays one round trip for many requests and an idle one sends each at once.
If Redis cannot be reached, RATE_LIMIT_ON_REDIS_FAILURE decides: `serve` admits unlimited (counted in
scaigrid_redis_failures_total, a warning at most once a minute), `refuse` answers 503 LIMITS_UNAVAILABLE.
Usage is never dropped: without Redis it is written to MariaDB directly.
"""

import asyncio
import itertools
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.accounting import scripts, usage
from scaigrid.accounting.budgets import (
    LIMIT_TYPES,
    TOPIC_BUDGETS,
    Budget,
    BudgetCache,
    Period,
    counter_key,
    current_period,
    split_cost,
)
from scaigrid.accounting.records import RateState, UsageRecord
from scaigrid.appkeys import RATE_STATE
from scaigrid.auth.principal import Principal
from scaigrid.cache import InvalidationBus
from scaigrid.clock import utc_now
from scaigrid.hybrid import outbox as hybrid_outbox
from scaigrid.settings import Settings
from scaigrid.webhooks import outbox

logger = logging.getLogger(__name__)

RATE_KEY_PREFIX = "scaigrid:rl:"  # + level:id, a sorted set of the last minute's admitted requests
WINDOW_S = 60
FAILURE_LOG_INTERVAL_S = 60.0
BATCH_MAX = 256  # admissions, and usage records, sent in one call at most (each)
_ADMITTED, _RATE_LIMITED, _OVER_BUDGET = 0, 1, 2

REDIS_FAILURES = Counter("scaigrid_redis_failures_total", "Redis operations of the request path that failed",
                         ["operation"])
BUDGET_THRESHOLDS = Counter("scaigrid_budget_thresholds_total",
                            "budgets crossing their soft limit or limit (once per budget and period)",
                            ["threshold", "hard_action"])

_LEVEL_NAMES = {"key": "API key", "user": "user", "tenant": "tenant", "partner": "partner"}
_HARD_CONSEQUENCE = {
    "block": "new metered requests are refused until the period ends",
    "notify": "requests are still served (hard_action notify)",
    "throttle": "rate limits are cut to a tenth until the period ends",
}


@dataclass(frozen=True)
class BudgetEvent:
    """A budget crossed its soft limit or its limit: reported once per budget and period, by one process."""

    budget: Budget
    threshold: str  # soft | hard
    period: Period



def _limit_args(budget: Budget) -> list[str]:
    """The budget's cost, token and request limits as the scripts take them: '' for one not set."""
    limits = budget.limits
    return [str(limits[limit_type]) if limit_type in limits else "" for limit_type in LIMIT_TYPES]


class Accounting:
    def __init__(self, settings: Settings, engine: AsyncEngine, redis: Redis, bus: InvalidationBus) -> None:
        self._settings = settings
        self._engine = engine
        self._budgets = BudgetCache(engine)
        bus.on(TOPIC_BUDGETS, self._budgets.invalidate)
        self._batch = redis.register_script(scripts.BATCH)
        self._admits: list[tuple[list[str], list[str | int], asyncio.Future[list[int]]]] = []
        self._pending: list[tuple[UsageRecord, asyncio.Future[None] | None]] = []
        self._writer: asyncio.Task[None] | None = None
        # The sliding log's member for each admitted request: unique across processes by the token, within by count.
        self._member_prefix = secrets.token_hex(8) + ":"
        self._members = itertools.count()
        self._emitting: set[asyncio.Task[None]] = set()  # budget webhook events on their way to the outbox
        self._next_failure_log = 0.0

    async def admit(self, request: web.Request, principal: Principal, *, metered: bool) -> None:
        """Counts the request against its rate limits (and, when metered, checks budgets); raises when refused.

        Sets request[RATE_STATE] whether or not the request is admitted, so even a 429 carries the headers.
        """
        if principal.kind == "service":
            if metered:  # no metered route accepts a scope (requires() refuses one); this keeps usage tenant-bound
                raise errors.insufficient_scope("a service token runs no inference: use a tenant's API key")
            return  # administration by the operator scope, which belongs to no tenant: nothing to count it against
        limits = principal.limits
        levels = [(level, object_id, rpm) for level, object_id, rpm in (
            ("key", principal.api_key_id, limits.key), ("user", principal.user_id, limits.user),
            ("tenant", principal.tenant_id, limits.tenant), ("partner", principal.partner_id, limits.partner),
        ) if object_id is not None]
        budgets: list[Budget] = []
        if metered:  # a notify budget never changes whether a request is admitted: not checked
            found = await self._budgets.applying_to(principal.partner_id, principal.tenant_id, principal.user_id)
            budgets = [budget for budget in found if budget.hard_action != "notify"]
        now = datetime.now(UTC)
        keys = [f"{RATE_KEY_PREFIX}{level}:{object_id}" for level, object_id, _ in levels]
        keys += [counter_key(budget.id, current_period(budget.period, now)) for budget in budgets]
        args: list[str | int] = [len(levels), self._member_prefix + str(next(self._members)),
                                 *(rpm for _, _, rpm in levels)]
        for budget in budgets:
            args += [budget.hard_action, *_limit_args(budget)]
        answer = asyncio.get_running_loop().create_future()
        self._admits.append((keys, args, answer))
        self._wake()
        try:
            (verdict, shown, limit, remaining, reset_unix, retry_after_s, blocking, blocking_limit
             ) = await answer
        except RedisError as exc:
            self._redis_failed("admit", exc)
            # Unknown while Redis is away; the headers stay, so clients that read them keep working.
            lowest = min(rpm for _, _, rpm in levels)
            request[RATE_STATE] = RateState(lowest, lowest, int(time.time()) + WINDOW_S)
            if self._settings.limits.on_redis_failure == "refuse":
                raise errors.limits_unavailable() from None
            return
        request[RATE_STATE] = RateState(limit, remaining, reset_unix)
        if verdict == _RATE_LIMITED:
            level = _LEVEL_NAMES[levels[shown - 1][0]]
            raise errors.rate_limited(retry_after_s, f"rate limit of this {level} reached: {limit} requests per minute")
        if verdict == _OVER_BUDGET:
            budget = budgets[blocking - 1]
            raise errors.budget_exceeded(f"the {budget.period} {LIMIT_TYPES[blocking_limit - 1]} limit of the budget "
                                         f"of this {budget.scope} ({budget.id}) is used up")

    def submit(self, record: UsageRecord) -> None:
        """Queues one usage record for the next batch and returns at once (the request path does not wait).

        A write that fails even in MariaDB is logged with its request ids.
        """
        self._enqueue(record, None)

    async def record(self, record: UsageRecord) -> None:
        """Like submit, but returns once the record is stored, and raises if it could not be."""
        stored = asyncio.get_running_loop().create_future()
        self._enqueue(record, stored)
        await asyncio.shield(stored)  # a cancelled caller must not take its record out of the batch

    async def drain(self) -> None:
        """Returns when every queued record (and budget event) is written: the last step of a clean shutdown."""
        while self._writer is not None and not self._writer.done():
            await asyncio.shield(self._writer)
        await asyncio.gather(*self._emitting)

    def _enqueue(self, record: UsageRecord, stored: "asyncio.Future[None] | None") -> None:
        self._pending.append((record, stored))
        self._wake()

    def _wake(self) -> None:
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def _write_pending(self) -> None:
        while self._pending or self._admits:
            admits, self._admits = self._admits[:BATCH_MAX], self._admits[BATCH_MAX:]
            batch, self._pending = self._pending[:BATCH_MAX], self._pending[BATCH_MAX:]
            try:
                await self._write(admits, [record for record, _ in batch])
            except Exception as exc:
                for _, _, answer in admits:
                    if not answer.done():
                        answer.set_exception(exc)
                if not batch:
                    continue
                logger.exception("usage of %d request(s) not recorded: %s", len(batch),
                                 ", ".join(record.request_id for record, _ in batch), extra={"event": "usage_lost"})
                for _, stored in batch:
                    if stored is not None:
                        stored.set_exception(exc)
            else:
                for _, stored in batch:
                    if stored is not None:
                        stored.set_result(None)

    async def _write(self, admits: list[tuple[list[str], list[str | int], "asyncio.Future[list[int]]"]],
                     records: list[UsageRecord]) -> None:
        """One batch: the records (first, so that admissions see the budgets they use), then the admissions; each
        admission's answer, or the Redis error, goes to its waiter. Records Redis did not take go to MariaDB."""
        writes = []
        for record in records:
            budgets = await self._budgets.applying_to(record.partner_id, record.tenant_id, record.user_id)
            at = datetime.fromtimestamp(record.created_at_unix, UTC)
            periods = [current_period(budget.period, at) for budget in budgets]
            units, picos = split_cost(record.cost)
            keys = [usage.BUFFER_KEY, *(counter_key(b.id, p) for b, p in zip(budgets, periods, strict=True))]
            args: list[str | int] = [usage.encode(record), record.tokens_in + record.tokens_out, units, picos]
            for budget, period in zip(budgets, periods, strict=True):
                args += [period.ttl_s or 0, str(budget.soft_limit_pct), *_limit_args(budget)]
            writes.append((keys, args, budgets, periods))
        calls = [(scripts.RECORD, keys, args) for keys, args, _, _ in writes]
        admits = [admit for admit in admits if not admit[2].done()]  # a waiter whose client went away is cancelled
        calls += [(scripts.ADMIT, keys, args) for keys, args, _ in admits]
        try:
            answers = await self._call_batch(calls) if calls else []
        except RedisError as exc:
            for _, _, answer in admits:
                if not answer.done():
                    answer.set_exception(exc)
            if not records:
                return
            self._redis_failed("record", exc)
            async with self._engine.begin() as conn:  # the budget counters miss them; the bill does not
                await usage.store(conn, records)
                await outbox.emit_usage(conn, records)  # the flush, which would have emitted them, never sees them
                if self._settings.hybrid.role == "node":  # nor queued them for the link
                    await hybrid_outbox.enqueue(conn, records)
            return
        for (_, _, answer), admitted in zip(admits, answers[len(writes):], strict=True):
            if not answer.done():
                answer.set_result(admitted)
        for (_, _, budgets, periods), crossed in zip(writes, answers[:len(writes)], strict=True):
            for index, threshold in zip(crossed[::2], crossed[1::2], strict=True):
                self._budget_crossed(BudgetEvent(budgets[index - 1], threshold.decode(), periods[index - 1]))

    async def _call_batch(self, calls: list[tuple[str, list[str], list[str | int]]]) -> list[list[Any]]:
        """Each call's answer, from one EVALSHA of scripts.BATCH (which reloads the script into a Redis that lost it:
        NOSCRIPT means nothing ran)."""
        keys: list[str] = []
        head: list[str | int] = [len(calls)]
        args: list[str | int] = []
        for kind, call_keys, call_args in calls:
            head += [kind, len(call_keys), len(call_args)]
            keys += call_keys
            args += call_args
        answers: list[list[Any]] = await self._batch(keys, head + args)
        return answers

    def _budget_crossed(self, event: BudgetEvent) -> None:
        budget = event.budget
        BUDGET_THRESHOLDS.labels(event.threshold, budget.hard_action).inc()
        limits = ", ".join(f"{limit_type} {value}" for limit_type, value in budget.limits.items())
        what = (f"{budget.period} budget {budget.id} of {budget.scope} {budget.scope_id} "
                f"(period {event.period.label}, limits {limits})")
        fields = {"event": f"budget_{event.threshold}_limit", "budget_id": budget.id, "period": event.period.label}
        if event.threshold == "soft":
            logger.warning("%s reached its soft limit (%s)", what, budget.soft_limit_pct, extra=fields)
        else:
            logger.warning("%s is used up: %s", what, _HARD_CONSEQUENCE[budget.hard_action], extra=fields)
        # In the background: the request path never waits for MariaDB.
        task = asyncio.create_task(self._emit_budget_event(event))
        self._emitting.add(task)
        task.add_done_callback(self._emitting.discard)

    async def _emit_budget_event(self, event: BudgetEvent) -> None:
        """budget.*_limit_reached into the webhook outbox; a failure is logged, the request never sees it."""
        try:
            await outbox.emit_budget(self._engine, event.budget, event.threshold, event.period, utc_now())
        except Exception:
            logger.exception("the budget webhook event of budget %s could not be stored", event.budget.id,
                             extra={"event": "budget_webhook_event_lost", "budget_id": event.budget.id})

    def _redis_failed(self, operation: str, exc: RedisError) -> None:
        REDIS_FAILURES.labels(operation).inc()
        now = time.monotonic()
        if now >= self._next_failure_log:
            self._next_failure_log = now + FAILURE_LOG_INTERVAL_S
            policy = self._settings.limits.on_redis_failure
            logger.warning("Redis unreachable (%s): RATE_LIMIT_ON_REDIS_FAILURE=%s %s; usage goes to MariaDB directly "
                           "(logged at most once a minute; see scaigrid_redis_failures_total)", type(exc).__name__,
                           policy, "admits unlimited" if policy == "serve" else "refuses requests",
                           extra={"event": "redis_failure", "operation": operation})
