"""Identity routes: API keys, tenancy administration, the ScaiKey webhook receiver."""

from aiohttp import web

ROUTES: list[web.RouteDef] = []
