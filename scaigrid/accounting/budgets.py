"""Budgets: definitions cached in each process, their calendar periods, and the Redis counters kept for them.

A budget's usage lives in one Redis hash per budget and period (`counter_key`), incremented by every
`Accounting.record` and read by `Accounting.admit` before a metered request is dispatched; each of the budget's
limits (cost, tokens, requests) is checked against it. Periods are
UTC calendar periods: a day, an ISO week from Monday, a month, or `total` (never resets).
"""

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.db.tables import budgets

logger = logging.getLogger(__name__)

SCOPES = ("partner", "tenant", "user")
PERIODS = ("daily", "weekly", "monthly", "total")
LIMIT_TYPES = ("cost", "tokens", "requests")  # in this order the first limit set is the node's former limit_type
LIMIT_FIELDS = {"cost": "cost_limit", "tokens": "token_limit", "requests": "request_limit"}  # the documented names
HARD_ACTIONS = ("block", "notify", "throttle")
TOPIC_BUDGETS = "budgets"  # invalidation bus topic: any change reloads every definition
COUNTER_PREFIX = "scaigrid:budget:"
PICOS_PER_UNIT = 10**12  # costs are exact to 12 decimals (the usage_records.cost column)
# Counters outlive their period by a margin, so a GET just after the turn still shows the last one.
_PERIOD_TTL_S = {"daily": 2 * 86400, "weekly": 8 * 86400, "monthly": 32 * 86400}
RELOAD_RETRY_S = 5.0  # after a failed reload; requests meanwhile use the previous definitions

BUDGET_LOAD_FAILURES = Counter("scaigrid_budget_load_failures_total",
                               "budget definitions could not be (re)loaded; the previous ones stay in use")


@dataclass(frozen=True)
class Budget:
    id: str
    scope: str  # partner | tenant | user
    scope_id: str
    partner_id: str
    tenant_id: str | None
    period: str
    cost_limit: Decimal | None  # at least one of the three is set
    token_limit: int | None
    request_limit: int | None
    hard_action: str  # block | notify | throttle
    soft_limit_pct: Decimal
    created_at: datetime  # naive UTC; the period's usage before it is added when the counter is seeded

    @property
    def limits(self) -> dict[str, Decimal]:
        """Each limit set, by limit type (cost, tokens, requests, in that order)."""
        values = {"cost": self.cost_limit, "tokens": self.token_limit, "requests": self.request_limit}
        return {limit_type: Decimal(value) for limit_type, value in values.items() if value is not None}

    @property
    def limit_type(self) -> str:
        """The node's former single limit: the first one set."""
        return next(iter(self.limits))

    @property
    def limit_value(self) -> Decimal:
        return self.limits[self.limit_type]


@dataclass(frozen=True)
class Period:
    label: str  # part of the counter key
    start: datetime | None  # naive UTC; None for `total`
    ttl_s: int | None  # of the counter; None: kept for good
    end: datetime | None = None  # naive UTC, exclusive; None for `total`


def current_period(period: str, now: datetime) -> Period:
    """The period of this kind that `now` (naive or aware UTC) falls in."""
    day = now.date()
    if period == "total":
        return Period("total", None, None)
    if period == "daily":
        start, label = day, day.isoformat()
        end = start + timedelta(days=1)
    elif period == "weekly":
        start = day - timedelta(days=day.weekday())
        label = "w" + start.isoformat()
        end = start + timedelta(days=7)
    else:
        start = date(day.year, day.month, 1)
        label = start.strftime("%Y-%m")
        end = date(day.year + day.month // 12, day.month % 12 + 1, 1)
    return Period(label, datetime(start.year, start.month, start.day), _PERIOD_TTL_S[period],
                  datetime(end.year, end.month, end.day))


def counter_key(budget_id: str, period: Period) -> str:
    return f"{COUNTER_PREFIX}{budget_id}:{period.label}"


def used_of(counter: Mapping[bytes, bytes]) -> dict[str, Decimal]:
    """What a budget has used this period, by limit type, from its counter hash (exact)."""
    units = int(counter.get(b"cost_units", 0))
    picos = int(counter.get(b"cost_picos", 0))
    return {"cost": Decimal(units) + Decimal(picos) / PICOS_PER_UNIT,
            "tokens": Decimal(int(counter.get(b"tokens", 0))), "requests": Decimal(int(counter.get(b"requests", 0)))}


def split_cost(cost: Decimal) -> tuple[int, int]:
    """(whole units, picos): the counter keeps cost as two integers, so Redis adds it exactly."""
    picos = int(cost.scaleb(12).to_integral_value())
    return divmod(picos, PICOS_PER_UNIT)


def budget_of(row: Any) -> Budget:
    """A row of the budgets table as a Budget."""
    fields = {name: row[name] for name in Budget.__dataclass_fields__}
    if all(fields[name] is None for name in LIMIT_FIELDS.values()):
        # Written by a release before core_0010 (its one limit only): that limit.
        value = row["limit_value"]
        fields[LIMIT_FIELDS[row["limit_type"]]] = value if row["limit_type"] == "cost" else int(value)
    return Budget(**fields)


async def load_budgets(engine: AsyncEngine) -> list[Budget]:
    async with engine.connect() as conn:
        return [budget_of(row) for row in (await conn.execute(select(budgets))).mappings()]


class BudgetCache:
    """Every budget definition, by the object it limits; reloaded on first use after a change is announced.

    The hot path never waits on MariaDB once loaded: a reload happens at most once per announced change.
    If MariaDB cannot be reached then, the previous definitions stay in use (a warning says so).
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._by_scope: dict[tuple[str, str], tuple[Budget, ...]] = {}
        self._stale = True
        self._generation = 0  # bumped by every invalidation, so a reload racing one is redone
        self._retry_at = 0.0  # monotonic; no reload before it
        self._lock = asyncio.Lock()

    def invalidate(self, _key: str | None) -> None:
        self._stale = True
        self._generation += 1

    async def applying_to(self, partner_id: str, tenant_id: str, user_id: str | None) -> list[Budget]:
        if self._stale and time.monotonic() >= self._retry_at:
            await self._reload()
        found = [*self._by_scope.get(("partner", partner_id), ()), *self._by_scope.get(("tenant", tenant_id), ())]
        if user_id is not None:
            found.extend(self._by_scope.get(("user", user_id), ()))
        return found

    async def _reload(self) -> None:
        async with self._lock:
            if not self._stale or time.monotonic() < self._retry_at:
                return  # another request reloaded (or failed to) while this one waited
            generation = self._generation
            try:
                loaded = await load_budgets(self._engine)
            except Exception as exc:  # keep serving with what we have, and try again a little later
                self._retry_at = time.monotonic() + RELOAD_RETRY_S
                BUDGET_LOAD_FAILURES.inc()
                logger.warning("budgets could not be loaded (%s); the previous definitions stay in use",
                               type(exc).__name__, extra={"event": "budget_load_failed"})
                return
            by_scope: dict[tuple[str, str], list[Budget]] = {}
            for budget in loaded:
                by_scope.setdefault((budget.scope, budget.scope_id), []).append(budget)
            self._by_scope = {scope: tuple(found) for scope, found in by_scope.items()}
            self._stale = generation != self._generation
