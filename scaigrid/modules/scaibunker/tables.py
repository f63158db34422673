"""ScaiBunker's tables, mirroring migrations/modules/scaibunker for queries (the module's own metadata)."""

from typing import Any

from sqlalchemy import BigInteger, Column, DateTime, Index, MetaData, String, Table, func

metadata = MetaData()
TABLE_ARGS: dict[str, Any] = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4"}

storage_audit = Table(
    "mod_scaibunker_storage_audit", metadata,
    Column("id", String(40), primary_key=True),
    Column("action", String(16), nullable=False),  # put | delete
    Column("object_key", String(1024), nullable=False),  # the S3 name: tenants/<tenant id>/<key>
    Column("size_bytes", BigInteger),
    Column("capability_id", String(64)),
    Column("created_at", DateTime, nullable=False, server_default=func.now()),
    Index("ix_mod_scaibunker_storage_audit_created_at", "created_at"),
    **TABLE_ARGS,
)

# The audit trail of minted capabilities (who minted what, when), read by operators; verification never reads it.
capabilities = Table(
    "mod_scaibunker_capabilities", metadata,
    Column("id", String(40), primary_key=True),
    Column("tenant_id", String(40), nullable=False),
    Column("prefix", String(1024), nullable=False),
    Column("verbs", String(64), nullable=False),  # comma separated, as in the token
    Column("max_bytes", BigInteger, nullable=False),
    Column("expires_at", DateTime, nullable=False),
    Column("created_by_user_id", String(40)),
    Column("created_by_key_id", String(40)),
    Column("created_by", String(255), nullable=False),  # the principal's kind and name, for people reading the table
    Column("created_at", DateTime, nullable=False, server_default=func.now()),
    Index("ix_mod_scaibunker_capabilities_expires_at", "expires_at"),
    Index("ix_mod_scaibunker_capabilities_tenant_id", "tenant_id"),
    **TABLE_ARGS,
)
