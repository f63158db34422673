"""What the load left behind, checked against what its clients saw: usage rows, webhook events and stored objects.

After the usage flush (waited for: what the Redis buffer held when the audit began has left it, and every succeeded
request's row is in MariaDB; or the wait's end), `audit` counts:
  usage_missing    succeeded chat requests without a usage row of status `ok` (no row, or one saying it failed)
  usage_doubled    request ids with more than one row (the primary key forbids it; counted so that a schema change
                   cannot hide one), and requests the client saw fail whose row says `ok`: billed as served. A failed
                   request's row of status `error` is by design (docs/api.md, "Usage records": every dispatch is
                   recorded, answered or failed, and a stream cut after it started pays for what it delivered).
  events_lost      succeeded chat requests whose request.completed never reached the receiver, and failed ones with an
                   `error` row whose request.failed never did (by request id in the event's payload; an event that
                   arrives twice is allowed: delivery is at least once)
  objects_corrupt  objects whose PUT succeeded and whose GET now answers other bytes, or no object
and, for the report, usage_unmatched: rows of the load's tenants, in the records' time span, that no record names
(a client that never got an answer has no request id to match its row with). It is exact only for records of a
traffic that has stopped: while the load goes on, requests still in flight, or outside the records given, have rows
in that span too.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import redis as sync_redis
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import create_async_engine

from scaigrid.accounting import usage
from scaigrid.db.tables import usage_records
from scaigrid.settings import read_env_file
from tests.appliance_stack import ApplianceStack
from tests.chaos.load import STORAGE, SUCCEEDED, Record, Stats, World
from tests.support.waiting import eventually

EXAMPLES = 20  # request ids kept per finding, for the report


def _urls(stack: ApplianceStack) -> tuple[str, str]:
    """The database and Redis URLs every program of the stack runs with."""
    env = read_env_file(stack.config.scaigrid_env_file)
    return env["DATABASE_URL"], env["REDIS_URL"]


def usage_rows(stack: ApplianceStack, tenant_ids: list[str], since_unix: float, until_unix: float
               ) -> dict[str, Counter[str]]:
    """request id -> how many rows of each status, for the tenants' rows created in [since, until]."""
    database_url, _ = _urls(stack)

    async def read() -> dict[str, Counter[str]]:
        engine = create_async_engine(database_url, pool_size=1)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    select(usage_records.c.request_id, usage_records.c.status, func.count())
                    .where(usage_records.c.tenant_id.in_(tenant_ids),
                           usage_records.c.created_at >= _naive_utc(since_unix),
                           usage_records.c.created_at <= _naive_utc(until_unix))
                    .group_by(usage_records.c.request_id, usage_records.c.status))
                rows: dict[str, Counter[str]] = {}
                for request_id, status, count in result:
                    rows.setdefault(request_id, Counter())[status] += count
                return rows
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _naive_utc(unix: float) -> datetime:
    return datetime.fromtimestamp(unix, UTC).replace(tzinfo=None)


def newest_buffered(stack: ApplianceStack) -> bytes | None:
    """The usage record last pushed to the Redis buffer (None when it is empty)."""
    _, redis_url = _urls(stack)
    with sync_redis.Redis.from_url(redis_url) as client:
        newest = client.lindex(usage.BUFFER_KEY, -1)
        return None if newest is None else bytes(newest)


def still_buffered(stack: ApplianceStack, entry: bytes) -> bool:
    """Whether that record still waits in the buffer (the flush takes records from its head, oldest first)."""
    _, redis_url = _urls(stack)
    with sync_redis.Redis.from_url(redis_url) as client:
        return client.lpos(usage.BUFFER_KEY, entry) is not None


def object_intact(stack: ApplianceStack, token: str, key: str, sha256: str) -> bool:
    request = urllib.request.Request(f"{stack.url}{STORAGE}/objects/{key}",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=stack.tls_context()) as response:
            return hashlib.sha256(response.read()).hexdigest() == sha256
    except (urllib.error.URLError, OSError):
        return False


