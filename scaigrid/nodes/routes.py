"""GET /v1/infra/nodes: the ScaiInfer nodes that heartbeat to this gateway, for platform operators."""

from aiohttp import web

from scaigrid.access import requires
from scaigrid.appkeys import DB, SETTINGS
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.envelope import ok
from scaigrid.nodes.registry import list_nodes


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def infra_nodes(request: web.Request) -> web.Response:
    """Every node with its health by heartbeat age; nodes are shared infrastructure, so only the platform sees them."""
    items = await list_nodes(request.app[DB], request.app[SETTINGS].nodes)
    return ok({"items": items, "pagination": {"has_more": False, "next_cursor": None}})


ROUTES: list[web.RouteDef] = [web.get("/v1/infra/nodes", infra_nodes)]
