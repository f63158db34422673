"""Accounting routes: usage, usage summary, usage export, budgets, per-object rate limits.

Reach decides what a caller sees, as everywhere: another tenant's (partner's) usage and budgets are
simply not there for it (404 for a single object, absent from listings).
"""

import contextlib
import dataclasses
from collections.abc import AsyncIterator, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError
from sqlalchemy import ColumnElement, RowMapping, and_, delete, false, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.accounting import limits
from scaigrid.accounting.budgets import (
    HARD_ACTIONS,
    LIMIT_FIELDS,
    LIMIT_TYPES,
    PERIODS,
    SCOPES,
    TOPIC_BUDGETS,
    budget_of,
    counter_key,
    current_period,
    used_of,
)
from scaigrid.appkeys import DB, PRINCIPAL, REDIS, SETTINGS
from scaigrid.auth.authenticator import TOPIC_IDENTITY
from scaigrid.auth.principal import Principal
from scaigrid.auth.roles import REACHES
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.auth.tenancy import require_above, require_rank, visible_to
from scaigrid.cache import announce
from scaigrid.clock import iso, utc_now
from scaigrid.db import in_transaction
from scaigrid.db.tables import budgets, new_id, partners, tenants, usage_records, users
from scaigrid.envelope import PAGE, download, listing, ok, page
from scaigrid.errors import FieldError
from scaigrid.fields import Fields, decimal_text, query_time

USAGE_PAGE_DEFAULT = 100
USAGE_PAGE_MAX = 1000
LIMIT_VALUE_MAX = Decimal(10) ** 12  # the COST column's 24 digits less its 12 decimals
DEFAULT_SOFT_LIMIT_PCT = Decimal("0.8")
SUMMARY_GROUPS: dict[str, ColumnElement[Any]] = {
    "model": usage_records.c.model, "user": usage_records.c.user_id, "backend": usage_records.c.backend_id,
    "tenant": usage_records.c.tenant_id}


# --- usage ---

USAGE_COLUMN_FILTERS = {"model": usage_records.c.model, "user_id": usage_records.c.user_id,
                        "tenant_id": usage_records.c.tenant_id, "backend_id": usage_records.c.backend_id}
# ?period=: the last hour, day, week or month up to now (a sliding window; a month is 30 days).
USAGE_PERIODS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7),
                 "month": timedelta(days=30)}
USAGE_FILTERS = ("start", "end", "period", *USAGE_COLUMN_FILTERS)  # the query parameters of /usage, summary, export


def _usage_query(request: web.Request, principal: Principal, query: Any) -> Any:
    """The caller's visible usage (own, tenant's, partner's or all), narrowed by the query parameters."""
    if principal.can("accounting:view_partner"):
        query = visible_to(principal, query, usage_records.c.tenant_id, usage_records.c.partner_id)
    elif principal.can("accounting:view_tenant"):
        query = query.where(usage_records.c.tenant_id == principal.tenant_id)
    elif principal.user_id is not None:
        query = query.where(usage_records.c.user_id == principal.user_id)
    else:
        query = query.where(false())
    params = request.query
    problems: list[FieldError] = []
    start, end = query_time(params, "start", problems), query_time(params, "end", problems)
    if "period" in params and params["period"] not in USAGE_PERIODS:
        problems.append(FieldError("period", "one of " + ", ".join(USAGE_PERIODS)))
    if problems:
        raise errors.validation_error(problems, "invalid query parameters")
    if "period" in params:  # with start and end too: each narrows
        query = query.where(usage_records.c.created_at >= utc_now() - USAGE_PERIODS[params["period"]])
    if start is not None:
        query = query.where(usage_records.c.created_at >= start)
    if end is not None:
        query = query.where(usage_records.c.created_at < end)
    for name, column in USAGE_COLUMN_FILTERS.items():
        if name in params:
            query = query.where(column == params[name])
    return query


