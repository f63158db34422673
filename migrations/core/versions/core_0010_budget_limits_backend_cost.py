"""Budgets hold up to three limits at once (cost, tokens, requests), and usage records their backend's cost.

The documented budget shape has `cost_limit`, `token_limit` and `request_limit`, each enforced; the node's former
single `limit_type` + `limit_value` stays, filled with the first limit set (cost, then tokens, then requests), so
that the release before keeps reading and enforcing one of them. Existing budgets get their one limit copied into
its new column. `usage_records.backend_cost` is the upstream cost at the backend's `cost_*_per_mtok` prices, 0 for
records from before.

Revision ID: core_0010
Revises: core_0009
Create Date: 2026-12-12
"""

import sqlalchemy as sa
from alembic import op

revision = "core_0010"
down_revision = "core_0009"
branch_labels = None
depends_on = None

COST = sa.Numeric(24, 12)
_COLUMN_OF = {"cost": "cost_limit", "tokens": "token_limit", "requests": "request_limit"}


def upgrade() -> None:
    op.add_column("budgets", sa.Column("cost_limit", COST))
    op.add_column("budgets", sa.Column("token_limit", sa.BigInteger))
    op.add_column("budgets", sa.Column("request_limit", sa.BigInteger))
    budgets = sa.table("budgets", sa.column("limit_type"), sa.column("limit_value"),
                       *(sa.column(column) for column in _COLUMN_OF.values()))
    for limit_type, column in _COLUMN_OF.items():
        op.execute(budgets.update().where(budgets.c.limit_type == limit_type).values(
            {column: budgets.c.limit_value}))
    op.add_column("usage_records", sa.Column("backend_cost", COST, nullable=False, server_default="0"))


def downgrade() -> None:
    op.drop_column("usage_records", "backend_cost")
    # limit_type + limit_value already hold each budget's first limit: the release before enforces that one.
    op.drop_column("budgets", "request_limit")
    op.drop_column("budgets", "token_limit")
    op.drop_column("budgets", "cost_limit")
