"""A revision that fails on purpose (references a table that does not exist).

Revision ID: broken_0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op

revision = "broken_0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE no_such_table ADD COLUMN x INT")


def downgrade() -> None:
    pass
