"""API keys: `sgk_` + 43 random url-safe characters; only the SHA-256 is stored, the key is shown once."""

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid.auth.tenancy import MEMBERSHIP_COLUMNS, MEMBERSHIP_JOIN, Membership, membership_of
from scaigrid.db.tables import api_keys, new_id, users

PREFIX = "sgk_"


def generate() -> str:
    return PREFIX + secrets.token_urlsafe(32)  # 256 bits


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def looks_like_key(token: str) -> bool:
    return token.startswith(PREFIX) and len(token) >= len(PREFIX) + 32


@dataclass(frozen=True)
class KeyRecord:
    """A key with everything authentication needs about its user, tenant and partner (one query)."""

    id: str
    role: str
    prefix: str
    expires_at: datetime | None
    revoked: bool
    rpm: int | None
    member: Membership


async def create_api_key(conn: AsyncConnection, *, tenant_id: str, user_id: str, name: str, role: str,
                         expires_at: datetime | None = None) -> tuple[str, str]:
    """Stores a new key; returns (id, key). The caller shows the key once and forgets it."""
    key = generate()
    key_id = new_id("key")
    await conn.execute(insert(api_keys).values(
        id=key_id, tenant_id=tenant_id, user_id=user_id, name=name, role=role, key_hash=hash_key(key),
        key_prefix=key[:12], expires_at=expires_at))
    return key_id, key


async def load_key(conn: AsyncConnection, key_hash: str) -> KeyRecord | None:
    row = (await conn.execute(
        select(api_keys.c.id, api_keys.c.role, api_keys.c.key_prefix, api_keys.c.expires_at, api_keys.c.revoked_at,
               api_keys.c.rpm_limit, *MEMBERSHIP_COLUMNS)
        .select_from(MEMBERSHIP_JOIN.join(api_keys, api_keys.c.user_id == users.c.id))
        .where(api_keys.c.key_hash == key_hash))).first()
    if row is None:
        return None
    return KeyRecord(id=row.id, role=row.role, prefix=row.key_prefix, expires_at=row.expires_at,
                     revoked=row.revoked_at is not None, rpm=row.rpm_limit, member=membership_of(row))
