"""Delivery of the outbox by the worker: claim due deliveries under a lease, POST them signed, record the outcome.

Claiming takes the due rows with SELECT ... FOR UPDATE SKIP LOCKED and, in the same transaction, sets their
lease (now + WEBHOOK_TIMEOUT_S + LEASE_SLACK_S) and counts the attempt. Another worker neither sees rows being
claimed (skipped while locked) nor rows leased (filtered), so no attempt is sent twice. A worker killed
mid-delivery leaves its lease to expire; the delivery is then due again and another worker sends it
(at-least-once). The outcome is written only if the row still holds the claimed attempt, so a worker
that outlived its lease cannot overwrite the attempt that replaced its own.

Every function takes the time (or a clock) from its caller: retry timing is tested without sleeping. The job
(`Courier`) keeps one HTTP client per worker process, so connections to receivers are reused across polls.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from prometheus_client import Counter, Gauge
from sqlalchemy import delete, exists, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid import crypto, netguard
from scaigrid.clock import utc_now
from scaigrid.db import delete_in_batches
from scaigrid.db.tables import webhook_deliveries, webhook_events, webhooks
from scaigrid.settings import Settings
from scaigrid.webhooks import outbox
from scaigrid.worker.jobs import JobContext

logger = logging.getLogger(__name__)

Clock = Callable[[], datetime]  # naive UTC, as stored

RETRY_DELAYS_S = (30, 120, 600, 1800, 7200)  # after the 1st, 2nd, ... failed attempt; the last one repeats
# The lease outlasts the request's timeout by this much: time to write the outcome.
LEASE_SLACK_S = 5.0
CLAIM_BATCH = 20  # deliveries one worker sends at once
DUE_COUNT_EVERY_S = 10.0  # how often a worker draining a backlog counts it for OUTBOX_DUE
SIGNATURE_HEADER = "X-ScaiGrid-Signature"

DELIVERIES = Counter("scaigrid_webhook_deliveries_total", "webhook delivery attempts by outcome", ["outcome"])
OUTBOX_DUE = Gauge("scaigrid_webhook_outbox_due", "webhook deliveries due and not leased, as last counted")
AUTO_DISABLED = Counter("scaigrid_webhooks_auto_disabled_total", "webhooks disabled for consecutive failures")

d = webhook_deliveries


@dataclass(frozen=True)
class Claimed:
    """One leased attempt: what to send, and the attempt number that fences its outcome."""

    id: str
    attempts: int
    webhook_id: str
    url: str
    secret_encrypted: str
    event: dict[str, Any]


@dataclass(frozen=True)
class Outcome:
    status_code: int | None
    error: str | None  # None: delivered

    @property
    def delivered(self) -> bool:
        return self.error is None


def retry_delay_s(attempts: int) -> int:
    """The wait after the attempts-th failed attempt."""
    return RETRY_DELAYS_S[min(attempts, len(RETRY_DELAYS_S)) - 1]


def lease_s(settings: Settings) -> float:
    return settings.webhooks.timeout_s + LEASE_SLACK_S


def signature(secret: str, body: bytes) -> str:
    """The X-ScaiGrid-Signature value: sha256=<hex HMAC-SHA256 of the raw body under the webhook's secret>."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _due(now: datetime) -> Any:
    return (d.c.status == "pending") & (d.c.next_attempt_at <= now) & or_(d.c.lease_until.is_(None),
                                                                         d.c.lease_until <= now)


async def claim(engine: AsyncEngine, now: datetime, lease: timedelta, limit: int = CLAIM_BATCH) -> list[Claimed]:
    """Leases up to `limit` due deliveries (oldest first) to this caller and counts their attempt."""
    async with engine.connect() as conn:
        # READ COMMITTED: no gap locks, so concurrent claims skip each other's rows instead of deadlocking.
        await conn.execution_options(isolation_level="READ COMMITTED")
        async with conn.begin():
            return await _claim(conn, now, lease, limit)


