"""Models get a `description` (the documented model field, issue 15): free text shown in the model's answers.

Expand-only: the column is nullable, so code of the previous revision keeps reading and writing models unchanged.
core_0010 is not in this branch: down_revision is core_0009 until the branches are merged (then core_0010).

Revision ID: core_0011
Revises: core_0010
Create Date: 2026-12-15
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0011"
down_revision = "core_0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("models", sa.Column("description", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("models", "description")
