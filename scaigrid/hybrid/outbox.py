"""The usage outbox: a node's usage waits in MariaDB until the managed side acknowledges it, then is deleted.

Node: the usage flush enqueues records of the managed side's tenants in the transaction that stores them (so a
record is in both or in neither), and the link sends them batch by batch, deleting a batch only once the managed
side acknowledged it. Managed: a batch is stored idempotently on request id, so a batch sent again (after a lost
acknowledgement) counts once, and only records of the tenants allowed on the node that sent it are stored.
"""

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from decimal import Decimal

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from scaigrid.accounting import usage
from scaigrid.accounting.records import UsageRecord
from scaigrid.clock import utc_now
from scaigrid.db.tables import (
    api_keys,
    backends,
    hybrid_mirrored,
    hybrid_node_tenants,
    hybrid_relayed_requests,
    hybrid_usage_outbox,
    model_routes,
    models,
    tenants,
    usage_records,
    users,
)
from scaigrid.routing.catalogue import HYBRID, MANAGED
from scaigrid.webhooks import outbox as webhook_outbox

logger = logging.getLogger(__name__)

MANAGED_BACKEND_PREFIX = "managed-"  # mirror.managed_backend_id: served, and accounted, by the managed side
MIRRORED_TENANT = "tenant"  # hybrid_mirrored's kind for a tenant the config snapshot made


@dataclass(frozen=True)
class Batch:
    batch_id: str  # "<first seq>-<last seq>": the same when the batch is sent again
    seqs: tuple[int, ...]
    records_json: list[str]


# --- node side ---

async def enqueue(conn: AsyncConnection, records: Sequence[UsageRecord]) -> int:
    """Adds records to the outbox in the caller's transaction; returns how many it took.

    Only usage of the managed side's tenants (those a config snapshot mirrored here) is taken: the node's own
    tenants are unknown to the managed side, and their usage never leaves the appliance. Usage of requests a
    `managed` backend served (the snapshot's `managed-` ones, and any made by hand), and of requests the managed
    side tunnelled here, stays out too: the managed side accounted those itself, under its own request id, so it
    would count them twice. A record enqueued again (a flush replayed after a crash) is ignored, by its request id.
    """
    tenant_ids = {record.tenant_id for record in records}
    mirrored = set(await conn.scalars(select(hybrid_mirrored.c.row_id).where(
        hybrid_mirrored.c.kind == MIRRORED_TENANT, hybrid_mirrored.c.row_id.in_(tenant_ids)))) if tenant_ids else set()
    backend_ids = {record.backend_id for record in records if record.backend_id}
    upstream = set(await conn.scalars(select(backends.c.id).where(
        backends.c.id.in_(backend_ids), backends.c.provider == MANAGED))) if backend_ids else set()
    # Without the backend cost: the managed side has its own (and one of the release before would refuse the field).
    rows = [{"request_id": record.request_id, "record_json": usage.encode(replace(record, backend_cost=Decimal(0))),
             "created_at": utc_now()}
            for record in records
            if record.tenant_id in mirrored
            and not (record.tunnelled or record.backend_id in upstream
                     or (record.backend_id or "").startswith(MANAGED_BACKEND_PREFIX))]
    if rows:
        statement = insert(hybrid_usage_outbox)
        # ON DUPLICATE KEY rather than INSERT IGNORE: IGNORE would also swallow bad values as mere warnings.
        await conn.execute(statement.on_duplicate_key_update(request_id=statement.inserted.request_id), rows)
    return len(rows)


async def next_batch(engine: AsyncEngine, limit: int = 500) -> Batch | None:
    """The oldest records waiting, at most `limit`; None when the outbox is empty."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(hybrid_usage_outbox.c.seq, hybrid_usage_outbox.c.record_json)
                                   .order_by(hybrid_usage_outbox.c.seq).limit(limit))).all()
    if not rows:
        return None
    return Batch(f"{rows[0].seq}-{rows[-1].seq}", tuple(row.seq for row in rows), [row.record_json for row in rows])


async def acknowledge(engine: AsyncEngine, batch: Batch) -> None:
    """Deletes exactly the batch's records (none enqueued since, whatever their seq)."""
    # By seq, not by range: seqs are taken at insert and committed in any order (the flush and an http process
    # writing directly), so a row inside the range may have been committed after the batch was read.
    async with engine.begin() as conn:
        await conn.execute(delete(hybrid_usage_outbox).where(hybrid_usage_outbox.c.seq.in_(batch.seqs)))


