"""Housekeeping jobs of the core: old usage records and long-dead API keys are deleted in small batches."""

import logging
from datetime import timedelta

from sqlalchemy import delete, or_

from scaigrid.auth.bodies import utc_now
from scaigrid.db import delete_in_batches
from scaigrid.db.tables import api_keys, usage_records
from scaigrid.worker.jobs import JobContext

logger = logging.getLogger(__name__)


async def purge_usage(ctx: JobContext) -> None:
    """Daily, at a quiet hour: usage older than USAGE_RETENTION_DAYS leaves MariaDB (budgets and summaries of
    shorter periods never read it). Cut at the timeout, it goes on at the next run."""
    days = ctx.settings.worker.usage_retention_days
    deleted = await delete_in_batches(ctx.engine, delete(usage_records).where(
        usage_records.c.created_at < utc_now() - timedelta(days=days)))
    logger.info("deleted %d usage record(s) older than %d days", deleted, days,
                extra={"event": "usage_purged", "count": deleted})


async def purge_api_keys(ctx: JobContext) -> None:
    """Hourly: keys expired or revoked more than API_KEY_RETENTION_DAYS ago are deleted. They were refused from
    the moment they expired or were revoked; keeping them that long lets an operator still see why a client
    fails. Usage keeps the key id, so old records still say which key made them."""
    days = ctx.settings.worker.api_key_retention_days
    cutoff = utc_now() - timedelta(days=days)
    deleted = await delete_in_batches(ctx.engine, delete(api_keys).where(
        or_(api_keys.c.expires_at < cutoff, api_keys.c.revoked_at < cutoff)))
    if deleted:
        logger.info("deleted %d API key(s) expired or revoked more than %d days ago", deleted, days,
                    extra={"event": "api_keys_purged", "count": deleted})
