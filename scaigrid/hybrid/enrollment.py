"""Enrolment tokens and node credentials on the managed side: minted once, stored only as sha256 hashes."""

import hashlib
import secrets
from datetime import timedelta
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.clock import utc_now
from scaigrid.db.tables import hybrid_enrollment_tokens, hybrid_nodes, new_id

TOKEN_PREFIX = "sget_"  # noqa: S105  # a prefix that says what a pasted secret is, not a secret
CREDENTIAL_PREFIX = "sgn_"


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _new_credential() -> str:
    return CREDENTIAL_PREFIX + secrets.token_urlsafe(32)


async def mint_token(conn: AsyncConnection, name: str | None, ttl_s: int) -> dict[str, Any]:
    """A new enrolment token: {id, token, expires_at}; the token itself is in this answer only."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    now = utc_now()
    row = {"id": new_id("het"), "token_hash": digest(token), "name": name, "created_at": now,
           "expires_at": now + timedelta(seconds=ttl_s)}
    await conn.execute(insert(hybrid_enrollment_tokens).values(**row))
    return {"id": row["id"], "token": token, "expires_at": row["expires_at"]}


async def enroll(conn: AsyncConnection, token: str, name: str, software_version: str) -> tuple[str, str]:
    """Spends the token on a new node: (node id, credential). Call inside a transaction.

    The token row is locked first, so of two enrolments racing on one token the second waits, then finds it used.
    """
    tokens = hybrid_enrollment_tokens
    row = (await conn.execute(select(tokens).where(tokens.c.token_hash == digest(token)).with_for_update())
           ).mappings().first()
    if row is None:
        raise errors.enrollment_token_invalid()
    if row["used_at"] is not None:
        raise errors.enrollment_token_used()
    now = utc_now()
    if row["expires_at"] <= now:
        raise errors.enrollment_token_expired()
    node_id, credential = new_id("hn"), _new_credential()
    await conn.execute(insert(hybrid_nodes).values(
        id=node_id, name=name, credential_hash=digest(credential), software_version=software_version, created_at=now))
    await conn.execute(update(tokens).where(tokens.c.id == row["id"]).values(used_at=now, node_id=node_id))
    return node_id, credential


def bearer(authorization: str | None) -> str:
    scheme, _, value = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not value.strip().startswith(CREDENTIAL_PREFIX):
        raise errors.node_credential_invalid()
    return value.strip()


async def authenticate(conn: AsyncConnection, authorization: str | None) -> Any:
    """The live node whose credential this is (locked). Call inside a transaction.

    A rotated-in credential's first use is the switch: it becomes the node's credential, the old one stops working.
    """
    hashed = digest(bearer(authorization))
    nodes = hybrid_nodes
    query = select(nodes).where(or_(nodes.c.credential_hash == hashed, nodes.c.pending_credential_hash == hashed),
                                nodes.c.revoked_at.is_(None)).with_for_update()
    row = (await conn.execute(query)).mappings().first()
    if row is None:
        raise errors.node_credential_invalid()
    if row["pending_credential_hash"] == hashed:
        await conn.execute(update(nodes).where(nodes.c.id == row["id"]).values(
            credential_hash=hashed, pending_credential_hash=None, rotated_at=utc_now()))
        row = (await conn.execute(select(nodes).where(nodes.c.id == row["id"]))).mappings().one()
    return row


async def rotate(conn: AsyncConnection, node_id: str) -> str:
    """A new credential, pending until first used; an earlier pending one that was never used is dropped."""
    credential = _new_credential()
    await conn.execute(update(hybrid_nodes).where(hybrid_nodes.c.id == node_id).values(
        pending_credential_hash=digest(credential)))
    return credential


async def revoke(conn: AsyncConnection, node_id: str) -> bool:
    """Revokes the node and every credential of it; False when there is no such live node."""
    result = await conn.execute(update(hybrid_nodes).where(
        hybrid_nodes.c.id == node_id, hybrid_nodes.c.revoked_at.is_(None)).values(
        revoked_at=utc_now(), pending_credential_hash=None))
    return bool(result.rowcount)
