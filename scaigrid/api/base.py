"""What every aiohttp app of ScaiGrid shares: request ids, the error envelope, draining, health and metrics."""

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import Counter, Gauge, Histogram

from scaigrid import db, errors
from scaigrid.access import public
from scaigrid.appkeys import DRAIN, READY_CHECKS, REQUEST_ID, SETTINGS, STARTED, TUNNELLED
from scaigrid.hybrid import protocol
from scaigrid.lifecycle import wait_for_stop_signal
from scaigrid.logs import request_id_var
from scaigrid.metrics import Children, metrics_handler
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
REQUEST_ID_HEADER = "X-Request-ID"
# Health and metrics stay served while draining: load balancers and Prometheus must see the drain happen.
DRAIN_EXEMPT = ("/health", "/health/ready", "/metrics")
LISTEN_BACKLOG = 1024

HTTP_REQUESTS = Counter("scaigrid_http_requests_total", "HTTP requests answered", ["route", "method", "status"])
HTTP_DURATION = Histogram("scaigrid_http_request_duration_seconds", "HTTP request duration", ["route"])
HTTP_INFLIGHT = Gauge("scaigrid_http_inflight_requests", "HTTP requests being handled")
DRAINING = Gauge("scaigrid_draining", "1 while the process is draining before exit")
http_requests = Children(HTTP_REQUESTS)
http_duration = Children(HTTP_DURATION)


class Drain:
    """Counts requests in flight; once draining starts, new requests are refused and we wait for the rest."""

    def __init__(self) -> None:
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def enter(self) -> None:
        self.inflight += 1
        self._idle.clear()
        HTTP_INFLIGHT.inc()

    def leave(self) -> None:
        self.inflight -= 1
        HTTP_INFLIGHT.dec()
        if self.inflight == 0:
            self._idle.set()

    async def drain(self, grace_s: float) -> tuple[int, int]:
        """Refuses new work, waits up to grace_s for in-flight requests; returns (finished, still running)."""
        self.draining = True
        DRAINING.set(1)
        started = self.inflight
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), grace_s)
        return started - self.inflight, self.inflight



# CORS (CORS_ALLOWED_ORIGINS): browsers send `Authorization: Bearer`, never cookies, so no credentials mode.
CORS_MAX_AGE_S = 600
CORS_ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type, X-Request-ID"
CORS_EXPOSE_HEADERS = ("X-Request-ID, X-Scaigrid-Ratelimit-Limit, X-Scaigrid-Ratelimit-Remaining, "
                       "X-Scaigrid-Ratelimit-Reset, Retry-After")


def cors_origin(request: web.Request) -> str | None:
    """The request's Origin when the operator allows it (CORS_ALLOWED_ORIGINS), else None: no CORS headers."""
    allowed = request.app[SETTINGS].server.cors_allowed_origins
    origin = request.headers.get("Origin")
    if not allowed or origin is None:
        return None
    return origin if "*" in allowed or origin.lower() in allowed else None


