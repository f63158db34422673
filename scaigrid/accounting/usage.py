"""Usage records on their way to MariaDB: the JSON they are buffered as in Redis, and the idempotent insert."""

import json
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid.accounting.records import UsageRecord
from scaigrid.clock import utc_from_unix
from scaigrid.db.tables import usage_records

BUFFER_KEY = "scaigrid:usage:buffer"  # a Redis list: RPUSHed by every http process, drained by the worker
# How many entries the flush has trimmed from the buffer's head, each once stored: with the buffer's length, the
# position of an entry among all ever pushed, and whether it is in MariaDB (service.py's journal, scripts.BATCH).
TRIMMED_KEY = "scaigrid:usage:trimmed"
WRITER_KEY_PREFIX = "scaigrid:usage:writer:"  # + a process's token: its count of its batches of records pushed
COST_QUANTUM = Decimal("1e-12")
_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps with options would build one per record


def encode(usage: UsageRecord) -> str:
    fields = vars(usage).copy()
    fields["cost"] = str(usage.cost)  # a string: the cost never becomes a float on its way
    fields["backend_cost"] = str(usage.backend_cost)
    # Left out while they say nothing, so that a worker (or a managed side) of a release before reads the rest.
    if not usage.tunnelled:
        del fields["tunnelled"]
    if not usage.backend_cost:
        del fields["backend_cost"]
    return _COMPACT.encode(fields)


def decode(raw: bytes | str) -> UsageRecord:
    fields = json.loads(raw)
    fields["cost"] = Decimal(fields["cost"])
    if "backend_cost" in fields:
        fields["backend_cost"] = Decimal(fields["backend_cost"])
    return UsageRecord(**fields)


def row_of(usage: UsageRecord) -> dict[str, Any]:
    row = vars(usage).copy()
    del row["created_at_unix"], row["tunnelled"]
    row["created_at"] = utc_from_unix(usage.created_at_unix)
    # The column's scale; anything finer would be rounded silently.
    row["cost"] = usage.cost.quantize(COST_QUANTUM)
    row["backend_cost"] = usage.backend_cost.quantize(COST_QUANTUM)
    return row


async def store(conn: AsyncConnection, records: Sequence[UsageRecord]) -> None:
    """Inserts records; one already stored (same request id) is left as it is, so a replay doubles nothing."""
    statement = insert(usage_records)
    # ON DUPLICATE KEY rather than INSERT IGNORE: IGNORE would also swallow bad values as mere warnings.
    await conn.execute(statement.on_duplicate_key_update(request_id=statement.inserted.request_id),
                       [row_of(usage) for usage in records])
