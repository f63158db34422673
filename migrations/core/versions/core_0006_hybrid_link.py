"""Hybrid link: which tenants each node may serve and its snapshot version (managed side); the applied snapshot,
what it mirrored, and the usage outbox (node side).

Revision ID: core_0006
Revises: core_0005
Create Date: 2026-11-27
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0006"
down_revision = "core_0005"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps, LONGTEXT for whole snapshots.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")


def upgrade() -> None:
    # Managed side.
    op.create_table(
        "hybrid_node_tenants",
        sa.Column("node_id", sa.String(40), sa.ForeignKey("hybrid_nodes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
        **TABLE_ARGS,
    )
    op.create_table(
        "hybrid_node_snapshots",
        sa.Column("node_id", sa.String(40), sa.ForeignKey("hybrid_nodes.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("updated_at", MICROSECONDS, nullable=False),
        **TABLE_ARGS,
    )
    # Node side.
    op.create_table(
        "hybrid_applied_snapshot",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),  # always 1: the one last-known-good
        sa.Column("node_id", sa.String(40), nullable=False),  # the enrolment it came with: versions count per node
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("body_json", LONG_TEXT, nullable=False),
        sa.Column("applied_at", MICROSECONDS, nullable=False),
        **TABLE_ARGS,
    )
    op.create_table(
        "hybrid_mirrored",
        sa.Column("kind", sa.String(16), primary_key=True),  # partner | tenant | user | api_key | model | backend
        sa.Column("row_id", sa.String(64), primary_key=True),
        **TABLE_ARGS,
    )
    op.create_table(
        "hybrid_usage_outbox",
        # Auto-increment on purpose: one appliance writes it, and the order is the order batches are sent in.
        sa.Column("seq", sa.BigInteger, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("record_json", sa.Text, nullable=False),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Index("ix_hybrid_usage_outbox_request_id", "request_id", unique=True),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("hybrid_usage_outbox")
    op.drop_table("hybrid_mirrored")
    op.drop_table("hybrid_applied_snapshot")
    op.drop_table("hybrid_node_snapshots")
    op.drop_table("hybrid_node_tenants")
