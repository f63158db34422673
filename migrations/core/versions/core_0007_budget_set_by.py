"""Budgets remember the reach of who set them, so that one set from above cannot be raised or removed from below.

Existing budgets get `tenant` (the least): they stay as changeable as they were; a partner or the platform locks
one by changing it (PUT), which records its own reach.

Revision ID: core_0007
Revises: core_0006
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0007"
down_revision = "core_0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("budgets", sa.Column("set_by_reach", sa.String(16), nullable=False, server_default="tenant"))


def downgrade() -> None:
    op.drop_column("budgets", "set_by_reach")
