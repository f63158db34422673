"""The gateway's request pipeline around every handler: authenticate, admit (rate limits, budgets), authorise."""

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from scaigrid import errors
from scaigrid.access import route_access
from scaigrid.appkeys import (
    ACCOUNTING,
    AUTHENTICATOR,
    MODULE_GATE,
    MODULE_ROUTES,
    PRINCIPAL,
    RATE_STATE,
    REQUEST_ID,
    TUNNELLED,
)
from scaigrid.auth.roles import REACHES
from scaigrid.errors import FieldError
from scaigrid.hybrid.assertion import ASSERTION_HEADER
from scaigrid.logs import tenant_id_var, user_id_var

logger = logging.getLogger(__name__)


@web.middleware
async def gateway_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    if request.match_info.http_exception is not None:
        return await handler(request)  # no such route: 404/405 without asking who is calling
    access = route_access(request)
    if access is None:
        # Fail closed: a route that forgot to say who may call it is refused, loudly, instead of open.
        logger.error("route %s declares no access rule; refused", request.match_info.route.resource,
                     extra={"event": "undeclared_route"})
        raise errors.not_permitted("this route declares no access rule, so it is refused")
    if access.permission is None:
        return await handler(request)
    authenticator = request.app[AUTHENTICATOR]
    if request.get(TUNNELLED):
        # The managed side's caller, as its signed assertion names them; the managed side keeps the credential.
        principal = await authenticator.tunnelled(request.headers.get(ASSERTION_HEADER), request[REQUEST_ID])
    else:
        principal = await authenticator.authenticate(request.headers.get("Authorization"))
    request[PRINCIPAL] = principal
    tenant_id_var.set(principal.tenant_id)
    user_id_var.set(principal.user_id)
    if principal.scope is not None and principal.scope not in access.scopes:
        accepted = ", ".join(access.scopes) or "none"
        raise errors.insufficient_scope(f"a service token of scope {principal.scope} cannot call this route "
                                        f"(scopes accepted: {accepted})")
    await request.app[ACCOUNTING].admit(request, principal, metered=access.metered)
    principal.require(access.permission)
    if REACHES.index(principal.reach) < REACHES.index(access.reach):
        raise errors.not_permitted(f"this route needs {access.reach} reach, beyond this caller's {principal.reach}")
    if unknown := [name for name in request.query if name not in access.query]:
        takes = ", ".join(access.query) or "none"
        raise errors.validation_error([FieldError(name, f"unknown query parameter (this route takes {takes})")
                                       for name in dict.fromkeys(unknown)], "unknown query parameters")
    # A module's route, for a caller of a tenant that (or whose partner) switched the module off: 403
    # MODULE_NOT_ENABLED. In-process switches (ModuleGate), so this costs nothing once loaded.
    module_id = request.app[MODULE_ROUTES].get(request.match_info.route)
    if module_id is not None and principal.tenant_id:
        await request.app[MODULE_GATE].require(module_id, principal.tenant_id, principal.partner_id)
    return await handler(request)


async def add_rate_limit_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every authenticated response says where the caller stands, streams and errors included."""
    state = request.get(RATE_STATE)
    if state is not None:
        response.headers["X-Scaigrid-Ratelimit-Limit"] = str(state.limit)
        response.headers["X-Scaigrid-Ratelimit-Remaining"] = str(state.remaining)
        response.headers["X-Scaigrid-Ratelimit-Reset"] = str(state.reset_unix)
