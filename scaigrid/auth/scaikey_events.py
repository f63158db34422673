"""ScaiKey's identity events (inbound webhooks): changes pushed by ScaiKey, authenticated by signature, applied once.

ScaiKey signs `"<t>.<raw body>"` with HMAC-SHA256 under SCAIKEY_WEBHOOK_SECRET and sends
`X-ScaiKey-Signature: t=<unix>,v1=<hex>`. Only signed values are trusted: the event id and type come from the body
(the headers must agree), the age from `t`. Records are matched by their ScaiKey id; created and updated events
both upsert, because ScaiKey may deliver them out of order (a user before its tenant makes a placeholder tenant
that the tenant's own event later fills in).
"""

import hashlib
import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from sqlalchemy import Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.access import public
from scaigrid.appkeys import DB, REDIS, SETTINGS
from scaigrid.auth import tenancy
from scaigrid.auth.authenticator import TOPIC_IDENTITY
from scaigrid.auth.roles import ROLES
from scaigrid.cache import announce
from scaigrid.clock import utc_now
from scaigrid.db.defaults import DEFAULT_SLUG
from scaigrid.db.tables import partners, scaikey_events, tenants, users
from scaigrid.envelope import ok
from scaigrid.errors import FieldError
from scaigrid.fields import Fields, load_object
from scaigrid.webhooks import outbox

logger = logging.getLogger(__name__)

WINDOW_S = 300  # a signature older (or further in the future) than this is a replay, or a broken clock
NEW_USER_ROLE = "tenant_user"


def signature_invalid(message: str) -> errors.ScaigridError:
    return errors.ScaigridError(message, "WEBHOOK_SIGNATURE_INVALID", 401)


