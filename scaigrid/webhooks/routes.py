"""/v1/webhooks: a tenant's subscriptions, a test event, and the record of deliveries.

The signing secret is the client's own or generated here, stored Fernet-encrypted (the worker must read it to sign)
and shown in the answer that creates (or rotates) it only. Webhooks of tenants out of the caller's reach answer 404.
A user sets `active` or `inactive`; the node alone sets `disabled` (after WEBHOOK_AUTO_DISABLE_AFTER failures).
"""

import logging
import re
import secrets
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from aiohttp import web
from sqlalchemy import delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import crypto, errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, PRINCIPAL, SETTINGS
from scaigrid.auth.principal import Principal
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.auth.tenancy import target_tenant, visible_to
from scaigrid.clock import iso, utc_now
from scaigrid.db.tables import new_id, webhook_deliveries, webhook_events, webhooks
from scaigrid.envelope import PAGE, listing, ok
from scaigrid.errors import FieldError
from scaigrid.fields import Fields, naive_utc
from scaigrid.webhooks import delivery, outbox, targets

logger = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 5
MAX_RETRIES_LIMIT = 20
USER_STATUSES = ("active", "inactive")  # what a user sets
STATUSES = (*USER_STATUSES, "disabled")  # and what the node sets on its own
STATUS_ALIASES = {"disabled": "inactive"}  # the node's earlier name for a user's switch, still accepted in bodies
SECRET_MIN, SECRET_MAX = 32, 256  # characters of a client-chosen secret: enough entropy for an HMAC key
SECRET_PATTERN = re.compile(r"[\x21-\x7e]+")  # printable ASCII without spaces: one byte each, as the receiver reads it
# A delivery's documented status -> the node's stored ones (paused: pending while its webhook is not active).
DELIVERY_FILTERS = {"success": ("delivered",), "failed": ("failed",), "pending": ("pending", "paused"),
                    "delivered": ("delivered",), "paused": ("paused",)}  # the last two: the node's own names
DELIVERY_STATUS = {"delivered": "success", "failed": "failed", "pending": "pending", "paused": "pending"}


class WebhookBody(Fields):
    def events(self, name: str, *, required: bool = False) -> list[str] | None:
        value = self._raw(name, required)
        if value is None:
            return None
        if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
            self.fail(name, "expected a non-empty list of event types")
        elif unknown := [item for item in value if item not in outbox.EVENT_TYPES]:
            self.fail(name, f"unknown event type(s) {', '.join(unknown)}; known: " + ", ".join(outbox.EVENT_TYPES))
        else:
            return sorted(set(value))
        return None

    def status(self, name: str) -> str | None:
        value = self.string(name, choices=(*USER_STATUSES, *STATUS_ALIASES))
        return None if value is None else STATUS_ALIASES.get(value, value)

    def secret(self, name: str) -> str | None:
        """A client-chosen signing secret; its value is never put into a message."""
        hint = f"{SECRET_MIN}-{SECRET_MAX} printable ASCII characters without spaces, e.g. 64 hex digits"
        value = self.string(name, max_length=SECRET_MAX, pattern=SECRET_PATTERN, hint=hint)
        if value is not None and len(value) < SECRET_MIN:
            self.fail(name, hint)
            return None
        return value

    async def url(self, name: str, *, required: bool, allow_private: bool) -> str | None:
        value = self.string(name, required=required, max_length=2048)
        if value is not None and (problem := await targets.target_problem(value, allow_private=allow_private)):
            self.fail(name, problem)
            return None
        return value


def _webhook_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "tenant_id": row["tenant_id"], "partner_id": row["partner_id"], "url": row["url"],
            "events": row["events"], "description": row["description"], "status": row["status"],
            "max_retries": row["max_retries"], "consecutive_failures": row["consecutive_failures"],
            "disabled_reason": row["disabled_reason"], "created_at": iso(row["created_at"]),
            "updated_at": iso(row["updated_at"])}


def _new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


async def _webhook_row(conn: AsyncConnection, principal: Principal, webhook_id: str, *, lock: bool = False) -> Any:
    query = select(webhooks).where(webhooks.c.id == webhook_id)
    row = (await conn.execute(query.with_for_update() if lock else query)).mappings().first()
    if row is None or not principal.reaches(row["tenant_id"], row["partner_id"]):
        raise errors.not_found(f"no webhook {webhook_id!r}")
    return row


def _check_choice(params: Mapping[str, str], name: str, choices: Sequence[str]) -> None:
    if name in params and params[name] not in choices:
        raise errors.validation_error([FieldError(name, "one of: " + ", ".join(choices))], "invalid query parameters")


