"""Jobs of the core (modules declare theirs on their Module)."""

from scaigrid.accounting.flush import flush_usage
from scaigrid.nodes.registry import sweep_node_status
from scaigrid.settings import Settings
from scaigrid.webhooks import delivery as webhook_delivery
from scaigrid.worker import heartbeat, housekeeping
from scaigrid.worker.jobs import Job


def core_jobs(settings: Settings) -> tuple[Job, ...]:
    heartbeat_ttl_s = settings.worker.heartbeat_ttl_s
    flush_interval_s = settings.limits.usage_flush_interval_s
    courier = webhook_delivery.Courier()  # the process's delivery client, kept across polls
    return (
        # Three beats per TTL, so one late beat never makes a live worker look dead.
        Job("worker_heartbeat", heartbeat.beat, every_s=max(1, heartbeat_ttl_s // 3), timeout_s=5, exclusive=False),
        # A long backlog is cut at the timeout and goes on next tick; what was committed stays flushed.
        Job("usage_flush", flush_usage, every_s=flush_interval_s, timeout_s=max(60.0, 2.0 * flush_interval_s)),
        Job("usage_retention", housekeeping.purge_usage, cron="17 3 * * *", timeout_s=600),
        Job("audit_retention", housekeeping.purge_audit_log, cron="29 3 * * *", timeout_s=600),
        Job("api_key_purge", housekeeping.purge_api_keys, cron="41 * * * *", timeout_s=120),
        # Every worker polls (not exclusive): SKIP LOCKED claims with a lease keep them from sending an attempt twice.
        Job("webhook_delivery", courier.deliver, every_s=settings.webhooks.poll_interval_s, timeout_s=120,
            exclusive=False, cleanup=courier.close),
        Job("webhook_purge", webhook_delivery.purge_old, cron="23 * * * *", timeout_s=600),
        Job("node_staleness_sweep", sweep_node_status, every_s=max(1, int(settings.nodes.warning_after_s // 3)),
            timeout_s=30),
    )
