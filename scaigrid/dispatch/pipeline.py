"""Dispatch: choose a backend, call it over the OpenAI protocol, fail over, relay the answer, account for it.

HTTP backends speak the OpenAI protocol; ScaiInfer nodes speak scaiinfer.v1 over gRPC, and their answer is read
as the same OpenAI SSE bytes (scaigrid/dispatch/scaiinfer.py); the hybrid link's backends carry an OpenAI answer
made on the other side (scaigrid/dispatch/hybrid.py). Each kind is a Transport (dispatch/transport.py), chosen by
the backend's provider, so everything below is one pipeline for all of them.

Failover happens only while nothing has been sent to the client: on a connection error, a timeout, a 5xx, a 429
(the backend then cools down for its Retry-After) or an answer that is not the OpenAI shape. Once a stream has
started, a failure becomes an `event: error` frame, and the stream still ends with `data: [DONE]`.
"""

import asyncio
import contextlib
import json
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from scaigrid import errors, netguard
from scaigrid.accounting.records import UsageRecord
from scaigrid.accounting.service import Accounting
from scaigrid.appkeys import ACCOUNTING, BUS, DB, DISPATCHER, REDIS, REQUEST_ID, SETTINGS, TUNNELLED
from scaigrid.auth.principal import Principal
from scaigrid.dispatch import metrics, sse
from scaigrid.dispatch.anthropic import AnthropicTransport
from scaigrid.dispatch.failures import Failure
from scaigrid.dispatch.hybrid import HybridTransport, LinkDirectory, ManagedTransport, managed_session
from scaigrid.dispatch.scaiinfer import NodeClient
from scaigrid.dispatch.transport import (
    MEDIA,
    NEED_FIELDS,
    AzureTransport,
    HttpTransport,
    Transport,
    Upstream,
    request_needs,
)
from scaigrid.nodes.registry import NodeDirectory, channel_credentials
from scaigrid.routing.breaker import COOLING, TRIAL, USABLE, Breakers
from scaigrid.routing.catalogue import ANTHROPIC, AZURE, HYBRID, MANAGED, SCAIINFER, Backend, CatalogueLoader, Model
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

T = TypeVar("T")
NATIVE, OAI = "native", "oai"
DRAIN_AFTER_DONE_S = 1.0  # after [DONE], how long we read on so the connection can be reused
MAX_TOKENS = 2**31 - 1  # the usage_records token columns' range
STREAM_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Exchange:
    """One inference request on its way through the dispatcher."""

    __slots__ = ("answered", "backend", "created_unix", "model", "principal", "protocol", "request", "started",
                 "status", "tokens_in", "tokens_out", "unit_cost", "upstream_s")

    def __init__(self, request: web.Request, principal: Principal, model: Model, protocol: str,
                 started: float) -> None:
        self.request = request
        self.principal = principal
        self.model = model
        self.protocol = protocol
        self.started = started
        self.created_unix = time.time()
        self.backend: Backend | None = None
        self.status = "ok"  # or the error code the client got
        self.answered = False  # the client has the whole answer ([DONE] written); what follows is housekeeping
        self.tokens_in = 0
        self.tokens_out = 0
        self.upstream_s = 0.0  # time spent waiting on backends
        self.unit_cost = Decimal(0)  # images, audio seconds, characters at the model's per-unit prices (dispatch/media)


def _client_error(exc: Exception) -> Failure:
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error, netguard.RefusedTarget):
        return Failure("connect", f"refused target: {exc.os_error}", public="refused target")
    if isinstance(exc, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError):
        return Failure("connect", f"cannot connect: {type(exc).__name__}", public="no connection")
    return Failure("status", f"connection failed: {type(exc).__name__}", public="connection failed")


def _gone(request: web.Request) -> bool:
    """Whether the client's connection is closed (a write then fails with ConnectionResetError)."""
    return request.transport is None or request.transport.is_closing()


