"""Catalogue administration under /v1/: backends, models, routing policies, backend health."""

from aiohttp import web

ROUTES: list[web.RouteDef] = []
