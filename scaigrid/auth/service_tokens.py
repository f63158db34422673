"""Service tokens for internal callers (gRPC clients, operator tooling): `sst_` + an HS256 JWT (python-jose).

Claims: svc (service name), scp (scope), exp (unix seconds), signed with SERVICE_TOKEN_SECRET. Stateless: every
process holding the secret verifies without a database, a token stops working when it expires, and rotating the
secret retires every token at once. The scope says what the caller may call at all: each HTTP route and gRPC method
lists the scopes it accepts, and no scope reaches inference.
"""

import re
import time
from dataclasses import dataclass

from jose import jwt
from jose.exceptions import JWTError

from scaigrid import errors
from scaigrid.settings import Secret

PREFIX = "sst_"
ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 1024  # a real token is ~200 characters; anything far longer is not worth decoding
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")

OPERATOR = "operator"  # platform administration over HTTP (never inference)
SCAIINFER_NODE = "scaiinfer-node"  # a ScaiInfer node: HeartbeatService.Heartbeat only
HYBRID_RELAY = "hybrid-relay"  # a managed http process: TunnelRelay.Open only
HYBRID_LINK = "hybrid-link"  # a hybrid node's link program marking the tunnelled requests it hands its http process
SCOPES = (OPERATOR, SCAIINFER_NODE, HYBRID_RELAY, HYBRID_LINK)


@dataclass(frozen=True)
class ServiceIdentity:
    name: str
    scope: str
    expires_at_unix: int


def mint(secret: Secret, name: str, ttl_s: int, now_s: float | None = None, *, scope: str) -> str:
    """A token naming the service `name` with one of SCOPES, valid for ttl_s seconds."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError("a service name is 1-64 letters, digits, dots, dashes or underscores")
    if scope not in SCOPES:
        raise ValueError(f"a scope is one of {', '.join(SCOPES)}")
    now_s = time.time() if now_s is None else now_s
    claims = {"svc": name, "scp": scope, "exp": int(now_s) + ttl_s}
    token: str = jwt.encode(claims, secret.reveal(), algorithm=ALGORITHM)
    return PREFIX + token


def verify(secret: Secret | None, token: str, now_s: float | None = None) -> ServiceIdentity:
    """The service a token names, and its scope; raises SERVICE_TOKEN_INVALID (401) for anything else, the gRPC side
    included."""
    if secret is None:
        raise errors.service_token_invalid("this node accepts no service tokens (SERVICE_TOKEN_SECRET is not set)")
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise errors.service_token_invalid("malformed service token")
    try:
        # The algorithm list is pinned, so "none" or RS256 never pass; jose compares signatures in constant time.
        # exp is required and checked below, with no leeway, against now_s: jose checks only against its own clock.
        claims = jwt.decode(token[len(PREFIX):], secret.reveal(), algorithms=[ALGORITHM],
                            options={"verify_exp": False})
    except JWTError:
        raise errors.service_token_invalid("the service token is malformed or its signature does not match") from None
    name, expires_at = claims.get("svc"), claims.get("exp")
    if not isinstance(name, str) or not isinstance(expires_at, int):
        raise errors.service_token_invalid("malformed service token")
    if expires_at <= (time.time() if now_s is None else now_s):
        raise errors.service_token_invalid("the service token has expired")
    scope = claims.get("scp")
    # Tokens minted before scopes existed were platform-wide; none of them is honoured now, whatever it names.
    if scope not in SCOPES:
        raise errors.service_token_invalid(
            "the service token carries no known scope; mint it again with `scaigrid admin service-token --scope`")
    return ServiceIdentity(name, scope, expires_at)
