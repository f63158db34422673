"""Time as ScaiGrid stores and shows it: naive UTC in the database, ISO 8601 with `Z` on the wire."""

from datetime import UTC, datetime


def iso(value: datetime | None) -> str | None:
    """Stored times are naive UTC; on the wire they say so."""
    return None if value is None else value.replace(tzinfo=None).isoformat(timespec="seconds") + "Z"


def utc_now() -> datetime:
    """Now, as stored: naive UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def utc_from_unix(unix_s: float) -> datetime:
    """A unix time as stored: naive UTC."""
    return datetime.fromtimestamp(unix_s, UTC).replace(tzinfo=None)
