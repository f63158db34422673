"""The outbox: an event is stored with one delivery row per subscribed webhook, in the caller's transaction.

Nothing is sent from here; the worker delivers what the outbox holds (delivery.py). Ids of events that stand
for something that happened once (a request, a budget crossing) are derived from it, and every insert
ignores a row already there, so emitting the same thing twice (a replayed usage flush) stores it once.
"""

import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid.accounting.budgets import Budget, Period
from scaigrid.accounting.records import UsageRecord
from scaigrid.clock import iso, utc_from_unix
from scaigrid.db.tables import new_id, webhook_deliveries, webhook_events, webhooks
from scaigrid.fields import decimal_text

logger = logging.getLogger(__name__)

REQUEST_COMPLETED = "request.completed"
REQUEST_FAILED = "request.failed"
BUDGET_SOFT = "budget.soft_limit_reached"
BUDGET_HARD = "budget.hard_limit_reached"
AUTO_DISABLED = "webhook.auto_disabled"
SCAIKEY_USER_CREATED = "scaikey.user.created"
SCAIKEY_USER_UPDATED = "scaikey.user.updated"
TEST = "webhook.test"  # sent by POST /v1/webhooks/{id}/test only, never subscribed to
EVENT_TYPES = (REQUEST_COMPLETED, REQUEST_FAILED, BUDGET_SOFT, BUDGET_HARD, AUTO_DISABLED, SCAIKEY_USER_CREATED,
               SCAIKEY_USER_UPDATED)
SOURCE = "scaigrid"


@dataclass(frozen=True)
class Event:
    id: str
    event_type: str
    partner_id: str
    tenant_id: str
    payload: dict[str, Any]
    created_at: datetime  # naive UTC


def derived_id(prefix: str, *parts: str) -> str:
    """The same id for the same parts, so that storing twice stores once."""
    return f"{prefix}_" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def delivery_id(webhook_id: str, event_id: str) -> str:
    return derived_id("dlv", webhook_id, event_id)


def body_of(row: Any) -> dict[str, Any]:
    """The JSON a receiver gets, from a webhook_events row (or an Event's fields)."""
    created_at: datetime = row["created_at"]
    return {"event_id": row["id"], "event_type": row["event_type"], "source": SOURCE, "tenant_id": row["tenant_id"],
            "partner_id": row["partner_id"], "payload": row["payload"],
            "timestamp": created_at.isoformat(timespec="microseconds") + "Z"}


async def store(conn: AsyncConnection, targets: Sequence[tuple[Event, str]]) -> None:
    """Stores each (event, webhook id) pair: the event once, a delivery due at the event's time."""
    if not targets:
        return
    events = {event.id: event for event, _ in targets}
    statement = insert(webhook_events)
    await conn.execute(statement.on_duplicate_key_update(id=statement.inserted.id), [
        {"id": e.id, "event_type": e.event_type, "partner_id": e.partner_id, "tenant_id": e.tenant_id,
         "payload": e.payload, "created_at": e.created_at} for e in events.values()])
    statement = insert(webhook_deliveries)
    await conn.execute(statement.on_duplicate_key_update(id=statement.inserted.id), [
        {"id": delivery_id(webhook_id, event.id), "webhook_id": webhook_id, "event_id": event.id,
         "status": "pending", "attempts": 0, "next_attempt_at": event.created_at, "created_at": event.created_at}
        for event, webhook_id in targets])


async def emit(conn: AsyncConnection, events: Sequence[Event]) -> int:
    """Stores the events that an active webhook of their tenant subscribes to; returns how many deliveries.

    One query finds the subscriptions of all the events' tenants; without any, nothing else happens.
    """
    tenant_ids = {event.tenant_id for event in events}
    if not tenant_ids:
        return 0
    subscribed: dict[str, list[tuple[str, set[str]]]] = {}
    for row in await conn.execute(select(webhooks.c.id, webhooks.c.tenant_id, webhooks.c.events).where(
            webhooks.c.tenant_id.in_(tenant_ids), webhooks.c.status == "active")):
        subscribed.setdefault(row.tenant_id, []).append((row.id, set(row.events)))
    targets = [(event, webhook_id) for event in events
               for webhook_id, types in subscribed.get(event.tenant_id, ()) if event.event_type in types]
    await store(conn, targets)
    return len(targets)