async def _claim(conn: AsyncConnection, now: datetime, lease: timedelta, limit: int) -> list[Claimed]:
    ids = list((await conn.scalars(select(d.c.id).where(_due(now)).order_by(d.c.next_attempt_at).limit(limit)
                                   .with_for_update(skip_locked=True))).all())
    if not ids:
        return []
    await conn.execute(update(d).where(d.c.id.in_(ids)).values(lease_until=now + lease, attempts=d.c.attempts + 1))
    rows = (await conn.execute(
        select(d.c.id, d.c.attempts, d.c.webhook_id, webhooks.c.url, webhooks.c.secret_encrypted,
               webhook_events.c.id.label("event_id"), webhook_events.c.event_type, webhook_events.c.partner_id,
               webhook_events.c.tenant_id, webhook_events.c.payload, webhook_events.c.created_at)
        .join(webhooks, webhooks.c.id == d.c.webhook_id).join(webhook_events, webhook_events.c.id == d.c.event_id)
        .where(d.c.id.in_(ids)))).mappings().all()
    return [Claimed(row["id"], row["attempts"], row["webhook_id"], row["url"], row["secret_encrypted"],
                    outbox.body_of({**row, "id": row["event_id"]})) for row in rows]


async def send(session: aiohttp.ClientSession, settings: Settings, claimed: Claimed) -> Outcome:
    """One POST of the event, signed; never raises for what the receiver (or the network) does."""
    refused = None if settings.webhooks.allow_private_targets else netguard.literal_refusal(claimed.url)
    if refused is not None:
        return Outcome(None, f"refused target: {refused}")
    try:
        secret = crypto.decrypt(settings, claimed.secret_encrypted)
    except crypto.UndecryptableCredential:
        return Outcome(None, "the signing secret cannot be decrypted with SCAIGRID_ENCRYPTION_KEY; rotate it")
    body = json.dumps(claimed.event, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "User-Agent": "ScaiGrid-Webhooks/1",
               SIGNATURE_HEADER: signature(secret, body), "X-ScaiGrid-Event-ID": claimed.event["event_id"],
               "X-ScaiGrid-Event-Type": claimed.event["event_type"], "X-ScaiGrid-Delivery-ID": claimed.id,
               "X-ScaiGrid-Delivery-Attempt": str(claimed.attempts)}
    timeout_s = settings.webhooks.timeout_s
    try:
        async with session.post(claimed.url, data=body, headers=headers, allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            if 200 <= response.status < 300:
                return Outcome(response.status, None)
            return Outcome(response.status, f"HTTP {response.status} {response.reason or ''}".strip())
    except TimeoutError:
        return Outcome(None, f"no answer within {timeout_s:g} s")
    except aiohttp.ClientConnectorError as exc:
        if isinstance(exc.os_error, netguard.RefusedTarget):
            return Outcome(None, f"refused target: {exc.os_error}")
        return Outcome(None, f"cannot connect: {exc.os_error}")
    except aiohttp.ClientError as exc:
        return Outcome(None, f"{type(exc).__name__}: {exc}")


async def finish(engine: AsyncEngine, settings: Settings, claimed: Claimed, outcome: Outcome, now: datetime) -> None:
    """Writes the attempt's outcome (unless the attempt is no longer this caller's) and the webhook's failures."""
    async with engine.begin() as conn:
        # The webhook row first, then the delivery: the order every writer of both uses (no deadlocks).
        hook = (await conn.execute(select(webhooks).where(webhooks.c.id == claimed.webhook_id)
                                   .with_for_update())).mappings().first()
        mine = (d.c.id == claimed.id) & (d.c.attempts == claimed.attempts) & (d.c.status == "pending")
        common = {"lease_until": None, "last_attempt_at": now, "last_status_code": outcome.status_code,
                  "last_error": None if outcome.error is None else outcome.error[:255]}
        if hook is None:
            return  # deleted meanwhile; its deliveries went with it
        if outcome.delivered:
            result = await conn.execute(update(d).where(mine).values(**common, status="delivered", delivered_at=now))
            if result.rowcount:
                await conn.execute(update(webhooks).where(webhooks.c.id == hook["id"]).values(consecutive_failures=0))
                DELIVERIES.labels("delivered").inc()
                logger.debug("webhook %s: delivery %s delivered (attempt %d)", hook["id"], claimed.id,
                             claimed.attempts, extra={"event": "webhook_delivered", "webhook_id": hook["id"],
                                                      "delivery_id": claimed.id})
            return
        given_up = claimed.attempts > hook["max_retries"]
        values: dict[str, Any]
        if given_up:
            values = {"status": "failed"}
        else:
            values = {"status": "pending" if hook["status"] == "active" else "paused",
                      "next_attempt_at": now + timedelta(seconds=retry_delay_s(claimed.attempts))}
        result = await conn.execute(update(d).where(mine).values(**common, **values))
        if not result.rowcount:
            return  # another worker took the attempt over after this one's lease ran out
        DELIVERIES.labels("failed" if given_up else "retrying").inc()
        failures = hook["consecutive_failures"] + 1
        await conn.execute(update(webhooks).where(webhooks.c.id == hook["id"]).values(consecutive_failures=failures))
        logger.info("webhook %s: delivery %s attempt %d failed: %s", hook["id"], claimed.id, claimed.attempts,
                    outcome.error, extra={"event": "webhook_attempt_failed", "webhook_id": hook["id"],
                                          "delivery_id": claimed.id, "given_up": given_up})
        if hook["status"] == "active" and failures >= settings.webhooks.auto_disable_after:
            await disable(conn, hook, f"{failures} consecutive failed deliveries (last: {outcome.error})"[:255], now)


async def disable(conn: AsyncConnection, hook: Any, reason: str, now: datetime) -> None:
    """Auto-disables a webhook: its pending deliveries wait (paused) until it is enabled again."""
    await conn.execute(update(webhooks).where(webhooks.c.id == hook["id"]).values(
        status="disabled", disabled_reason=reason, updated_at=now))
    await pause(conn, hook["id"])
    await outbox.emit_auto_disabled(conn, hook, reason, now)
    AUTO_DISABLED.inc()
    logger.warning("webhook %s of tenant %s disabled: %s", hook["id"], hook["tenant_id"], reason,
                   extra={"event": "webhook_auto_disabled", "webhook_id": hook["id"]})


async def pause(conn: AsyncConnection, webhook_id: str) -> None:
    await conn.execute(update(d).where(d.c.webhook_id == webhook_id, d.c.status == "pending").values(status="paused"))


async def resume(conn: AsyncConnection, webhook_id: str, now: datetime) -> None:
    await conn.execute(update(d).where(d.c.webhook_id == webhook_id, d.c.status == "paused").values(
        status="pending", next_attempt_at=now))


def new_session(settings: Settings) -> aiohttp.ClientSession:
    """The client deliveries go through; unless private targets are allowed, its resolver refuses them."""
    resolver = None if settings.webhooks.allow_private_targets else netguard.GuardedResolver()
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver, limit=CLAIM_BATCH))