@requires("webhooks:manage", scopes=(OPERATOR,), query=(*PAGE, "tenant_id", "status"))
async def list_webhooks(request: web.Request) -> web.Response:
    """The webhooks of the tenants in the caller's reach, newest first; ?tenant_id= and ?status= narrow it."""
    _check_choice(request.query, "status", STATUSES)
    query = visible_to(request[PRINCIPAL], select(webhooks), webhooks.c.tenant_id, webhooks.c.partner_id)
    return await listing(request, query, webhooks.c.created_at, webhooks.c.id, _webhook_json,
                         filters=(webhooks.c.tenant_id, webhooks.c.status))


@requires("webhooks:manage", scopes=(OPERATOR,))
async def create_webhook(request: web.Request) -> web.Response:
    """A webhook of the caller's tenant (or of tenant_id, in reach); `secret` (given or generated) is in this answer
    only."""
    principal = request[PRINCIPAL]
    settings = request.app[SETTINGS]
    body = await WebhookBody.of(request)
    url = await body.url("url", required=True, allow_private=settings.webhooks.allow_private_targets)
    events = body.events("events", required=True)
    description = body.string("description", multiline=True)
    max_retries = body.integer("max_retries", minimum=0, maximum=MAX_RETRIES_LIMIT)
    status = body.status("status") or "active"
    secret = body.secret("secret") or _new_secret()
    wanted_tenant_id = body.string("tenant_id", max_length=40)
    body.done()
    assert url is not None and events is not None  # done() raised otherwise
    webhook_id = new_id("whk")
    async with request.app[DB].begin() as conn:
        tenant_id, partner_id = await target_tenant(conn, principal, wanted_tenant_id)
        now = utc_now()
        await conn.execute(insert(webhooks).values(
            id=webhook_id, partner_id=partner_id, tenant_id=tenant_id, url=url, events=events,
            secret_encrypted=crypto.encrypt(settings, secret), description=description, status=status,
            max_retries=DEFAULT_MAX_RETRIES if max_retries is None else max_retries, created_at=now, updated_at=now))
        row = await _webhook_row(conn, principal, webhook_id)
    logger.info("webhook %s created for tenant %s", webhook_id, tenant_id,
                extra={"event": "webhook_created", "webhook_id": webhook_id})
    return ok({**_webhook_json(row), "secret": secret}, status=201)


