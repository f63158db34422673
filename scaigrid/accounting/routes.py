"""Accounting routes: usage, usage summary, budgets."""

from aiohttp import web

ROUTES: list[web.RouteDef] = []
