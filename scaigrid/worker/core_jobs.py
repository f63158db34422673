"""Jobs of the core (modules declare theirs on their Module)."""

from scaigrid.accounting.flush import flush_usage
from scaigrid.settings import Settings
from scaigrid.worker import heartbeat
from scaigrid.worker.jobs import Job


def core_jobs(settings: Settings) -> tuple[Job, ...]:
    heartbeat_ttl_s = settings.worker.heartbeat_ttl_s
    flush_interval_s = settings.limits.usage_flush_interval_s
    return (
        # Three beats per TTL, so one late beat never makes a live worker look dead.
        Job("worker_heartbeat", heartbeat.beat, every_s=max(1, heartbeat_ttl_s // 3), timeout_s=5, exclusive=False),
        # A long backlog is cut at the timeout and goes on next tick; what was committed stays flushed.
        Job("usage_flush", flush_usage, every_s=flush_interval_s, timeout_s=max(60.0, 2.0 * flush_interval_s)),
    )
