"""The edges of the identity routes: JSON bodies validated field by field (422 with details), envelopes, pages."""

import base64
import binascii
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Self

from aiohttp import web
from sqlalchemy import Column, Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.api.base import DB
from scaigrid.errors import FieldError

DEFAULT_PAGE = 50
MAX_PAGE = 100


def ok(data: Any, status: int = 200) -> web.Response:
    return web.json_response({"status": "ok", "data": data}, status=status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=_json_default)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return iso(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def iso(value: datetime | None) -> str | None:
    """Stored times are naive UTC; on the wire they say so."""
    return None if value is None else value.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def utc_now() -> datetime:
    """Now, as stored: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def utc_from_unix(unix_s: float) -> datetime:
    """A unix time as stored: naive UTC."""
    return datetime.fromtimestamp(unix_s, UTC).replace(tzinfo=None)


def naive_utc(value: datetime) -> datetime:
    """A parsed time as stored: naive UTC (without a zone it is taken as UTC). OverflowError past year 1 or 9999."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def decimal_text(value: Decimal) -> str:
    """A decimal as plain digits, without trailing zeros or an exponent: "0.00042", "100"."""
    return format(value.normalize(), "f") if value else "0"


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body, which must be a JSON object (422 VALIDATION_ERROR otherwise)."""
    try:
        data = await request.json()
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested deeper than json parses
        data = None
    if not isinstance(data, dict):
        raise errors.validation_error([FieldError("body", "expected a JSON object")])
    return data


class Body:
    """A JSON object read field by field; every problem is collected, then raised at once as VALIDATION_ERROR."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        self._seen: set[str] = set()
        self.problems: list[FieldError] = []

    @classmethod
    async def of(cls, request: web.Request) -> Self:
        return cls(await json_object(request))

    def has(self, name: str) -> bool:
        return name in self._data

    def _raw(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        value = self._data.get(name)
        if value is None and required:
            self.problems.append(FieldError(name, "required"))
        return value

    def string(self, name: str, *, required: bool = False, max_length: int = 255,
               pattern: re.Pattern[str] | None = None, choices: Sequence[str] | None = None,
               hint: str = "") -> str | None:
        value = self._raw(name, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.problems.append(FieldError(name, "expected a non-empty string"))
        elif len(value) > max_length:
            self.problems.append(FieldError(name, f"at most {max_length} characters"))
        elif choices is not None and value not in choices:
            self.problems.append(FieldError(name, "one of " + ", ".join(choices)))
        elif pattern is not None and not pattern.match(value):
            self.problems.append(FieldError(name, hint or f"must match {pattern.pattern}"))
        else:
            return value
        return None

    def whole_number(self, name: str, *, maximum: int, minimum: int = 0, unit: str = "",
                     required: bool = False) -> int | None:
        """An integer (a boolean is not one) from `minimum` to `maximum`; `unit` ("seconds") goes into the message."""
        value = self._raw(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            what = f"a whole number of {unit}," if unit else "a whole number"
            self.problems.append(FieldError(name, f"{what} {minimum}-{maximum}"))
            return None
        return value

    def timestamp(self, name: str, *, future: bool = False) -> datetime | None:
        """An ISO 8601 time; without a zone it is taken as UTC. Returned as naive UTC, as stored."""
        value = self._raw(name, False)
        if value is None:
            return None
        try:
            parsed = naive_utc(datetime.fromisoformat(value)) if isinstance(value, str) else None
        except (ValueError, OverflowError):
            parsed = None
        if parsed is None:
            self.problems.append(FieldError(name, "expected an ISO 8601 time, e.g. 2030-01-31T12:00:00Z"))
            return None
        if future and parsed <= utc_now():
            self.problems.append(FieldError(name, "must be in the future"))
            return None
        return parsed

    def done(self) -> None:
        """Raises VALIDATION_ERROR for every problem found, unknown fields included (a typo must not pass)."""
        for name in self._data:
            if name not in self._seen:
                self.problems.append(FieldError(name, "unknown field"))
        if self.problems:
            raise errors.validation_error(self.problems)


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
