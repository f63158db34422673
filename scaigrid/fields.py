"""The one reader of every body (API routes, `admin apply`, config snapshots): JSON loaded strictly, then typed fields
read off it, every problem collected as a FieldError and raised at once as VALIDATION_ERROR.

What it refuses, everywhere alike (docs/api.md, "Validation"): bodies that are not a JSON object, NaN and Infinity,
nesting deeper than MAX_BODY_DEPTH; strings that are blank, too long, with control characters, or that do not match
their pattern as a whole (fullmatch: `^...$` with re.match lets a trailing newline through); integers out of their
bounds (never beyond their column); JSON values (default_params) deeper than MAX_JSON_DEPTH or larger than
MAX_JSON_BYTES. A value stored must never make a later request fail: it is refused when written.
"""

import json
import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, Self

from aiohttp import web

from scaigrid import errors
from scaigrid.errors import FieldError

MAX_BODY_DEPTH = 64  # nesting of a whole request body: chat tools carry JSON schemas, which nest
MAX_JSON_DEPTH = 31  # nesting of a stored JSON value: MariaDB's JSON functions (the column's check) refuse 32 levels
MAX_JSON_BYTES = 65_536  # a stored JSON value, serialised
INT32_MAX = 2**31 - 1  # an INT column
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MONEY_DECIMALS = 6  # the PRICE column's scale
MONEY_MAX = Decimal(10) ** 12  # the PRICE column's 18 digits less its 6 decimals


def decimal_text(value: Decimal) -> str:
    """A decimal as plain digits, without trailing zeros or an exponent: "0.00042", "100"."""
    return format(value.normalize(), "f") if value else "0"


# C0, DEL and C1 controls, line and paragraph separators, and lone surrogates (which no database or header takes).
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_CONTROL_BUT_LINES = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class _Refused(ValueError):
    pass


def _no_constant(name: str) -> Any:
    raise _Refused(f"{name} is not a JSON number")


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise _Refused(f"{text[:20]} is beyond the range of a number")
    return number


# json.loads with hooks would build a decoder (and its scanner) for every body.
_STRICT = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite)


def depth(value: Any) -> int:
    """How deeply objects and lists nest in a JSON value (a scalar is 0, {} or [] is 1); iterative, so it never hits
    the recursion limit."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, Mapping) else item if isinstance(item, list | tuple) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest


def load_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object (UTF-8, no NaN or Infinity, at most MAX_BODY_DEPTH deep)."""
    try:
        data = _STRICT.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))  # as json.loads reads bytes
    except _Refused as exc:
        raise errors.validation_error([FieldError("body", str(exc))]) from None
    except (ValueError, RecursionError):  # invalid UTF-8 is a ValueError; RecursionError: nested past json's limit
        data = None
    if not isinstance(data, dict):
        raise errors.validation_error([FieldError("body", "expected a JSON object")])
    # Each level opens with a bracket or brace: a body with few of them (most) cannot nest too deep, and the walk,
    # which costs the request path, is spared.
    if raw.count(b"{") + raw.count(b"[") > MAX_BODY_DEPTH and depth(data) > MAX_BODY_DEPTH:
        raise errors.validation_error([FieldError("body", f"nested deeper than {MAX_BODY_DEPTH} levels")])
    return data


async def json_object(request: web.Request) -> dict[str, Any]:
    """The request's body as `load_object` reads it (bytes, so that a bogus charset parameter changes nothing)."""
    return load_object(await request.read())


def json_value_problem(value: Any) -> str | None:
    """Why a JSON object cannot be stored (and sent upstream later), or None."""
    if not isinstance(value, Mapping):
        return "must be an object of JSON values"
    if depth(value) > MAX_JSON_DEPTH:
        return f"nested deeper than {MAX_JSON_DEPTH} levels"
    try:
        size = len(json.dumps(value, allow_nan=False).encode())
    except (TypeError, ValueError):  # ValueError: NaN or Infinity (TOML has them)
        return "must be an object of JSON values (no NaN or Infinity)"
    return f"at most {MAX_JSON_BYTES} bytes as JSON" if size > MAX_JSON_BYTES else None


def naive_utc(value: datetime) -> datetime:
    """A parsed time as stored: naive UTC (without a zone it is taken as UTC). OverflowError past year 1 or 9999."""
    return value.astimezone(UTC).replace(tzinfo=None) if value.tzinfo is not None else value


def query_time(params: Mapping[str, str], name: str, problems: list[FieldError]) -> datetime | None:
    """An ISO 8601 query parameter as naive UTC (as stored; without a zone it is UTC), or None when absent; a bad value
    is added to `problems`."""
    if name not in params:
        return None
    try:
        return naive_utc(datetime.fromisoformat(params[name]))
    except (ValueError, OverflowError):
        problems.append(FieldError(name, "expected an ISO 8601 time, e.g. 2030-01-31T12:00:00Z"))
        return None


