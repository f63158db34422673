"""Hybrid link: the request ids the managed side relayed to nodes, so a node cannot report usage under them.

Revision ID: core_0009
Revises: core_0008
Create Date: 2026-12-10
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0009"
down_revision = "core_0008"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "hybrid_relayed_requests",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("node_id", sa.String(40), nullable=False),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Index("ix_hybrid_relayed_requests_created_at", "created_at"),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("hybrid_relayed_requests")