USAGE_FIELDS = ("id", "request_id", "created_at", "partner_id", "tenant_id", "user_id", "api_key_id", "model",
                "backend_id", "protocol", "status", "tokens_in", "tokens_out", "latency_ms", "cost", "backend_cost",
                "error_code")


def _usage_json(row: Any) -> dict[str, Any]:
    """A usage record as the API shows it; `id` is its request id (stable: the record's primary key)."""
    return {"id": row["request_id"], **{name: row[name] for name in USAGE_FIELDS[1:]},
            "created_at": iso(row["created_at"]), "cost": decimal_text(row["cost"]),
            "backend_cost": decimal_text(row["backend_cost"])}


@requires("accounting:view_own", scopes=(OPERATOR,), query=(*USAGE_FILTERS, *PAGE))
async def list_usage(request: web.Request) -> web.Response:
    """Usage records, newest first: ?start=&end= (ISO 8601), ?period=, ?model=, ?user_id=, ?tenant_id=,
    ?backend_id=, ?limit=, ?cursor=."""
    query = _usage_query(request, request[PRINCIPAL], select(usage_records))
    return await listing(request, query, usage_records.c.created_at, usage_records.c.request_id, _usage_json,
                         default_limit=USAGE_PAGE_DEFAULT, max_limit=USAGE_PAGE_MAX)


def _sums(request_count: int, tokens_in: int, tokens_out: int, cost: Decimal, backend_cost: Decimal
          ) -> dict[str, Any]:
    """A summary row's sums under the documented names, then the node's former ones (requests, tokens_in, ...)."""
    return {"request_count": request_count, "input_tokens": tokens_in, "output_tokens": tokens_out,
            "total_tokens": tokens_in + tokens_out, "total_cost": decimal_text(cost),
            "backend_cost": decimal_text(backend_cost),
            "requests": request_count, "tokens_in": tokens_in, "tokens_out": tokens_out, "cost": decimal_text(cost)}


@requires("accounting:view_own", scopes=(OPERATOR,), query=("group_by", *USAGE_FILTERS))
async def usage_summary(request: web.Request) -> web.Response:
    """Sums per model, user, backend or tenant (?group_by=, default model), under the same filters as /usage."""
    group_by = request.query.get("group_by", "model")
    if group_by not in SUMMARY_GROUPS:
        raise errors.validation_error([FieldError("group_by", "one of " + ", ".join(SUMMARY_GROUPS))],
                                      "invalid query parameters")
    column = SUMMARY_GROUPS[group_by]
    cost = func.sum(usage_records.c.cost)
    query = _usage_query(request, request[PRINCIPAL], select(
        column.label("key"), func.count().label("requests"), func.sum(usage_records.c.tokens_in).label("tokens_in"),
        func.sum(usage_records.c.tokens_out).label("tokens_out"), cost.label("cost"),
        func.sum(usage_records.c.backend_cost).label("backend_cost"),
    )).group_by(column).order_by(cost.desc(), column)
    async with request.app[DB].connect() as conn:
        rows = (await conn.execute(query)).all()
    items = [{"group_key": row.key, column.name: row.key, **_sums(
        row.requests, int(row.tokens_in), int(row.tokens_out), row.cost, row.backend_cost)} for row in rows]
    total = _sums(sum(row.requests for row in rows), sum(int(row.tokens_in) for row in rows),
                  sum(int(row.tokens_out) for row in rows), sum((row.cost for row in rows), Decimal(0)),
                  sum((row.backend_cost for row in rows), Decimal(0)))
    return ok({"group_by": group_by, "period": request.query.get("period"), "items": items, "total": total})


EXPORT_PAGE = 1000  # rows read from MariaDB at a time: an export never holds more in memory


@requires("accounting:view_own", scopes=(OPERATOR,), query=("format", *USAGE_FILTERS))
async def export_usage(request: web.Request) -> web.StreamResponse:
    """Every usage record the caller sees under the /usage filters, oldest first, as a download (?format=csv, json or
    ndjson), read from MariaDB a page at a time while it is sent."""
    query = _usage_query(request, request[PRINCIPAL], select(usage_records))  # checks the filters before any byte

    async def batches() -> AsyncIterator[list[dict[str, Any]]]:
        async for rows in _usage_pages(request, query):
            yield [_usage_json(row) for row in rows]

    return await download(request, "usage", USAGE_FIELDS, batches())


