"""Core tables. The schema itself is created by Alembic revisions in migrations/core; these mirror them for queries.

Fit for MariaDB Galera: InnoDB everywhere, a primary key on every table, ids are random strings (no
auto-increment hot spot, no offset juggling between writers).
"""

import uuid
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Computed,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.dialects import mysql

metadata = MetaData()

TABLE_ARGS: dict[str, Any] = {
    "mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_unicode_ci"}


def new_id(prefix: str) -> str:
    """Ids say what they are (prt_, ten_, usr_, key_, mdl_, bud_) and are unguessable."""
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
    Column("rpm_limit", Integer),  # requests/minute; NULL = RATE_LIMIT_PARTNER_RPM
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
    Column("rpm_limit", Integer),  # NULL = RATE_LIMIT_TENANT_RPM
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
    Column("rpm_limit", Integer),  # NULL = RATE_LIMIT_USER_RPM
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
    # A key acts with this role, never more than its user's (checked when it is created).
    Column("role", String(32), nullable=False, server_default="tenant_user"),
    Column("rpm_limit", Integer),  # NULL = RATE_LIMIT_KEY_RPM
    *_timestamps(),
    Index("ix_api_keys_user_id", "user_id"),
    **TABLE_ARGS,
)

# Event ids of ScaiKey webhooks already applied: a redelivered event is acknowledged and ignored.
scaikey_events = Table(
    "scaikey_events", metadata,
    Column("event_id", String(128), primary_key=True),
    Column("event_type", String(64), nullable=False),
    Column("received_at", DateTime, nullable=False, server_default=func.now()),
    **TABLE_ARGS,
)

# Money: prices and costs per million tokens have at most 6 decimals; a request's cost is exact at 12.
PRICE = Numeric(18, 6)
MICROSECONDS = DateTime().with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")  # MariaDB-specific precision
COST = Numeric(24, 12)

