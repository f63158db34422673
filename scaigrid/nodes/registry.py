"""ScaiInfer nodes: heartbeats stored, health by heartbeat age, the http process's node directory, the sweep job.

Health is always computed from the age of the last heartbeat (healthy, then warning after NODE_WARNING_AFTER_S,
then stale after NODE_STALE_AFTER_S), so a listing is right even when no worker runs. The `status` column is the
sweep job's record of the same, written so that each transition is logged once, by one worker.
"""

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import grpc
from sqlalchemy import select, update
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.clock import utc_now
from scaigrid.db.tables import infra_nodes
from scaigrid.errors import FieldError
from scaigrid.nodes.directory import ChannelDirectory
from scaigrid.settings import ConfigError, NodeSettings, ScaiInferSettings, Secret
from scaigrid.worker.jobs import JobContext

logger = logging.getLogger(__name__)

SERVICE_NAME_PREFIX = "scaiinfer-"
# Short enough that "scaiinfer-<id>" is a service token name (at most 64 characters).
NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,53}")
HEALTHY, WARNING, STALE = "healthy", "warning", "stale"
MAX_MODELS = 256
MAX_NAME_CHARS = 255
MAX_COUNT = 2**31 - 1  # the capacity and load columns' range (the protocol's uint32 goes higher)
# How often an http process rereads the nodes: well below NODE_WARNING_AFTER_S, one small query per process.
DIRECTORY_REFRESH_S = 2.0


@dataclass(frozen=True)
class Heartbeat:
    node_id: str
    endpoint: str  # host:port of its InferenceService
    models: tuple[str, ...]
    capacity: int
    load: int
    version: str | None


def parse_heartbeat(node_id: str, endpoint: str, models: Sequence[str], capacity: int, load: int,
                    version: str) -> Heartbeat:
    """A heartbeat's fields checked; VALIDATION_ERROR lists every problem."""
    problems = []
    if not NODE_ID.fullmatch(node_id):
        problems.append(FieldError("node_id", f"required, must match {NODE_ID.pattern}"))
    if not _is_endpoint(endpoint):
        problems.append(FieldError("endpoint", "required: host:port where the node serves InferenceService"))
    if len(models) > MAX_MODELS:
        problems.append(FieldError("models", f"at most {MAX_MODELS}"))
    if any(not name or len(name) > MAX_NAME_CHARS for name in models):
        problems.append(FieldError("models", f"each a name of 1-{MAX_NAME_CHARS} characters"))
    for name, value in (("capacity", capacity), ("load", load)):
        if value > MAX_COUNT:
            problems.append(FieldError(name, f"at most {MAX_COUNT}"))
    if len(version) > 64:
        problems.append(FieldError("version", "at most 64 characters"))
    if problems:
        raise errors.validation_error(problems, "the heartbeat is invalid")
    return Heartbeat(node_id, endpoint, tuple(models), capacity, load, version or None)


def token_name(node_id: str) -> str:
    """The name of the service token a node heartbeats with (scope scaiinfer-node): `scaigrid admin service-token
    --name scaiinfer-<id> --scope scaiinfer-node`."""
    return SERVICE_NAME_PREFIX + node_id


def call_token(secret: Secret, node_id: str) -> str:
    """The credential the gateway's calls to this node carry, handed to the node in every heartbeat reply.

    Derived from SERVICE_TOKEN_SECRET and the node id: every gateway process knows it without shared state, the
    node needs no secret (SERVICE_TOKEN_SECRET signs every service token, and must stay on the gateway), and one
    node's credential says nothing about another's.
    """
    digest = hmac.new(secret.reveal().encode(), b"scaiinfer-call:" + node_id.encode(), hashlib.sha256)
    return "sgc_" + digest.hexdigest()


def _is_endpoint(endpoint: str) -> bool:
    if not endpoint or len(endpoint) > MAX_NAME_CHARS or "/" in endpoint:
        return False
    try:
        parts = urlsplit("//" + endpoint)
        return bool(parts.hostname) and parts.port is not None and parts.port > 0
    except ValueError:
        return False


def health(age_s: float, settings: NodeSettings) -> str:
    if age_s > settings.stale_after_s:
        return STALE
    if age_s > settings.warning_after_s:
        return WARNING
    return HEALTHY


def _age_s(last_heartbeat_at: datetime, now_s: float) -> float:
    return max(0.0, now_s - last_heartbeat_at.replace(tzinfo=UTC).timestamp())


async def record_heartbeat(engine: AsyncEngine, beat: Heartbeat) -> None:
    """Registers the node, or refreshes it: one upsert. `status` is left to the sweep, which logs the recovery."""
    now = utc_now()
    values = {"endpoint": beat.endpoint, "models": list(beat.models), "capacity": beat.capacity,
              "load": beat.load, "version": beat.version, "last_heartbeat_at": now}
    statement = insert(infra_nodes).values(id=beat.node_id, registered_at=now, status=HEALTHY, **values)
    async with engine.begin() as conn:
        await conn.execute(statement.on_duplicate_key_update(**values))


