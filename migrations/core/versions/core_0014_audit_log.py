"""The audit log: one row per administrative change (POST, PUT, PATCH, DELETE on /v1/ but inference), who, what,
the outcome, and the object after (and before, where the route has it).

Revision ID: core_0014
Revises: core_0013
Create Date: 2027-01-15
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0014"
down_revision = "core_0013"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "audit_log",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("actor_type", sa.String(16), nullable=False),  # user | service | webhook
        sa.Column("actor_id", sa.String(191)),
        sa.Column("actor_email", sa.String(320)),
        sa.Column("actor_partner_id", sa.String(40)),
        sa.Column("actor_tenant_id", sa.String(40)),
        sa.Column("api_key_id", sa.String(40)),
        sa.Column("action", sa.String(96), nullable=False),
        sa.Column("resource_type", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(191)),
        # Whose object it is (who may read the entry): NULL tenant = a platform-wide object.
        sa.Column("partner_id", sa.String(40)),
        sa.Column("tenant_id", sa.String(40)),
        sa.Column("status", sa.String(8), nullable=False),  # SUCCESS | FAILURE
        sa.Column("http_status", sa.Integer, nullable=False),
        sa.Column("error_code", sa.String(64)),
        sa.Column("method", sa.String(8), nullable=False),
        sa.Column("path", sa.String(1024), nullable=False),
        sa.Column("ip", sa.String(64)),
        sa.Column("user_agent", sa.String(512)),
        sa.Column("before", sa.JSON),
        sa.Column("after", sa.JSON),
        **TABLE_ARGS,
    )
    # One by one, in this order: indexes given to create_table are created in a set's order, which differs between
    # runs, and so would SHOW CREATE TABLE.
    op.create_index("ix_audit_log_created_at", "audit_log", ["created_at"])
    op.create_index("ix_audit_log_tenant_time", "audit_log", ["tenant_id", "created_at"])
    op.create_index("ix_audit_log_partner_time", "audit_log", ["partner_id", "created_at"])


def downgrade() -> None:
    op.drop_table("audit_log")
