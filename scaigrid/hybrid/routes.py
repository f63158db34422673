"""/v1/hybrid/: enrolment tokens and nodes (super_admin), enrolment (public), and a node's own link record.

Answered only when HYBRID_ROLE=managed; elsewhere every route answers 404 HYBRID_NOT_MANAGED. The node routes
are `@public` to the gateway and check the node credential themselves: a node credential is not an API key, so
it must never pass the API-key authenticator (nor an API key pass here).
"""

import logging
import re
from typing import Any

from aiohttp import web
from sqlalchemy import select

from scaigrid import errors
from scaigrid.access import public, requires
from scaigrid.appkeys import DB, REDIS, SETTINGS
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.cache import announce
from scaigrid.clock import iso, utc_from_unix
from scaigrid.db.tables import hybrid_nodes
from scaigrid.envelope import PAGE, listing, ok
from scaigrid.fields import Fields, json_object
from scaigrid.hybrid import enrollment, registry, snapshot
from scaigrid.routing.catalogue import TOPIC_CATALOGUE

logger = logging.getLogger(__name__)

NAME = re.compile(r"[\w .:@-]+")


def _managed(request: web.Request) -> None:
    if request.app[SETTINGS].hybrid.role != "managed":
        raise errors.hybrid_not_managed()


def _node_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "name": row["name"], "software_version": row["software_version"],
            "created_at": iso(row["created_at"]), "rotated_at": iso(row["rotated_at"]),
            "revoked_at": iso(row["revoked_at"]), "status": "revoked" if row["revoked_at"] else "enrolled"}


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def create_enrollment_token(request: web.Request) -> web.Response:
    """A single-use enrolment token, valid ttl_s (default and maximum HYBRID_ENROLLMENT_TOKEN_TTL_S); shown once."""
    _managed(request)
    max_ttl_s = request.app[SETTINGS].hybrid.enrollment_token_ttl_s
    body = await Fields.of(request)
    name = body.string("name", pattern=NAME, hint="letters, digits, spaces and . : @ _ -")
    ttl_s = body.integer("ttl_s", minimum=1, maximum=max_ttl_s, unit="seconds")
    body.done()
    async with request.app[DB].begin() as conn:
        minted = await enrollment.mint_token(conn, name, max_ttl_s if ttl_s is None else ttl_s)
    logger.info("hybrid enrolment token %s minted", minted["id"],
                extra={"event": "hybrid_token_minted", "token_id": minted["id"]})
    return ok(minted, status=201)


def _link_state(holder: registry.LinkHolder | None) -> dict[str, Any]:
    if holder is None:
        return {"connected": False, "last_heartbeat_at": None, "software_version": None, "config_version": None,
                "outbox_depth": None}
    return {"connected": True, "last_heartbeat_at": iso(utc_from_unix(holder.last_heartbeat_unix)),
            "software_version": holder.software_version, "config_version": holder.config_version,
            "outbox_depth": holder.outbox_depth}


@requires("admin:access", reach="platform", scopes=(OPERATOR,), query=PAGE)
async def list_nodes(request: web.Request) -> web.Response:
    """Every node ever enrolled, revoked ones included, newest first, with its link as the registry has it."""
    _managed(request)
    links = await registry.holders(request.app[REDIS])
    return await listing(request, select(hybrid_nodes), hybrid_nodes.c.created_at, hybrid_nodes.c.id,
                         lambda row: {**_node_json(row), "link": _link_state(links.get(row["id"]))})


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def revoke_node(request: web.Request) -> web.Response:
    """Revokes the node: its credentials stop working at once (repeating it changes nothing)."""
    _managed(request)
    node_id = request.match_info["id"]
    async with request.app[DB].begin() as conn:
        await enrollment.revoke(conn, node_id)
        row = (await conn.execute(select(hybrid_nodes).where(hybrid_nodes.c.id == node_id))).mappings().first()
    if row is None:
        raise errors.not_found(f"no hybrid node {node_id!r}")
    await announce(request.app[REDIS], TOPIC_CATALOGUE)  # its `hybrid` backends serve nobody from now on
    logger.info("hybrid node %s revoked by an admin", node_id,
                extra={"event": "hybrid_node_revoked", "node_id": node_id})
    return ok(_node_json(row))


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def get_node_tenants(request: web.Request) -> web.Response:
    """The tenants whose partners, users, keys and models the node mirrors (its config snapshot carries them)."""
    _managed(request)
    node_id = request.match_info["id"]
    async with request.app[DB].connect() as conn:
        if await conn.scalar(select(hybrid_nodes.c.id).where(hybrid_nodes.c.id == node_id)) is None:
            raise errors.not_found(f"no hybrid node {node_id!r}")
        tenant_ids = await snapshot.allowed_tenants(conn, node_id)
    return ok({"node_id": node_id, "tenant_ids": tenant_ids})


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def put_node_tenants(request: web.Request) -> web.Response:
    """Replaces the node's tenants: {"tenant_ids": [...]}; the node gets them with its next snapshot."""
    _managed(request)
    node_id = request.match_info["id"]
    body = await json_object(request)
    tenant_ids = body.get("tenant_ids")
    problems = [errors.FieldError(name, "unknown field") for name in body if name != "tenant_ids"]
    if not isinstance(tenant_ids, list) or not all(isinstance(t, str) and t for t in tenant_ids):
        problems.append(errors.FieldError("tenant_ids", "required: a list of tenant ids"))
        tenant_ids = []
    if problems:
        raise errors.validation_error(problems)
    async with request.app[DB].begin() as conn:
        await snapshot.set_allowed_tenants(conn, node_id, tenant_ids)
        allowed = await snapshot.allowed_tenants(conn, node_id)
    await announce(request.app[REDIS], TOPIC_CATALOGUE)  # `hybrid` backends send only these tenants' requests
    logger.info("hybrid node %s may serve %d tenant(s)", node_id, len(allowed),
                extra={"event": "hybrid_node_tenants_set", "node_id": node_id})
    return ok({"node_id": node_id, "tenant_ids": allowed})


