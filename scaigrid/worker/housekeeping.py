"""Housekeeping jobs of the core: old usage records, audit log entries and long-dead API keys are deleted in small
batches."""

import logging
from datetime import timedelta

from sqlalchemy import Select, delete, or_, select

from scaigrid.clock import utc_now
from scaigrid.db import delete_in_batches
from scaigrid.db.tables import api_keys, audit_log, budgets, hybrid_relayed_requests, usage_records
from scaigrid.worker.jobs import JobContext

logger = logging.getLogger(__name__)


def _total_budget_scopes(scope: str) -> Select[tuple[str]]:
    return select(budgets.c.scope_id).where(budgets.c.period == "total", budgets.c.scope == scope)


async def purge_usage(ctx: JobContext) -> None:
    """Daily, at a quiet hour: usage older than USAGE_RETENTION_DAYS leaves MariaDB. Cut at the timeout, it goes on
    at the next run.

    Usage of a partner, tenant or user with a `total` budget stays while that budget exists: after Redis lost its
    counters, a total budget is counted again from every record of its scope, and a purged record would be spend
    it no longer sees. Budgets of shorter periods only read their current period, well within any retention.
    """
    days = ctx.settings.worker.usage_retention_days
    u = usage_records.c
    deleted = await delete_in_batches(ctx.engine, delete(usage_records).where(
        u.created_at < utc_now() - timedelta(days=days),
        u.partner_id.not_in(_total_budget_scopes("partner")), u.tenant_id.not_in(_total_budget_scopes("tenant")),
        or_(u.user_id.is_(None), u.user_id.not_in(_total_budget_scopes("user")))))
    logger.info("deleted %d usage record(s) older than %d days", deleted, days,
                extra={"event": "usage_purged", "count": deleted})
    # The ids relayed to hybrid nodes guard usage records: they go when such records would.
    await delete_in_batches(ctx.engine, delete(hybrid_relayed_requests).where(
        hybrid_relayed_requests.c.created_at < utc_now() - timedelta(days=days)))


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


async def purge_audit_log(ctx: JobContext) -> None:
    """Daily, at a quiet hour, like usage: audit log entries older than AUDIT_RETENTION_DAYS are deleted (an export,
    GET /v1/audit-log/export, keeps them longer elsewhere). Cut at the timeout, it goes on at the next run."""
    days = ctx.settings.worker.audit_retention_days
    deleted = await delete_in_batches(ctx.engine, delete(audit_log).where(
        audit_log.c.created_at < utc_now() - timedelta(days=days)))
    logger.info("deleted %d audit log entries older than %d days", deleted, days,
                extra={"event": "audit_log_purged", "count": deleted})