def request_event(record: UsageRecord) -> Event:
    """request.completed or request.failed of one usage record; its id follows from the request id."""
    event_type = REQUEST_COMPLETED if record.status == "ok" else REQUEST_FAILED
    payload: dict[str, Any] = {
        "request_id": record.request_id, "model": record.model, "backend_id": record.backend_id,
        "protocol": record.protocol, "status": record.status, "user_id": record.user_id,
        "api_key_id": record.api_key_id, "tokens_in": record.tokens_in, "tokens_out": record.tokens_out,
        "latency_ms": record.latency_ms, "cost": decimal_text(record.cost)}
    if event_type == REQUEST_FAILED:
        payload["error_code"] = record.error_code
    return Event(derived_id("evt", "request", record.request_id), event_type, record.partner_id, record.tenant_id,
                 payload, utc_from_unix(record.created_at_unix))


async def emit_usage(conn: AsyncConnection, records: Iterable[UsageRecord]) -> int:
    """request.* events of flushed usage records (called in the flush's transaction)."""
    return await emit(conn, [request_event(record) for record in records])


async def emit_budget(engine: AsyncEngine, budget: Budget, threshold: str, period: Period, at: datetime) -> None:
    """budget.*_limit_reached to the webhooks of the budget's tenant (a partner's budget: of each of its tenants).

    The id follows from budget, period, threshold and limit: reported twice, stored once; a changed limit
    is a new threshold (as for the budget's own report).
    """
    event_type = BUDGET_SOFT if threshold == "soft" else BUDGET_HARD
    payload = {"budget_id": budget.id, "scope": budget.scope, "scope_id": budget.scope_id, "period": budget.period,
               "period_label": period.label, "period_start": iso(period.start), "limit_type": budget.limit_type,
               "limit_value": decimal_text(budget.limit_value), "soft_limit_pct": decimal_text(budget.soft_limit_pct),
               "hard_action": budget.hard_action}
    async with engine.begin() as conn:
        if budget.tenant_id is not None:
            tenant_ids = [budget.tenant_id]
        else:
            tenant_ids = list((await conn.scalars(select(webhooks.c.tenant_id).distinct().where(
                webhooks.c.partner_id == budget.partner_id))).all())
        await emit(conn, [Event(
            derived_id("evt", "budget", budget.id, period.label, threshold, str(budget.limit_value), tenant_id),
            event_type, budget.partner_id, tenant_id, payload, at) for tenant_id in tenant_ids])


async def emit_scaikey_user(conn: AsyncConnection, scaikey_event_id: str, event_type: str, user: Any,
                            partner_id: str, at: datetime) -> None:
    """scaikey.user.created|updated to the webhooks of the user's tenant; the id follows from ScaiKey's event id, so
    one ScaiKey event is one event here (ScaiKey's redelivery of it is refused before this runs anyway)."""
    payload = {"user_id": user["id"], "email": user["email"], "display_name": user["display_name"],
               "role": user["role"], "status": user["status"], "tenant_id": user["tenant_id"],
               "scaikey_id": user["scaikey_id"]}
    await emit(conn, [Event(derived_id("evt", "scaikey", scaikey_event_id), event_type, partner_id, user["tenant_id"],
                            payload, at)])


async def emit_auto_disabled(conn: AsyncConnection, hook: Any, reason: str, at: datetime) -> None:
    """webhook.auto_disabled to the tenant's other webhooks (this one is already disabled, so it gets none)."""
    await emit(conn, [Event(new_id("evt"), AUTO_DISABLED, hook["partner_id"], hook["tenant_id"], {
        "webhook_id": hook["id"], "url": hook["url"], "disabled_reason": reason}, at)])