async def list_nodes(engine: AsyncEngine, settings: NodeSettings) -> list[dict[str, Any]]:
    """Every node, by id, with its health by heartbeat age."""
    async with engine.connect() as conn:
        rows = (await conn.execute(select(infra_nodes).order_by(infra_nodes.c.id))).all()
    now_s = time.time()
    items = []
    for row in rows:
        age_s = _age_s(row.last_heartbeat_at, now_s)
        items.append({
            "id": row.id, "endpoint": row.endpoint, "models": row.models, "capacity": row.capacity,
            "load": row.load, "version": row.version, "health": health(age_s, settings),
            "last_heartbeat_at": row.last_heartbeat_at, "heartbeat_age_s": round(age_s, 1),
            "registered_at": row.registered_at})
    return items


async def sweep_node_status(ctx: JobContext) -> None:
    """Writes each node's health into `status` and logs every transition (healthy → warning → stale, and back).

    Runs every third of NODE_WARNING_AFTER_S, once per tick across workers: a transition is then logged at most
    that late, and the sweep (one small query) costs nothing next to the heartbeats. A row is only updated while
    its heartbeat is the one this sweep read, so a heartbeat arriving meanwhile wins.
    """
    settings = ctx.settings.nodes
    async with ctx.engine.begin() as conn:
        rows = (await conn.execute(select(infra_nodes.c.id, infra_nodes.c.status,
                                          infra_nodes.c.last_heartbeat_at))).all()
        now_s = time.time()
        for row in rows:
            age_s = _age_s(row.last_heartbeat_at, now_s)
            status = health(age_s, settings)
            if status == row.status:
                continue
            changed = await conn.execute(
                update(infra_nodes).where(infra_nodes.c.id == row.id,
                                          infra_nodes.c.last_heartbeat_at == row.last_heartbeat_at)
                .values(status=status))
            if changed.rowcount:
                log = logger.warning if status == STALE else logger.info
                log("node %s: %s -> %s (last heartbeat %.0f s ago)", row.id, row.status, status, age_s,
                    extra={"event": "node_status_changed", "node_id": row.id, "from": row.status, "to": status})


@dataclass(frozen=True, slots=True)
class KnownNode:
    endpoint: str
    last_heartbeat_unix: float
    models: frozenset[str]  # the models its last heartbeat announced as loaded


def channel_credentials(settings: ScaiInferSettings) -> grpc.ChannelCredentials | None:
    """TLS for the calls to nodes, from SCAIINFER_* (read once, at start); None only with SCAIINFER_PLAINTEXT."""
    if settings.plaintext:
        logger.warning("SCAIINFER_PLAINTEXT is true: calls to ScaiInfer nodes, and the node credential each carries, "
                       "cross the network in clear", extra={"event": "scaiinfer_plaintext"})
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read("SCAIINFER_CA_FILE", settings.ca_file),
        private_key=_read("SCAIINFER_CLIENT_KEY_FILE", settings.client_key_file),
        certificate_chain=_read("SCAIINFER_CLIENT_CERT_FILE", settings.client_cert_file))


def _read(env: str, path: str | None) -> bytes | None:
    try:
        return Path(path).read_bytes() if path else None
    except OSError as exc:
        raise ConfigError(f"{env}: cannot read {path} ({exc.strerror})") from None


class NodeDirectory(ChannelDirectory):
    """The http process's view of the nodes its catalogue routes to (scaigrid/nodes/directory.py), and a channel to
    each one's endpoint."""

    def __init__(self, engine: AsyncEngine, settings: NodeSettings, stream_timeout_s: float,
                 credentials: grpc.ChannelCredentials | None) -> None:
        super().__init__("node", DIRECTORY_REFRESH_S, stream_timeout_s, credentials)
        self._engine = engine
        self._stale_after_s = settings.stale_after_s
        self._nodes: dict[str, KnownNode] = {}

    def reachable(self, node_id: str, now_s: float) -> KnownNode | None:
        """The node, unless it is unknown or stale."""
        node = self._nodes.get(node_id)
        if node is None or now_s - node.last_heartbeat_unix > self._stale_after_s:
            return None
        return node

    async def refresh(self) -> None:
        async with self._engine.connect() as conn:
            rows = (await conn.execute(select(infra_nodes.c.id, infra_nodes.c.endpoint, infra_nodes.c.models,
                                              infra_nodes.c.last_heartbeat_at))).all()
        self._nodes = {row.id: KnownNode(row.endpoint, row.last_heartbeat_at.replace(tzinfo=UTC).timestamp(),
                                         frozenset(row.models or ())) for row in rows}
        self.keep_channels(node.endpoint for node in self._nodes.values())
