"""Dependency checks shared by readiness endpoints and the gRPC health service."""

import asyncio
import logging
from collections.abc import Awaitable

import redis.asyncio as aioredis
from minio import Minio
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

logger = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 3.0


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
