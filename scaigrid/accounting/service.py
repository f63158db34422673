"""Accounting as the request path sees it: admit a request (rate limits, budgets), record its usage.

Each is one Redis round trip (a Lua script, see scripts.py) and never touches MariaDB once the budget
definitions are cached. If Redis cannot be reached, RATE_LIMIT_ON_REDIS_FAILURE decides: `serve` admits
unlimited (counted in scaigrid_redis_failures_total, a warning at most once a minute), `refuse` answers
503 LIMITS_UNAVAILABLE. Usage is never dropped: without Redis it is written to MariaDB directly.
"""

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.accounting import scripts, usage
from scaigrid.accounting.budgets import (
    TOPIC_BUDGETS,
    Budget,
    BudgetCache,
    Period,
    counter_key,
    current_period,
    split_cost,
)
from scaigrid.accounting.records import RateState, UsageRecord
from scaigrid.auth.principal import Principal
from scaigrid.cache import InvalidationBus
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

RATE_STATE = web.RequestKey("rate_state", RateState)
RATE_KEY_PREFIX = "scaigrid:rl:"  # + level:id, a sorted set of the last minute's admitted requests
WINDOW_S = 60
FAILURE_LOG_INTERVAL_S = 60.0
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


BudgetListener = Callable[[BudgetEvent], Awaitable[None]]


class Accounting:
    def __init__(self, settings: Settings, engine: AsyncEngine, redis: Redis, bus: InvalidationBus) -> None:
        self._settings = settings
        self._engine = engine
        self._budgets = BudgetCache(engine)
        bus.on(TOPIC_BUDGETS, self._budgets.invalidate)
        self._admit = redis.register_script(scripts.ADMIT)
        self._record = redis.register_script(scripts.RECORD)
        self._budget_listeners: list[BudgetListener] = []
        self._next_failure_log = 0.0

    def add_budget_listener(self, listener: BudgetListener) -> None:
        """The hook for budget.soft_limit_reached / budget.hard_limit_reached (outbound webhooks)."""
        self._budget_listeners.append(listener)

    async def admit(self, request: web.Request, principal: Principal, *, metered: bool) -> None:
        """Counts the request against its rate limits (and, when metered, checks budgets); raises when refused.

        Sets request[RATE_STATE] whether or not the request is admitted, so even a 429 carries the headers.
        """
        if principal.kind == "service":
            return  # internal callers belong to no tenant; each is limited by the service it fronts
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
        args: list[str | int] = [len(levels), secrets.token_hex(8), *(rpm for _, _, rpm in levels)]
        for budget in budgets:
            args += [budget.hard_action, budget.limit_type, str(budget.limit_value)]
        try:
            verdict, shown, limit, remaining, reset_unix, retry_after_s, blocking = await self._admit(keys, args)
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
            raise errors.budget_exceeded(
                f"the {budget.period} {budget.limit_type} budget of this {budget.scope} ({budget.id}) is used up")

    async def record(self, record: UsageRecord) -> None:
        """Buffers one usage record in Redis and counts it towards its budgets; the worker flushes it to MariaDB."""
        budgets = await self._budgets.applying_to(record.partner_id, record.tenant_id, record.user_id)
        at = datetime.fromtimestamp(record.created_at_unix, UTC)
        periods = [current_period(budget.period, at) for budget in budgets]
        units, picos = split_cost(record.cost)
        keys = [usage.BUFFER_KEY, *(counter_key(b.id, p) for b, p in zip(budgets, periods, strict=True))]
        args: list[str | int] = [usage.encode(record), record.tokens_in + record.tokens_out, units, picos]
        for budget, period in zip(budgets, periods, strict=True):
            args += [period.ttl_s or 0, budget.limit_type, str(budget.limit_value), str(budget.soft_value)]
        try:
            crossed = await self._record(keys, args)
        except RedisError as exc:
            self._redis_failed("record", exc)
            async with self._engine.begin() as conn:  # the budget counters miss it; the bill does not
                await usage.store(conn, [record])
            return
        for index, threshold in zip(crossed[::2], crossed[1::2], strict=True):
            await self._budget_crossed(BudgetEvent(budgets[index - 1], threshold.decode(), periods[index - 1]))

    async def _budget_crossed(self, event: BudgetEvent) -> None:
        budget = event.budget
        BUDGET_THRESHOLDS.labels(event.threshold, budget.hard_action).inc()
        what = (f"{budget.period} {budget.limit_type} budget {budget.id} of {budget.scope} {budget.scope_id} "
                f"(period {event.period.label}, limit {budget.limit_value})")
        fields = {"event": f"budget_{event.threshold}_limit", "budget_id": budget.id, "period": event.period.label}
        if event.threshold == "soft":
            logger.warning("%s reached its soft limit (%s)", what, budget.soft_limit_pct, extra=fields)
        else:
            logger.warning("%s is used up: %s", what, _HARD_CONSEQUENCE[budget.hard_action], extra=fields)
        for listener in self._budget_listeners:
            try:
                await listener(event)
            except Exception:  # a listener's failure must not lose the usage record it came with
                logger.exception("budget listener failed", extra={"event": "budget_listener_failed"})

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
