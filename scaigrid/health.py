"""Dependency checks shared by readiness endpoints, the gRPC health service and bunker_proxy's S3 watch."""

import asyncio
import logging
from collections.abc import Awaitable

import redis.asyncio as aioredis
from minio import Minio
from prometheus_client import Gauge
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0
# How often the processes that watch a dependency for the alerts (grpc: database, Redis; bunker_proxy: S3) check it.
HEALTH_CHECK_INTERVAL_S = 5.0

DEPENDENCY_UP = Gauge("scaigrid_dependency_up", "1 when the last check of the dependency passed", ["dependency"])
# A server that crashed and came back between two checks leaves no failed check; its uptime going down shows it.
DEPENDENCY_UPTIME = Gauge("scaigrid_dependency_uptime_seconds", "the dependency server's own uptime at the last check",
                          ["dependency"])


async def _check(name: str, probe: Awaitable[object]) -> str:
    try:
        await asyncio.wait_for(probe, CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure of a dependency is reported, never raised
        reason = "timeout" if isinstance(exc, TimeoutError) else type(exc).__name__
        logger.warning("%s check failed: %s", name, exc, extra={"event": "health_check_failed", "check": name})
        return f"error: {reason}"
    return "ok"


async def _ping_database(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def check_database(engine: AsyncEngine) -> str:
    return await _check("database", _ping_database(engine))


async def check_redis(redis: "aioredis.Redis") -> str:
    return await _check("redis", redis.ping())


async def check_s3(s3: Minio, bucket: str) -> str:
    async def probe() -> None:
        # minio is a blocking client; keep it off the event loop.
        if not await asyncio.to_thread(s3.bucket_exists, bucket):
            raise LookupError(f"bucket {bucket} does not exist")

    return await _check("s3", probe())


async def database_uptime(engine: AsyncEngine) -> float:
    async with engine.connect() as conn:
        return float((await conn.execute(text("SHOW GLOBAL STATUS LIKE 'Uptime'"))).one()[1])


async def redis_uptime(redis: "aioredis.Redis") -> float:
    return float((await redis.info("server"))["uptime_in_seconds"])
