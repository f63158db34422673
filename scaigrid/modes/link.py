"""link mode: the appliance's one link to the managed ScaiGrid (HYBRID_ROLE=node), its state, and its tunnels.

A program of its own rather than a part of the worker: workers scale out (each would open a link), and a slow
scheduled job must never delay a heartbeat.
"""

import asyncio
import logging
from collections.abc import Awaitable
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp

from scaigrid.hybrid.link_client import LinkClient
from scaigrid.hybrid.tunnel import LOCAL_CONNECT_TIMEOUT_S
from scaigrid.lifecycle import background, wait_for_stop_signal
from scaigrid.metrics import metrics_site_ctx
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Requirement, Settings

logger = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = ("hybrid_node", "database", "redis", "service_token")
EXIT_STOP_FORCED = 1  # the stop overran its deadline: what was still running was cut
CUT_WAIT_S = 1.0  # how long a forced stop waits for the cut step to end (supervisord waits 15 s past the grace)


@dataclass
class Progress:
    """Where the link mode is, for the line a forced stop logs."""

    step: str = "starting"
    client: LinkClient | None = None


async def _link(settings: Settings, stop: Awaitable[str], progress: Progress) -> tuple[int, int]:
    """Holds the link until `stop`, then drains its tunnels and closes it: (tunnels finished, tunnels cut)."""
    server = settings.server
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(database_ctx(settings))
        redis = await stack.enter_async_context(redis_ctx(settings))
        await stack.enter_async_context(metrics_site_ctx(server.bind_host, server.link_metrics_port))
        # No total timeout: a tunnelled stream lasts as long as the node's own dispatch settings allow.
        http = await stack.enter_async_context(aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=LOCAL_CONNECT_TIMEOUT_S)))
        client = progress.client = LinkClient(settings, engine, redis, http)
        async with background(client.publish_state(), "link-state"):
            link = asyncio.create_task(client.run(), name="link")
            logger.info("linking node %s to %s", settings.hybrid.node_id, settings.hybrid.link_target,
                        extra={"event": "started", "target": settings.hybrid.link_target})
            progress.step = "linked"
            await stop
            # Tunnels are HTTP requests of this node: they get the http process's drain grace.
            progress.step = "draining the tunnels"
            finished, cut = await client.drain(server.http_drain_grace_s)
            progress.step = "closing the link"
            link.cancel()
            await asyncio.gather(link, return_exceptions=True)
            progress.step = "stopping the state publisher"
        progress.step = "removing the link state"
        await client.forget_state()
        progress.step = "closing the database, Redis and metrics"
    return finished, cut


async def serve(settings: Settings) -> int:
    stop = asyncio.ensure_future(wait_for_stop_signal())
    progress = Progress()
    linked = asyncio.create_task(_link(settings, stop, progress), name="link-mode")
    await asyncio.wait({stop, linked}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.done():  # the mode ended before any signal, which it awaits: it failed to start
        stop.cancel()
        await asyncio.wait({stop})
        linked.result()  # raises why
    # Every step of the stop is bounded on its own, yet under heavy load the loop was seen waiting, without end, on
    # something that never completed once the stop began (most likely a gRPC operation ignoring its cancellation).
    # asyncio.wait, not wait_for: on its timeout wait_for would wait for the stuck step to take its cancellation.
    margin_s = settings.hybrid.link_stop_margin_s
    done, _ = await asyncio.wait({linked}, timeout=settings.server.http_drain_grace_s + margin_s)
    if not done:
        tunnels = progress.client.state().tunnels_in_flight if progress.client else 0
        logger.error("stop forced: %s did not end within %g s of the tunnels' grace; cut it (%d tunnel(s) open)",
                     progress.step, margin_s, tunnels,
                     extra={"event": "stop_forced", "step": progress.step, "tunnels_open": tunnels})
        # A step that takes its cancellation still closes what the mode opened; one that does not is left behind.
        linked.cancel()
        await asyncio.wait({linked}, timeout=CUT_WAIT_S)
        return EXIT_STOP_FORCED
    finished, cut = linked.result()
    logger.info("stopped: %d tunnel(s) finished, %d cut; link closed", finished, cut,
                extra={"event": "stopped", "finished": finished, "cut": cut})
    return 0


def run(settings: Settings) -> int:
    # Not asyncio.run: after a forced stop its teardown would wait, again without end, for the stuck step to take
    # its cancellation. Closing the loop leaves it behind, and the process exits.
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(serve(settings))
    finally:
        loop.close()