@requires("webhooks:manage", scopes=(OPERATOR,))
async def get_webhook(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        row = await _webhook_row(conn, request[PRINCIPAL], request.match_info["id"])
    return ok(_webhook_json(row))


@requires("webhooks:manage", scopes=(OPERATOR,))
async def update_webhook(request: web.Request) -> web.Response:
    """Changes url, events, description, max_retries, secret or status; enabling again resets the failure count."""
    principal = request[PRINCIPAL]
    settings = request.app[SETTINGS]
    body = await WebhookBody.of(request)
    changes: dict[str, Any] = {
        "url": await body.url("url", required=False, allow_private=settings.webhooks.allow_private_targets),
        "events": body.events("events"),
        "max_retries": body.integer("max_retries", minimum=0, maximum=MAX_RETRIES_LIMIT),
        "status": body.status("status"),
    }
    description = body.string("description", multiline=True)
    secret = body.secret("secret")
    body.done()
    values = {name: value for name, value in changes.items() if value is not None}
    if secret is not None:
        values["secret_encrypted"] = crypto.encrypt(settings, secret)
    if body.has("description"):  # null clears it
        values["description"] = description
    now = utc_now()
    async with request.app[DB].begin() as conn:
        row = await _webhook_row(conn, principal, request.match_info["id"], lock=True)
        status = values.get("status", row["status"])
        if status != row["status"]:
            if status == "active":  # a fresh start: the failures that disabled it are behind it
                values.update(consecutive_failures=0, disabled_reason=None)
                await delivery.resume(conn, row["id"], now)
            else:  # inactive: the user's choice, so no reason of the node's stays shown
                values["disabled_reason"] = None
                await delivery.pause(conn, row["id"])
        await conn.execute(update(webhooks).where(webhooks.c.id == row["id"]).values(**values, updated_at=now))
        row = await _webhook_row(conn, principal, row["id"])
    return ok(_webhook_json(row))


@requires("webhooks:manage", scopes=(OPERATOR,))
async def delete_webhook(request: web.Request) -> web.Response:
    """Deletes the webhook and its deliveries (pending ones are never sent)."""
    async with request.app[DB].begin() as conn:
        row = await _webhook_row(conn, request[PRINCIPAL], request.match_info["id"], lock=True)
        await conn.execute(delete(webhooks).where(webhooks.c.id == row["id"]))
    logger.info("webhook %s deleted", row["id"], extra={"event": "webhook_deleted", "webhook_id": row["id"]})
    return ok({"id": row["id"], "deleted": True})


@requires("webhooks:manage", scopes=(OPERATOR,))
async def rotate_secret(request: web.Request) -> web.Response:
    """A new signing secret, in this answer only; attempts from now on are signed with it."""
    settings = request.app[SETTINGS]
    secret = _new_secret()
    async with request.app[DB].begin() as conn:
        row = await _webhook_row(conn, request[PRINCIPAL], request.match_info["id"], lock=True)
        await conn.execute(update(webhooks).where(webhooks.c.id == row["id"]).values(
            secret_encrypted=crypto.encrypt(settings, secret), updated_at=utc_now()))
        row = await _webhook_row(conn, request[PRINCIPAL], row["id"])
    return ok({**_webhook_json(row), "secret": secret})


@requires("webhooks:manage", scopes=(OPERATOR,))
async def test_webhook(request: web.Request) -> web.Response:
    """Sends a `webhook.test` event to this webhook alone (whatever its status) and answers how that went: 200
    whatever the receiver did, since the test ran; a receiver's failure is in `status_code` and `error`."""
    async with request.app[DB].connect() as conn:
        row = await _webhook_row(conn, request[PRINCIPAL], request.match_info["id"])
    event = outbox.Event(new_id("evt"), outbox.TEST, row["partner_id"], row["tenant_id"],
                         {"webhook_id": row["id"], "message": "a test event, sent on request"}, utc_now())
    outcome, duration_ms = await delivery.send_test(request.app[DB], request.app[SETTINGS], row, event)
    return ok({"delivery_id": outbox.delivery_id(row["id"], event.id), "event_id": event.id,
               "status_code": outcome.status_code, "duration_ms": duration_ms, "error": outcome.error})


def _delivery_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "event_id": row["event_id"], "event_type": row["event_type"],
            "status": DELIVERY_STATUS[row["status"]], "paused": row["status"] == "paused", "attempts": row["attempts"],
            "next_attempt_at": iso(row["next_attempt_at"]) if row["status"] == "pending" else None,
            "last_attempt_at": iso(row["last_attempt_at"]), "last_status_code": row["last_status_code"],
            "last_error": row["last_error"], "delivered_at": iso(row["delivered_at"]),
            "created_at": iso(row["created_at"])}


def _since(params: Mapping[str, str]) -> datetime | None:
    if "since" not in params:
        return None
    try:
        return naive_utc(datetime.fromisoformat(params["since"]))
    except (ValueError, OverflowError):
        raise errors.validation_error([FieldError("since", "expected an ISO 8601 time, e.g. 2030-01-31T12:00:00Z")],
                                      "invalid query parameters") from None


@requires("webhooks:manage", scopes=(OPERATOR,), query=(*PAGE, "status", "since"))
async def list_deliveries(request: web.Request) -> web.Response:
    """The webhook's deliveries, newest first; ?status= (success, failed, pending) and ?since= (ISO 8601) narrow it."""
    _check_choice(request.query, "status", tuple(DELIVERY_FILTERS))
    since = _since(request.query)
    async with request.app[DB].connect() as conn:
        row = await _webhook_row(conn, request[PRINCIPAL], request.match_info["id"])
    d = webhook_deliveries
    query = select(d, webhook_events.c.event_type).join(webhook_events, webhook_events.c.id == d.c.event_id).where(
        d.c.webhook_id == row["id"])
    if "status" in request.query:
        query = query.where(d.c.status.in_(DELIVERY_FILTERS[request.query["status"]]))
    if since is not None:
        query = query.where(d.c.created_at >= since)
    return await listing(request, query, d.c.created_at, d.c.id, _delivery_json)


ROUTES: list[web.RouteDef] = [
    web.get("/v1/webhooks", list_webhooks),
    web.post("/v1/webhooks", create_webhook),
    web.get("/v1/webhooks/{id}", get_webhook),
    web.put("/v1/webhooks/{id}", update_webhook),
    web.delete("/v1/webhooks/{id}", delete_webhook),
    web.post("/v1/webhooks/{id}/test", test_webhook),
    web.post("/v1/webhooks/{id}/rotate-secret", rotate_secret),
    web.get("/v1/webhooks/{id}/deliveries", list_deliveries),
]