@public  # authenticated by the enrolment token in its body
async def enroll(request: web.Request) -> web.Response:
    """Spends an enrolment token on a new node: {node_id, credential}; the credential is shown once."""
    _managed(request)
    body = await Fields.of(request)
    token = body.string("token", required=True, max_length=128)
    name = body.string("name", required=True, pattern=NAME, hint="letters, digits, spaces and . : @ _ -")
    software_version = body.string("software_version", required=True, max_length=64)
    body.done()
    assert token is not None and name is not None and software_version is not None  # done() raised otherwise
    async with request.app[DB].begin() as conn:
        node_id, credential = await enrollment.enroll(conn, token, name, software_version)
    logger.info("hybrid node %s enrolled (%s, %s)", node_id, name, software_version,
                extra={"event": "hybrid_node_enrolled", "node_id": node_id})
    return ok({"node_id": node_id, "credential": credential}, status=201)


def _link_json(row: Any) -> dict[str, Any]:
    return {"node_id": row["id"], "name": row["name"], "rotated_at": iso(row["rotated_at"])}


@public  # authenticated by the node credential, checked here
async def get_link(request: web.Request) -> web.Response:
    """The calling node's own record; a rotated-in credential's first use here completes the switch."""
    _managed(request)
    async with request.app[DB].begin() as conn:
        row = await enrollment.authenticate(conn, request.headers.get("Authorization"))
    return ok(_link_json(row))


@public  # authenticated by the node credential, checked here
async def rotate_link(request: web.Request) -> web.Response:
    """A new credential for the calling node; the old one works until the new one is first used."""
    _managed(request)
    async with request.app[DB].begin() as conn:
        row = await enrollment.authenticate(conn, request.headers.get("Authorization"))
        credential = await enrollment.rotate(conn, row["id"])
    logger.info("hybrid node %s rotated its credential", row["id"],
                extra={"event": "hybrid_credential_rotated", "node_id": row["id"]})
    return ok({"node_id": row["id"], "credential": credential})


@public  # authenticated by the node credential, checked here
async def unenroll(request: web.Request) -> web.Response:
    """The calling node leaves: it is revoked, every credential of it with it."""
    _managed(request)
    async with request.app[DB].begin() as conn:
        row = await enrollment.authenticate(conn, request.headers.get("Authorization"))
        await enrollment.revoke(conn, row["id"])
    await announce(request.app[REDIS], TOPIC_CATALOGUE)
    logger.info("hybrid node %s unenrolled itself", row["id"],
                extra={"event": "hybrid_node_unenrolled", "node_id": row["id"]})
    return ok({"node_id": row["id"], "revoked": True})


ROUTES: list[web.RouteDef] = [
    web.post("/v1/hybrid/enrollment-tokens", create_enrollment_token),
    web.get("/v1/hybrid/nodes", list_nodes),
    web.delete("/v1/hybrid/nodes/{id}", revoke_node),
    web.get("/v1/hybrid/nodes/{id}/tenants", get_node_tenants),
    web.put("/v1/hybrid/nodes/{id}/tenants", put_node_tenants),
    web.post("/v1/hybrid/enroll", enroll),
    web.get("/v1/hybrid/link", get_link),
    web.post("/v1/hybrid/link/rotate", rotate_link),
    web.delete("/v1/hybrid/link", unenroll),
]
