"""Storage proxy routes under /v1/modules/scaibunker/storage/ (object routes arrive with the storage issue)."""

from aiohttp import web

ROUTES: list[web.RouteDef] = []