def _preflight(request: web.Request) -> web.Response | None:
    """The answer to a browser's preflight from an allowed origin (any path: the real request meets the route)."""
    if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
        return None
    if cors_origin(request) is None:
        return None  # a disallowed origin: the OPTIONS goes on to its 405, without CORS headers
    return web.Response(status=204, headers={
        "Access-Control-Allow-Methods": CORS_ALLOW_METHODS, "Access-Control-Allow-Headers": CORS_ALLOW_HEADERS,
        "Access-Control-Max-Age": str(CORS_MAX_AGE_S)})


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer to an allowed origin, errors and streams included, lets its browser read it."""
    if request.app[SETTINGS].server.cors_allowed_origins:
        response.headers.add("Vary", "Origin")  # an answer differs by Origin: caches must keep them apart
    origin = cors_origin(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = CORS_EXPOSE_HEADERS


OAI_PREFIX = "/oai/"
# OpenAI's error `type` for each status, so OpenAI SDKs raise the exception their users catch.
_OAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "invalid_request_error", 409: "invalid_request_error", 429: "rate_limit_error"}


def _oai_error(error: errors.ScaigridError) -> web.Response:
    """The OpenAI shape: validation is a 400 there (BadRequestError); the ScaiGrid code stays in `code`."""
    status = 400 if error.status == 422 else error.status
    message = error.message
    if error.details:
        message += ": " + "; ".join(f"{d.field}: {d.message}" if d.field else d.message for d in error.details)
    body = {"message": message, "type": _OAI_TYPES.get(status, "server_error" if status >= 500 else "api_error"),
            "param": error.details[0].field if error.details else None, "code": error.code}
    return web.json_response({"error": body}, status=status)


def error_response(error: errors.ScaigridError, path: str = "") -> web.Response:
    """The native envelope, or under /oai/ the OpenAI error shape."""
    if path.startswith(OAI_PREFIX):
        response = _oai_error(error)
    else:
        body: dict[str, Any] = {"code": error.code, "message": error.message}
        if error.retry_after_s is not None:
            body["retry_after"] = error.retry_after_s
        if error.details:
            body["details"] = [{"field": d.field, "message": d.message} for d in error.details]
        response = web.json_response(
            {"status": "error", "error": body, "meta": {"request_id": request_id_var.get()}}, status=error.status)
    if error.retry_after_s is not None:
        response.headers["Retry-After"] = str(error.retry_after_s)
    return response


def _translate_http_exception(exc: web.HTTPException) -> errors.ScaigridError:
    if exc.status == 404:
        return errors.not_found("no route for this path")
    if exc.status == 405:
        return errors.method_not_allowed(exc.reason)
    return errors.ScaigridError(exc.reason, f"HTTP_{exc.status}", exc.status)


@web.middleware
async def request_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                             ) -> web.StreamResponse:
    """Request id, drain accounting, error translation and the request log line, in one place."""
    tunnel_id = protocol.tunnel_id(request.headers, request.app[SETTINGS].auth.service_token_secret, request.path)
    request[TUNNELLED] = tunnel_id is not None
    request_id = request[REQUEST_ID] = tunnel_id or "req_" + secrets.token_hex(12)
    request_id_var.set(request_id)
    drain = request.app[DRAIN]
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    started = request[STARTED] = time.perf_counter()
    response: web.StreamResponse
    drain.enter()
    try:
        if drain.draining and request.path not in DRAIN_EXEMPT:
            raise errors.service_draining()
        response = _preflight(request) or await handler(request)
    except errors.ScaigridError as exc:
        response = error_response(exc, request.path)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and the like are not errors
        response = error_response(_translate_http_exception(exc), request.path)
    except asyncio.CancelledError:
        logger.info("request cut", extra={"event": "request_cut", "method": request.method, "path": request.path})
        raise
    except Exception as exc:
        if db.unreachable(exc):  # a cache miss while MariaDB is away: the client may retry, nothing is broken
            logger.warning("MariaDB unreachable: %s", getattr(exc, "orig", exc),
                           extra={"event": "database_unavailable", "path": request.path})
            response = error_response(errors.database_unavailable(), request.path)
        else:
            logger.exception("unhandled error", extra={"event": "request_error", "path": request.path})
            response = error_response(errors.ScaigridError("internal error; see the server log with this request id"),
                                      request.path)
    finally:
        drain.leave()
    elapsed_s = time.perf_counter() - started
    http_requests(route, request.method, str(response.status)).inc()
    http_duration(route).observe(elapsed_s)
    # Probes and scrapes arrive every few seconds; at info level they would drown the log.
    level = logging.DEBUG if request.path in DRAIN_EXEMPT else logging.INFO
    node_request_id = protocol.node_request_id(request.headers)
    logger.log(level, "%s %s %d", request.method, request.path, response.status, extra={
        "event": "request", "method": request.method, "path": request.path, "status": response.status,
        "duration_ms": round(elapsed_s * 1000, 1), **({"node_request_id": node_request_id} if node_request_id else {})})
    return response


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    """Every response carries the request id, streams included (this runs as each one is prepared)."""
    if REQUEST_ID in request:
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    if node_request_id := protocol.node_request_id(request.headers):
        response.headers[protocol.NODE_REQUEST_ID_HEADER] = node_request_id


async def health(request: web.Request) -> web.Response:
    """Liveness: answers while the process runs; checks nothing else."""
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.Response:
    """Readiness: every dependency check, run concurrently; 503 names the failing ones."""
    if request.app[DRAIN].draining:
        return web.json_response({"status": "draining", "checks": {}}, status=503)
    checks = request.app[READY_CHECKS]
    results = await asyncio.gather(*(check(request.app) for check in checks.values()))
    by_name = dict(zip(checks, results, strict=True))
    ok = all(result == "ok" for result in by_name.values())
    return web.json_response({"status": "ready" if ok else "not_ready", "checks": by_name}, status=200 if ok else 503)


def resource_ctx(key: web.AppKey[T], factory: Callable[[Settings], AbstractAsyncContextManager[T]]
                 ) -> Callable[[web.Application], AsyncIterator[None]]:
    """Adapts one of the shared `*_ctx` resource factories to an aiohttp cleanup_ctx storing it under `key`."""
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with factory(app[SETTINGS]) as value:
            app[key] = value
            yield

    return ctx


def base_app(settings: Settings) -> web.Application:
    """An app with the shared middleware, /health, /health/ready and /metrics; no I/O happens here."""
    app = web.Application(middlewares=[request_middleware])
    app[SETTINGS] = settings
    app[DRAIN] = Drain()
    app[READY_CHECKS] = {}
    app.on_response_prepare.append(add_request_id_header)
    app.on_response_prepare.append(add_cors_headers)
    app.router.add_get("/health", public(health))
    app.router.add_get("/health/ready", public(ready))
    app.router.add_get("/metrics", public(metrics_handler))
    return app


async def serve(app: web.Application, host: str, port: int, grace_s: float) -> int:
    """Runs the app until SIGTERM/SIGINT, then drains: readiness 503, new requests 503, in-flight get grace_s."""
    # Cleanup waits at most this long after the drain: whatever still runs by then is cut.
    # handler_cancellation: a client that goes away cancels its handler, and with it the upstream request.
    runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0,
                           handler_cancellation=True)
    await runner.setup()
    try:
        # A deep accept queue: hundreds of clients opening streams at once must wait in it, not be dropped.
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()
        logger.info("listening on http://%s:%d", host, port, extra={"event": "listening", "port": port})
        await wait_for_stop_signal()
        finished, cut = await app[DRAIN].drain(grace_s)
        logger.info("drained: %d in-flight request(s) finished, %d cut after %g s grace", finished, cut, grace_s,
                    extra={"event": "drained", "finished": finished, "cut": cut})
    finally:
        await runner.cleanup()
    return 0
