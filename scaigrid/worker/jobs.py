"""Scheduled jobs as data: each declared once with its schedule, timeout and whether it runs once per tick."""

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.settings import Settings


@dataclass(frozen=True)
class JobContext:
    """What a job run gets: explicit resources, and the tick (scheduled time, unix seconds) it runs for."""

    settings: Settings
    engine: AsyncEngine
    redis: "aioredis.Redis"
    worker_id: str
    tick: int


@dataclass(frozen=True)
class Job:
    name: str
    func: Callable[[JobContext], Awaitable[None]]
    every_s: int | None = None  # fires at multiples of every_s since the epoch, so all workers agree on ticks
    cron: str | None = None  # five-field crontab, minute resolution
    timeout_s: float = 60.0
    exclusive: bool = True  # one run per tick across all workers, decided by a Redis lock
    # Awaited once when the process that ran the job is done with it: releases what runs kept (a client, say).
    cleanup: Callable[[], Awaitable[None]] | None = None

    def __post_init__(self) -> None:
        if (self.every_s is None) == (self.cron is None):
            raise ValueError(f"job {self.name}: give exactly one of every_s and cron")

    @property
    def period_s(self) -> int:
        return self.every_s or 60

    def tick_for(self, now_s: float) -> int:
        """The scheduled time this run belongs to: the tick nearest to now.

        Nearest, not latest: a timer that fires a millisecond early must not be taken for the previous
        tick (which has run already and would make this one be skipped). Runs later than half a period
        are dropped by the scheduler's misfire grace, so nearest is always right.
        """
        return round(now_s / self.period_s) * self.period_s
