"""grpc mode: scaiinfer.v1 HeartbeatService on GRPC_PORT, standard health (following DB and Redis) and reflection;
with HYBRID_ROLE=managed also the hybrid link (HybridLink, and TunnelRelay for the http processes)."""

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.health import (
    CHECK_TIMEOUT_S,
    DEPENDENCY_UP,
    DEPENDENCY_UPTIME,
    HEALTH_CHECK_INTERVAL_S,
    check_database,
    check_redis,
    database_uptime,
    redis_uptime,
)
from scaigrid.hybrid.link_server import HeldLinks, HybridLinkServicer, NotManagedLinkServicer, TunnelRelayServicer
from scaigrid.lifecycle import wait_for_stop_signal
from scaigrid.metrics import metrics_site_ctx
from scaigrid.nodes.servicer import HeartbeatServicer
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.rpc.generated.scaigrid.hybrid.v1 import link_pb2, link_pb2_grpc
from scaigrid.rpc.generated.scaiinfer.v1 import scaiinfer_pb2, scaiinfer_pb2_grpc
from scaigrid.rpc.interceptors import ServiceInterceptor
from scaigrid.settings import Requirement, Settings

logger = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = ("database", "redis")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

async def _follow_dependencies(servicer: health.aio.HealthServicer, engine: AsyncEngine,
                               redis: "aioredis.Redis") -> None:
    """Keeps the overall ("") health status in step with the database and Redis."""
    last = None
    while True:
        results = {"database": await check_database(engine), "redis": await check_redis(redis)}
        for name, result in results.items():
            DEPENDENCY_UP.labels(name).set(result == "ok")
        uptimes: dict[str, Callable[[], Awaitable[float]]] = {
            "database": lambda: database_uptime(engine), "redis": lambda: redis_uptime(redis)}
        for name, uptime in uptimes.items():
            if results[name] == "ok":
                with contextlib.suppress(Exception):  # down meanwhile: the next check says so
                    DEPENDENCY_UPTIME.labels(name).set(await asyncio.wait_for(uptime(), CHECK_TIMEOUT_S))
        status = SERVING if all(r == "ok" for r in results.values()) else NOT_SERVING
        if status != last:
            logger.info("health: %s %s", health_pb2.HealthCheckResponse.ServingStatus.Name(status), results,
                        extra={"event": "health_changed", "checks": results})
            await servicer.set("", status)
            last = status
        await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)


async def serve(settings: Settings) -> int:
    server_settings = settings.server
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(database_ctx(settings))
        redis = await stack.enter_async_context(redis_ctx(settings))
        await stack.enter_async_context(
            metrics_site_ctx(server_settings.bind_host, server_settings.grpc_metrics_port))

        server = grpc.aio.server(interceptors=[ServiceInterceptor(settings.auth.service_token_secret)])
        servicer = health.aio.HealthServicer()
        # grpc's servicer starts out SERVING; this one serves only once its dependencies were checked.
        await servicer.set("", NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        scaiinfer_pb2_grpc.add_HeartbeatServiceServicer_to_server(HeartbeatServicer(engine, settings), server)
        services = [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                    scaiinfer_pb2.DESCRIPTOR.services_by_name["HeartbeatService"].full_name]
        held = None
        if settings.hybrid.role == "managed":
            held = HeldLinks(engine, redis, settings)
            link_pb2_grpc.add_HybridLinkServicer_to_server(HybridLinkServicer(held), server)
            link_pb2_grpc.add_TunnelRelayServicer_to_server(TunnelRelayServicer(held), server)
            services += [link_pb2.DESCRIPTOR.services_by_name[name].full_name for name in ("HybridLink", "TunnelRelay")]
        else:
            link_pb2_grpc.add_HybridLinkServicer_to_server(NotManagedLinkServicer(), server)
        reflection.enable_server_reflection((*services, reflection.SERVICE_NAME), server)
        address = f"{server_settings.bind_host}:{server_settings.grpc_port}"
        server.add_insecure_port(address)
        await server.start()
        follower = asyncio.create_task(_follow_dependencies(servicer, engine, redis))
        logger.info("listening on %s", address, extra={"event": "listening", "port": server_settings.grpc_port})

        await wait_for_stop_signal()
        follower.cancel()
        # Health turns NOT_SERVING first, so clients stop picking this server while its RPCs finish.
        await servicer.enter_graceful_shutdown()
        # Links end at once, not after the grace: each node links again to another replica within its backoff, so
        # its traffic moves on in about a second. The price is the tunnels in flight here (a request cannot move
        # to another link): they end with LINK_LOST. Waiting for them would refuse new ones for the whole grace.
        links, tunnels = held.close_all() if held is not None else (0, 0)
        await server.stop(server_settings.grpc_stop_grace_s)
        logger.info("stopped after a grace of up to %g s; %d hybrid link(s) ended, %d tunnel(s) cut",
                    server_settings.grpc_stop_grace_s, links, tunnels,
                    extra={"event": "stopped", "hybrid_links": links, "tunnels_cut": tunnels})
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(serve(settings))
