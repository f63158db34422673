"""Turns `Authorization: Bearer ...` into a Principal: API keys, ScaiKey JWTs, service tokens (or, in dev, nobody);
on a hybrid node, a tunnelled request's caller assertion (`tunnelled`).

Once warm, authenticating an API key touches neither MariaDB nor Redis: records are cached for
API_KEY_CACHE_TTL_S, and a revocation or suspension is announced on the invalidation bus so every
process forgets the record at once. ScaiKey users are cached the same way, by subject.
"""

import asyncio
import dataclasses
import logging
import time
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from scaigrid import db, errors
from scaigrid.auth import keys, service_tokens
from scaigrid.auth.principal import Principal, RateLimits
from scaigrid.auth.roles import ROLE_REACH, ROLES, TENANT_ROLES, grants_at_most
from scaigrid.auth.scaikey import ScaiKeyVerifier
from scaigrid.auth.tenancy import Membership, create_user, load_membership
from scaigrid.cache import InvalidationBus
from scaigrid.clock import utc_now
from scaigrid.db.defaults import DEFAULT_SLUG
from scaigrid.db.tables import api_keys, hybrid_mirrored, tenants, users
from scaigrid.hybrid import assertion
from scaigrid.hybrid.assertion import ASSERTION_HEADER
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

# Topics on the invalidation bus: one key by hash, or every identity (tenant or user status changed).
TOPIC_API_KEY = "apikey"
TOPIC_IDENTITY = "identity"
# How long a key's last verdict is kept, while MariaDB cannot be reached, before its lookup is tried again.
STALE_RETRY_S = 5.0
NEGATIVE_TTL_S = 5.0  # an unknown key is remembered briefly, so a flood of bad keys does not reach MariaDB
DEV_EMAIL = f"dev@{DEFAULT_SLUG}.local"
DEV_ROLE = "tenant_admin"
JIT_DEFAULT_ROLE = "tenant_user"


@dataclasses.dataclass(frozen=True)
class _CachedKey:
    deadline: float  # monotonic time after which the database is asked again
    expires_at: datetime | None  # the key's own expiry (naive UTC)
    principal: Principal | None  # None: refused, for `refusal`
    refusal: str