async def send_test(engine: AsyncEngine, settings: Settings, hook: Any, event: outbox.Event) -> tuple[Outcome, int]:
    """POST /v1/webhooks/{id}/test: the event is stored with its delivery already leased to this caller, sent at once
    (same guard, signature and timeout as the worker's) and recorded as final, with how long it took in ms.

    The caller sees the outcome, so a failed test is not retried and counts toward neither `max_retries` nor
    auto-disable. Should this process die mid-test, the lease runs out and the worker sends it (at-least-once).
    """
    delivery = outbox.delivery_id(hook["id"], event.id)
    async with engine.begin() as conn:
        await outbox.store(conn, [(event, hook["id"])])
        await conn.execute(update(d).where(d.c.id == delivery).values(
            attempts=1, lease_until=utc_now() + timedelta(seconds=lease_s(settings))))
    claimed = Claimed(delivery, 1, hook["id"], hook["url"], hook["secret_encrypted"],
                      outbox.body_of(asdict(event)))
    async with new_session(settings) as session:
        started_s = time.monotonic()
        outcome = await send(session, settings, claimed)
        duration_ms = round((time.monotonic() - started_s) * 1000)
    now = utc_now()
    async with engine.begin() as conn:
        await conn.execute(update(d).where(d.c.id == delivery, d.c.attempts == 1, d.c.status == "pending").values(
            status="delivered" if outcome.delivered else "failed", lease_until=None, last_attempt_at=now,
            last_status_code=outcome.status_code, last_error=None if outcome.error is None else outcome.error[:255],
            delivered_at=now if outcome.delivered else None))
    DELIVERIES.labels("delivered" if outcome.delivered else "failed").inc()
    return outcome, duration_ms


