"""Turns `Authorization: Bearer ...` into a Principal, with API keys cached in process.

Once warm, authenticating an API key touches neither MariaDB nor Redis: records are cached for
API_KEY_CACHE_TTL_S, and a revocation or suspension is announced on the invalidation bus so every
process forgets the record at once.
"""

import time
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import errors
from scaigrid.auth import keys
from scaigrid.auth.principal import Principal, RateLimits
from scaigrid.cache import InvalidationBus
from scaigrid.settings import Settings

# Topics on the invalidation bus: one key by hash, or every identity (tenant or user status changed).
TOPIC_API_KEY = "apikey"
TOPIC_IDENTITY = "identity"
NEGATIVE_TTL_S = 5.0  # an unknown key is remembered briefly, so a flood of bad keys does not reach MariaDB


class Authenticator:
    def __init__(self, settings: Settings, engine: AsyncEngine, bus: InvalidationBus) -> None:
        self._settings = settings
        self._engine = engine
        self._keys: dict[str, tuple[float, keys.KeyRecord | None]] = {}
        bus.on(TOPIC_API_KEY, self._forget_key)
        bus.on(TOPIC_IDENTITY, lambda _key: self._keys.clear())

    def _forget_key(self, key_hash: str | None) -> None:
        if key_hash is None:
            self._keys.clear()
        else:
            self._keys.pop(key_hash, None)

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise errors.auth_token_missing()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.auth_token_invalid("expected `Authorization: Bearer <token>`")
        if keys.looks_like_key(token):
            return await self._api_key(token)
        raise errors.auth_token_invalid()

    async def _api_key(self, key: str) -> Principal:
        key_hash = keys.hash_key(key)
        now = time.monotonic()
        cached = self._keys.get(key_hash)
        if cached is not None and cached[0] > now:
            record = cached[1]
        else:
            async with self._engine.connect() as conn:
                record = await keys.load_key(conn, key_hash)
            ttl_s = self._settings.auth.api_key_cache_ttl_s if record is not None else NEGATIVE_TTL_S
            self._keys[key_hash] = (now + ttl_s, record)
        if record is None or record.revoked:
            raise errors.auth_token_invalid("unknown or revoked API key")
        if record.expires_at is not None and record.expires_at <= datetime.now(UTC).replace(tzinfo=None):
            raise errors.auth_token_invalid("this API key has expired")
        for what, status in (("user", record.user_status), ("tenant", record.tenant_status),
                             ("partner", record.partner_status)):
            if status != "active":
                raise errors.auth_token_invalid(f"the key's {what} is {status}")
        limits = self._settings.limits
        return Principal(
            kind="api_key", role=record.role, partner_id=record.partner_id, tenant_id=record.tenant_id,
            user_id=record.user_id, api_key_id=record.id, name=record.prefix,
            limits=RateLimits(key=record.key_rpm or limits.key_rpm, user=record.user_rpm or limits.user_rpm,
                              tenant=record.tenant_rpm or limits.tenant_rpm,
                              partner=record.partner_rpm or limits.partner_rpm))
