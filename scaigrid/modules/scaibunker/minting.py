"""POST /v1/modules/scaibunker/storage/capabilities (http process only): mints a storage capability and records it."""

import logging
import time
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from sqlalchemy import select

from scaigrid import errors
from scaigrid.api.access import requires
from scaigrid.api.base import DB, SETTINGS
from scaigrid.auth.bodies import iso, json_object, ok
from scaigrid.auth.principal import PRINCIPAL, Principal
from scaigrid.db.tables import new_id, tenants
from scaigrid.errors import FieldError
from scaigrid.modules.scaibunker import capabilities
from scaigrid.modules.scaibunker.capabilities import VERBS, Capability
from scaigrid.modules.scaibunker.tables import capabilities as capability_rows
from scaigrid.settings import StorageSettings

logger = logging.getLogger(__name__)

PERMISSION = "scaibunker:images:manage"
DEFAULT_TTL_S = 3600
FIELDS = ("prefix", "verbs", "ttl_s", "max_bytes", "tenant_id")


def _whole(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_body(data: dict[str, Any], storage: StorageSettings) -> tuple[str, frozenset[str], int, int, str | None]:
    """prefix, verbs, ttl_s, max_bytes and the optional tenant_id, or 422 naming every bad field."""
    problems = [FieldError(name, "unknown field") for name in data if name not in FIELDS]
    prefix = data.get("prefix")
    if not isinstance(prefix, str):
        problems.append(FieldError("prefix", 'required: a string, "" or a path ending with "/"'))
    elif problem := capabilities.prefix_problem(prefix):
        problems.append(FieldError("prefix", problem))
    verbs = data.get("verbs")
    if not (isinstance(verbs, list) and verbs and all(isinstance(v, str) and v in VERBS for v in verbs)
            and len(set(verbs)) == len(verbs)):
        problems.append(FieldError("verbs", "required: a non-empty list of distinct verbs among " + ", ".join(VERBS)))
    ttl_s = _whole(data.get("ttl_s", DEFAULT_TTL_S))
    if ttl_s is None or not 1 <= ttl_s <= storage.capability_max_ttl_s:
        problems.append(FieldError("ttl_s", f"a whole number of seconds, 1-{storage.capability_max_ttl_s}"))
    max_bytes = _whole(data.get("max_bytes", storage.max_object_bytes))
    if max_bytes is None or not 1 <= max_bytes <= storage.max_object_bytes:
        problems.append(FieldError("max_bytes", f"a whole number of bytes, 1-{storage.max_object_bytes}"))
    tenant_id = data.get("tenant_id")
    if tenant_id is not None and not (isinstance(tenant_id, str) and 0 < len(tenant_id) <= 40):
        problems.append(FieldError("tenant_id", "a tenant id"))
    if problems:
        raise errors.validation_error(problems)
    assert isinstance(prefix, str) and isinstance(verbs, list) and ttl_s is not None and max_bytes is not None
    return prefix, frozenset(verbs), ttl_s, max_bytes, tenant_id


async def _tenant_for(request: web.Request, principal: Principal, tenant_id: str | None) -> str:
    """The caller's own tenant, or another it reaches (404 when it does not, as for every object out of reach)."""
    if tenant_id is None or tenant_id == principal.tenant_id:
        if not principal.tenant_id:
            raise errors.validation_error([FieldError("tenant_id", "required: a service caller has no tenant")])
        return principal.tenant_id
    async with request.app[DB].connect() as conn:
        row = (await conn.execute(select(tenants.c.partner_id).where(tenants.c.id == tenant_id))).first()
    if row is None or not principal.reaches(tenant_id, row.partner_id):
        raise errors.not_found("no such tenant")
    return tenant_id


@requires(PERMISSION)
async def mint_capability(request: web.Request) -> web.Response:
    """A capability for the caller's tenant (or one it reaches), recorded so the worker can purge it once expired."""
    settings = request.app[SETTINGS].storage
    if settings.capability_secret is None:
        raise errors.storage_not_configured("this node mints no storage capabilities (STORAGE_CAPABILITY_SECRET unset)")
    principal = request[PRINCIPAL]
    prefix, verbs, ttl_s, max_bytes, tenant_id = _read_body(await json_object(request), settings)
    tenant_id = await _tenant_for(request, principal, tenant_id)
    expires_at_unix = int(time.time()) + ttl_s
    capability = Capability(new_id("cap"), tenant_id, prefix, verbs, max_bytes, expires_at_unix)
    token = capabilities.mint(settings.capability_secret, capability)
    expires_at = datetime.fromtimestamp(expires_at_unix, UTC).replace(tzinfo=None)
    verb_list = [v for v in VERBS if v in verbs]
    async with request.app[DB].begin() as conn:
        await conn.execute(capability_rows.insert().values(
            id=capability.id, tenant_id=tenant_id, prefix=prefix, verbs=",".join(verb_list), max_bytes=max_bytes,
            expires_at=expires_at, created_by_user_id=principal.user_id, created_by_key_id=principal.api_key_id,
            created_by=f"{principal.kind}:{principal.name}"[:255]))
    logger.info("storage capability %s minted for %s%s", capability.id, tenant_id, prefix, extra={
        "event": "storage_capability_minted", "capability_id": capability.id, "prefix": prefix, "verbs": verb_list,
        "expires_at": iso(expires_at)})
    return ok({"id": capability.id, "token": token, "expires_at": iso(expires_at), "tenant_id": tenant_id,
               "prefix": prefix, "verbs": verb_list, "max_bytes": max_bytes}, status=201)


ROUTES = [web.post("/storage/capabilities", mint_capability)]