def verify_signature(secret: str, header: str | None, body: bytes, now_s: float) -> None:
    """Raises unless `header` carries a v1 signature of this body, made within WINDOW_S of now."""
    if not header:
        raise signature_invalid("X-ScaiKey-Signature is missing")
    parts: dict[str, list[str]] = {}
    for item in header.split(","):
        name, _, value = item.strip().partition("=")
        parts.setdefault(name, []).append(value)
    stamp = parts.get("t", [""])[0]
    # ASCII and short: str.isdigit also takes "²", and int() refuses strings of over 4300 digits.
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12) or "v1" not in parts:
        raise signature_invalid("X-ScaiKey-Signature must look like t=<unix time>,v1=<hex HMAC-SHA256>")
    if abs(now_s - int(stamp)) > WINDOW_S:
        raise signature_invalid(f"the signature's time is more than {WINDOW_S} s away from ours")
    expected = hmac.new(secret.encode(), stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    # Every candidate is compared in constant time (ScaiKey may send several v1 during a secret rotation).
    if not any(hmac.compare_digest(expected.encode(), given.encode()) for given in parts["v1"]):
        raise signature_invalid("the signature does not match this body")


@dataclass(frozen=True)
class Event:
    event_id: str
    event_type: str
    resource_id: str
    data: dict[str, Any]
    tenant_id: str | None  # ScaiKey ids, not ours
    partner_id: str | None


# The fields of an event's data that are stored (as names, emails, ScaiKey ids), with their columns' lengths.
_DATA_TEXT = {"name": 255, "email": 320, "display_name": 255, "tenant_id": 64, "partner_id": 64}


def parse_event(body: bytes, headers: Mapping[str, str]) -> Event:
    """The event, read with the body reader; fields ScaiKey adds that we do not know are ignored, not refused."""
    document = load_object(body)
    top = Fields(document)
    event_id = top.string("event_id", required=True, max_length=128)
    event_type = top.string("event_type", required=True, max_length=64)
    tenant_id = top.string("tenant_id", max_length=64)
    partner_id = top.string("partner_id", max_length=64)
    resource = Fields(document.get("resource") or {}, prefix="resource.")
    resource_id = resource.string("id", required=True, max_length=64)
    data = document.get("data") or {}
    stored = Fields(data, prefix="data.")
    for name, max_len in _DATA_TEXT.items():
        if isinstance(data, dict) and isinstance(data.get(name), str) and data[name].strip():  # else ignored
            stored.string(name, max_length=max_len)
    problems = top.problems + resource.problems + stored.problems
    for header, value in (("X-ScaiKey-Event-ID", event_id), ("X-ScaiKey-Event-Type", event_type)):
        if header in headers and value is not None and headers[header] != value:
            problems.append(FieldError(header, "does not match the signed body"))
    if problems:
        raise errors.validation_error(problems, "not a ScaiKey event")
    assert event_id is not None and event_type is not None and resource_id is not None
    return Event(event_id, event_type, resource_id, data, tenant_id, partner_id)


def _status(raw: Any) -> str | None:
    """ScaiKey's status in ours; anything but ACTIVE (or DELETED) fails closed as suspended."""
    if raw is None:
        return None
    value = str(raw).lower()
    return value if value in ("active", "deleted") else "suspended"


def _string(data: dict[str, Any], *names: str) -> str | None:
    for name in names:
        if isinstance(data.get(name), str) and data[name].strip():
            return str(data[name]).strip()
    return None


async def _slug(conn: AsyncConnection, table: Table, data: dict[str, Any], fallback: str) -> str:
    wanted = _string(data, "slug")
    if wanted is not None and tenancy.SLUG_PATTERN.fullmatch(wanted):
        return await tenancy.free_slug(conn, table, wanted)
    return await tenancy.free_slug(conn, table, _string(data, "name") or fallback)


async def _partner(conn: AsyncConnection, scaikey_id: str | None) -> str:
    """Our partner for a ScaiKey partner id (a placeholder if it is new); no id: the default partner."""
    if scaikey_id is None:
        partner_id = await conn.scalar(select(partners.c.id).where(partners.c.slug == DEFAULT_SLUG))
        if partner_id is None:
            raise errors.validation_error([FieldError("partner_id", "required: this node has no default partner")])
        return str(partner_id)
    partner_id = await conn.scalar(select(partners.c.id).where(partners.c.scaikey_id == scaikey_id))
    if partner_id is not None:
        return str(partner_id)
    return await tenancy.create_partner(conn, slug=await tenancy.free_slug(conn, partners, scaikey_id),
                                        name=scaikey_id, scaikey_id=scaikey_id)


async def _tenant(conn: AsyncConnection, scaikey_id: str | None, scaikey_partner_id: str | None) -> str:
    if scaikey_id is None:
        raise errors.validation_error([FieldError("tenant_id", "required for user events")])
    tenant_id = await conn.scalar(select(tenants.c.id).where(tenants.c.scaikey_id == scaikey_id))
    if tenant_id is not None:
        return str(tenant_id)
    return await tenancy.create_tenant(
        conn, partner_id=await _partner(conn, scaikey_partner_id),
        slug=await tenancy.free_slug(conn, tenants, scaikey_id), name=scaikey_id, scaikey_id=scaikey_id)


async def _set_status(conn: AsyncConnection, table: Table, scaikey_id: str, status: str) -> bool:
    result = await conn.execute(update(table).where(table.c.scaikey_id == scaikey_id).values(status=status))
    return bool(result.rowcount)


async def _upsert_organisation(conn: AsyncConnection, table: Table, event: Event,
                               create: Callable[[str, str], Awaitable[str]]) -> bool:
    """A partner or tenant by its ScaiKey id: made by `create(slug, name)` if new, then given ScaiKey's fields."""
    data = event.data
    changes = {k: v for k, v in (("name", _string(data, "name")), ("status", _status(data.get("status"))))
               if v is not None}
    existing = await conn.scalar(select(table.c.id).where(table.c.scaikey_id == event.resource_id))
    if existing is None:
        existing = await create(await _slug(conn, table, data, event.resource_id),
                                changes.get("name", event.resource_id))
    if changes:
        await conn.execute(update(table).where(table.c.id == existing).values(**changes))
    return True


async def _upsert_partner(conn: AsyncConnection, event: Event) -> bool:
    async def create(slug: str, name: str) -> str:
        return await tenancy.create_partner(conn, slug=slug, name=name, scaikey_id=event.resource_id)

    return await _upsert_organisation(conn, partners, event, create)


async def _upsert_tenant(conn: AsyncConnection, event: Event) -> bool:
    async def create(slug: str, name: str) -> str:
        partner_id = await _partner(conn, event.partner_id or _string(event.data, "partner_id"))
        return await tenancy.create_tenant(conn, partner_id=partner_id, slug=slug, name=name,
                                           scaikey_id=event.resource_id)

    return await _upsert_organisation(conn, tenants, event, create)


async def _upsert_user(conn: AsyncConnection, event: Event) -> bool:
    data = event.data
    role = _string(data, "role")
    if role is not None and role not in ROLES:
        logger.warning("ScaiKey user %s: unknown role %r ignored", event.resource_id, role,
                       extra={"event": "scaikey_unknown_role"})
        role = None
    changes = {k: v for k, v in (("email", _string(data, "email")), ("role", role),
                                 ("display_name", _string(data, "display_name", "name")),
                                 ("status", _status(data.get("status")))) if v is not None}
    existing = await conn.scalar(select(users.c.id).where(users.c.scaikey_id == event.resource_id))
    if existing is None:
        tenant_id = await _tenant(conn, event.tenant_id or _string(data, "tenant_id"), event.partner_id)
        email = changes.get("email", f"{event.resource_id}@scaikey")
        # A user the operator made here with the same email becomes this ScaiKey user (ScaiKey is the authority).
        existing = await conn.scalar(select(users.c.id).where(
            users.c.tenant_id == tenant_id, users.c.email == email, users.c.scaikey_id.is_(None)))
        if existing is None:
            existing = await tenancy.create_user(conn, tenant_id=tenant_id, email=email,
                                                 role=changes.get("role", NEW_USER_ROLE),
                                                 scaikey_id=event.resource_id)
        else:
            changes["scaikey_id"] = event.resource_id
    if changes:
        await conn.execute(update(users).where(users.c.id == existing).values(**changes))
    return True


async def apply(conn: AsyncConnection, event: Event) -> bool:
    """Applies one event; False when it changes nothing here (group events, unknown records or types)."""
    kind, _, action = event.event_type.partition(".")
    table = {"partner": partners, "tenant": tenants, "user": users}.get(kind)
    if table is None:
        return False
    if action in ("created", "updated"):
        upsert = {"partner": _upsert_partner, "tenant": _upsert_tenant, "user": _upsert_user}[kind]
        return await upsert(conn, event)
    status = {"deleted": "deleted", "suspended": "suspended", "activated": "active"}.get(action)
    if status is None or (kind != "user" and action != "deleted"):
        return False
    return await _set_status(conn, table, event.resource_id, status)


async def _emit_user_event(conn: AsyncConnection, event: Event) -> None:
    """scaikey.user.created|updated, in the transaction that applied the ScaiKey event (stored once with it)."""
    user = (await conn.execute(select(users, tenants.c.partner_id).join(tenants, tenants.c.id == users.c.tenant_id)
                               .where(users.c.scaikey_id == event.resource_id))).mappings().one()
    await outbox.emit_scaikey_user(conn, event.event_id, "scaikey." + event.event_type, user, user["partner_id"],
                                   utc_now())


@public  # authenticated by its signature, not by a bearer token
async def receive(request: web.Request) -> web.Response:
    """POST /v1/webhooks/scaikey: verify, record the event id, apply, announce."""
    secret = request.app[SETTINGS].scaikey.webhook_secret
    if secret is None:
        raise errors.ScaigridError("this node takes no ScaiKey webhooks: SCAIKEY_WEBHOOK_SECRET is not set",
                                   "WEBHOOKS_NOT_CONFIGURED", 503)
    body = await request.read()
    verify_signature(secret.reveal(), request.headers.get("X-ScaiKey-Signature"), body, time.time())
    event = parse_event(body, request.headers)
    async with request.app[DB].begin() as conn:
        try:
            await conn.execute(insert(scaikey_events).values(event_id=event.event_id, event_type=event.event_type))
        except IntegrityError:
            logger.info("ScaiKey event %s already applied", event.event_id, extra={"event": "scaikey_duplicate"})
            return ok({"event_id": event.event_id, "applied": False, "duplicate": True})
        applied = await apply(conn, event)
        if applied and event.event_type in ("user.created", "user.updated"):
            await _emit_user_event(conn, event)
    if applied:
        await announce(request.app[REDIS], TOPIC_IDENTITY)
    logger.info("ScaiKey event %s %s: %s", event.event_type, event.event_id, "applied" if applied else "ignored",
                extra={"event": "scaikey_event", "event_type": event.event_type, "applied": applied})
    return ok({"event_id": event.event_id, "applied": applied, "duplicate": False})
