"""ScaiBunker storage audit: one row per object written or deleted through the storage proxy.

Revision ID: scaibunker_0001
Revises:
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "scaibunker_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mod_scaibunker_storage_audit",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("object_key", sa.String(1024), nullable=False),
        sa.Column("size_bytes", sa.BigInteger),
        sa.Column("capability_id", sa.String(64)),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        # MariaDB-specific: InnoDB is what Galera replicates.
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_mod_scaibunker_storage_audit_created_at", "mod_scaibunker_storage_audit", ["created_at"])


def downgrade() -> None:
    op.drop_table("mod_scaibunker_storage_audit")