def usage_tokens(usage: Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0
    return _token_count(usage.get("prompt_tokens")), _token_count(usage.get("completion_tokens"))


def _token_count(value: Any) -> int:
    """A backend's count, within what usage_records holds: one record it cannot store would stall every flush."""
    if not isinstance(value, int):
        return 0
    return min(max(value, 0), MAX_TOKENS)



@contextlib.asynccontextmanager
async def _attempting(backend: Backend, exchange: Exchange) -> AsyncIterator[None]:
    """One call to a backend that answers whole (or up to its answer's start): counted in flight, bounded by the
    backend's timeout, its client errors and timeout as the Failures that decide failover."""
    inflight = metrics.backend_inflight(backend.id)
    inflight.inc()
    waited_from = time.perf_counter()
    try:
        async with asyncio.timeout(backend.timeout_s):
            yield
    except aiohttp.ClientError as exc:
        raise _client_error(exc) from None
    except TimeoutError:
        raise Failure("timeout", f"no answer within {backend.timeout_s:g} s") from None
    finally:
        inflight.dec()
        exchange.upstream_s += time.perf_counter() - waited_from

class Dispatcher:
    """One per process: the transports (one per kind of backend), the catalogue, the breakers, and the request
    pipeline."""

    def __init__(self, settings: Settings, catalogue: CatalogueLoader, breakers: Breakers, accounting: Accounting,
                 http: HttpTransport, others: dict[str, Transport]) -> None:
        self._http = http
        self._transports = others  # by provider; every other provider speaks the OpenAI protocol over HTTP
        self.catalogue = catalogue
        self.breakers = breakers
        self._accounting = accounting
        self._connect_timeout_s = settings.dispatch.connect_timeout_s
        self._stream_timeout_s = settings.dispatch.stream_timeout_s

    # --- choosing ---

    def _transport(self, backend: Backend) -> Transport:
        return self._transports.get(backend.provider, self._http)

    def _serves(self, backend: Backend, needs: frozenset[str], now_s: float) -> bool:
        transport = self._transport(backend)
        return transport.available(backend, now_s) and not (needs and needs & transport.lacks.keys())

    def takes_requests(self, backend: Backend, tenant_id: str, now_s: float) -> bool:
        """Whether a request of this tenant could be sent to the backend now, as `_choose` and `_failover` judge it
        (for the health of GET /v1/models): its transport reaches it, its breaker is closed or due a trial, it is not
        cooling down, and a linked node serves the tenant."""
        if backend.provider == HYBRID and tenant_id not in backend.node_tenant_ids:
            return False
        return self._serves(backend, frozenset(), now_s) and self.breakers.check(backend.id, now_s) in (USABLE, TRIAL)

    async def _choose(self, model: Model, tried: set[str] | None, needs: frozenset[str]) -> Backend | None:
        """The lowest priority group with a usable backend, weighted inside it; None when none is left.

        A backend that cannot serve what the request needs, or whose transport cannot reach it now (a node that is
        unknown, stale or has not loaded the model), is passed over without counting against its breaker.
        """
        now_s = time.time()
        check = self.breakers.check
        serves = self._serves
        for group in model.groups:
            candidates = [route for route in group if (tried is None or route.backend.id not in tried)
                          and serves(route.backend, needs, now_s)]
            while candidates:
                route = candidates[0] if len(candidates) == 1 else random.choices(  # noqa: S311 (load spreading)
                    candidates, [r.weight for r in candidates])[0]
                verdict = check(route.backend.id, now_s)
                if verdict == USABLE:
                    return route.backend
                if verdict == TRIAL and await self.breakers.claim_trial(
                        route.backend.id, route.backend.timeout_s + self._connect_timeout_s):
                    return route.backend
                candidates.remove(route)
        return None

    def _unmet(self, model: Model, needs: frozenset[str]) -> errors.ScaigridError | None:
        """The client's 422 when no backend of the model can serve what the request needs, whatever its health."""
        reasons: dict[str, str] = {}
        for group in model.groups:
            for route in group:
                lacks = self._transport(route.backend).lacks
                lacking = needs & lacks.keys()
                if not lacking:
                    return None
                reasons.update((need, lacks[need]) for need in lacking)
        return errors.validation_error(
            [errors.FieldError(NEED_FIELDS[need], why) for need, why in sorted(reasons.items())],
            f"no backend of {model.slug!r} can serve this request")

    def _exhausted(self, model: Model, failure: Failure | None) -> errors.ScaigridError:
        """The client's error once no backend is left to try."""
        if failure is None:
            now_s = time.time()
            cooling = [self.breakers.cooling_until(route.backend.id) for group in model.groups for route in group
                       if self.breakers.check(route.backend.id, now_s) == COOLING]
            if cooling:
                return errors.backend_rate_limited(
                    max(1, math.ceil(min(cooling) - now_s)), f"the backends of {model.slug!r} are rate limited")
            # Say which hybrid link is down, rather than leave the operator to guess among breakers and health.
            unlinked = sorted({route.backend.node_id or "" for group in model.groups for route in group
                               if route.backend.provider == HYBRID
                               and not self._transport(route.backend).available(route.backend, now_s)})
            if unlinked:
                return errors.model_unavailable(model.slug, f"the link to node {', '.join(unlinked)} is down")
            return errors.model_unavailable(model.slug)
        if failure.kind == "timeout":
            return errors.backend_timeout(f"the backend of {model.slug!r} did not answer in time")
        if failure.kind == "rate_limited":
            return errors.backend_rate_limited(max(1, math.ceil(failure.retry_after_s)),
                                               f"the backend of {model.slug!r} is rate limited")
        if failure.kind == "shape":
            return errors.upstream_shape_mismatch(f"the backend of {model.slug!r} answered in an unexpected shape")
        return errors.backend_error(f"the backend of {model.slug!r} failed ({failure.public or failure.kind})")

    async def _report(self, backend: Backend, failure: Failure) -> None:
        """Tells the breaker how the attempt went (a refused request is the client's fault, not the backend's)."""
        if failure.kind == "rate_limited":
            await self.breakers.cool_down(backend.id, failure.retry_after_s)
        elif failure.kind == "refused":
            logger.info("backend %s refused a request: %s", backend.id, failure.detail,
                        extra={"event": "backend_refused", "backend_id": backend.id})
            await self._succeeded(backend)
        else:
            logger.warning("backend %s failed: %s", backend.id, failure.detail,
                           extra={"event": "backend_failed", "backend_id": backend.id, "kind": failure.kind})
            await self.breakers.failed(backend.id, f"{failure.kind}: {failure.detail}",
                                       f"{failure.kind}: {failure.public}" if failure.public else failure.kind)

    async def _succeeded(self, backend: Backend) -> None:
        if not self.breakers.clean(backend.id):
            await self.breakers.succeeded(backend.id)

    async def _failover(self, exchange: Exchange, needs: frozenset[str], attempt: Callable[[Backend], Awaitable[T]]
                        ) -> T:
        """`attempt` on one backend after another until one succeeds; raises the client's error when none does."""
        model = exchange.model
        if needs and (unmet := self._unmet(model, needs)) is not None:
            raise unmet
        tried: set[str] | None = None
        # A linked node knows only the users of the tenants allowed on it: nobody else's request is sent there. A
        # model whose every route is such a node is refused to this caller, as another tenant's model would be.
        tenant_id = exchange.principal.tenant_id
        foreign = {route.backend.id for group in model.groups for route in group
                   if route.backend.provider == HYBRID and tenant_id not in route.backend.node_tenant_ids}
        if foreign:
            if all(route.backend.id in foreign for group in model.groups for route in group):
                raise errors.model_access_denied(
                    f"model {model.slug!r} is served on hybrid nodes that do not serve your tenant")
            tried = foreign
        if exchange.request[TUNNELLED]:
            # A request the managed side sent down the link never goes back up it: a `managed` backend here would
            # loop it between the two sides until a timeout.
            tried = (tried or set()) | {route.backend.id for group in model.groups for route in group
                                        if route.backend.provider == MANAGED}
        failure: Failure | None = None
        while (backend := await self._choose(model, tried, needs)) is not None:
            exchange.backend = backend
            try:
                return await attempt(backend)
            except Failure as exc:
                failure = exc
                await self._report(backend, exc)
                if exc.kind == "refused":
                    # Below platform reach, never the backend's own words: a tenant's backend may be any URL.
                    why = exc.detail if exchange.principal.reach == "platform" else exc.public or "refused"
                    raise errors.validation_error(
                        [errors.FieldError("body", why)], "the backend refused the request") from None
            tried = tried or set()
            tried.add(backend.id)
        raise self._exhausted(model, failure)

    # --- non-streamed: chat completions and embeddings ---

    async def call(self, exchange: Exchange, payload: dict[str, Any], embeddings: bool) -> bytes:
        """The backend's JSON answer with the model renamed."""
        return await self._failover(exchange, request_needs(payload, embeddings),
                                    lambda backend: self._call_one(exchange, backend, payload, embeddings))

    async def _call_one(self, exchange: Exchange, backend: Backend, payload: dict[str, Any],
                        embeddings: bool) -> bytes:
        async with _attempting(backend, exchange):
            body = await self._transport(backend).fetch(backend, payload, exchange.request, embeddings)
        try:
            answer = json.loads(body)
        except ValueError:
            raise Failure("shape", "the answer is not JSON") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("data" if embeddings else "choices"), list):
            raise Failure("shape", "the answer lacks `data`" if embeddings else "the answer lacks `choices`")
        exchange.tokens_in, exchange.tokens_out = usage_tokens(answer.get("usage"))
        await self._succeeded(backend)
        return sse.rename_model(body, sse.model_field(exchange.model.slug))

    # --- images and audio (dispatch/media.py) ---

    async def relay(self, exchange: Exchange, attempt: Callable[[HttpTransport, Backend], Awaitable[T]]) -> T:
        """`attempt` with one backend after another, as chat is: failover, breakers, in-flight count and the backend's
        timeout (up to the answer's start); only backends that speak the OpenAI protocol over HTTP are chosen."""
        async def one(backend: Backend) -> T:
            transport = self._transport(backend)
            assert isinstance(transport, HttpTransport)  # the others lack MEDIA, so are never chosen
            async with _attempting(backend, exchange):
                result = await attempt(transport, backend)
            await self._succeeded(backend)
            return result

        return await self._failover(exchange, frozenset((MEDIA,)), one)

    # --- streamed chat completions ---

    async def stream(self, exchange: Exchange, payload: dict[str, Any], forward_usage: bool) -> web.StreamResponse:
        """Relays a stream from the first backend that starts one; raises (nothing sent) when none does."""
        field = sse.model_field(exchange.model.slug)
        return await self._failover(exchange, request_needs(payload, False), lambda backend: self._stream_one(
            exchange, backend, payload, sse.ChunkRelay(field, forward_usage)))

    async def _stream_one(self, exchange: Exchange, backend: Backend, payload: dict[str, Any],
                          relay: sse.ChunkRelay) -> web.StreamResponse:
        """Raises Failure while nothing was sent; once the client has frames, every ending is written to it."""
        loop = asyncio.get_running_loop()
        stream_deadline = loop.time() + self._stream_timeout_s
        inflight = metrics.backend_inflight(backend.id)
        inflight.inc()
        client: web.StreamResponse | None = None
        upstream: Upstream | None = None
        failure: Failure | None = None
        served = False
        perf_counter = time.perf_counter
        try:
            async with asyncio.timeout(backend.timeout_s) as deadline:
                waited_from = perf_counter()
                upstream = await self._transport(backend).open(backend, payload, exchange.request)
                read = upstream.read
                chunk = await read()
                exchange.upstream_s += perf_counter() - waited_from
                while chunk:
                    frames = relay.feed(chunk)
                    if frames:
                        if client is None:
                            deadline.reschedule(stream_deadline)
                            client = await self._start(exchange, backend)
                        await client.write(frames)
                    if relay.done:
                        break
                    waited_from = perf_counter()
                    chunk = await read()
                    exchange.upstream_s += perf_counter() - waited_from
                if not relay.done:
                    raise Failure("cut", "the backend closed the stream before [DONE]", public="stream cut")
                if client is None:
                    raise Failure("shape", "the stream ended without a single chunk")
                await client.write(sse.DONE_FRAME)
                # Served once [DONE] is written: a client that closes as soon as it reads it got the whole answer.
                served = exchange.answered = True
                await client.write_eof()
                # The client has everything; reading the rest lets the connection go back to the pool.
                deadline.reschedule(loop.time() + DRAIN_AFTER_DONE_S)
                while await read():
                    pass
        except (Failure, sse.ShapeError, sse.UpstreamStreamError, aiohttp.ClientError, ConnectionResetError,
                TimeoutError) as exc:
            if not served:
                failure = self._stream_failure(exc, exchange, backend, started=client is not None)
        finally:
            inflight.dec()
            if upstream is not None:
                upstream.close()
            self._count_stream(exchange, relay)  # a client that went away still pays for what it got
        if client is None:
            assert failure is not None
            raise failure
        if served:
            return client
        if failure is None:
            exchange.status = "CLIENT_CLOSED"  # not the backend's fault; nobody left to tell
            return client
        await self._break_stream(exchange, backend, client, failure)
        return client

    def _stream_failure(self, exc: Exception, exchange: Exchange, backend: Backend, started: bool
                        ) -> Failure | None:
        """What went wrong with a stream; None when it was the client that went away."""
        if isinstance(exc, Failure):
            return exc
        if isinstance(exc, sse.ShapeError):
            return Failure("shape", str(exc))
        if isinstance(exc, sse.UpstreamStreamError):
            return Failure("upstream", str(exc), public="error in its stream")
        if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
            if started:
                return Failure("timeout", f"longer than DISPATCH_STREAM_TIMEOUT_S ({self._stream_timeout_s:g} s)")
            return Failure("timeout", f"no first chunk within {backend.timeout_s:g} s")
        if started and _gone(exchange.request):
            return None
        if started or isinstance(exc, aiohttp.ClientPayloadError):
            return Failure("cut", f"the backend's stream broke off ({type(exc).__name__})", public="stream cut")
        return _client_error(exc)

    async def _break_stream(self, exchange: Exchange, backend: Backend, client: web.StreamResponse,
                            failure: Failure) -> None:
        """A stream that already started and then failed: an error frame, then [DONE], never a silent cut."""
        await self._report(backend, failure)
        exchange.status = "BACKEND_TIMEOUT" if failure.kind == "timeout" else "BACKEND_ERROR"
        logger.warning("stream from backend %s broke after it started: %s", backend.id, failure.detail,
                       extra={"event": "stream_broken", "backend_id": backend.id, "kind": failure.kind})
        message = ("the stream took longer than this node allows" if failure.kind == "timeout"
                   else "the backend's stream broke off")
        with contextlib.suppress(ConnectionResetError):
            await client.write(sse.error_frame(exchange.status, message, exchange.protocol == OAI))
            await client.write(sse.DONE_FRAME)
            await client.write_eof()

    async def _start(self, exchange: Exchange, backend: Backend) -> web.StreamResponse:
        """The client's response, opened with the first frame: from here on, no failover."""
        client = web.StreamResponse(headers=STREAM_HEADERS)
        await client.prepare(exchange.request)
        metrics.time_to_first_token(exchange.model.slug).observe(time.perf_counter() - exchange.started)
        await self._succeeded(backend)
        return client

    @staticmethod
    def _count_stream(exchange: Exchange, relay: sse.ChunkRelay) -> None:
        # Without a usage chunk from the backend, each content chunk counts as one output token.
        if relay.usage is not None:
            exchange.tokens_in, exchange.tokens_out = usage_tokens(relay.usage)
        else:
            exchange.tokens_in, exchange.tokens_out = 0, relay.content_chunks

    # --- after every request ---

    def finish(self, exchange: Exchange) -> None:
        """Metrics, and the usage record handed to accounting without waiting for its write, so that neither the
        answer nor the next request on this connection waits for it."""
        elapsed_s = time.perf_counter() - exchange.started
        model = exchange.model.slug
        backend_id = exchange.backend.id if exchange.backend is not None else None
        tenant_id = exchange.principal.tenant_id
        metrics.requests(model, exchange.status, exchange.protocol).inc()
        metrics.request_duration(model, backend_id or "").observe(elapsed_s)
        metrics.GATEWAY_OVERHEAD.observe(max(0.0, elapsed_s - exchange.upstream_s))
        if exchange.tokens_in:
            metrics.tokens(model, "in", tenant_id).inc(exchange.tokens_in)
        if exchange.tokens_out:
            metrics.tokens(model, "out", tenant_id).inc(exchange.tokens_out)
        principal = exchange.principal
        backend = exchange.backend
        backend_cost = Decimal(0) if backend is None else (
            exchange.tokens_in * backend.cost_input_per_mtok + exchange.tokens_out * backend.cost_output_per_mtok
        ) / 1_000_000
        usage = UsageRecord(
            request_id=exchange.request[REQUEST_ID], created_at_unix=exchange.created_unix,
            partner_id=principal.partner_id, tenant_id=tenant_id, user_id=principal.user_id,
            api_key_id=principal.api_key_id, model=model, backend_id=backend_id, protocol=exchange.protocol,
            status="ok" if exchange.status == "ok" else "error", tokens_in=exchange.tokens_in,
            tokens_out=exchange.tokens_out, latency_ms=int(elapsed_s * 1000),
            cost=exchange.model.cost(exchange.tokens_in, exchange.tokens_out) + exchange.unit_cost,
            backend_cost=backend_cost,
            error_code=None if exchange.status == "ok" else exchange.status, tunnelled=exchange.request[TUNNELLED])
        self._accounting.submit(usage)


