"""Accounting as the request path sees it: admit a request (rate limits, budgets), record its usage."""

from aiohttp import web
from redis.asyncio import Redis

from scaigrid.accounting.records import RateState, UsageRecord
from scaigrid.auth.principal import Principal
from scaigrid.settings import Settings

RATE_STATE = web.RequestKey("rate_state", RateState)


class Accounting:
    def __init__(self, settings: Settings, redis: Redis) -> None:
        self._settings = settings
        self._redis = redis

    async def admit(self, request: web.Request, principal: Principal, *, metered: bool) -> None:
        """Counts the request against its rate limits (and, when metered, checks budgets); raises when refused.

        Sets request[RATE_STATE] whether or not the request is admitted, so even a 429 carries the headers.
        """

    async def record(self, usage: UsageRecord) -> None:
        """Buffers one usage record in Redis; the worker flushes it to MariaDB."""
