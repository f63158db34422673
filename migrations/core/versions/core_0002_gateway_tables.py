"""Gateway tables: rate limits and roles on identities, ScaiKey event log, backends, models, routes, usage, budgets.

Revision ID: core_0002
Revises: core_0001
Create Date: 2026-11-26
"""

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

revision = "core_0002"
down_revision = "core_0001"
branch_labels = None
depends_on = None

# MariaDB-specific: InnoDB (required by Galera) and utf8mb4 throughout.
TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}
PRICE = sa.Numeric(18, 6)
COST = sa.Numeric(24, 12)


def _timestamps() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        sa.Column("updated_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
    ]


def upgrade() -> None:
    for table in ("partners", "tenants", "users", "api_keys"):
        op.add_column(table, sa.Column("rpm_limit", sa.Integer))
    op.add_column("api_keys", sa.Column("role", sa.String(32), nullable=False, server_default="tenant_user"))
    op.create_table(
        "scaikey_events",
        sa.Column("event_id", sa.String(128), primary_key=True),
        sa.Column("event_type", sa.String(64), nullable=False),
        sa.Column("received_at", sa.DateTime, nullable=False, server_default=sa.func.now()),
        **TABLE_ARGS,
    )
    op.create_table(
        "backends",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id")),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("base_url", sa.String(1024), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("api_key_encrypted", sa.Text),
        sa.Column("api_key_env", sa.String(128)),
        sa.Column("cost_input_per_mtok", PRICE, nullable=False, server_default="0"),
        sa.Column("cost_output_per_mtok", PRICE, nullable=False, server_default="0"),
        sa.Column("timeout_s", sa.Double),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        *_timestamps(),
        **TABLE_ARGS,
    )
    op.create_table(
        "models",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("slug", sa.String(191), nullable=False, unique=True),
        sa.Column("tenant_id", sa.String(40), sa.ForeignKey("tenants.id")),
        sa.Column("display_name", sa.String(255)),
        sa.Column("modality", sa.String(16), nullable=False),
        sa.Column("context_window", sa.Integer),
        sa.Column("max_output_tokens", sa.Integer),
        sa.Column("price_input_per_mtok", PRICE, nullable=False, server_default="0"),
        sa.Column("price_output_per_mtok", PRICE, nullable=False, server_default="0"),
        sa.Column("default_params", sa.JSON),
        sa.Column("status", sa.String(16), nullable=False, server_default="active"),
        *_timestamps(),
        **TABLE_ARGS,
    )
    op.create_table(
        "model_routes",
        sa.Column("model_id", sa.String(40), sa.ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("backend_id", sa.String(64), sa.ForeignKey("backends.id"), primary_key=True),
        sa.Column("weight", sa.Integer, nullable=False, server_default="1"),
        sa.Column("priority", sa.Integer, nullable=False, server_default="1"),
        **TABLE_ARGS,
    )
    op.create_table(
        "usage_records",
        sa.Column("request_id", sa.String(40), primary_key=True),
        sa.Column("created_at", mysql.DATETIME(fsp=6), nullable=False),  # MariaDB-specific precision
        sa.Column("partner_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(40)),
        sa.Column("api_key_id", sa.String(40)),
        sa.Column("model", sa.String(191), nullable=False),
        sa.Column("backend_id", sa.String(64)),
        sa.Column("protocol", sa.String(8), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("tokens_in", sa.Integer, nullable=False, server_default="0"),
        sa.Column("tokens_out", sa.Integer, nullable=False, server_default="0"),
        sa.Column("latency_ms", sa.Integer, nullable=False, server_default="0"),
        sa.Column("cost", COST, nullable=False, server_default="0"),
        **TABLE_ARGS,
    )
    op.create_index("ix_usage_tenant_time", "usage_records", ["tenant_id", "created_at"])
    op.create_index("ix_usage_user_time", "usage_records", ["user_id", "created_at"])
    op.create_index("ix_usage_partner_time", "usage_records", ["partner_id", "created_at"])
    op.create_table(
        "budgets",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("scope", sa.String(16), nullable=False),
        sa.Column("scope_id", sa.String(40), nullable=False),
        sa.Column("partner_id", sa.String(40), nullable=False),
        sa.Column("tenant_id", sa.String(40)),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("limit_type", sa.String(16), nullable=False),
        sa.Column("limit_value", COST, nullable=False),
        sa.Column("hard_action", sa.String(16), nullable=False, server_default="block"),
        sa.Column("soft_limit_pct", sa.Numeric(4, 3), nullable=False, server_default="0.8"),
        *_timestamps(),
        **TABLE_ARGS,
    )
    op.create_index("ix_budgets_scope", "budgets", ["scope", "scope_id"])


def downgrade() -> None:
    for table in ("budgets", "usage_records", "model_routes", "models", "backends", "scaikey_events"):
        op.drop_table(table)
    op.drop_column("api_keys", "role")
    for table in ("api_keys", "users", "tenants", "partners"):
        op.drop_column(table, "rpm_limit")
