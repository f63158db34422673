"""link mode: the appliance's one link to the managed ScaiGrid (HYBRID_ROLE=node), its state, and its tunnels.

A program of its own rather than a part of the worker: workers scale out (each would open a link), and a slow
scheduled job must never delay a heartbeat.
"""

import asyncio
import logging
import os
import threading
from contextlib import AsyncExitStack

import aiohttp

from scaigrid.hybrid.link_client import LinkClient
from scaigrid.hybrid.tunnel import LOCAL_CONNECT_TIMEOUT_S
from scaigrid.lifecycle import background, wait_for_stop_signal
from scaigrid.metrics import metrics_site_ctx
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Requirement, Settings

logger = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = ("hybrid_node", "database", "redis", "service_token")
LINK_STOP_MARGIN_S = 10.0  # beyond the tunnels' grace; every step of the link's close is bounded well within it


def _leave() -> None:
    """Ends a stop that did not finish in time; nothing of ours is lost (usage stays in the outbox)."""
    logger.error("the link did not close within %g s of the tunnels' grace; leaving without it", LINK_STOP_MARGIN_S,
                 extra={"event": "stop_forced"})
    os._exit(0)


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
            # Rarely (seen under heavy load, cause not found) the loop ends up waiting on something that never
            # completes once the stop began; a thread, not the loop, bounds the stop so the process always leaves.
            watchdog = threading.Timer(server.http_drain_grace_s + LINK_STOP_MARGIN_S, _leave)
            watchdog.daemon = True
            watchdog.start()
            # Tunnels are HTTP requests of this node: they get the http process's drain grace.
            finished, cut = await client.drain(server.http_drain_grace_s)
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
        await client.forget_state()
    watchdog.cancel()
    logger.info("stopped: %d tunnel(s) finished, %d cut; link closed", finished, cut,
                extra={"event": "stopped", "finished": finished, "cut": cut})
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(serve(settings))
