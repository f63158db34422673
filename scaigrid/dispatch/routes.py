"""Inference routes: native /v1/inference/* and /v1/models, OpenAI-compatible /oai/v1/*."""

from aiohttp import web

ROUTES: list[web.RouteDef] = []
