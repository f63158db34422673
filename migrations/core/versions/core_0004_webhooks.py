"""Outbound webhooks: subscriptions, the event outbox, and one delivery row per (webhook, event).

Revision ID: core_0004
Revises: core_0003
Create Date: 2026-11-26
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0004"
down_revision = "core_0003"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # The error code a failed request answered with, for request.failed events.
    op.add_column("usage_records", sa.Column("error_code", sa.String(64)))
    op.create_table(
        "webhooks",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("partner_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id"), nullable=False),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("events", sa.JSON, nullable=False),
        sa.Column("secret_encrypted", sa.Text, nullable=False),  # Fernet; the signing key must be readable
        sa.Column("description", sa.String(255)),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),  # active | disabled
        sa.Column("max_retries", sa.Integer, nullable=False, server_default="5"),
        sa.Column("consecutive_failures", sa.Integer, nullable=False, server_default="0"),
        sa.Column("disabled_reason", sa.String(255)),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Index("ix_webhooks_tenant_id", "tenant_id"),
        **TABLE_ARGS,
    )
    op.create_table(
        "webhook_events",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("partner_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("payload", sa.JSON, nullable=False),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Index("ix_webhook_events_created_at", "created_at"),
        **TABLE_ARGS,
    )
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("webhook_id", sa.String(40), sa.ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
        sa.Column("event_id", sa.String(40), sa.ForeignKey("webhook_events.id", ondelete="CASCADE"), nullable=False),
        # pending | paused (its webhook is disabled) | delivered | failed
        sa.Column("status", sa.String(16), nullable=False, server_default="pending"),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("next_attempt_at", MICROSECONDS, nullable=False),
        sa.Column("lease_until", MICROSECONDS),  # a worker holds the attempt until then
        sa.Column("last_attempt_at", MICROSECONDS),
        sa.Column("last_status_code", sa.Integer),
        sa.Column("last_error", sa.String(255)),
        sa.Column("delivered_at", MICROSECONDS),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
        sa.Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at"),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("webhook_deliveries")
    op.drop_table("webhook_events")
    op.drop_table("webhooks")
    op.drop_column("usage_records", "error_code")