async def _usage_pages(request: web.Request, query: Any) -> AsyncIterator[Sequence[RowMapping]]:
    """The rows of `query` (on usage_records) oldest first, EXPORT_PAGE at a time, each page read on a connection of
    its own: a slow client holds no connection of the pool while it reads."""
    after: tuple[datetime, str] | None = None
    while True:
        page_query = query
        if after is not None:
            page_query = query.where(or_(usage_records.c.created_at > after[0], and_(
                usage_records.c.created_at == after[0], usage_records.c.request_id > after[1])))
        async with request.app[DB].connect() as conn:
            rows = (await conn.execute(page_query.order_by(
                usage_records.c.created_at, usage_records.c.request_id).limit(EXPORT_PAGE))).mappings().all()
        if rows:
            yield rows
        if len(rows) < EXPORT_PAGE:
            return
        after = (rows[-1]["created_at"], rows[-1]["request_id"])


# --- budgets ---

def _number(value: Any, *, floats: bool) -> Decimal | None:
    """A JSON value as an exact decimal; floats only where rounding cannot matter (money is sent as a string)."""
    allowed = (int, float, str) if floats else (int, str)
    if not isinstance(value, allowed) or isinstance(value, bool):
        return None
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        return None
    return number if number.is_finite() else None


def _decimals(number: Decimal) -> int:
    exponent = number.as_tuple().exponent
    assert isinstance(exponent, int)  # finite numbers only reach here
    return max(0, -exponent)


class AccountingBody(Fields):
    """The identity routes' field-by-field body checks, plus the numbers budgets and rate limits need."""

    def limit(self, name: str, *, required: bool = False, integral: bool = False) -> Decimal | None:
        """A budget's limit: a decimal string (or a whole JSON number), > 0, at most 12 decimals."""
        value = self._raw(name, required)
        if value is None:
            return None
        number = _number(value, floats=False)
        if number is None:
            self.fail(name, 'expected a decimal string, e.g. "100.50"')
        elif not 0 < number < LIMIT_VALUE_MAX:
            self.fail(name, f"must be more than 0 and less than {LIMIT_VALUE_MAX}")
        elif integral and number != number.to_integral_value():
            self.fail(name, "must be a whole number for tokens and requests")
        elif _decimals(number) > 12:
            self.fail(name, "at most 12 decimals")
        else:
            return number
        return None

    def share(self, name: str) -> Decimal | None:
        """soft_limit_pct: a share of the limit, 0.0-1.0, at most three decimals."""
        value = self._raw(name, False)
        if value is None:
            return None
        number = _number(value, floats=True)
        if number is None or not 0 <= number <= 1 or _decimals(number) > 3:
            self.fail(name, "a share of the limit from 0.0 to 1.0 (e.g. 0.8)")
            return None
        return number

    def budget_limits(self, current: Mapping[str, Decimal] | None) -> dict[str, Decimal]:
        """A budget's limits by type once this body applies (`current`: the budget's, on a change): cost_limit,
        token_limit, request_limit (null removes one from a budget), or the node's former limit_type + limit_value,
        which set one limit in place of all. Empty when a problem was found."""
        documented = [name for name in LIMIT_FIELDS.values() if self.has(name)]
        former = [name for name in ("limit_type", "limit_value") if self.has(name)]
        if documented and former:
            for name in documented:
                self._raw(name, False)  # read, so that it is not also reported as unknown
            for name in former:
                self._raw(name, False)
                self.fail(name, "give cost_limit, token_limit, request_limit or the former limit_type + limit_value, "
                                "not both")
            return {}
        if former or (current is None and not documented):
            return self._former_limit(current)
        limits = dict(current or {})
        problems = len(self.problems)
        for limit_type, name in LIMIT_FIELDS.items():
            if self.has(name) and not self.present(name, False):
                limits.pop(limit_type, None)
            elif (value := self.limit(name, integral=limit_type != "cost")) is not None:
                limits[limit_type] = value
        if len(self.problems) > problems:
            return {}
        if not limits:
            self.fail(documented[0], "a budget needs at least one of cost_limit, token_limit, request_limit")
        return {limit_type: limits[limit_type] for limit_type in LIMIT_TYPES if limit_type in limits}

    def _former_limit(self, current: Mapping[str, Decimal] | None) -> dict[str, Decimal]:
        """limit_type + limit_value: one limit (on a change, either defaults to the budget's first limit)."""
        creating = current is None
        if creating and not self.has("limit_type") and not self.has("limit_value"):
            self.fail("cost_limit", "required: at least one of cost_limit, token_limit, request_limit (or the former "
                                    "limit_type + limit_value)")
            return {}
        limit_type = self.string("limit_type", required=creating, choices=LIMIT_TYPES)
        current_type = next(iter(current)) if current else None
        limit_type = limit_type or current_type
        integral = limit_type in ("tokens", "requests")
        value = self.limit("limit_value", required=creating or self.has("limit_value"), integral=integral)
        if value is None and current is not None and current_type is not None and not self.has("limit_value"):
            value = current[current_type]
            if integral and value != value.to_integral_value():
                self.fail("limit_value", "must be a whole number for tokens and requests")
                return {}
        if limit_type is None or value is None:
            return {}
        return {limit_type: value}

    def rpm(self, name: str) -> int | None:
        """A rate limit: present, and a whole number of requests per minute or null (the default)."""
        if not self.has(name):
            self.fail(name, "required: a whole number, or null for the default")
            return None
        value = self._raw(name, False)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not 1 <= value <= limits.RPM_MAX):
            self.fail(name, f"a whole number 1-{limits.RPM_MAX}, or null for the default")
            return None
        return value


