"""In-process caches kept honest across http processes: changes are announced on one Redis pub/sub channel.

A writer calls `announce(redis, topic, key)` after committing; every process's `InvalidationBus` calls the
handlers registered for that topic with the key. When the subscription drops (Redis restart, network), a
process may have missed messages, so on every (re)subscribe each handler is called with key None: drop all.
"""

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import redis.asyncio as aioredis
from aiohttp import web
from redis.exceptions import RedisError

from scaigrid.appkeys import BUS
from scaigrid.lifecycle import background
from scaigrid.resources import off_master

logger = logging.getLogger(__name__)

CHANNEL = "scaigrid:invalidate"
RESUBSCRIBE_DELAY_S = 0.5

Handler = Callable[[str | None], None]


async def announce(redis: aioredis.Redis, topic: str, key: str = "") -> bool:
    """Tells every process to forget `key` of `topic` (empty key: the whole topic), after a committed change.

    A Redis failure is logged and returns False, never raises: the change itself is stored, processes that lost
    Redis too drop their caches when they resubscribe, and the others' entries expire on their own.
    """
    try:
        await redis.publish(CHANNEL, f"{topic}:{key}")
    except RedisError as exc:
        logger.warning("change stored but not announced (%s): other processes keep their cached %s until it "
                       "expires or they resubscribe", type(exc).__name__, topic,
                       extra={"event": "announce_failed", "topic": topic})
        return False
    return True


class InvalidationBus:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Handler]] = {}
        self.subscribed = asyncio.Event()

    def on(self, topic: str, handler: Handler) -> None:
        self._handlers.setdefault(topic, []).append(handler)

    def _drop_all(self) -> None:
        for handlers in self._handlers.values():
            for handler in handlers:
                handler(None)

    def dispatch(self, message: str) -> None:
        topic, _, key = message.partition(":")
        for handler in self._handlers.get(topic, ()):
            handler(key or None)

    async def listen(self, redis: aioredis.Redis) -> None:
        """Runs until cancelled, resubscribing after any failure."""
        while True:
            try:
                async with redis.pubsub() as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self._drop_all()  # whatever was announced while we were not listening
                    self.subscribed.set()
                    while True:
                        # A read timeout of its own: the client's socket timeout would end an idle subscription.
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                        if off_master(redis.connection_pool, pubsub.connection):
                            # Sentinel moved the master: what is published there never reaches us here.
                            raise ConnectionError("the Redis master moved")
                        if message is not None:
                            data = message["data"]
                            self.dispatch(data.decode() if isinstance(data, bytes) else data)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.subscribed.is_set():
                    logger.warning("cache invalidation channel lost (%s); caches dropped until it is back",
                                   type(exc).__name__, extra={"event": "invalidation_lost"})
                self.subscribed.clear()
                self._drop_all()
                await asyncio.sleep(RESUBSCRIBE_DELAY_S)


def bus_ctx(redis_key: web.AppKey[aioredis.Redis]) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        async with background(app[BUS].listen(app[redis_key]), "invalidation-bus"):
            yield

    return ctx
