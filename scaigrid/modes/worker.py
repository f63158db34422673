"""worker mode: scheduled jobs of the core and the enabled modules; each exclusive tick runs on one worker only."""

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime

import redis.asyncio as aioredis
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid.lifecycle import finish_within, wait_for_stop_signal
from scaigrid.metrics import metrics_site_ctx
from scaigrid.modules import load_modules
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Requirement, Settings
from scaigrid.worker import heartbeat
from scaigrid.worker.core_jobs import core_jobs
from scaigrid.worker.jobs import Job, JobContext

logger = logging.getLogger(__name__)

REQUIRES: tuple[Requirement, ...] = ("database", "redis")
TICK_LOCK_PREFIX = "scaigrid:job:"
# Interval triggers count from this instant, so every worker's ticks fall on the same wall-clock times.
EPOCH = datetime(2000, 1, 1, tzinfo=UTC)

JOB_RUNS = Counter("scaigrid_job_runs_total", "job ticks by outcome", ["job", "outcome"])
JOB_DURATION = Histogram("scaigrid_job_duration_seconds", "duration of job runs", ["job"])
JOB_LAST_SUCCESS = Gauge("scaigrid_job_last_success_timestamp_seconds", "unix time of the job's last successful run",
                         ["job"])


class JobRunner:
    """Runs job ticks: takes the tick's lock when the job is exclusive, applies the timeout, counts outcomes."""

    def __init__(self, settings: Settings, engine: AsyncEngine, redis: "aioredis.Redis", worker_id: str) -> None:
        self.settings, self.engine, self.redis, self.worker_id = settings, engine, redis, worker_id
        self.running: set[asyncio.Task[None]] = set()

    def runner_for(self, job: Job) -> Callable[[], Awaitable[None]]:
        async def tick() -> None:
            task = asyncio.current_task()
            assert task is not None  # APScheduler runs coroutine jobs as tasks
            self.running.add(task)
            try:
                await self.run(job, job.tick_for(time.time()))
            finally:
                self.running.discard(task)

        return tick

    async def run(self, job: Job, tick: int) -> str:
        """Runs one tick of the job; returns its outcome (ok, error, timeout, taken_by_other_worker)."""
        if job.exclusive:
            # The lock outlives the run, so a slower worker reaching the same tick later still skips it.
            lock_ttl_s = max(2 * job.period_s, int(job.timeout_s) + 1)
            key = f"{TICK_LOCK_PREFIX}{job.name}:{tick}"
            if not await self.redis.set(key, self.worker_id, nx=True, ex=lock_ttl_s):
                JOB_RUNS.labels(job.name, "taken_by_other_worker").inc()
                return "taken_by_other_worker"
        ctx = JobContext(self.settings, self.engine, self.redis, self.worker_id, tick)
        started = time.perf_counter()
        outcome = "ok"
        try:
            await asyncio.wait_for(job.func(ctx), job.timeout_s)
        except TimeoutError:
            outcome = "timeout"
            logger.error("job %s timed out after %g s", job.name, job.timeout_s,
                         extra={"event": "job_timeout", "job": job.name, "tick": tick})
        except Exception:
            outcome = "error"
            logger.exception("job %s failed", job.name, extra={"event": "job_failed", "job": job.name, "tick": tick})
        else:
            JOB_LAST_SUCCESS.labels(job.name).set(time.time())
            logger.debug("job %s ran", job.name, extra={"event": "job_ran", "job": job.name, "tick": tick})
        finally:
            JOB_RUNS.labels(job.name, outcome).inc()
            JOB_DURATION.labels(job.name).observe(time.perf_counter() - started)
        return outcome

    async def finish(self, grace_s: float) -> tuple[int, int]:
        """Gives running ticks grace_s to end, then cancels the rest; returns (finished, cut)."""
        return await finish_within(set(self.running), grace_s)


def trigger_for(job: Job) -> IntervalTrigger | CronTrigger:
    if job.every_s is not None:
        return IntervalTrigger(seconds=job.every_s, start_date=EPOCH, timezone=UTC)
    assert job.cron is not None  # Job.__post_init__ guarantees one of the two
    return CronTrigger.from_crontab(job.cron, timezone=UTC)


def all_jobs(settings: Settings) -> list[Job]:
    """The core's jobs and those of every enabled module."""
    return [*core_jobs(settings), *(job for m in load_modules(settings.modules) for job in m.jobs)]


async def run_once(settings: Settings, job: Job) -> str:
    """One run of `job` now, as the scheduler would run it (same tick lock): `scaigrid job run NAME`."""
    async with database_ctx(settings) as engine, redis_ctx(settings) as redis:
        runner = JobRunner(settings, engine, redis, f"{socket.gethostname()}:{os.getpid()}:cli")
        try:
            return await runner.run(job, job.tick_for(time.time()))
        finally:
            if job.cleanup is not None:
                await job.cleanup()


async def serve(settings: Settings) -> int:
    jobs = all_jobs(settings)
    worker_id = f"{socket.gethostname()}:{os.getpid()}"
    async with AsyncExitStack() as stack:
        engine = await stack.enter_async_context(database_ctx(settings))
        redis = await stack.enter_async_context(redis_ctx(settings))
        await stack.enter_async_context(
            metrics_site_ctx(settings.server.bind_host, settings.server.worker_metrics_port))
        runner = JobRunner(settings, engine, redis, worker_id)
        # Beat once now, so `scaigrid check worker` passes as soon as the worker is up.
        await heartbeat.beat(JobContext(settings, engine, redis, worker_id, int(time.time())))

        scheduler = AsyncIOScheduler(timezone=UTC)
        for job in jobs:
            scheduler.add_job(runner.runner_for(job), trigger_for(job), id=job.name, name=job.name,
                              coalesce=True, max_instances=1, misfire_grace_time=max(1, job.period_s // 2))
        scheduler.start()
        logger.info("worker %s running %d job(s): %s", worker_id, len(jobs), ", ".join(j.name for j in jobs),
                    extra={"event": "worker_started", "jobs": [j.name for j in jobs]})

        await wait_for_stop_signal()
        scheduler.shutdown(wait=False)
        finished, cut = await runner.finish(settings.worker.stop_grace_s)
        for job in jobs:
            if job.cleanup is not None:
                await job.cleanup()
        await redis.delete(heartbeat.KEY_PREFIX + worker_id)
        logger.info("stopped: %d running job(s) finished, %d cut", finished, cut,
                    extra={"event": "stopped", "finished": finished, "cut": cut})
    return 0


def run(settings: Settings) -> int:
    return asyncio.run(serve(settings))
