"""POST /v1/modules/scaibunker/storage/capabilities (http process only): mints a storage capability and records it."""

import logging
import time

from aiohttp import web

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, MODULE_GATE, PRINCIPAL, SETTINGS
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.auth.tenancy import target_tenant
from scaigrid.clock import iso, utc_from_unix
from scaigrid.db.tables import new_id
from scaigrid.envelope import ok
from scaigrid.fields import Fields
from scaigrid.modules.scaibunker import capabilities
from scaigrid.modules.scaibunker.capabilities import VERBS, Capability
from scaigrid.modules.scaibunker.tables import capabilities as capability_rows

logger = logging.getLogger(__name__)

PERMISSION = "scaibunker:images:manage"
DEFAULT_TTL_S = 3600


class MintBody(Fields):
    def prefix(self, name: str) -> str | None:
        """Required; "" (the tenant's whole namespace) is a valid prefix, so Fields.string does not fit."""
        value = self._raw(name, False)
        if not isinstance(value, str):
            self.fail(name, 'required: a string, "" or a path ending with "/"')
        elif problem := capabilities.prefix_problem(value):
            self.fail(name, problem)
        else:
            return value
        return None

    def verbs(self, name: str) -> frozenset[str] | None:
        value = self._raw(name, False)
        if (isinstance(value, list) and value and all(isinstance(v, str) and v in VERBS for v in value)
                and len(set(value)) == len(value)):
            return frozenset(value)
        self.fail(name, "required: a non-empty list of distinct verbs among " + ", ".join(VERBS))
        return None


@requires(PERMISSION, scopes=(OPERATOR,))
async def mint_capability(request: web.Request) -> web.Response:
    """A capability for the caller's tenant (or one it reaches), recorded so the worker can purge it once expired."""
    settings = request.app[SETTINGS].storage
    if settings.capability_secret is None:
        raise errors.storage_not_configured("this node mints no storage capabilities (STORAGE_CAPABILITY_SECRET unset)")
    principal = request[PRINCIPAL]
    body = await MintBody.of(request)
    prefix = body.prefix("prefix")
    verbs = body.verbs("verbs")
    ttl_s = body.integer("ttl_s", minimum=1, maximum=settings.capability_max_ttl_s, unit="seconds")
    max_bytes = body.integer("max_bytes", minimum=1, maximum=settings.max_object_bytes, unit="bytes")
    wanted_tenant_id = body.string("tenant_id", max_length=40)
    body.done()
    assert prefix is not None and verbs is not None  # done() raised otherwise
    ttl_s = DEFAULT_TTL_S if ttl_s is None else ttl_s
    max_bytes = settings.max_object_bytes if max_bytes is None else max_bytes
    verb_list = [v for v in VERBS if v in verbs]
    async with request.app[DB].begin() as conn:
        tenant_id, partner_id = await target_tenant(conn, principal, wanted_tenant_id)
        # The gateway checked the caller's own tenant; a capability for another must find the module on there too.
        # Capabilities already minted keep working until they expire (at most STORAGE_CAPABILITY_MAX_TTL_S): the
        # object routes, on bunker_proxy too, read neither database nor Redis.
        await request.app[MODULE_GATE].require("scaibunker", tenant_id, partner_id)
        expires_at_unix = int(time.time()) + ttl_s
        capability = Capability(new_id("cap"), tenant_id, prefix, verbs, max_bytes, expires_at_unix)
        token = capabilities.mint(settings.capability_secret, capability)
        expires_at = utc_from_unix(expires_at_unix)
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
