"""Shared plumbing of the `scaigrid admin ...` commands: settings, a database engine, one-line failures."""

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import click
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import cache
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Requirement, Settings, load_settings

T = TypeVar("T")


class AdminError(click.ClickException):
    """A refused admin command: one line on stderr, exit 1."""


def settings_of(ctx: click.Context, *needs: Requirement) -> Settings:
    settings = load_settings(env_file=ctx.obj["env_file"])
    settings.require(*needs)
    return settings


def with_database(settings: Settings, work: Callable[[AsyncEngine], Awaitable[T]]) -> T:
    async def run() -> T:
        async with database_ctx(settings) as engine:
            return await work(engine)

    return asyncio.run(run())


def announce(settings: Settings, topic: str) -> bool:
    """Tells running http processes about a change the command committed; False when Redis is unset or away."""
    if settings.redis.url is None:
        return False

    async def publish() -> bool:
        async with redis_ctx(settings) as redis:
            return await cache.announce(redis, topic)

    return asyncio.run(publish())
