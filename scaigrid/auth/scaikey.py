"""ScaiKey JWTs: RS256 only, checked against the JWKS at SCAIKEY_JWKS_URL, which is cached and refetched sparingly.

The JWKS is fetched on the first token, again when a token names a `kid` we do not know (ScaiKey rotated its
keys) but at most once every SCAIKEY_JWKS_MIN_REFETCH_S, so a stream of forged kids cannot hammer ScaiKey, and
again once it is older than JWKS_MAX_AGE_S, so a key ScaiKey withdrew stops verifying. If a refetch fails, the
keys already known keep working.
"""

import asyncio
import logging
import time
from typing import Any

import aiohttp
from jose import jwk, jwt
from jose.backends.base import Key
from jose.exceptions import ExpiredSignatureError, JWKError, JWTClaimsError, JWTError

from scaigrid import errors
from scaigrid.settings import Settings

logger = logging.getLogger(__name__)

ALGORITHM = "RS256"  # the only one: no `none`, no HMAC (a public key must never double as a shared secret)
JWKS_MAX_AGE_S = 3600.0
JWKS_FETCH_TIMEOUT_S = 5.0


def idp_unavailable() -> errors.ScaigridError:
    # Not the caller's fault, and worth a retry: the token may well be good.
    return errors.ScaigridError("cannot verify ScaiKey tokens right now: the JWKS is unreachable",
                                "IDENTITY_PROVIDER_UNAVAILABLE", 503, retry_after_s=5)


class Jwks:
    """The signing keys of ScaiKey by kid, fetched with aiohttp."""

    def __init__(self, url: str, min_refetch_s: float) -> None:
        self._url = url
        self._min_refetch_s = min_refetch_s
        self._keys: dict[str, Key] = {}
        self._loaded_at = -float("inf")  # last successful fetch (monotonic)
        self._tried_at = -float("inf")  # last attempt, successful or not
        self._lock = asyncio.Lock()

    async def key(self, kid: str) -> Key:
        if kid not in self._keys or time.monotonic() - self._loaded_at > JWKS_MAX_AGE_S:
            async with self._lock:  # one fetch for a burst of tokens, not one each
                if time.monotonic() - self._tried_at >= self._min_refetch_s and (
                        kid not in self._keys or time.monotonic() - self._loaded_at > JWKS_MAX_AGE_S):
                    await self._fetch()
        key = self._keys.get(kid)
        if key is None:
            if self._loaded_at == -float("inf"):
                raise idp_unavailable()
            raise errors.auth_token_invalid("the token's signing key (kid) is not one of ScaiKey's")
        return key

    async def _fetch(self) -> None:
        self._tried_at = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=JWKS_FETCH_TIMEOUT_S)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(self._url) as response:
                response.raise_for_status()
                document = await response.json(content_type=None)
            entries = document["keys"]
            if not isinstance(entries, list):
                raise TypeError("`keys` is not a list")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError) as exc:
            logger.warning("cannot fetch the ScaiKey JWKS from %s: %s", self._url, exc, extra={"event": "jwks_failed"})
            return
        keys: dict[str, Key] = {}
        for entry in entries:
            if not isinstance(entry, dict) or entry.get("kty") != "RSA" or not isinstance(entry.get("kid"), str):
                continue
            if entry.get("alg", ALGORITHM) != ALGORITHM or entry.get("use", "sig") != "sig":
                continue
            try:
                keys[entry["kid"]] = jwk.construct(entry, ALGORITHM)
            except JWKError as exc:
                logger.warning("ignoring JWKS key %s: %s", entry["kid"], exc, extra={"event": "jwks_bad_key"})
        self._keys = keys
        self._loaded_at = time.monotonic()
        logger.info("ScaiKey JWKS loaded: %d key(s)", len(keys), extra={"event": "jwks_loaded", "kids": sorted(keys)})


class ScaiKeyVerifier:
    """Turns a ScaiKey JWT into its verified claims, or raises AUTH_TOKEN_INVALID saying why."""

    def __init__(self, settings: Settings) -> None:
        self._jwks = Jwks(settings.scaikey.jwks_url, settings.scaikey.jwks_min_refetch_s) if settings.scaikey.jwks_url \
            else None
        self._audience = settings.scaikey.audience
        self._issuer = settings.scaikey.issuer
        self._leeway_s = settings.scaikey.jwt_leeway_s

    async def claims(self, token: str) -> dict[str, Any]:
        if self._jwks is None:
            raise errors.auth_token_invalid("this node accepts no ScaiKey tokens (SCAIKEY_JWKS_URL is not set)")
        try:
            header = jwt.get_unverified_header(token)
        except JWTError:
            raise errors.auth_token_invalid("malformed token") from None
        if header.get("alg") != ALGORITHM:
            raise errors.auth_token_invalid(f"ScaiKey tokens must be signed with {ALGORITHM}")
        kid = header.get("kid")
        if not isinstance(kid, str):
            raise errors.auth_token_invalid("the token names no signing key (kid)")
        key = await self._jwks.key(kid)
        options = {"leeway": self._leeway_s, "require_exp": True, "require_sub": True, "require_aud": True,
                   "require_iss": self._issuer is not None}
        try:
            claims: dict[str, Any] = jwt.decode(token, key, algorithms=[ALGORITHM], audience=self._audience,
                                                issuer=self._issuer, options=options)
        except ExpiredSignatureError:
            raise errors.auth_token_invalid("the token has expired") from None
        except JWTClaimsError as exc:
            raise errors.auth_token_invalid(f"the token's claims are not acceptable: {exc}") from None
        except JWTError:
            raise errors.auth_token_invalid("the token's signature does not verify") from None
        if not isinstance(claims.get("sub"), str) or not claims["sub"]:
            raise errors.auth_token_invalid("the token has no subject")
        return claims