ENFORCEMENT = {"block": "blocked", "throttle": "throttled", "notify": "notified"}  # once a limit is reached


def _budget_json(row: Any, counter: dict[bytes, bytes] | None) -> dict[str, Any]:
    budget = budget_of(row)
    limits = budget.limits
    period = current_period(budget.period, datetime.now(UTC))
    current: dict[str, Any] = {"period": period.label, "period_start": iso(period.start),
                               "period_end": iso(period.end)}
    if counter is None:  # Redis's counters are unknown while it is unreachable
        current.update(used=None, cost=None, tokens=None, requests=None, state="unknown", enforcement="unknown")
    else:
        used = used_of(counter)
        if any(used[limit_type] >= limit for limit_type, limit in limits.items()):
            state = "exceeded"
        elif any(used[limit_type] >= limit * budget.soft_limit_pct for limit_type, limit in limits.items()):
            state = "soft_limit"
        else:
            state = "ok"
        current.update(used=decimal_text(used[budget.limit_type]), cost=decimal_text(used["cost"]),
                       tokens=int(used["tokens"]), requests=int(used["requests"]), state=state,
                       enforcement=ENFORCEMENT[budget.hard_action] if state == "exceeded" else "none")
    return {"id": budget.id, "scope": budget.scope, "scope_id": budget.scope_id, "partner_id": budget.partner_id,
            "tenant_id": budget.tenant_id, "period": budget.period,
            "cost_limit": None if budget.cost_limit is None else decimal_text(budget.cost_limit),
            "token_limit": budget.token_limit, "request_limit": budget.request_limit,
            # The node's former single-limit shape: the first limit set.
            "limit_type": budget.limit_type, "limit_value": decimal_text(budget.limit_value),
            "hard_action": budget.hard_action, "soft_limit_pct": decimal_text(budget.soft_limit_pct),
            "set_by_reach": row["set_by_reach"], "created_at": iso(budget.created_at),
            "updated_at": iso(row["updated_at"]), "current": current}


