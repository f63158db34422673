"""A test module with a job that counts its runs per tick, a slow streaming route to drain against, and a route for
signed-in callers (switched off per tenant: MODULE_NOT_ENABLED)."""

import asyncio

from aiohttp import web

from scaigrid.access import public, requires
from scaigrid.appkeys import PRINCIPAL
from scaigrid.envelope import ok
from scaigrid.modules import Module, Permission
from scaigrid.worker.jobs import Job, JobContext

TICKS_KEY = "probe:ticks"  # hash: tick -> number of runs of that tick (must be 1)
RUNNERS_KEY = "probe:runners"  # set of worker ids that ran at least one tick


async def count_tick(ctx: JobContext) -> None:
    await ctx.redis.hincrby(TICKS_KEY, str(ctx.tick), 1)
    await ctx.redis.sadd(RUNNERS_KEY, ctx.worker_id)


@public
async def slow_stream(request: web.Request) -> web.StreamResponse:
    """Streams one SSE line every 0.2 s for `seconds` seconds, then a final line."""
    seconds = float(request.query.get("seconds", "2"))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for i in range(int(seconds / 0.2)):
        await response.write(f"data: {i}\n\n".encode())
        await asyncio.sleep(0.2)  # the stream's pace is what this route offers, not an ordering wait
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


@requires("modules:use")
async def whoami(request: web.Request) -> web.Response:
    """The caller's tenant: what a module's own route answers while the module is on for it."""
    return ok({"tenant_id": request[PRINCIPAL].tenant_id})


MODULE = Module(
    id="probe",
    routes=[web.get("/slow", slow_stream), web.get("/whoami", whoami)],
    jobs=[Job("probe_count_tick", count_tick, every_s=1, timeout_s=5)],
    permissions=(Permission("probe:ticks:manage", "Manage ticks", "count the worker's ticks"),),
    display_name="Probe",
    version="0.1.0",
    description="test module: counts worker ticks, streams slowly, answers signed-in callers",
)
