"""Modules switched on or off per tenant and per partner (GET /v1/modules, POST /v1/modules/{id}/enable|disable).

Revision ID: core_0013
Revises: core_0012
Create Date: 2027-01-15
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0013"
down_revision = "core_0012"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera), utf8mb4, microsecond timestamps.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
MICROSECONDS = sa.DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")


def upgrade() -> None:
    # No row = the module is on for that tenant: every module SCAIGRID_MODULES enables is on until switched off.
    op.create_table(
        "module_switches",
        sa.Column("module_id", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(16), primary_key=True),  # tenant | partner
        sa.Column("scope_id", sa.String(40), primary_key=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
        sa.Column("updated_at", MICROSECONDS, nullable=False),
        sa.Column("updated_by", sa.String(64)),  # the user (or service) who switched it last
        **TABLE_ARGS,
    )


def downgrade() -> None:
    op.drop_table("module_switches")