async def dispatch_ctx(app: web.Application) -> AsyncIterator[None]:
    """The catalogue (loaded, then following announcements), the breakers, one upstream ClientSession, the
    ScaiInfer nodes (their directory, and a gRPC channel per node), and the hybrid link's backends (the directory of
    links with a channel per relay, and the session to the managed side)."""
    settings = app[SETTINGS]
    dispatch = settings.dispatch
    breakers = Breakers(settings, app[REDIS], app[BUS])
    loader = CatalogueLoader(app[DB], settings, app[BUS])
    loader.on_load(lambda catalogue: breakers.track(catalogue.backend_ids))
    directory = NodeDirectory(app[DB], settings.nodes, settings.dispatch.stream_timeout_s,
                              channel_credentials(settings.scaiinfer))
    loader.on_load(lambda catalogue: directory.track(catalogue.node_ids))
    links = LinkDirectory(app[REDIS], settings)
    loader.on_load(lambda catalogue: links.track(catalogue.linked_node_ids))
    # No pool limit: every client stream holds one upstream connection. Timeouts are per request (dispatch).
    # Tenants' backends connect through their own pool, whose resolver refuses what scaigrid.netguard refuses.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=dispatch.connect_timeout_s)
    guarded_resolver = None if dispatch.allow_private_targets else netguard.GuardedResolver()
    async with (aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                                      timeout=timeout) as session,
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300,
                                                                     resolver=guarded_resolver),
                                      timeout=timeout) as guarded,
                managed_session(settings, timeout) as managed, loader.running(), directory.running(),
                links.running()):
        http = HttpTransport(session, guarded)
        app[DISPATCHER] = Dispatcher(settings, loader, breakers, app[ACCOUNTING], http, {
            ANTHROPIC: AnthropicTransport(session, guarded), AZURE: AzureTransport(session, guarded),
            SCAIINFER: NodeClient(settings, directory),
            HYBRID: HybridTransport(settings, links),
            MANAGED: ManagedTransport(managed, settings)})
        try:
            yield
        finally:
            await app[ACCOUNTING].drain()
            await breakers.stop()