class Fields:
    """Typed fields read off one JSON object, each problem collected (as `prefix` + field name) until `done()`.

    With `known`, a field not in it is refused at once; without, `done()` refuses every field no reader read.
    A JSON null counts as an absent field.
    """

    def __init__(self, data: Any, known: Sequence[str] | None = None, prefix: str = "") -> None:
        self.where = prefix  # where the fields are, in the names of problems: "routes[2]."
        self.problems: list[FieldError] = []
        self._known = known
        self._seen: set[str] = set()
        self.body: Mapping[str, Any] = data if isinstance(data, Mapping) else {}
        if not isinstance(data, Mapping):
            self.fail("", "must be an object")
        elif known is not None:
            for name in data:
                if name not in known:
                    self.fail(str(name), f"unknown field (expected one of: {', '.join(known)})")

    @classmethod
    async def of(cls, request: web.Request, known: Sequence[str] | None = None) -> Self:
        return cls(await json_object(request), known)

    def fail(self, name: str, message: str) -> None:
        self.problems.append(FieldError(f"{self.where}{name}" if name else self.where.rstrip("."), message))

    def has(self, name: str) -> bool:
        return name in self.body

    def _raw(self, name: str, required: bool) -> Any:
        self._seen.add(name)
        value = self.body.get(name)
        if value is None and required:
            self.fail(name, "required")
        return value

    def present(self, name: str, required: bool) -> bool:
        return self._raw(name, required) is not None

    def string(self, name: str, *, required: bool = False, max_length: int = 255,
               pattern: re.Pattern[str] | None = None, choices: Sequence[str] | None = None, hint: str = "",
               multiline: bool = False) -> str | None:
        """A non-blank string of at most `max_length` characters, without control characters (`multiline`: but for
        tab and line breaks), one of `choices` and matching `pattern` as a whole when given."""
        value = self._raw(name, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            self.fail(name, "expected a non-empty string")
        elif len(value) > max_length:
            self.fail(name, f"at most {max_length} characters")
        elif (_CONTROL_BUT_LINES if multiline else _CONTROL).search(value):
            self.fail(name, "control characters (line breaks included) are not allowed")
        elif choices is not None and value not in choices:
            self.fail(name, "one of: " + ", ".join(choices))
        elif pattern is not None and not pattern.fullmatch(value):
            self.fail(name, hint or f"must match {pattern.pattern}")
        else:
            return value
        return None

    def integer(self, name: str, *, minimum: int = 1, maximum: int = INT32_MAX, unit: str = "",
                required: bool = False) -> int | None:
        """An integer (a boolean is not one) from `minimum` to `maximum`; `unit` ("seconds") goes into the message."""
        value = self._raw(name, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
            what = f"a whole number of {unit}," if unit else "a whole number"
            self.fail(name, f"{what} {minimum}-{maximum}")
            return None
        return value

    def seconds(self, name: str) -> float | None:
        value = self._raw(name, False)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86400:
            self.fail(name, "a number of seconds, more than 0 and at most 86400")
            return None
        return float(value)

    def money(self, name: str, *, required: bool = False) -> Decimal:
        """Per million tokens, as a decimal string (a float would not be exact): "0.10"; 0 when absent."""
        value = self._raw(name, required)
        if value is None:
            return Decimal(0)
        if isinstance(value, bool) or not isinstance(value, str | int):
            self.fail(name, 'a decimal string such as "2.50" (not a float: it would not be exact)')
            return Decimal(0)
        try:
            amount = Decimal(str(value).strip())
        except InvalidOperation:
            self.fail(name, 'a decimal string such as "2.50"')
            return Decimal(0)
        if not amount.is_finite() or amount < 0 or amount >= MONEY_MAX:
            self.fail(name, f"at least 0 and less than {MONEY_MAX:,}")
        # Normalised only once in range: normalising a huge exponent overflows.
        elif isinstance(exponent := amount.normalize().as_tuple().exponent, int) and exponent < -MONEY_DECIMALS:
            self.fail(name, f"at most {MONEY_DECIMALS} decimals")
        return amount

    def mapping(self, name: str) -> dict[str, Any] | None:
        """A JSON object that can be stored and sent on: see `json_value_problem`."""
        value = self._raw(name, False)
        if value is None:
            return None
        problem = json_value_problem(value)
        if problem is not None:
            self.fail(name, problem)
            return None
        return dict(json.loads(json.dumps(value)))

    def timestamp(self, name: str, *, future: bool = False, required: bool = False) -> datetime | None:
        """An ISO 8601 time; without a zone it is taken as UTC. Returned as naive UTC, as stored."""
        value = self._raw(name, required)
        if value is None:
            return None
        try:
            parsed = naive_utc(datetime.fromisoformat(value)) if isinstance(value, str) else None
        except (ValueError, OverflowError):
            parsed = None
        if parsed is None:
            self.fail(name, "expected an ISO 8601 time, e.g. 2030-01-31T12:00:00Z")
            return None
        if future and parsed <= datetime.now(UTC).replace(tzinfo=None):
            self.fail(name, "must be in the future")
            return None
        return parsed

    def done(self) -> None:
        """Raises VALIDATION_ERROR for every problem found, unknown fields included (a typo must not pass)."""
        if self._known is None:
            for name in self.body:
                if name not in self._seen:
                    self.fail(str(name), "unknown field")
        if self.problems:
            raise errors.validation_error(self.problems)
