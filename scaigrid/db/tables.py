"""Core tables. The schema itself is created by Alembic revisions in migrations/core; these mirror them for queries.

Fit for MariaDB Galera: InnoDB everywhere, a primary key on every table, ids are random strings (no
auto-increment hot spot, no offset juggling between writers).
"""

import uuid
from typing import Any

from sqlalchemy import Column, DateTime, ForeignKey, Index, MetaData, String, Table, UniqueConstraint, func

metadata = MetaData()

TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}


def new_id(prefix: str) -> str:
    """Ids say what they are (prt_, ten_, usr_, key_) and are unguessable."""
    return f"{prefix}_{uuid.uuid4().hex}"


def _timestamps() -> list[Column[Any]]:
    return [
        Column("created_at", DateTime, nullable=False, server_default=func.now()),
        Column("updated_at", DateTime, nullable=False, server_default=func.now(), onupdate=func.now()),
    ]


partners = Table(
    "partners", metadata,
    Column("id", String(40), primary_key=True),
    Column("slug", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("scaikey_id", String(64), unique=True),
    *_timestamps(),
    **TABLE_ARGS,
)

tenants = Table(
    "tenants", metadata,
    Column("id", String(40), primary_key=True),
    Column("partner_id", String(40), ForeignKey("partners.id"), nullable=False),
    Column("slug", String(64), nullable=False, unique=True),
    Column("name", String(255), nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("scaikey_id", String(64), unique=True),
    *_timestamps(),
    **TABLE_ARGS,
)

users = Table(
    "users", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("email", String(320), nullable=False),
    Column("display_name", String(255)),
    Column("role", String(32), nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("scaikey_id", String(64), unique=True),
    *_timestamps(),
    UniqueConstraint("tenant_id", "email", name="uq_users_tenant_email"),
    **TABLE_ARGS,
)

api_keys = Table(
    "api_keys", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("user_id", String(40), ForeignKey("users.id"), nullable=False),
    Column("name", String(255), nullable=False),
    # Hex SHA-256 of the whole key; the key itself is never stored.
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("key_prefix", String(16), nullable=False),  # first characters, so an operator can tell keys apart
    Column("expires_at", DateTime),
    Column("revoked_at", DateTime),
    Column("last_used_at", DateTime),
    *_timestamps(),
    Index("ix_api_keys_user_id", "user_id"),
    **TABLE_ARGS,
)