async def deliver_due(engine: AsyncEngine, settings: Settings, session: aiohttp.ClientSession,
                      clock: Clock = utc_now, limit: int = CLAIM_BATCH) -> int:
    """Claims one batch of due deliveries, sends them concurrently and records each outcome; returns how many."""
    claimed = await claim(engine, clock(), timedelta(seconds=lease_s(settings)), limit)

    async def one(item: Claimed) -> None:
        outcome = await send(session, settings, item)
        await finish(engine, settings, item, outcome, clock())

    await asyncio.gather(*(one(item) for item in claimed))
    return len(claimed)


async def count_due(engine: AsyncEngine, now: datetime) -> int:
    async with engine.connect() as conn:
        return await conn.scalar(select(func.count()).select_from(d).where(_due(now))) or 0


class Courier:
    """A worker process's delivery job. Its one HTTP client (pooled connections, one resolver) is opened by the
    first poll and kept across polls until the worker stops (`close`, the job's cleanup)."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._due_counted_at_s = -math.inf  # time.monotonic()

    async def deliver(self, ctx: JobContext) -> None:
        """Runs every WEBHOOK_POLL_INTERVAL_S on every worker (not exclusive: claims keep workers apart).

        Goes on while batches come back full, so a backlog drains within one run.
        """
        if self._closed:
            return  # a tick that began as the worker stopped: nothing may open a client after close()
        if self._session is None:
            self._session = new_session(ctx.settings)
        while await deliver_due(ctx.engine, ctx.settings, self._session) == CLAIM_BATCH:
            # The gauge costs a COUNT over the due index, so it is taken only when a claim comes back full (more
            # may be due), at most every DUE_COUNT_EVERY_S while a backlog drains batch by batch.
            if time.monotonic() - self._due_counted_at_s >= DUE_COUNT_EVERY_S:
                self._due_counted_at_s = time.monotonic()
                OUTBOX_DUE.set(await count_due(ctx.engine, utc_now()))
        OUTBOX_DUE.set(0)  # a claim that came back short took everything due (or skipped what others were claiming)

    async def close(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None


async def purge(engine: AsyncEngine, before: datetime) -> int:
    """Deletes delivered and failed deliveries created before `before`, then events left without deliveries."""
    deliveries = await delete_in_batches(engine, delete(d).where(
        d.c.status.in_(("delivered", "failed")), d.c.created_at < before))
    events = await delete_in_batches(engine, delete(webhook_events).where(
        webhook_events.c.created_at < before, ~exists().where(d.c.event_id == webhook_events.c.id)))
    return deliveries + events


async def purge_old(ctx: JobContext) -> None:
    """Hourly, on one worker: the outbox keeps finished deliveries WEBHOOK_RETENTION_DAYS for the deliveries API."""
    deleted = await purge(ctx.engine, utc_now() - timedelta(days=ctx.settings.webhooks.retention_days))
    if deleted:
        logger.info("deleted %d old webhook deliveries and events", deleted,
                    extra={"event": "webhooks_purged", "count": deleted})
