"""The config snapshot's format: canonical JSON, its sections and fields, and `parse`, which checks a received body
whole (digest, shape, types, references) before the node writes anything. Pure: no database, no I/O.

A body is canonical JSON (sorted keys, no spaces) with "schema": 1 and five sections: partners, tenants, users, API
keys (hashes only) and managed models. Every field is read with the one body reader (`fields.Fields`), under the
same rules as the API's, so whatever the API stored passes here.
"""

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from scaigrid.auth.roles import TENANT_ROLES
from scaigrid.auth.tenancy import SLUG_MAX, SLUG_PATTERN
from scaigrid.fields import Fields
from scaigrid.routing.catalogue import MODALITIES, MODEL_SLUG, MODEL_STATUSES

SCHEMA = 1


class SnapshotRejected(Exception):
    """The node keeps what it had; `reason` tells an operator what is wrong with the snapshot."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def canonical(body: Mapping[str, Any]) -> str:
    return json.dumps(body, sort_keys=True, separators=(",", ":"))


def digest(body_json: str) -> str:
    return hashlib.sha256(body_json.encode()).hexdigest()


Read = Callable[[Fields, str], object]  # reads one field of a row with the body reader, which notes any problem


def _text(max_len: int, pattern: re.Pattern[str] | None = None, *, optional: bool = False) -> Read:
    return lambda row, name: row.string(name, required=not optional, max_length=max_len, pattern=pattern)


def _choice(choices: Iterable[str]) -> Read:
    allowed = tuple(choices)
    return lambda row, name: row.string(name, required=True, choices=allowed)


def _whole(row: Fields, name: str) -> object:
    return row.integer(name)


def _time(row: Fields, name: str) -> object:
    return row.timestamp(name)


def _price(row: Fields, name: str) -> object:
    return row.money(name, required=True)


_ID = _text(40)
_STATUS = _text(16)
# The fields of each section, each with its reader: the same rules as the API's, so that whatever the API stored
# passes here; a row must have exactly these fields.
SECTIONS: dict[str, dict[str, Read]] = {
    "partners": {"id": _ID, "slug": _text(SLUG_MAX, SLUG_PATTERN), "name": _text(255), "status": _STATUS,
                 "rpm_limit": _whole},
    "tenants": {"id": _ID, "partner_id": _ID, "slug": _text(SLUG_MAX, SLUG_PATTERN), "name": _text(255),
                "status": _STATUS, "rpm_limit": _whole},
    "users": {"id": _ID, "tenant_id": _ID, "email": _text(320), "display_name": _text(255, optional=True),
              "role": _choice(TENANT_ROLES), "status": _STATUS, "rpm_limit": _whole},
    "api_keys": {"id": _ID, "tenant_id": _ID, "user_id": _ID, "name": _text(255),
                 "key_hash": _text(64, re.compile(r"[0-9a-f]{64}")), "key_prefix": _text(16),
                 "role": _choice(TENANT_ROLES), "rpm_limit": _whole, "expires_at": _time, "revoked_at": _time},
    "managed_models": {"slug": _text(191, MODEL_SLUG), "tenant_id": _text(40, optional=True),
                       "display_name": _text(255, optional=True), "modality": _choice(MODALITIES),
                       "context_window": _whole, "max_output_tokens": _whole,
                       "status": _choice(MODEL_STATUSES), "price_input_per_mtok": _price,
                       "price_output_per_mtok": _price},
}
# What identifies a row of each section (a model's slug is unique per owner only).
_KEY_OF = {"partners": ("id",), "tenants": ("id",), "users": ("id",), "api_keys": ("id",),
           "managed_models": ("tenant_id", "slug")}


def parse(body_json: str, sha256: str) -> dict[str, list[dict[str, Any]]]:
    """The sections of a snapshot whose digest, shape, types and references are all right; else SnapshotRejected."""
    if digest(body_json) != sha256:
        raise SnapshotRejected("the body does not match its sha256 (damaged on its way?)")
    try:
        body = json.loads(body_json)
    except (ValueError, RecursionError):
        raise SnapshotRejected("the body is not JSON") from None
    if not isinstance(body, dict):
        raise SnapshotRejected("the body is not a JSON object")
    if body.get("schema") != SCHEMA:
        raise SnapshotRejected(f"schema {body.get('schema')!r}; this node reads schema {SCHEMA} only "
                               "(upgrade the appliance)")
    unknown = sorted(set(body) - set(SECTIONS) - {"schema"})
    missing = sorted(set(SECTIONS) - set(body))
    if unknown or missing:
        raise SnapshotRejected(f"sections: unknown {unknown}, missing {missing}")
    for section, fields in SECTIONS.items():
        rows = body[section]
        if not isinstance(rows, list):
            raise SnapshotRejected(f"{section}: expected a list")
        seen: set[Any] = set()
        for index, row in enumerate(rows):
            where = f"{section}[{index}]"
            if not isinstance(row, dict) or set(row) != set(fields):
                raise SnapshotRejected(f"{where}: expected an object with exactly the fields {', '.join(fields)}")
            reader = Fields(row, tuple(fields), prefix=f"{where}.")
            for name, read in fields.items():
                read(reader, name)
            if reader.problems:
                raise SnapshotRejected(f"{reader.problems[0].field}: {reader.problems[0].message}")
            key = tuple(row[name] for name in _KEY_OF[section])
            if key in seen:
                raise SnapshotRejected(f"{where}: {key[-1]!r} appears twice")
            seen.add(key)
    sections: dict[str, list[dict[str, Any]]] = {section: body[section] for section in SECTIONS}
    _check_references(sections)
    return sections


def _check_references(sections: Mapping[str, list[dict[str, Any]]]) -> None:
    partner_ids = {row["id"] for row in sections["partners"]}
    tenant_ids = {row["id"] for row in sections["tenants"]}
    user_tenant = {row["id"]: row["tenant_id"] for row in sections["users"]}
    references = [
        *((f"tenants[{i}].partner_id", row["partner_id"], partner_ids) for i, row in enumerate(sections["tenants"])),
        *((f"users[{i}].tenant_id", row["tenant_id"], tenant_ids) for i, row in enumerate(sections["users"])),
        *((f"api_keys[{i}].user_id", row["user_id"], set(user_tenant)) for i, row in enumerate(sections["api_keys"])),
        *((f"managed_models[{i}].tenant_id", row["tenant_id"], tenant_ids)
          for i, row in enumerate(sections["managed_models"]) if row["tenant_id"] is not None),
    ]
    for where, value, known in references:
        if value not in known:
            raise SnapshotRejected(f"{where}: {value!r} is not in the snapshot")
    for index, row in enumerate(sections["api_keys"]):
        if user_tenant[row["user_id"]] != row["tenant_id"]:
            raise SnapshotRejected(f"api_keys[{index}].tenant_id: {row['tenant_id']!r} is not its user's tenant")