def audit(stack: ApplianceStack, world: World, records: list[Record], *, flush_wait_s: float = 60.0,
          events_wait_s: float = 60.0) -> dict[str, Any]:
    """The client-side counts of `records` (Stats) and the findings above, waiting at most flush_wait_s for the
    usage flush and events_wait_s for the events; `details` names up to EXAMPLES request ids or objects per finding."""
    served = {r.request_id for r in records if r.chat and r.request_id is not None and r.outcome == SUCCEEDED}
    refused = {r.request_id for r in records if r.chat and r.request_id is not None and r.outcome != SUCCEEDED}
    tenant_ids = [tenant.id for tenant in world.tenants]
    # A row carries the time its request reached the gateway (this machine's clock): inside the records' span.
    since_unix = min((record.started_unix for record in records), default=world.started_unix) - 1
    until_unix = max((record.started_unix + record.ended_s - record.started_s for record in records),
                     default=time.time()) + 1

    def rows() -> dict[str, Counter[str]]:
        return usage_rows(stack, tenant_ids, since_unix, until_unix)

    # Flushed: what the buffer held when the audit began, and every success's row. The load may go on meanwhile, so
    # the buffer itself need never be empty.
    newest: bytes | None = None
    with contextlib.suppress(sync_redis.RedisError, OSError):  # Redis still coming back: the rows decide alone
        newest = newest_buffered(stack)

    def flushed() -> bool:
        return ((newest is None or not still_buffered(stack, newest))
                and served <= {id_ for id_, count in rows().items() if count["ok"]})

    with contextlib.suppress(AssertionError):  # what is still missing then is counted below
        eventually(flushed, "the usage flush", flush_wait_s, interval_s=0.5,
                   ignoring=(sync_redis.RedisError, SQLAlchemyError, OSError))  # a service still coming back
    found = rows()
    usage_missing = sorted(id_ for id_ in served if not found.get(id_, Counter())["ok"])
    doubled = sorted(id_ for id_, count in found.items() if sum(count.values()) > 1)
    billed_failed = sorted(id_ for id_ in refused if found.get(id_, Counter())["ok"])
    known = {record.request_id for record in records} | world.warmup_request_ids
    unmatched = sorted(id_ for id_ in found if id_ not in known)

    expected = {(id_, "request.completed") for id_ in served} | {
        (id_, "request.failed") for id_ in refused if found.get(id_, Counter())["error"]}

    def lost() -> set[tuple[str, str]]:
        hooks = {tenant.hook for tenant in world.tenants}
        arrived = {(str(a.event.get("payload", {}).get("request_id")), str(a.event.get("event_type")))
                   for a in list(world.receiver.arrivals) if a.name in hooks and a.signature_valid}
        return expected - arrived

    with contextlib.suppress(AssertionError):
        eventually(lambda: not lost(), "every request event at the receiver", events_wait_s, interval_s=0.5)
    events_lost = sorted(lost())

    tokens = {caller.tenant: caller.storage_token for caller in world.callers}
    stored = {record.object_key: (record.tenant, record.sha256) for record in records
              if record.kind == "storage_put" and record.outcome == SUCCEEDED and record.object_key and record.sha256}
    corrupt = sorted(key for key, (tenant, sha256) in stored.items()
                     if not object_intact(stack, tokens[tenant], key, sha256))

    stats = Stats.of(records, EXAMPLES)
    return {"attempted": stats.attempted, "succeeded": stats.succeeded, "failed_documented": stats.failed_documented,
            "failed_other": stats.failed_other,
            "usage_missing": len(usage_missing), "usage_doubled": len(doubled) + len(billed_failed),
            "events_lost": len(events_lost), "objects_corrupt": len(corrupt), "usage_unmatched": len(unmatched),
            "objects_checked": len(stored),
            "details": {"failed_other": stats.other, "codes": stats.codes,
                        "usage_missing": usage_missing[:EXAMPLES], "usage_doubled": doubled[:EXAMPLES],
                        "usage_billed_failed": billed_failed[:EXAMPLES],
                        "events_lost": [f"{id_} {event}" for id_, event in events_lost[:EXAMPLES]],
                        "objects_corrupt": corrupt[:EXAMPLES], "usage_unmatched": unmatched[:EXAMPLES]}}
