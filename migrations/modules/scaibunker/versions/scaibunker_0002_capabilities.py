"""ScaiBunker storage capabilities: one row per minted capability (who minted what, for how long).

Tokens are verified without this table (bunker_proxy has no database); it is the record of what was handed out,
and the worker deletes rows once they have expired.

Revision ID: scaibunker_0002
Revises: scaibunker_0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "scaibunker_0002"
down_revision = "scaibunker_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mod_scaibunker_capabilities",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("prefix", sa.String(1024), nullable=False),
        sa.Column("verbs", sa.String(64), nullable=False),
        sa.Column("max_bytes", sa.BigInteger, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
        sa.Column("created_by_user_id", sa.String(40)),
        sa.Column("created_by_key_id", sa.String(40)),
        sa.Column("created_by", sa.String(255), nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        # MariaDB-specific: InnoDB is what Galera replicates.
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
    )
    op.create_index("ix_mod_scaibunker_capabilities_expires_at", "mod_scaibunker_capabilities", ["expires_at"])
    op.create_index("ix_mod_scaibunker_capabilities_tenant_id", "mod_scaibunker_capabilities", ["tenant_id"])


def downgrade() -> None:
    op.drop_table("mod_scaibunker_capabilities")
