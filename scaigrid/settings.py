"""One typed settings tree, read from the environment and an optional env file, validated before anything starts."""

import dataclasses
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

DEFAULT_ENV_FILE = Path("/etc/scaigrid/scaigrid.env")
MODES = ("migrate", "http", "grpc", "worker", "bunker_proxy", "link")
APP_ENVS = ("development", "test", "staging", "production")
LOG_LEVELS = ("debug", "info", "warning", "error")
# What a mode (its REQUIRES) or a command can need configured: the keys of Settings.require's table.
Requirement = Literal["database", "redis", "s3", "encryption", "service_token", "hybrid_node"]


class ConfigError(Exception):
    """A setting is missing or wrong; the message names the variable and what is expected."""


class Secret:
    """A value that must never reach a log line, a repr or check-config output."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def masked(self) -> str:
        return "********"

    def __repr__(self) -> str:
        return f"{type(self).__name__}('{self.masked()}')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class SecretUrl(Secret):
    """A URL that may carry a password: shown with the password masked, everything else visible."""

    __slots__ = ()

    def masked(self) -> str:
        parts = urlsplit(self._value)
        if parts.password is None:
            return self._value
        netloc = parts.netloc.replace(f":{parts.password}@", ":********@", 1)
        return parts._replace(netloc=netloc).geturl()


# --- parsers: each takes the raw string and returns the typed value or raises ValueError(expected) ---
# The public ones are shared: appliance/config.py parses its own keys with them, resources.py reads REDIS_URL.

def _str(raw: str) -> str:
    return raw


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("true or false")


def parse_port(raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError("a port number 1-65535")
    return int(raw)


def _ports(raw: str) -> tuple[int, ...]:
    try:
        return tuple(parse_port(item.strip()) for item in raw.split(","))
    except ValueError:
        raise ValueError("comma-separated port numbers 1-65535, like 8100,8101") from None


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a number of seconds > 0") from None
    if value <= 0:
        raise ValueError("a number of seconds > 0")
    return value


def parse_positive_int(raw: str) -> int:
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError("a whole number >= 1")
    return int(raw)


S3_MAX_PARTS = 10_000  # parts of one multipart upload


def _part_size(raw: str) -> int:
    # S3's multipart limits: every part but the last is 5 MiB to 5 GiB.
    if not raw.isdigit() or not 5 * 1024**2 <= int(raw) <= 5 * 1024**3:
        raise ValueError("a number of bytes from 5242880 (5 MiB) to 5368709120 (5 GiB)")
    return int(raw)


def _non_negative_int(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError("a whole number >= 0")
    return int(raw)


def _fernet_key(raw: str) -> Secret:
    from cryptography.fernet import Fernet

    try:
        Fernet(raw.encode())
    except (ValueError, TypeError):
        raise ValueError("a Fernet key: 32 random bytes, url-safe base64 (`scaigrid admin generate-key`)") from None
    return Secret(raw)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError("one of " + ", ".join(allowed))
        return value

    return parse


def _url(*schemes: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not parts.hostname:
            raise ValueError(f"a URL like {schemes[0]}://host[:port]/...")
        return raw

    return parse


def _database_url(raw: str) -> SecretUrl:
    parts = urlsplit(raw)
    if parts.scheme != "mysql+asyncmy" or not parts.hostname or not parts.path.strip("/"):
        raise ValueError("mysql+asyncmy://user:password@host:3306/database")
    return SecretUrl(raw)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed REDIS_URL: one server, or a Sentinel set naming the master to follow."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    password: str | None = None


def parse_redis_url(raw: str) -> RedisTarget:
    """Accepts redis://, rediss:// and redis+sentinel://[:password@]h1:26379[,h2:26379]/<master>[/<db>]."""
    if raw.startswith(("redis://", "rediss://")):
        if not urlsplit(raw).hostname:
            raise ValueError("redis://[:password@]host:6379/0")
        return RedisTarget(url=raw)
    if not raw.startswith("redis+sentinel://"):
        raise ValueError("redis://host:6379/0 or redis+sentinel://host1:26379,host2:26379/<master>/0")
    rest = raw[len("redis+sentinel://"):]
    netloc, _, path = rest.partition("/")
    credentials, _, hosts = netloc.rpartition("@")
    password = unquote(credentials.partition(":")[2]) or None
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError("redis+sentinel://host1:26379,host2:26379/<master>/0 (every sentinel as host:port)")
        sentinels.append((host, int(port)))
    master, _, db = path.strip("/").partition("/")
    if not master or (db and not db.isdigit()):
        raise ValueError("redis+sentinel://host1:26379,host2:26379/<master>/0 (master name, then optional db number)")
    return RedisTarget(url=raw, sentinels=tuple(sentinels), master=master, db=int(db or 0), password=password)