def _limit_columns(limits: Mapping[str, Decimal]) -> dict[str, Any]:
    """The budgets columns of a set of limits: each in its own, and the first in the former limit_type + value."""
    first = next(iter(limits))
    tokens, requests = limits.get("tokens"), limits.get("requests")
    return {"cost_limit": limits.get("cost"), "token_limit": None if tokens is None else int(tokens),
            "request_limit": None if requests is None else int(requests), "limit_type": first,
            "limit_value": limits[first]}


async def _counters(request: web.Request, rows: Sequence[Any]) -> list[dict[bytes, bytes] | None]:
    now = datetime.now(UTC)
    try:
        async with request.app[REDIS].pipeline(transaction=False) as pipe:
            for row in rows:
                pipe.hgetall(counter_key(row["id"], current_period(row["period"], now)))
            found: list[dict[bytes, bytes]] = await pipe.execute()
            return list(found)
    except RedisError:
        return [None] * len(rows)


def _reaches_budget(principal: Principal, tenant_id: str | None, partner_id: str) -> bool:
    if tenant_id is None:  # a partner's budget: its partner's people and the platform
        return principal.reach == "platform" or (principal.reach == "partner" and principal.partner_id == partner_id)
    return principal.reaches(tenant_id, partner_id)


async def _budget_row(conn: AsyncConnection, principal: Principal, budget_id: str) -> Any:
    row = (await conn.execute(select(budgets).where(budgets.c.id == budget_id))).mappings().first()
    if row is None or not _reaches_budget(principal, row["tenant_id"], row["partner_id"]):
        raise errors.not_found(f"no budget {budget_id!r}")
    return row


async def _scope_owner(conn: AsyncConnection, principal: Principal, scope: str, scope_id: str
                       ) -> tuple[str | None, str]:
    """(tenant_id, partner_id) of the object a budget limits; 404 when the caller does not reach it."""
    owner: tuple[str | None, str] | None = None
    role = None
    if scope == "user":
        row = (await conn.execute(select(users.c.tenant_id, tenants.c.partner_id, users.c.role).join(
            tenants, tenants.c.id == users.c.tenant_id).where(users.c.id == scope_id))).first()
        owner, role = (None, None) if row is None else ((row.tenant_id, row.partner_id), row.role)
    elif scope == "tenant":
        partner_id = await conn.scalar(select(tenants.c.partner_id).where(tenants.c.id == scope_id))
        owner = None if partner_id is None else (scope_id, partner_id)
    elif await conn.scalar(select(partners.c.id).where(partners.c.id == scope_id)) is not None:
        owner = (None, scope_id)
    if owner is None or not _reaches_budget(principal, *owner):
        raise errors.not_found(f"no {scope} {scope_id!r}")
    if role is not None:
        require_rank(principal, role)
    return owner


async def _require_budget_setter(conn: AsyncConnection, principal: Principal, row: Any) -> None:
    """Changing or deleting a budget: it was not set from above the caller, and (a user's) its user does not
    outrank the caller. Reading it needs reach only."""
    if REACHES.index(principal.reach) < REACHES.index(row["set_by_reach"]):
        raise errors.not_permitted(
            f"this budget was set with {row['set_by_reach']} reach; changing or deleting it needs as much")
    await _scope_owner(conn, principal, row["scope"], row["scope_id"])


@requires("accounting:manage_budgets", scopes=(OPERATOR,), query=PAGE)
async def list_budgets(request: web.Request) -> web.Response:
    """The budgets of everything the caller reaches, newest first, each with its current period's usage."""
    query = visible_to(request[PRINCIPAL], select(budgets), budgets.c.tenant_id, budgets.c.partner_id)
    async with request.app[DB].connect() as conn:
        rows, pagination = await page(conn, request, query, budgets.c.created_at, budgets.c.id)
    counters = await _counters(request, rows)
    return ok({"items": [_budget_json(row, counter) for row, counter in zip(rows, counters, strict=True)],
               "pagination": pagination})


