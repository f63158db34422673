"""Worker liveness: each worker keeps a Redis key with a TTL; `scaigrid check worker` looks for a fresh one."""

import time

import redis.asyncio as aioredis

from scaigrid.worker.jobs import JobContext

KEY_PREFIX = "scaigrid:worker:heartbeat:"


async def beat(ctx: JobContext) -> None:
    """Runs on every worker (not exclusive): each one proves it is alive."""
    await ctx.redis.set(KEY_PREFIX + ctx.worker_id, str(time.time()), ex=ctx.settings.worker.heartbeat_ttl_s)


async def fresh_heartbeats(redis: "aioredis.Redis") -> dict[str, float]:
    """Worker id -> age in seconds of its last heartbeat, for workers whose key has not expired."""
    now = time.time()
    ages = {}
    async for key in redis.scan_iter(match=KEY_PREFIX + "*"):
        value = await redis.get(key)
        if value is not None:
            ages[key.decode()[len(KEY_PREFIX):]] = now - float(value)
    return ages