backends = Table(
    "backends", metadata,
    # catalogue.backend_key: the name its owner chose ("vllm-a100-1"), then "@<tenant id>" for a tenant's backend,
    # so that names are unique per owner (core_0008). The API shows the name as `id`.
    Column("id", String(128), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id")),  # NULL = shared by every tenant
    Column("provider", String(16), nullable=False),  # routing.catalogue.PROVIDERS
    Column("base_url", String(1024), nullable=False),
    Column("model", String(255), nullable=False),  # the upstream's own model name
    Column("api_key_encrypted", Text),  # Fernet token under SCAIGRID_ENCRYPTION_KEY
    Column("api_key_env", String(128)),  # or: the variable holding the key in the node's environment
    Column("cost_input_per_mtok", PRICE, nullable=False, server_default="0"),
    Column("cost_output_per_mtok", PRICE, nullable=False, server_default="0"),
    Column("timeout_s", Double),  # NULL = DISPATCH_TIMEOUT_S; DOUBLE: MariaDB FLOAT would round it
    Column("status", String(16), nullable=False, server_default="active"),  # active | disabled
    # provider azure: the deployment its URLs name; anthropic and azure: the API version they send (core_0015)
    Column("deployment", String(64)),
    Column("api_version", String(32)),
    *_timestamps(),
    **TABLE_ARGS,
)

models = Table(
    "models", metadata,
    Column("id", String(40), primary_key=True),
    Column("slug", String(191), nullable=False),  # what clients send as `model`; unique per owner
    Column("tenant_id", String(40), ForeignKey("tenants.id")),  # NULL = offered to every tenant
    # The owner as a value a unique key compares ('' = the platform): NULLs are never equal in one (core_0008).
    Column("owner_scope", String(40), Computed("COALESCE(tenant_id, '')", persisted=True)),
    Column("display_name", String(255)),
    Column("description", Text),  # core_0011
    Column("modality", String(16), nullable=False),  # chat | embedding | image | audio
    Column("context_window", Integer),
    Column("max_output_tokens", Integer),
    Column("price_input_per_mtok", PRICE, nullable=False, server_default="0"),
    Column("price_output_per_mtok", PRICE, nullable=False, server_default="0"),
    # Image and audio models are priced per unit besides (or instead of) tokens (core_0016, dispatch/media.py).
    Column("price_per_image", PRICE, nullable=False, server_default="0"),
    Column("price_per_audio_second", PRICE, nullable=False, server_default="0"),
    Column("price_per_mchar", PRICE, nullable=False, server_default="0"),  # per million characters of speech input
    Column("default_params", JSON),
    Column("status", String(16), nullable=False, server_default="active"),  # active | deprecated
    *_timestamps(),
    UniqueConstraint("owner_scope", "slug", name="uq_models_owner_slug"),
    **TABLE_ARGS,
)

model_routes = Table(
    "model_routes", metadata,
    Column("model_id", String(40), ForeignKey("models.id", ondelete="CASCADE"), primary_key=True),
    Column("backend_id", String(128), ForeignKey("backends.id"), primary_key=True),
    Column("weight", Integer, nullable=False, server_default="1"),
    # Lower value is tried first: every priority-1 backend before any priority-2 one.
    Column("priority", Integer, nullable=False, server_default="1"),
    **TABLE_ARGS,
)

usage_records = Table(
    "usage_records", metadata,
    Column("request_id", String(40), primary_key=True),  # the flush is idempotent on it
    Column("created_at", MICROSECONDS, nullable=False),
    Column("partner_id", String(40), nullable=False),
    Column("tenant_id", String(40), nullable=False),
    Column("user_id", String(40)),
    Column("api_key_id", String(40)),
    Column("model", String(191), nullable=False),
    Column("backend_id", String(128)),  # its key (catalogue.backend_key)
    Column("protocol", String(8), nullable=False),  # native | oai
    Column("status", String(16), nullable=False),  # ok | error
    Column("tokens_in", Integer, nullable=False, server_default="0"),
    Column("tokens_out", Integer, nullable=False, server_default="0"),
    Column("latency_ms", Integer, nullable=False, server_default="0"),
    Column("cost", COST, nullable=False, server_default="0"),
    Column("error_code", String(64)),  # what a failed request answered with
    # At the backend's cost_*_per_mtok prices, computed at dispatch (core_0010; 0 for records from before).
    Column("backend_cost", COST, nullable=False, server_default="0"),
    Index("ix_usage_tenant_time", "tenant_id", "created_at"),
    Index("ix_usage_user_time", "user_id", "created_at"),
    Index("ix_usage_partner_time", "partner_id", "created_at"),
    **TABLE_ARGS,
)

budgets = Table(
    "budgets", metadata,
    Column("id", String(40), primary_key=True),
    Column("scope", String(16), nullable=False),  # partner | tenant | user
    Column("scope_id", String(40), nullable=False),
    Column("partner_id", String(40), nullable=False),  # owner, for visibility checks
    Column("tenant_id", String(40)),
    Column("period", String(16), nullable=False),  # daily | weekly | monthly | total
    # The node's former single limit: the first of the limits below that is set (cost, tokens, requests), kept so
    # that the release before still enforces one of them (core_0010).
    Column("limit_type", String(16), nullable=False),  # cost | tokens | requests
    Column("limit_value", COST, nullable=False),
    Column("cost_limit", COST),  # at least one of these three is set; each is enforced (core_0010)
    Column("token_limit", BigInteger),
    Column("request_limit", BigInteger),
    Column("hard_action", String(16), nullable=False, server_default="block"),  # block | notify | throttle
    Column("soft_limit_pct", Numeric(4, 3), nullable=False, server_default="0.8"),
    # tenant | partner | platform: the reach of who set it last; a caller of less reach may not change it (core_0007)
    Column("set_by_reach", String(16), nullable=False, server_default="tenant"),
    *_timestamps(),
    Index("ix_budgets_scope", "scope", "scope_id"),
    **TABLE_ARGS,
)


# --- ScaiInfer nodes (core_0003) ---

infra_nodes = Table(
    "infra_nodes", metadata,
    Column("id", String(64), primary_key=True),  # the node's own id, as in scaiinfer:<node>/<model>
    Column("endpoint", String(255), nullable=False),  # host:port of its InferenceService
    Column("models", JSON, nullable=False),  # loaded model names
    Column("capacity", Integer, nullable=False, server_default="0"),
    Column("load", Integer, nullable=False, server_default="0"),
    Column("version", String(64)),
    Column("status", String(16), nullable=False, server_default="healthy"),  # healthy | warning | stale
    Column("registered_at", MICROSECONDS, nullable=False),
    Column("last_heartbeat_at", MICROSECONDS, nullable=False),
    **TABLE_ARGS,
)

# --- outbound webhooks (core_0004) ---

webhooks = Table(
    "webhooks", metadata,
    Column("id", String(40), primary_key=True),
    Column("partner_id", String(40), nullable=False),
    Column("tenant_id", String(40), ForeignKey("tenants.id"), nullable=False),
    Column("url", String(2048), nullable=False),
    Column("events", JSON, nullable=False),
    Column("secret_encrypted", Text, nullable=False),  # Fernet; the signing key must be readable
    Column("description", String(255)),
    Column("status", String(16), nullable=False, server_default="active"),  # active | inactive | disabled (auto)
    Column("max_retries", Integer, nullable=False, server_default="5"),
    Column("consecutive_failures", Integer, nullable=False, server_default="0"),
    Column("disabled_reason", String(255)),
    *_timestamps(),
    Index("ix_webhooks_tenant_id", "tenant_id"),
    **TABLE_ARGS,
)

# The outbox: an event is stored, with a delivery row per subscribed webhook, before anything is sent.
webhook_events = Table(
    "webhook_events", metadata,
    Column("id", String(40), primary_key=True),
    Column("event_type", String(64), nullable=False),
    Column("partner_id", String(40), nullable=False),
    Column("tenant_id", String(40), nullable=False),
    Column("payload", JSON, nullable=False),
    Column("created_at", MICROSECONDS, nullable=False),
    Index("ix_webhook_events_created_at", "created_at"),
    **TABLE_ARGS,
)

webhook_deliveries = Table(
    "webhook_deliveries", metadata,
    Column("id", String(40), primary_key=True),
    Column("webhook_id", String(40), ForeignKey("webhooks.id", ondelete="CASCADE"), nullable=False),
    Column("event_id", String(40), ForeignKey("webhook_events.id", ondelete="CASCADE"), nullable=False),
    # pending | paused (its webhook is disabled) | delivered | failed
    Column("status", String(16), nullable=False, server_default="pending"),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("next_attempt_at", MICROSECONDS, nullable=False),
    Column("lease_until", MICROSECONDS),  # a worker holds the attempt until then
    Column("last_attempt_at", MICROSECONDS),
    Column("last_status_code", Integer),
    Column("last_error", String(255)),
    Column("delivered_at", MICROSECONDS),
    Column("created_at", MICROSECONDS, nullable=False),
    Index("ix_webhook_deliveries_due", "status", "next_attempt_at"),
    Index("ix_webhook_deliveries_webhook", "webhook_id", "created_at"),
    **TABLE_ARGS,
)

# --- hybrid enrolment (core_0005) ---

# An enrolled appliance. Credentials are kept as sha256 hashes only; a rotated-in credential waits in
# pending_credential_hash until its first use, which promotes it and retires the old one.
hybrid_nodes = Table(
    "hybrid_nodes", metadata,
    Column("id", String(40), primary_key=True),
    Column("name", String(255), nullable=False),
    Column("credential_hash", String(64), nullable=False),
    Column("pending_credential_hash", String(64)),
    Column("software_version", String(64), nullable=False),
    Column("created_at", MICROSECONDS, nullable=False),
    Column("rotated_at", MICROSECONDS),
    Column("revoked_at", MICROSECONDS),
    Index("ix_hybrid_nodes_credential_hash", "credential_hash", unique=True),
    Index("ix_hybrid_nodes_pending_credential_hash", "pending_credential_hash", unique=True),
    **TABLE_ARGS,
)

hybrid_enrollment_tokens = Table(
    "hybrid_enrollment_tokens", metadata,
    Column("id", String(40), primary_key=True),
    Column("token_hash", String(64), nullable=False),
    Column("name", String(255)),
    Column("created_at", MICROSECONDS, nullable=False),
    Column("expires_at", MICROSECONDS, nullable=False),
    Column("used_at", MICROSECONDS),
    Column("node_id", String(40), ForeignKey("hybrid_nodes.id", ondelete="SET NULL")),
    Index("ix_hybrid_enrollment_tokens_token_hash", "token_hash", unique=True),
    **TABLE_ARGS,
)

# --- hybrid link (core_0006) ---

# Managed side: the tenants a node may serve (its config snapshot carries exactly these), and the snapshot
# version last computed for it, bumped only when the body's sha256 changes.
hybrid_node_tenants = Table(
    "hybrid_node_tenants", metadata,
    Column("node_id", String(40), ForeignKey("hybrid_nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("tenant_id", String(40), ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    **TABLE_ARGS,
)

hybrid_node_snapshots = Table(
    "hybrid_node_snapshots", metadata,
    Column("node_id", String(40), ForeignKey("hybrid_nodes.id", ondelete="CASCADE"), primary_key=True),
    Column("version", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("updated_at", MICROSECONDS, nullable=False),
    **TABLE_ARGS,
)

# Node side: the last snapshot applied (one row, id 1: the last-known-good served from when the link is down),
# the rows it put into partners, tenants, users, api_keys, models and backends, and the usage outbox.
LONG_TEXT = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
hybrid_applied_snapshot = Table(
    "hybrid_applied_snapshot", metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("node_id", String(40), nullable=False),  # the enrolment it came with: versions count per node
    Column("version", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("body_json", LONG_TEXT, nullable=False),
    Column("applied_at", MICROSECONDS, nullable=False),
    **TABLE_ARGS,
)

hybrid_mirrored = Table(
    "hybrid_mirrored", metadata,
    Column("kind", String(16), primary_key=True),  # partner | tenant | user | api_key | model | backend
    Column("row_id", String(64), primary_key=True),
    **TABLE_ARGS,
)

hybrid_usage_outbox = Table(
    "hybrid_usage_outbox", metadata,
    Column("seq", BigInteger, primary_key=True, autoincrement=True),
    Column("request_id", String(40), nullable=False),
    Column("record_json", Text, nullable=False),  # scaigrid.accounting.usage.encode(record)
    Column("created_at", MICROSECONDS, nullable=False),
    Index("ix_hybrid_usage_outbox_request_id", "request_id", unique=True),
    **TABLE_ARGS,
)

# --- hybrid relayed requests (core_0009) ---

# Managed side: the request ids this side sent down a link, written before the node learns the id, so that a
# node's usage record under one of them is refused whenever it arrives (the managed side's own record wins).
hybrid_relayed_requests = Table(
    "hybrid_relayed_requests", metadata,
    Column("request_id", String(40), primary_key=True),
    Column("node_id", String(40), nullable=False),
    Column("created_at", MICROSECONDS, nullable=False),
    Index("ix_hybrid_relayed_requests_created_at", "created_at"),
    **TABLE_ARGS,
)

# --- modules switched per tenant and partner (core_0013) ---

# No row = on: every module SCAIGRID_MODULES enables is on for a tenant until its admins or its partner switch it off.
module_switches = Table(
    "module_switches", metadata,
    Column("module_id", String(64), primary_key=True),
    Column("scope", String(16), primary_key=True),  # tenant | partner
    Column("scope_id", String(40), primary_key=True),
    Column("enabled", Boolean, nullable=False),
    Column("updated_at", MICROSECONDS, nullable=False),
    Column("updated_by", String(64)),
    **TABLE_ARGS,
)

# --- audit log (core_0014) ---

audit_log = Table(
    "audit_log", metadata,
    Column("id", String(40), primary_key=True),
    Column("created_at", MICROSECONDS, nullable=False),
    Column("request_id", String(40), nullable=False),
    Column("actor_type", String(16), nullable=False),  # user | service | webhook
    Column("actor_id", String(191)),
    Column("actor_email", String(320)),
    Column("actor_partner_id", String(40)),
    Column("actor_tenant_id", String(40)),
    Column("api_key_id", String(40)),
    Column("action", String(96), nullable=False),
    Column("resource_type", String(64), nullable=False),
    Column("resource_id", String(191)),
    Column("partner_id", String(40)),  # whose object it is: who may read the entry; NULL tenant = platform-wide
    Column("tenant_id", String(40)),
    Column("status", String(8), nullable=False),  # SUCCESS | FAILURE
    Column("http_status", Integer, nullable=False),
    Column("error_code", String(64)),
    Column("method", String(8), nullable=False),
    Column("path", String(1024), nullable=False),
    Column("ip", String(64)),
    Column("user_agent", String(512)),
    Column("before", JSON),
    Column("after", JSON),
    Index("ix_audit_log_created_at", "created_at"),
    Index("ix_audit_log_tenant_time", "tenant_id", "created_at"),
    Index("ix_audit_log_partner_time", "partner_id", "created_at"),
    **TABLE_ARGS,
)

# The lock `scaigrid migrate` takes for the whole cluster (scaigrid/db/migrations.py): at most one row, inserted by
# the run that holds it. Not an Alembic revision: it must exist before the first revision runs, so migrate creates
# it (CREATE TABLE IF NOT EXISTS) from this definition before taking the lock.
migrate_lock = Table(
    "scaigrid_migrate_lock", metadata,
    Column("name", String(32), primary_key=True),  # always "migrate": one lock per database
    Column("holder", String(191), nullable=False),  # host:pid:nonce of the run, for the operator
    Column("server", String(191), nullable=False),  # the database server whose GET_LOCK the holder also holds
    Column("expires_at", DateTime, nullable=False),  # UTC; renewed while the run lives
    **TABLE_ARGS,
)