@requires("accounting:manage_budgets", scopes=(OPERATOR,))
async def create_budget(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    body = await AccountingBody.of(request)
    if body.has("scope") and body.body["scope"] == "group":
        body.string("scope")
        body.fail("scope", "group budgets are not on the node: ScaiKey groups are not mirrored here; "
                           "use scope partner, tenant or user")
        scope = None
    else:
        scope = body.string("scope", required=True, choices=SCOPES)
    scope_id = body.string("scope_id", max_length=40)
    period = body.string("period", required=True, choices=PERIODS)
    limits = body.budget_limits(None)
    hard_action = body.string("hard_action", choices=HARD_ACTIONS) or "block"
    soft_limit_pct = body.share("soft_limit_pct")
    if scope == "user" and scope_id is None and not body.problems:
        body.problems.append(FieldError("scope_id", "required for a user budget"))
    body.done()
    assert scope is not None and period is not None and limits  # done() raised otherwise
    if scope_id is None:
        scope_id = principal.tenant_id if scope == "tenant" else principal.partner_id
    budget_id = new_id("bud")

    async def create(conn: AsyncConnection) -> Any:  # _budget_row's row
        tenant_id, partner_id = await _scope_owner(conn, principal, scope, scope_id)
        now = utc_now()  # not the server's NOW(): usage before it is counted in, compared with UTC times
        await conn.execute(insert(budgets).values(
            id=budget_id, scope=scope, scope_id=scope_id, partner_id=partner_id, tenant_id=tenant_id, period=period,
            **_limit_columns(limits), hard_action=hard_action,
            soft_limit_pct=DEFAULT_SOFT_LIMIT_PCT if soft_limit_pct is None else soft_limit_pct,
            set_by_reach=principal.reach, created_at=now, updated_at=now))
        return await _budget_row(conn, principal, budget_id)

    row = await in_transaction(request.app[DB], create)
    await announce(request.app[REDIS], TOPIC_BUDGETS)
    return ok(_budget_json(row, (await _counters(request, [row]))[0]), status=201)


@requires("accounting:manage_budgets", scopes=(OPERATOR,))
async def get_budget(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        row = await _budget_row(conn, request[PRINCIPAL], request.match_info["id"])
    return ok(_budget_json(row, (await _counters(request, [row]))[0]))


@requires("accounting:manage_budgets", scopes=(OPERATOR,))
async def update_budget(request: web.Request) -> web.Response:
    """Changes the limits, the hard action or the soft limit; scope and period are fixed at creation."""
    principal = request[PRINCIPAL]
    body = await AccountingBody.of(request)
    for fixed in ("scope", "scope_id", "period"):
        if body.has(fixed):
            body.string(fixed)  # read, so that it is not also reported as unknown
            body.problems.append(FieldError(fixed, "cannot be changed; delete the budget and create another"))

    async def change(conn: AsyncConnection) -> Any:  # _budget_row's row
        row = await _budget_row(conn, principal, request.match_info["id"])
        await _require_budget_setter(conn, principal, row)
        current = budget_of(row).limits
        limits = body.budget_limits(current)
        changes: dict[str, Any] = {
            "hard_action": body.string("hard_action", choices=HARD_ACTIONS),
            "soft_limit_pct": body.share("soft_limit_pct"),
        }
        body.done()
        values = {name: value for name, value in changes.items() if value is not None}
        if limits != current:
            values.update(_limit_columns(limits))
        # The caller reaches at least as far as the last setter: the budget is now set from its reach.
        await conn.execute(update(budgets).where(budgets.c.id == row["id"]).values(
            **values, set_by_reach=principal.reach, updated_at=utc_now()))
        return await _budget_row(conn, principal, row["id"])

    # Two operators changing one budget through two Galera nodes conflict: the later commit runs again.
    row = await in_transaction(request.app[DB], change)
    # A new limit is a new threshold, whose crossing is reported again (without Redis: once less, no harm).
    with contextlib.suppress(RedisError):
        await request.app[REDIS].hdel(counter_key(row["id"], current_period(row["period"], datetime.now(UTC))),
                                      "soft", "hard")
    await announce(request.app[REDIS], TOPIC_BUDGETS)
    return ok(_budget_json(row, (await _counters(request, [row]))[0]))


@requires("accounting:manage_budgets", scopes=(OPERATOR,))
async def delete_budget(request: web.Request) -> web.Response:
    async def remove(conn: AsyncConnection) -> Any:  # _budget_row's row
        row = await _budget_row(conn, request[PRINCIPAL], request.match_info["id"])
        await _require_budget_setter(conn, request[PRINCIPAL], row)
        await conn.execute(delete(budgets).where(budgets.c.id == row["id"]))
        return row

    row = await in_transaction(request.app[DB], remove)
    await announce(request.app[REDIS], TOPIC_BUDGETS)
    # Without Redis: a periodic budget's counter expires on its own; a `total` one's stays, unread.
    with contextlib.suppress(RedisError):
        await request.app[REDIS].delete(counter_key(row["id"], current_period(row["period"], datetime.now(UTC))))
    return ok({"id": row["id"], "deleted": True})


# --- rate limits ---

def _may_see(principal: Principal, holder: limits.LimitHolder) -> bool:
    if holder.level == "partner":
        return principal.reach == "platform" or principal.partner_id == holder.id
    return principal.reaches(holder.tenant_id, holder.partner_id)


def _limit_json(request: web.Request, holder: limits.LimitHolder) -> dict[str, Any]:
    default = limits.default_rpm(request.app[SETTINGS], holder.level)
    return {"level": holder.level, "id": holder.id, "rpm": holder.rpm, "effective_rpm": holder.rpm or default}


async def _holder(conn: AsyncConnection, request: web.Request) -> limits.LimitHolder:
    level, object_id = request.match_info["level"], request.match_info["id"]
    if level not in limits.LEVELS:
        raise errors.not_found(f"no rate-limit level {level!r} (one of {', '.join(limits.LEVELS)})")
    holder = await limits.find_holder(conn, level, limits.LEVELS[level].c.id == object_id)
    if holder is None or not _may_see(request[PRINCIPAL], holder):
        raise errors.not_found(f"no {level} {object_id!r}")
    return holder


@requires("admin:access", scopes=(OPERATOR,))
async def get_rate_limit(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        holder = await _holder(conn, request)
    return ok(_limit_json(request, holder))


@requires("admin:access", scopes=(OPERATOR,))
async def set_rate_limit(request: web.Request) -> web.Response:
    """Body {"rpm": N} or {"rpm": null} (back to the RATE_LIMIT_<LEVEL>_RPM default)."""
    principal = request[PRINCIPAL]
    body = await AccountingBody.of(request)
    rpm = body.rpm("rpm")
    body.done()
    async with request.app[DB].begin() as conn:
        holder = await _holder(conn, request)
        if holder.level in ("tenant", "partner"):
            require_above(principal, holder.level)  # else a tenant admin could lift its own tenant's ceiling
        else:
            assert holder.role is not None and holder.user_role is not None  # a key's or user's
            require_rank(principal, holder.user_role)
            if holder.level == "key":
                require_rank(principal, holder.role, "this key's role")
        await limits.set_rpm(conn, holder, rpm)
    await announce(request.app[REDIS], TOPIC_IDENTITY)
    return ok(_limit_json(request, dataclasses.replace(holder, rpm=rpm)))


ROUTES: list[web.RouteDef] = [
    web.get("/v1/accounting/usage", list_usage),
    web.get("/v1/accounting/usage/summary", usage_summary),
    web.get("/v1/accounting/export", export_usage),
    web.get("/v1/accounting/budgets", list_budgets),
    web.post("/v1/accounting/budgets", create_budget),
    web.get("/v1/accounting/budgets/{id}", get_budget),
    web.put("/v1/accounting/budgets/{id}", update_budget),
    web.delete("/v1/accounting/budgets/{id}", delete_budget),
    web.get("/v1/rate-limits/{level}/{id}", get_rate_limit),
    web.put("/v1/rate-limits/{level}/{id}", set_rate_limit),
]
