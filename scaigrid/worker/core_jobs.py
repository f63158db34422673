"""Jobs of the core (modules declare theirs on their Module)."""

from scaigrid.worker import heartbeat
from scaigrid.worker.jobs import Job


def core_jobs(heartbeat_ttl_s: int) -> tuple[Job, ...]:
    return (
        # Three beats per TTL, so one late beat never makes a live worker look dead.
        Job("worker_heartbeat", heartbeat.beat, every_s=max(1, heartbeat_ttl_s // 3), timeout_s=5, exclusive=False),
    )
