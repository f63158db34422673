"""ScaiInfer nodes: one row per node, upserted by every heartbeat the grpc mode receives.

Revision ID: core_0003
Revises: core_0002
Create Date: 2026-11-26
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0003"
down_revision = "core_0002"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "infra_nodes",
        sa.Column("id", sa.String(64), primary_key=True),  # the node's own id, as in scaiinfer:<node>/<model>
        sa.Column("endpoint", sa.String(255), nullable=False),  # host:port of its InferenceService
        sa.Column("models", sa.JSON, nullable=False),  # loaded model names
        sa.Column("capacity", sa.Integer, nullable=False, server_default="0"),
        sa.Column("load", sa.Integer, nullable=False, server_default="0"),
        sa.Column("version", sa.String(64)),
        sa.Column("status", sa.String(16), nullable=False, server_default="healthy"),  # healthy | warning | stale
        sa.Column("registered_at", MICROSECONDS, nullable=False),
        sa.Column("last_heartbeat_at", MICROSECONDS, nullable=False),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("infra_nodes")