async def depth(engine: AsyncEngine) -> int:
    """Records waiting to be acknowledged."""
    async with engine.connect() as conn:
        return int(await conn.scalar(select(func.count()).select_from(hybrid_usage_outbox)) or 0)


# --- managed side ---

async def ingest(engine: AsyncEngine, node_id: str, records_json: Sequence[str]) -> int:
    """Stores a node's batch in one transaction; returns how many records were new.

    A record that does not decode, or holds what usage_records cannot, is logged (by position and request id only)
    and skipped: one bad record must not hold up the node's outbox forever. A record of a tenant not allowed on
    the node (or under another partner than the tenant's), of a user or key not of that tenant, or under a request
    id the managed side relayed to a node is skipped too, and only counted in the log (`_refusals`): a node
    accounts for the tenants it serves, never for anyone else. The cost is the managed side's (`_node_prices`),
    never the node's. Request events go to webhooks as for the managed side's own usage.
    """
    records: list[UsageRecord] = []
    for index, raw in enumerate(records_json):
        try:
            record = usage.decode(raw)
        except (ValueError, TypeError, KeyError, ArithmeticError, AttributeError, RecursionError):
            problem: str | None = "not a usage record"
        else:
            problem = _problem(record)
        if problem is None:
            records.append(record)
        else:
            logger.error("usage record %d of a node's batch (request %s) skipped: %s", index, _request_id(raw),
                         problem, extra={"event": "hybrid_usage_invalid"})
    if not records:
        return 0
    async with engine.begin() as conn:
        refusals = await _refusals(conn, node_id, records)
        ours = [record for record in records if record.request_id not in refusals]
        stored: set[str] = set()
        if ours:
            prices = await _node_prices(conn, node_id, {record.model for record in ours})
            ours = [_priced(record, prices.get(record.model)) for record in ours]
            stored = set((await conn.scalars(select(usage_records.c.request_id).where(
                usage_records.c.request_id.in_([record.request_id for record in ours])))).all())
            await usage.store(conn, ours)
            await webhook_outbox.emit_usage(conn, ours)  # derived ids: a batch sent again emits nothing new
    for reason in sorted(set(refusals.values())):
        count = sum(1 for why in refusals.values() if why == reason)
        logger.warning("%d usage record(s) of node %s not stored: %s", count, node_id, reason,
                       extra={"event": "hybrid_usage_foreign", "node_id": node_id, "count": count})
    return len({record.request_id for record in ours} - stored)


async def _refusals(conn: AsyncConnection, node_id: str, records: Sequence[UsageRecord]) -> dict[str, str]:
    """Why the managed side stores none of these records, by request id: a node accounts only for what it served,
    to the users and keys of the tenants allowed on it, and never under an id the managed side relayed to a node
    (it accounted that request itself, whichever record arrives first)."""
    allowed = set((await conn.execute(select(tenants.c.id, tenants.c.partner_id).join(
        hybrid_node_tenants, hybrid_node_tenants.c.tenant_id == tenants.c.id).where(
        hybrid_node_tenants.c.node_id == node_id))).tuples().all())
    request_ids = [record.request_id for record in records]
    relayed = set((await conn.scalars(select(hybrid_relayed_requests.c.request_id).where(
        hybrid_relayed_requests.c.request_id.in_(request_ids)))).all())
    user_ids = {record.user_id for record in records if record.user_id}
    members = set((await conn.execute(select(users.c.id, users.c.tenant_id).where(
        users.c.id.in_(user_ids)))).tuples().all()) if user_ids else set()
    key_ids = {record.api_key_id for record in records if record.api_key_id}
    keys = set((await conn.execute(select(api_keys.c.id, api_keys.c.user_id, api_keys.c.tenant_id).where(
        api_keys.c.id.in_(key_ids)))).tuples().all()) if key_ids else set()
    refusals: dict[str, str] = {}
    for record in records:
        if (record.tenant_id, record.partner_id) not in allowed:
            refusals[record.request_id] = "their tenants are not allowed on the node"
        elif record.request_id in relayed:
            refusals[record.request_id] = "the managed side relayed these requests and accounts for them itself"
        elif (record.user_id, record.tenant_id) not in members or (
                record.api_key_id is not None
                and (record.api_key_id, record.user_id, record.tenant_id) not in keys):
            refusals[record.request_id] = "their user or key is not one of their tenant's"
    return refusals