class Authenticator:
    def __init__(self, settings: Settings, engine: AsyncEngine, bus: InvalidationBus) -> None:
        self._settings = settings
        self._engine = engine
        self._scaikey = ScaiKeyVerifier(settings)
        self._keys: dict[str, _CachedKey] = {}  # by key hash
        self._loading: dict[str, asyncio.Future[_CachedKey]] = {}  # lookups in flight, by key hash
        self._generation = 0  # bumped by every invalidation: a lookup that began before one is not cached
        self._subjects: dict[str, tuple[float, Membership]] = {}  # ScaiKey subject -> local user
        self._dev: Principal | None = None
        bus.on(TOPIC_API_KEY, self._forget_key)
        bus.on(TOPIC_IDENTITY, self._forget_identities)
        if settings.auth_disabled:
            logger.warning("SCAIGRID_AUTH_DISABLED is set: every request acts as %s of the tenant %r, whatever its "
                           "token. Never run a reachable node like this.", DEV_ROLE, DEFAULT_SLUG,
                           extra={"event": "auth_disabled"})

    def _forget_key(self, key_hash: str | None) -> None:
        self._generation += 1
        if key_hash is None:
            self._keys.clear()
        else:
            self._keys.pop(key_hash, None)

    def _forget_identities(self, _key: str | None) -> None:
        self._generation += 1
        self._keys.clear()
        self._subjects.clear()

    async def authenticate(self, authorization: str | None) -> Principal:
        if self._settings.auth_disabled:
            return await self._dev_principal()
        if not authorization:
            raise errors.auth_token_missing()
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise errors.auth_token_invalid("expected `Authorization: Bearer <token>`")
        if keys.looks_like_key(token):
            return await self._api_key(token)
        if token.startswith(service_tokens.PREFIX):
            return self._service(token)
        if token.count(".") == 2:
            return await self._jwt(token)
        raise errors.auth_token_invalid()

    def _principal(self, kind: str, role: str, member: Membership, name: str, api_key_id: str | None = None,
                   key_rpm: int | None = None) -> Principal:
        refusal = member.refusal()
        if refusal is not None:
            raise errors.auth_token_invalid(f"refused: {refusal}")
        limits = self._settings.limits
        return Principal(
            kind=kind, role=role, partner_id=member.partner_id, tenant_id=member.tenant_id, user_id=member.user_id,
            api_key_id=api_key_id, name=name,
            limits=RateLimits(key=key_rpm or limits.key_rpm, user=member.user_rpm or limits.user_rpm,
                              tenant=member.tenant_rpm or limits.tenant_rpm,
                              partner=member.partner_rpm or limits.partner_rpm))

    async def _api_key(self, key: str) -> Principal:
        key_hash = keys.hash_key(key)
        now = time.monotonic()
        cached = self._keys.get(key_hash)
        if cached is None or cached.deadline <= now:
            pending = self._loading.get(key_hash)
            if pending is None:
                # Single flight: when a popular key's entry expires under load, one query answers every waiter.
                pending = asyncio.ensure_future(self._load_key(key_hash))
                self._loading[key_hash] = pending
                pending.add_done_callback(lambda _done: self._loading.pop(key_hash, None))
            try:
                cached = await asyncio.shield(pending)  # a waiter whose client left must not cancel the others' lookup
            except Exception as exc:
                cached = self._stale(key_hash, exc, now)
        if cached.principal is None:
            raise errors.auth_token_invalid(cached.refusal)
        if cached.expires_at is not None and cached.expires_at <= utc_now():
            raise errors.auth_token_invalid("this API key has expired")
        return cached.principal

    def _stale(self, key_hash: str, exc: Exception, now: float) -> "_CachedKey":
        """While MariaDB is unreachable, a key's last verdict stands (an invalidation, which arrives through Redis,
        still drops it), retried every STALE_RETRY_S; without one the error goes on (DATABASE_UNAVAILABLE)."""
        stale = self._keys.get(key_hash)
        if stale is None or not db.unreachable(exc):
            raise exc
        logger.warning("MariaDB unreachable; API key %s… keeps its last verdict for %g s", key_hash[:8],
                       STALE_RETRY_S, extra={"event": "key_cache_stale"})
        kept = dataclasses.replace(stale, deadline=now + STALE_RETRY_S)
        self._keys[key_hash] = kept
        return kept

    async def _load_key(self, key_hash: str) -> "_CachedKey":
        generation = self._generation
        async with self._engine.connect() as conn:
            record = await keys.load_key(conn, key_hash)
        cached = self._verdict(record, time.monotonic())
        if generation == self._generation:  # else a revocation arrived meanwhile: this answer may predate it
            self._keys[key_hash] = cached
        return cached

    def _verdict(self, record: keys.KeyRecord | None, now: float) -> "_CachedKey":
        """What a key is worth until its cache entry expires (only its expiry is checked per request)."""
        if record is None or record.revoked:
            return _CachedKey(now + NEGATIVE_TTL_S, None, None, "unknown or revoked API key")
        deadline = now + self._settings.auth.api_key_cache_ttl_s
        if not grants_at_most(record.role, record.member.role):
            # The user was demoted after the key was made: the key must not keep what the user lost.
            return _CachedKey(deadline, None, None, f"this key's role {record.role} exceeds its user's role "
                                                    f"{record.member.role}; make a new key")
        refusal = record.member.refusal()
        if refusal is not None:
            return _CachedKey(deadline, None, None, f"refused: {refusal}")
        principal = self._principal("api_key", record.role, record.member, record.prefix, record.id, record.rpm)
        return _CachedKey(deadline, record.expires_at, principal, "")

    def _service(self, token: str) -> Principal:
        """An internal caller, belonging to no tenant (partner_id and tenant_id are empty). The operator scope acts
        platform-wide as super_admin; the gateway refuses a scope on every route that does not list it."""
        identity = service_tokens.verify(self._settings.auth.service_token_secret, token)
        limits = self._settings.limits
        return Principal(kind="service", role="super_admin", partner_id="", tenant_id="", user_id=None,
                         name=identity.name, scope=identity.scope,
                         limits=RateLimits(limits.key_rpm, limits.user_rpm, limits.tenant_rpm, limits.partner_rpm))

    async def _jwt(self, token: str) -> Principal:
        claims = await self._scaikey.claims(token)
        subject: str = claims["sub"]
        now = time.monotonic()
        cached = self._subjects.get(subject)
        if cached is not None and cached[0] > now:
            member = cached[1]
        else:
            generation = self._generation
            try:
                member = await self._scaikey_user(subject, claims)
            except errors.ScaigridError as exc:
                if exc.code != "SLUG_CONFLICT":
                    raise
                # Another request created this user a moment ago, or the email belongs to an unlinked user.
                async with self._engine.connect() as conn:
                    found = await load_membership(conn, users.c.scaikey_id == subject)
                if found is None:
                    raise errors.auth_token_invalid(f"cannot create the local user: {exc.message}") from None
                member = found
            if generation == self._generation:  # else a suspension arrived meanwhile: this answer may predate it
                self._subjects[subject] = (now + self._settings.auth.api_key_cache_ttl_s, member)
        return self._principal("jwt", member.role, member, subject)

    async def _scaikey_user(self, subject: str, claims: dict[str, Any]) -> Membership:
        """The local user of a ScaiKey subject; created on first sight when the token names a known tenant."""
        async with self._engine.begin() as conn:
            member = await load_membership(conn, users.c.scaikey_id == subject)
            if member is not None:
                return member
            scaikey_tenant = claims.get("tenant_id")
            tenant_id = None if not isinstance(scaikey_tenant, str) else await conn.scalar(
                select(tenants.c.id).where(tenants.c.scaikey_id == scaikey_tenant))
            if tenant_id is None:
                raise errors.auth_token_invalid(
                    "this ScaiKey user is not known here, and the token names no tenant (`tenant_id`) known here")
            role = claims.get("role", JIT_DEFAULT_ROLE)
            # Sign-in creates tenant members only; partner and platform roles are granted on the node itself.
            if role not in ROLES or ROLE_REACH[role] != "tenant":
                raise errors.auth_token_invalid(
                    f"the token's role {role!r} cannot be given at first sign-in; one of {', '.join(TENANT_ROLES)}")
            email = claims["email"] if isinstance(claims.get("email"), str) else f"{subject}@scaikey"
            name = claims["name"] if isinstance(claims.get("name"), str) else None
            await create_user(conn, tenant_id=tenant_id, email=email, role=role, display_name=name,
                              scaikey_id=subject)
            logger.info("ScaiKey user %s created on first sight as %s", subject, role,
                        extra={"event": "user_provisioned", "scaikey_id": subject})
            member = await load_membership(conn, users.c.scaikey_id == subject)
            assert member is not None  # just inserted in this transaction
            return member

    async def tunnelled(self, token: str | None, request_id: str) -> Principal:
        """The managed side's caller of a request its link tunnelled here (docs/hybrid.md, "Tunnel"): named by a
        caller assertion signed for this node and this request, and known here as a user (and key) that the config
        snapshot mirrored, in a tenant it mirrored. The role is the asserted one, never above the mirrored row's
        (which the snapshot caps at tenant_user). No credential of the client ever reaches the node."""
        hybrid = self._settings.hybrid
        if hybrid.node_id is None or hybrid.node_credential is None:
            raise errors.auth_token_invalid("this node verifies no tunnelled callers: it needs HYBRID_NODE_ID and "
                                            "HYBRID_NODE_CREDENTIAL")
        if not token:
            raise errors.auth_token_invalid(f"a tunnelled request needs its caller assertion ({ASSERTION_HEADER})")
        caller = assertion.verify(assertion.credential_key(hybrid.node_credential.reveal()), token,
                                  node_id=hybrid.node_id, request_id=request_id)
        if caller.role not in TENANT_ROLES:
            raise errors.auth_token_invalid(f"a tunnelled caller has a tenant role here, not {caller.role!r}")
        wanted = {("tenant", caller.tenant_id), ("user", caller.user_id)}
        if caller.api_key_id is not None:
            wanted.add(("api_key", caller.api_key_id))
        async with self._engine.connect() as conn:
            member = await load_membership(conn, users.c.id == caller.user_id)
            mirrored = set((await conn.execute(select(hybrid_mirrored.c.kind, hybrid_mirrored.c.row_id).where(
                tuple_(hybrid_mirrored.c.kind, hybrid_mirrored.c.row_id).in_(sorted(wanted))))).tuples().all())
            key = None if caller.api_key_id is None else (await conn.execute(select(api_keys).where(
                api_keys.c.id == caller.api_key_id, api_keys.c.user_id == caller.user_id))).first()
        if (member is None or mirrored != wanted or (member.tenant_id, member.partner_id) != (
                caller.tenant_id, caller.partner_id)):
            raise errors.auth_token_invalid("the tunnelled caller is not a user of a tenant mirrored on this node")
        role_here = member.role
        if caller.api_key_id is not None:
            if key is None or key.revoked_at is not None or (
                    key.expires_at is not None and key.expires_at <= utc_now()):
                raise errors.auth_token_invalid("the tunnelled caller's API key is unknown, revoked or expired here")
            if grants_at_most(key.role, member.role):
                role_here = key.role
        role = caller.role if grants_at_most(caller.role, role_here) else role_here
        return self._principal("tunnel", role, member, f"tunnel:{caller.api_key_id or caller.user_id}",
                               caller.api_key_id, None if key is None else key.rpm_limit)

    async def _dev_principal(self) -> Principal:
        if self._dev is None:
            async with self._engine.begin() as conn:
                tenant_id = await conn.scalar(select(tenants.c.id).where(tenants.c.slug == DEFAULT_SLUG))
                if tenant_id is None:
                    raise errors.ScaigridError("SCAIGRID_AUTH_DISABLED needs the default tenant: run migrate")
                where = (users.c.tenant_id == tenant_id) & (users.c.email == DEV_EMAIL)
                if await load_membership(conn, where) is None:
                    await create_user(conn, tenant_id=tenant_id, email=DEV_EMAIL, role=DEV_ROLE,
                                      display_name="development (auth disabled)")
                member = await load_membership(conn, where)
            assert member is not None
            self._dev = self._principal("dev", DEV_ROLE, member, DEV_EMAIL)
        return self._dev
