"""Webhooks a user switched off become `inactive`; `disabled` is left to the node's automatic state.

Until now both were `disabled`, told apart only by the reason "disabled by a user" that the API wrote.
Data only: the status column already holds any of active | inactive | disabled.

Revision ID: core_0012
Revises: core_0011
Create Date: 2026-12-10
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0012"
down_revision = "core_0011"
branch_labels = None
depends_on = None

USER_REASON = "disabled by a user"


def upgrade() -> None:
    op.execute(sa.text("UPDATE webhooks SET status = 'inactive', disabled_reason = NULL "
                       "WHERE status = 'disabled' AND disabled_reason = :reason").bindparams(reason=USER_REASON))


def downgrade() -> None:
    op.execute(sa.text("UPDATE webhooks SET status = 'disabled', disabled_reason = :reason "
                       "WHERE status = 'inactive'").bindparams(reason=USER_REASON))