async def _node_prices(conn: AsyncConnection, node_id: str, slugs: set[str]) -> dict[str, tuple[Decimal, Decimal]]:
    """The managed side's prices of the node's models: those of the managed model routed to each one (through a
    `hybrid` backend "<node>/<slug>"; the first by slug when several are). A model none routes to has none."""
    by_target = {f"{node_id}/{slug}": slug for slug in slugs}
    rows = (await conn.execute(
        select(backends.c.model, models.c.price_input_per_mtok, models.c.price_output_per_mtok)
        .select_from(backends.join(model_routes, model_routes.c.backend_id == backends.c.id)
                     .join(models, models.c.id == model_routes.c.model_id))
        .where(backends.c.provider == HYBRID, backends.c.model.in_(by_target)).order_by(models.c.slug))).all()
    prices: dict[str, tuple[Decimal, Decimal]] = {}
    for target, price_in, price_out in rows:
        prices.setdefault(by_target[target], (price_in, price_out))
    return prices


def _priced(record: UsageRecord, price: tuple[Decimal, Decimal] | None) -> UsageRecord:
    """The record at the managed side's price: the node's own cost (and backend cost) is never taken."""
    price_in, price_out = price or (Decimal(0), Decimal(0))
    return replace(record, cost=(record.tokens_in * price_in + record.tokens_out * price_out) / 1_000_000,
                   backend_cost=Decimal(0), tunnelled=False)


# The columns' limits: a value beyond them would fail the whole batch's insert, and the batch would come back forever.
_TEXT_LIMITS = {"request_id": 40, "partner_id": 40, "tenant_id": 40, "user_id": 40, "api_key_id": 40, "model": 191,
                "backend_id": 128, "protocol": 8, "status": 16, "error_code": 64}
_REQUIRED = ("request_id", "partner_id", "tenant_id", "model", "protocol", "status")
_INT_MAX = 2**31 - 1
_COST_MAX = Decimal(10) ** 12


def _problem(record: UsageRecord) -> str | None:
    """What about a decoded record the usage_records table would refuse (the field's name only), or None."""
    for name, limit in _TEXT_LIMITS.items():
        value = getattr(record, name)
        if value is None and name not in _REQUIRED:
            continue
        if not isinstance(value, str) or not value or len(value) > limit:
            return f"{name} is not a string of 1-{limit} characters"
    for name in ("tokens_in", "tokens_out", "latency_ms"):
        value = getattr(record, name)
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= _INT_MAX:
            return f"{name} is not a whole number 0-{_INT_MAX}"
    created = record.created_at_unix
    if isinstance(created, bool) or not isinstance(created, int | float) or not 0 < created < 253402300800:
        return "created_at_unix is not a unix time"
    if not record.cost.is_finite() or not 0 <= record.cost < _COST_MAX:
        return "cost is out of range"
    return None


def _request_id(raw: str) -> str:
    """The record's request id if it has a readable one; never anything else of the record."""
    try:
        value = json.loads(raw).get("request_id")
    except (ValueError, AttributeError, RecursionError):
        return "unknown"
    return value if isinstance(value, str) and len(value) <= 64 else "unknown"
