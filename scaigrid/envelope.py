"""The API envelope: `{"status": "ok", "data": ...}` answers, and listings a page at a time."""

import base64
import binascii
import csv
import io
import json
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import Column, Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.appkeys import DB
from scaigrid.clock import iso, utc_now
from scaigrid.errors import FieldError

logger = logging.getLogger(__name__)

DEFAULT_PAGE = 50
MAX_PAGE = 100
PAGE = ("limit", "cursor")  # the query parameters of every `page`


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"status": "ok", "data": data}, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


async def page(conn: AsyncConnection, request: web.Request, query: Select[Any], created_at: Column[datetime],
               id_: Column[str], *, default_limit: int = DEFAULT_PAGE, max_limit: int = MAX_PAGE
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One page of a listing, newest first: ?limit= (1-max_limit, default_limit if absent) and ?cursor=."""
    problems = []
    raw_limit = request.query.get("limit", str(default_limit))
    # ASCII and short: str.isdigit also takes "²", and int() refuses strings of over 4300 digits.
    limit = int(raw_limit) if raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 9 else 0
    if not 1 <= limit <= max_limit:
        problems.append(FieldError("limit", f"a whole number 1-{max_limit}"))
    cursor = request.query.get("cursor")
    if cursor:
        try:
            stamp, _, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().partition("|")
            after = datetime.fromisoformat(stamp)
        except (ValueError, binascii.Error, UnicodeDecodeError):
            problems.append(FieldError("cursor", "not a cursor from a previous page"))
        else:
            query = query.where(or_(created_at < after, and_(created_at == after, id_ < last_id)))
    if problems:
        raise errors.validation_error(problems, "invalid query parameters")
    rows = [dict(row) for row in (await conn.execute(
        query.order_by(created_at.desc(), id_.desc()).limit(limit + 1))).mappings()]
    more = len(rows) > limit
    rows = rows[:limit]
    next_cursor = None
    if more:
        last = rows[-1]
        next_cursor = base64.urlsafe_b64encode(
            f"{last[created_at.name].isoformat()}|{last[id_.name]}".encode()).decode()
    return rows, {"has_more": more, "next_cursor": next_cursor}


async def listing(request: web.Request, query: Select[Any], created_at: Column[datetime], id_: Column[str],
                  shown: Callable[[dict[str, Any]], dict[str, Any]], *, filters: Sequence[Column[str]] = (),
                  default_limit: int = DEFAULT_PAGE, max_limit: int = MAX_PAGE) -> web.Response:
    """One `page` of a listing in the envelope, {"items": [each row as `shown`], "pagination": ...}; each of
    `filters` narrows it to the value ?<its name>= gives, if given."""
    for column in filters:
        if column.name in request.query:
            query = query.where(column == request.query[column.name])
    async with request.app[DB].connect() as conn:
        rows, pagination = await page(conn, request, query, created_at, id_, default_limit=default_limit,
                                      max_limit=max_limit)
    return ok({"items": [shown(row) for row in rows], "pagination": pagination})


EXPORT_FORMATS = {"csv": "text/csv; charset=utf-8", "json": "application/json", "ndjson": "application/x-ndjson"}


def _csv_row(values: Iterable[Any]) -> bytes:
    line = io.StringIO()
    csv.writer(line).writerow(["" if value is None else json.dumps(value) if isinstance(value, dict | list) else value
                               for value in values])
    return line.getvalue().encode()


async def download(request: web.Request, stem: str, fields: Sequence[str],
                   batches: AsyncIterator[Sequence[dict[str, Any]]]) -> web.StreamResponse:
    """Every item of `batches` as a download in ?format= (csv with a header row of `fields`, a json array, or ndjson),
    written a batch at a time, so an export is never held whole in memory. Once the headers are sent, a failure cuts
    the connection: a short file must never look whole."""
    form = request.query.get("format", "csv")
    if form not in EXPORT_FORMATS:
        raise errors.validation_error([FieldError("format", "one of " + ", ".join(EXPORT_FORMATS))],
                                      "invalid query parameters")
    response = web.StreamResponse(headers={
        "Content-Type": EXPORT_FORMATS[form], "Cache-Control": "no-store",
        "Content-Disposition": f'attachment; filename="{stem}-{utc_now():%Y%m%dT%H%M%SZ}.{form}"'})
    await response.prepare(request)
    try:
        await response.write(_csv_row(fields) if form == "csv" else b"[" if form == "json" else b"")
        first = True
        async for batch in batches:
            chunk = bytearray()
            for item in batch:
                if form == "csv":
                    chunk += _csv_row(item[name] for name in fields)
                else:
                    line = json.dumps(item).encode()
                    chunk += line + b"\n" if form == "ndjson" else (b"" if first else b",") + line
                first = False
            await response.write(bytes(chunk))
        if form == "json":
            await response.write(b"]")
    except ConnectionError:
        return response  # the client left
    except Exception:
        logger.exception("%s export cut", stem, extra={"event": "export_cut"})
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response
