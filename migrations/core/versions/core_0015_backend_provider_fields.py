"""Backends of the providers `azure` and `anthropic`: a deployment name (azure) and an API version (both).

Both columns are nullable: existing backends (openai, custom, scaiinfer, hybrid, managed) have neither.

Revision ID: core_0015
Revises: core_0014
Create Date: 2027-01-20
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0015"
# core_0010..core_0014 are other parts of issue 15, merged separately: rechain onto the newest of them.
down_revision = "core_0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backends", sa.Column("deployment", sa.String(64)))
    op.add_column("backends", sa.Column("api_version", sa.String(32)))


def downgrade() -> None:
    # Going back would leave azure and anthropic backends the old code cannot call: refuse while any exists.
    bind = op.get_bind()
    count = bind.execute(sa.text("SELECT COUNT(*) FROM backends WHERE provider IN ('azure', 'anthropic')")).scalar()
    if count:
        raise RuntimeError(f"{count} azure or anthropic backend(s) exist: delete them before going below core_0015")
    op.drop_column("backends", "api_version")
    op.drop_column("backends", "deployment")
