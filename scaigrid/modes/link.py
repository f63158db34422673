"""link mode: the appliance's one link to the managed ScaiGrid (HYBRID_ROLE=node), its state, and its tunnels.

A program of its own rather than a part of the worker: workers scale out (each would open a link), and a slow
scheduled job must never delay a heartbeat.
"""

import asyncio
import logging
import os
from contextlib import AsyncExitStack

import aiohttp

from scaigrid.hybrid.link_client import LinkClient
from scaigrid.hybrid.tunnel import LOCAL_CONNECT_TIMEOUT_S
from scaigrid.lifecycle import background, wait_for_stop_signal
from scaigrid.metrics import metrics_site_ctx
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

REQUIRES = ("hybrid_node", "database", "redis", "service_token")
LINK_STOP_TIMEOUT_S = 10.0  # every step of the link's close is bounded well within this


async def serve(settings: Settings) -> int:
    server = settings.server
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(database_ctx(settings))
        redis = await stack.enter_async_context(redis_ctx(settings))
        await stack.enter_async_context(metrics_site_ctx(server.bind_host, server.link_metrics_port))
        # No total timeout: a tunnelled stream lasts as long as the node's own dispatch settings allow.
        http = await stack.enter_async_context(aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=LOCAL_CONNECT_TIMEOUT_S)))
        client = LinkClient(settings, engine, redis, http)
        async with background(client.publish_state(), "link-state"):
            link = asyncio.create_task(client.run(), name="link")
            logger.info("linking node %s to %s", settings.hybrid.node_id, settings.hybrid.link_target,
                        extra={"event": "started", "target": settings.hybrid.link_target})
            await wait_for_stop_signal()
            # Tunnels are HTTP requests of this node: they get the http process's drain grace.
            finished, cut = await client.drain(server.http_drain_grace_s)
            link.cancel()
            if not (await asyncio.wait({link}, timeout=LINK_STOP_TIMEOUT_S))[0]:
                # A gRPC operation that never takes its cancellation must not keep the process from stopping
                # (supervisord would only kill it after stopwaitsecs); nothing of ours is lost by leaving now.
                logger.error("the link did not close within %g s of the stop; leaving without it",
                             LINK_STOP_TIMEOUT_S, extra={"event": "stopped", "finished": finished, "cut": cut})
                os._exit(0)
        await client.forget_state()
    logger.info("stopped: %d tunnel(s) finished, %d cut; link closed", finished, cut,
                extra={"event": "stopped", "finished": finished, "cut": cut})
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(serve(settings))
