"""Prometheus: the /metrics handler, a small metrics listener for modes without HTTP, memoised labelled children."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)


class Children:
    """A metric's labelled children, memoised: `labels()` takes a lock and rebuilds keys on every call, and the
    request path asks for the same few children all the time. Grows like the metric itself (bounded by the
    catalogue's models and backends, the tenants and the error codes)."""

    def __init__(self, metric: Counter | Gauge | Histogram) -> None:
        self._metric = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *labels: str) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self._metric.labels(*labels)
        return child


async def metrics_handler(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


@asynccontextmanager
async def metrics_site_ctx(host: str, port: int) -> AsyncIterator[None]:
    """Serves GET /metrics on host:port for as long as the context is open."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("metrics on http://%s:%d/metrics", host, port, extra={"event": "listening", "port": port})
    try:
        yield
    finally:
        await runner.cleanup()
