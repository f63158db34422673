"""Hybrid enrolment: single-use enrolment tokens and the nodes (appliances) they enrolled, credentials as hashes.

Revision ID: core_0005
Revises: core_0004
Create Date: 2026-11-26
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0005"
down_revision = "core_0004"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    op.create_table(
        "hybrid_nodes",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("credential_hash", sa.String(64), nullable=False),  # sha256 hex; the credential is never stored
        sa.Column("pending_credential_hash", sa.String(64)),  # after a rotate, until the new credential is first used
        sa.Column("software_version", sa.String(64), nullable=False),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Column("rotated_at", MICROSECONDS),
        sa.Column("revoked_at", MICROSECONDS),
        sa.Index("ix_hybrid_nodes_credential_hash", "credential_hash", unique=True),
        sa.Index("ix_hybrid_nodes_pending_credential_hash", "pending_credential_hash", unique=True),
        **TABLE_ARGS,
    )
    op.create_table(
        "hybrid_enrollment_tokens",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("token_hash", sa.String(64), nullable=False),  # sha256 hex; the token is never stored
        sa.Column("name", sa.String(255)),
        sa.Column("created_at", MICROSECONDS, nullable=False),
        sa.Column("expires_at", MICROSECONDS, nullable=False),
        sa.Column("used_at", MICROSECONDS),
        sa.Column("node_id", sa.String(40), sa.ForeignKey("hybrid_nodes.id", ondelete="SET NULL")),
        sa.Index("ix_hybrid_enrollment_tokens_token_hash", "token_hash", unique=True),
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("hybrid_enrollment_tokens")
    op.drop_table("hybrid_nodes")