def _redis_url(raw: str) -> SecretUrl:
    parse_redis_url(raw)
    return SecretUrl(raw)


def _secret(raw: str) -> Secret:
    return Secret(raw)


_MODULE_REF = re.compile(r"^[a-z][a-z0-9_]*$|^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def _module_list(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        if not _MODULE_REF.fullmatch(item):
            raise ValueError("comma-separated module ids (e.g. scaibunker) or package.module:attribute references")
    return items


def _origins(raw: str) -> tuple[str, ...]:
    # Scheme and host are case-insensitive; browsers send them lower-case in `Origin`.
    items = tuple(item.strip().rstrip("/").lower() for item in raw.split(",") if item.strip())
    for item in items:
        parts = urlsplit(item)
        if item != "*" and (parts.scheme not in ("http", "https") or not parts.hostname or parts.path
                            or parts.query or parts.fragment or parts.username is not None):
            raise ValueError("comma-separated origins like https://app.example.com (scheme, host, optional port, no "
                             "path), or *")
    return items


# --- the tree ---

def setting(env: str, parse: Callable[[str], Any], default: Any = None, help: str = "", *, secret: bool = False) -> Any:
    """Declares one setting: the variable it comes from, how it is parsed, its default and its meaning."""
    return field(default=default, metadata={"env": env, "parse": parse, "help": help, "secret": secret})


@dataclass(frozen=True)
class DatabaseSettings:
    url: SecretUrl | None = setting(
        "DATABASE_URL", _database_url,
        help="MariaDB, `mysql+asyncmy://user:password@host:3306/database`, shown with the password masked",
        secret=True)
    pool_size: int = setting("DATABASE_POOL_SIZE", parse_positive_int, 10, "connections kept open per process")
    migrate_lock_timeout_s: float = setting(
        "MIGRATE_LOCK_TIMEOUT_S", _positive_float, 300.0,
        "how long `migrate` waits for another migrate run to finish")


@dataclass(frozen=True)
class RedisSettings:
    url: SecretUrl | None = setting(
        "REDIS_URL", _redis_url,
        help="`redis://[:password@]host:6379/0`, or a Sentinel set (below), shown with the password masked",
        secret=True)


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = setting(
        "S3_ENDPOINT_URL", _url("http", "https"), help="S3-compatible endpoint (Garage, MinIO, AWS)")
    access_key_id: str | None = setting("S3_ACCESS_KEY_ID", _str, help="S3 access key id")
    secret_access_key: Secret | None = setting("S3_SECRET_ACCESS_KEY", _secret, help="S3 secret key", secret=True)
    bucket: str = setting("S3_BUCKET", _str, "scaigrid", "bucket for ScaiGrid objects")


@dataclass(frozen=True)
class ScaiKeySettings:
    base_url: str | None = setting("SCAIKEY_BASE_URL", _url("https", "http"), help="ScaiKey identity provider")
    jwks_url: str | None = setting(
        "SCAIKEY_JWKS_URL", _url("https", "http"),
        help="JWKS used to verify ScaiKey JWTs; must be `https://` when `APP_ENV=production`")
    audience: str = setting("SCAIKEY_AUDIENCE", _str, "user-portal", "expected JWT audience")
    client_id: str | None = setting("SCAIKEY_CLIENT_ID", _str, help="OAuth client id of this node")
    client_secret: Secret | None = setting("SCAIKEY_CLIENT_SECRET", _secret, help="OAuth client secret", secret=True)
    webhook_secret: Secret | None = setting(
        "SCAIKEY_WEBHOOK_SECRET", _secret, help="HMAC secret of ScaiKey identity webhooks", secret=True)
    issuer: str | None = setting(
        "SCAIKEY_ISSUER", _str,
        help="expected `iss` of ScaiKey JWTs; required when `APP_ENV=production` and `SCAIKEY_JWKS_URL` is set "
        "(elsewhere unchecked when unset)")
    jwt_leeway_s: int = setting(
        "SCAIKEY_JWT_LEEWAY_S", _non_negative_int, 30,
        "clock skew allowed on a JWT's `exp` and `nbf`")
    jwks_min_refetch_s: float = setting(
        "SCAIKEY_JWKS_MIN_REFETCH_S", _positive_float, 30.0,
        "a JWT with an unknown `kid` refetches the JWKS at most this often")


@dataclass(frozen=True)
class AuthSettings:
    encryption_key: Secret | None = setting(
        "SCAIGRID_ENCRYPTION_KEY", _fernet_key,
        help="encrypts backend credentials at rest (a Fernet key: `scaigrid admin generate-key`)", secret=True)
    service_token_secret: Secret | None = setting(
        "SERVICE_TOKEN_SECRET", _secret,
        help="HMAC key of service tokens for internal callers (ScaiInfer nodes, operator tooling, the hybrid link), "
        "each with a scope; unset = no service token is accepted (and no ScaiInfer node can register or be "
        "called)",
        secret=True)
    api_key_cache_ttl_s: float = setting(
        "API_KEY_CACHE_TTL_S", _positive_float, 60.0,
        "how long an http process trusts a cached API key; revocation is pushed at once through Redis")


@dataclass(frozen=True)
class LimitSettings:
    key_rpm: int = setting("RATE_LIMIT_KEY_RPM", parse_positive_int, 60, "default requests per minute per API key")
    user_rpm: int = setting("RATE_LIMIT_USER_RPM", parse_positive_int, 120, "default requests per minute per user")
    tenant_rpm: int = setting(
        "RATE_LIMIT_TENANT_RPM", parse_positive_int, 1000,
        "default requests per minute per tenant")
    partner_rpm: int = setting(
        "RATE_LIMIT_PARTNER_RPM", parse_positive_int, 5000, "default requests per minute per partner")
    on_redis_failure: str = setting(
        "RATE_LIMIT_ON_REDIS_FAILURE", _choice("serve", "refuse"), "serve",
        "when Redis is unreachable: `serve` (count it in a metric, log once a minute) or `refuse` (503)")
    usage_flush_interval_s: int = setting(
        "USAGE_FLUSH_INTERVAL_S", parse_positive_int, 30,
        "the worker moves buffered usage records from Redis to MariaDB this often")


@dataclass(frozen=True)
class DispatchSettings:
    connect_timeout_s: float = setting(
        "DISPATCH_CONNECT_TIMEOUT_S", _positive_float, 5.0,
        "connecting to a backend; then the next backend is tried")
    timeout_s: float = setting(
        "DISPATCH_TIMEOUT_S", _positive_float, 120.0,
        "a backend's whole answer (not streamed) or its first streamed byte; then the next backend is tried")
    stream_timeout_s: float = setting(
        "DISPATCH_STREAM_TIMEOUT_S", _positive_float, 600.0,
        "longest a streamed response may last (nginx `proxy_read_timeout` must exceed it)")
    breaker_failures: int = setting(
        "BREAKER_FAILURE_THRESHOLD", parse_positive_int, 5,
        "consecutive failures that open a backend's circuit breaker")
    breaker_open_s: float = setting(
        "BREAKER_OPEN_S", _positive_float, 30.0, "how long a breaker stays open before one trial request (half-open)")
    allow_private_targets: bool = setting(
        "BACKEND_ALLOW_PRIVATE_TARGETS", parse_bool, False,
        "allow tenants' backends on loopback, private, link-local, CGNAT and other non-global addresses (refused "
        "when saved and at every connection otherwise); shared backends, which only the platform writes, always "
        "may. A backend's `api_key_env` names only variables starting `SCAIGRID_BACKEND_KEY_`")


@dataclass(frozen=True)
class NodeSettings:
    """ScaiInfer nodes: heartbeat cadence and the ages at which a node is warning, then stale."""

    heartbeat_interval_s: float = setting(
        "NODE_HEARTBEAT_INTERVAL_S", _positive_float, 10.0, "how often ScaiInfer nodes are told to heartbeat")
    warning_after_s: float = setting(
        "NODE_WARNING_AFTER_S", _positive_float, 30.0, "a node whose last heartbeat is older is `warning` (still used)")
    stale_after_s: float = setting(
        "NODE_STALE_AFTER_S", _positive_float, 90.0,
        "a node whose last heartbeat is older is `stale`: never dispatched to")


@dataclass(frozen=True)
class ScaiInferSettings:
    """How the http processes reach ScaiInfer nodes: TLS by default, since each call carries the node's credential."""

    ca_file: str | None = setting(
        "SCAIINFER_CA_FILE", _str,
        help="CA bundle that signs the ScaiInfer nodes' certificates (each must name the host of the endpoint the node "
        "announces); unset = the system CAs")
    client_cert_file: str | None = setting(
        "SCAIINFER_CLIENT_CERT_FILE", _str,
        help="PEM certificate (chain) the gateway presents to nodes that require one; set with "
        "`SCAIINFER_CLIENT_KEY_FILE`")
    client_key_file: str | None = setting(
        "SCAIINFER_CLIENT_KEY_FILE", _str, help="PEM private key of `SCAIINFER_CLIENT_CERT_FILE`")
    plaintext: bool = setting(
        "SCAIINFER_PLAINTEXT", parse_bool, False,
        "call nodes without TLS, their call credential in clear: only for nodes on a trusted network; allowed in "
        "production, with a warning logged by each http process at start")


@dataclass(frozen=True)
class WebhookSettings:
    """Outbound webhooks, delivered by the worker from the outbox."""

    allow_private_targets: bool = setting(
        "WEBHOOK_ALLOW_PRIVATE_TARGETS", parse_bool, False,
        "allow webhook URLs on private, loopback and link-local addresses (receivers inside the site network, "
        "common on an appliance)")
    timeout_s: float = setting("WEBHOOK_TIMEOUT_S", _positive_float, 10.0, "a receiver must answer 2xx within this")
    auto_disable_after: int = setting(
        "WEBHOOK_AUTO_DISABLE_AFTER", parse_positive_int, 50, "consecutive failed deliveries that disable a webhook")
    poll_interval_s: int = setting(
        "WEBHOOK_POLL_INTERVAL_S", parse_positive_int, 1, "every worker looks for due webhook deliveries this often")
    retention_days: int = setting(
        "WEBHOOK_RETENTION_DAYS", parse_positive_int, 14,
        "delivered and failed webhook deliveries (and their events) older than this are deleted by the worker")


@dataclass(frozen=True)
class HybridSettings:
    """The hybrid deployment: a managed ScaiGrid enrols appliances (nodes) that link back to it."""

    role: str = setting(
        "HYBRID_ROLE", _choice("managed", "node", "off"), "off",
        "`managed` (enrols appliances: the `/v1/hybrid/` routes, [docs/hybrid.md](docs/hybrid.md)), `node` (an "
        "appliance linked to a managed side), or `off`")
    enrollment_token_ttl_s: int = setting(
        "HYBRID_ENROLLMENT_TOKEN_TTL_S", parse_positive_int, 3600,
        "default and longest validity of a minted enrolment token")
    # The node's end of the link (`scaigrid-appliance link enroll` renders these from its link file).
    managed_url: str | None = setting(
        "HYBRID_MANAGED_URL", _url("https"),
        help="node: the managed side's `https://` URL, where `managed` backends send requests for models the node does "
        "not host")
    link_target: str | None = setting(
        "HYBRID_LINK_TARGET", _str,
        help="node: `host:port` of the managed side's gRPC TLS endpoint (its nginx `GRPC_TLS_PORT`)")
    node_id: str | None = setting("HYBRID_NODE_ID", _str, help="node: the id enrolment gave this node (`hn_...`)")
    node_credential: Secret | None = setting(
        "HYBRID_NODE_CREDENTIAL", _secret,
        help="node: the node credential (`sgn_...`); the http processes verify tunnelled callers' assertions with it "
        "(and `HYBRID_NODE_ID`). The appliance renders these four and `HYBRID_CA_FILE` from `link enroll` "
        "(refused in `appliance.env`)", secret=True)
    ca_file: str | None = setting(
        "HYBRID_CA_FILE", _str,
        help="node: CA bundle that signs the managed side's certificate; unset = the system CAs")
    tunnel_http_ports: tuple[int, ...] | None = setting(
        "HYBRID_TUNNEL_HTTP_PORTS", _ports,
        help="node: the ports of this host's http processes, comma-separated, that the link hands tunnelled requests "
        "to in turn (a refused connection moves on to the next); unset = `HTTP_PORT`. The appliance renders one per "
        "http process (refused in `appliance.env`)")
    backoff_max_s: float = setting(
        "HYBRID_BACKOFF_MAX_S", _positive_float, 60.0,
        "node: longest wait between reconnection attempts (exponential from 0.5 s, full jitter)")
    link_stop_margin_s: float = setting(
        "HYBRID_LINK_STOP_MARGIN_S", _positive_float, 10.0,
        "node: on SIGTERM, how long past the tunnels' grace (`HTTP_DRAIN_GRACE_S`) the link may take to close; then "
        "what still runs is cut and `link` exits 1 (on an appliance keep it under 15: supervisord waits "
        "`HTTP_DRAIN_GRACE_S` + 15 s)")
    # The managed end.
    heartbeat_interval_s: int = setting(
        "HYBRID_HEARTBEAT_INTERVAL_S", parse_positive_int, 15,
        "managed: how often nodes send heartbeats (told to them on connect); a link silent for 3 intervals is "
        "dropped")
    config_refresh_s: float = setting(
        "HYBRID_CONFIG_REFRESH_S", _positive_float, 5.0,
        "managed: how often a grpc replica recomputes the config snapshot of each node it holds, pushing it when "
        "it changed")
    relay_address: str | None = setting(
        "HYBRID_RELAY_ADDRESS", _str,
        help="managed: `host:port` where the other managed processes reach this grpc replica; unset = "
        "`BIND_HOST:GRPC_PORT`")


@dataclass(frozen=True)
class StorageSettings:
    """The ScaiBunker storage proxy (http and bunker_proxy modes) and its capabilities."""

    capability_secret: Secret | None = setting(
        "STORAGE_CAPABILITY_SECRET", _secret,
        help="HMAC key of storage capabilities, the same on every http and bunker_proxy process; unset = none accepted",
        secret=True)
    max_object_bytes: int = setting(
        "STORAGE_MAX_OBJECT_BYTES", parse_positive_int, 5 * 1024**3,
        "largest object the storage proxy accepts (5 GiB), whatever a capability allows; larger uploads get 413")
    capability_max_ttl_s: int = setting(
        "STORAGE_CAPABILITY_MAX_TTL_S", parse_positive_int, 86400,
        "longest validity a minted storage capability may ask for")
    part_size_bytes: int = setting(
        "STORAGE_PART_SIZE_BYTES", _part_size, 8 * 1024**2,
        "multipart part size of uploads to S3 (5 MiB-5 GiB); an upload peaks at about six parts' worth of memory; "
        "`STORAGE_MAX_OBJECT_BYTES` may be at most 10,000 parts")
    max_transfers: int = setting(
        "STORAGE_MAX_TRANSFERS", parse_positive_int, 64,
        "object requests one http or bunker_proxy process serves at once, each on a thread of storage's own pool; "
        "more answer 503 `STORAGE_BUSY`")
    client_stall_s: float = setting(
        "STORAGE_CLIENT_STALL_S", _positive_float, 60.0,
        "an object transfer whose client sends or reads nothing for this long is ended, freeing its slot of the "
        "storage pool")


@dataclass(frozen=True)
class ServerSettings:
    bind_host: str = setting(
        "BIND_HOST", _str, "127.0.0.1",
        "address every listener binds (on the appliance nginx fronts them; use `0.0.0.0` in containers)")
    http_port: int = setting("HTTP_PORT", parse_port, 8000, "http mode")
    grpc_port: int = setting("GRPC_PORT", parse_port, 50051, "grpc mode")
    bunker_proxy_port: int = setting(
        "BUNKER_PROXY_PORT", parse_port, 8001, "bunker_proxy mode (its `/metrics` included)")
    grpc_metrics_port: int = setting("GRPC_METRICS_PORT", parse_port, 9151, "`/metrics` of the grpc mode")
    worker_metrics_port: int = setting("WORKER_METRICS_PORT", parse_port, 9152, "`/metrics` of the worker mode")
    link_metrics_port: int = setting("LINK_METRICS_PORT", parse_port, 9154, "`/metrics` of the link mode")
    http_drain_grace_s: float = setting(
        "HTTP_DRAIN_GRACE_S", _positive_float, 30.0,
        "on SIGTERM, how long in-flight HTTP requests (streams included) may finish")
    grpc_stop_grace_s: float = setting(
        "GRPC_STOP_GRACE_S", _positive_float, 10.0, "on SIGTERM, how long in-flight RPCs may finish")
    cors_allowed_origins: tuple[str, ...] | None = setting(
        "CORS_ALLOWED_ORIGINS", _origins,
        help="browser origins allowed to call the API (CORS), comma-separated, e.g. `https://app.example.com`; `*` = "
        "any; unset = no CORS headers")


@dataclass(frozen=True)
class WorkerSettings:
    heartbeat_ttl_s: int = setting(
        "WORKER_HEARTBEAT_TTL_S", parse_positive_int, 30, "a worker whose heartbeat is older than this counts as dead")
    stop_grace_s: float = setting(
        "WORKER_STOP_GRACE_S", _positive_float, 10.0, "on SIGTERM, how long running jobs may finish")
    usage_retention_days: int = setting(
        "USAGE_RETENTION_DAYS", parse_positive_int, 400, "usage records older than this are deleted by the worker")
    api_key_retention_days: int = setting(
        "API_KEY_RETENTION_DAYS", parse_positive_int, 30,
        "API keys expired or revoked longer ago than this are deleted by the worker")
    audit_retention_days: int = setting(
        "AUDIT_RETENTION_DAYS", parse_positive_int, 400, "audit log entries older than this are deleted by the worker")


@dataclass(frozen=True)
class Settings:
    mode: str | None = setting("SCAIGRID_MODE", _choice(*MODES), help="runtime mode: " + ", ".join(MODES))
    app_env: str = setting("APP_ENV", _choice(*APP_ENVS), "production", ", ".join(APP_ENVS))
    log_level: str = setting("APP_LOG_LEVEL", _choice(*LOG_LEVELS), "info", ", ".join(LOG_LEVELS))
    auth_disabled: bool = setting(
        "SCAIGRID_AUTH_DISABLED", parse_bool, False, "dev only: bypass auth; refused when `APP_ENV=production`")
    jwt_signing_secret: Secret | None = setting(
        "JWT_SIGNING_SECRET", _secret, help="signs admin UI sessions (random, 64 chars)", secret=True)
    modules: tuple[str, ...] = setting(
        "SCAIGRID_MODULES", _module_list, ("scaibunker",),
        "enabled modules, comma-separated: built-in ids, or `package.module:ATTRIBUTE` for an external module")
    database: DatabaseSettings = field(default_factory=DatabaseSettings)
    redis: RedisSettings = field(default_factory=RedisSettings)
    s3: S3Settings = field(default_factory=S3Settings)
    scaikey: ScaiKeySettings = field(default_factory=ScaiKeySettings)
    auth: AuthSettings = field(default_factory=AuthSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    nodes: NodeSettings = field(default_factory=NodeSettings)
    scaiinfer: ScaiInferSettings = field(default_factory=ScaiInferSettings)
    webhooks: WebhookSettings = field(default_factory=WebhookSettings)
    hybrid: HybridSettings = field(default_factory=HybridSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)

    def require(self, *names: Requirement) -> None:
        """Fails unless every named dependency (a key of `needs`) is configured."""
        needs: dict[Requirement, list[tuple[str, object]]] = {
            "database": [("DATABASE_URL", self.database.url)],
            "redis": [("REDIS_URL", self.redis.url)],
            "s3": [("S3_ENDPOINT_URL", self.s3.endpoint_url), ("S3_ACCESS_KEY_ID", self.s3.access_key_id),
                   ("S3_SECRET_ACCESS_KEY", self.s3.secret_access_key)],
            "encryption": [("SCAIGRID_ENCRYPTION_KEY", self.auth.encryption_key)],
            "service_token": [("SERVICE_TOKEN_SECRET", self.auth.service_token_secret)],
            "hybrid_node": [("HYBRID_LINK_TARGET", self.hybrid.link_target), ("HYBRID_NODE_ID", self.hybrid.node_id),
                            ("HYBRID_NODE_CREDENTIAL", self.hybrid.node_credential)],
        }
        needed_by = f"mode {self.mode}" if self.mode else "this command"
        if "hybrid_node" in names and self.hybrid.role != "node":
            raise ConfigError(f"HYBRID_ROLE: {needed_by} needs node, but it is {self.hybrid.role}")
        for name in names:
            for env, value in needs[name]:
                if value is None:
                    raise ConfigError(f"{env}: required by {needed_by}, but not set")


@dataclass(frozen=True)
class Entry:
    """One setting as shown by check-config and the README table."""

    env: str
    value: Any
    default: Any
    help: str
    secret: bool

    def display(self) -> str:
        if self.value is None:
            return "(not set)"
        if isinstance(self.value, Secret):
            return self.value.masked()
        if isinstance(self.value, tuple):
            return ",".join(self.value)
        return str(self.value)


def entries(settings: Settings | None = None) -> Iterator[Entry]:
    """Walks the tree in declaration order: every setting with its value (or default)."""
    def walk(node: Any, cls: type) -> Iterator[Entry]:
        for f in dataclasses.fields(cls):
            if "env" in f.metadata:
                value = getattr(node, f.name) if node is not None else f.default
                yield Entry(f.metadata["env"], value, f.default, f.metadata["help"], f.metadata["secret"])
            else:
                yield from walk(getattr(node, f.name) if node is not None else None, f.type)  # type: ignore[arg-type]

    yield from walk(settings, Settings)


def setting_parsers() -> dict[str, Callable[[str], Any]]:
    """Every setting's variable and parser, for tools checking settings one by one (the appliance's check-config)."""
    def walk(cls: type) -> Iterator[tuple[str, Callable[[str], Any]]]:
        for f in dataclasses.fields(cls):
            if "env" in f.metadata:
                yield f.metadata["env"], f.metadata["parse"]
            else:
                yield from walk(f.type)  # type: ignore[arg-type]

    return dict(walk(Settings))


_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(path: Path) -> dict[str, str]:
    """Reads KEY=VALUE lines in the subset systemd's EnvironmentFile= also understands."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read env file ({exc.strerror})") from None
    values: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = _ENV_LINE.match(line)
        if not match:
            raise ConfigError(f"{path}:{number}: expected KEY=VALUE")
        key, value = match.groups()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def load_settings(environ: Mapping[str, str] | None = None, env_file: Path | None = None) -> Settings:
    """Builds the settings: environment over env file over defaults. Raises ConfigError naming the variable."""
    environ = os.environ if environ is None else environ
    if env_file is None and DEFAULT_ENV_FILE.is_file():
        env_file = DEFAULT_ENV_FILE
    source = {**(read_env_file(env_file) if env_file else {}), **environ}

    def build(cls: type) -> Any:
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if "env" not in f.metadata:
                kwargs[f.name] = build(f.type)  # type: ignore[arg-type]
                continue
            env = f.metadata["env"]
            raw = source.get(env)
            if raw is None or (raw.strip() == "" and f.default is None):
                continue
            try:
                kwargs[f.name] = f.metadata["parse"](raw.strip())
            except ValueError as exc:
                shown = "" if f.metadata["secret"] else f", got {raw!r}"
                raise ConfigError(f"{env}: expected {exc}{shown}") from None
        return cls(**kwargs)

    settings: Settings = build(Settings)
    if settings.auth_disabled and settings.app_env == "production":
        raise ConfigError("SCAIGRID_AUTH_DISABLED: must not be true when APP_ENV=production")
    if settings.nodes.warning_after_s >= settings.nodes.stale_after_s:
        raise ConfigError("NODE_WARNING_AFTER_S: must be below NODE_STALE_AFTER_S "
                          f"({settings.nodes.warning_after_s:g} >= {settings.nodes.stale_after_s:g})")
    _check_transport(settings)
    storage = settings.storage
    if storage.max_object_bytes > S3_MAX_PARTS * storage.part_size_bytes:
        raise ConfigError(f"STORAGE_MAX_OBJECT_BYTES: must be at most {S3_MAX_PARTS} x STORAGE_PART_SIZE_BYTES "
                          f"(S3 takes at most {S3_MAX_PARTS} parts per upload; {storage.max_object_bytes} > "
                          f"{S3_MAX_PARTS} x {storage.part_size_bytes})")
    return settings


def _check_transport(settings: Settings) -> None:
    """Rules across the transport settings: TLS to ScaiInfer nodes, and ScaiKey's JWKS in production."""
    tls = settings.scaiinfer
    if (tls.client_cert_file is None) != (tls.client_key_file is None):
        raise ConfigError("SCAIINFER_CLIENT_CERT_FILE, SCAIINFER_CLIENT_KEY_FILE: set both (the certificate and its "
                          "key) or neither")
    if tls.plaintext and (tls.ca_file or tls.client_cert_file):
        raise ConfigError("SCAIINFER_PLAINTEXT: true, but SCAIINFER_CA_FILE or SCAIINFER_CLIENT_CERT_FILE is set: "
                          "choose TLS or plaintext")
    # A JWKS fetched over plain http can be swapped on the way, and then any token verifies; a token of another
    # issuer sharing the audience would be accepted. Both are development conveniences only.
    jwks_url = settings.scaikey.jwks_url
    if settings.app_env == "production" and jwks_url is not None:
        if urlsplit(jwks_url).scheme != "https":
            raise ConfigError(f"SCAIKEY_JWKS_URL: must be https when APP_ENV=production, got {jwks_url!r}")
        if not settings.scaikey.issuer:
            raise ConfigError("SCAIKEY_ISSUER: required when APP_ENV=production and SCAIKEY_JWKS_URL is set "
                              "(the `iss` every ScaiKey token must carry)")
