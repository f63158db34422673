"""Caller assertions: who a tunnelled request is for, signed by the managed side, verified by the node.

The managed side never sends a client's credential down the hybrid link. The grpc replica that relays a request
signs `sga_` + an HS256 JWT (python-jose) instead, with claims aud (the node id), req, tenant, partner, user, key,
role, exp. The key is derived from the sha256 of the node
credential the link authenticated with: the managed side stores only that hash, and the node computes it from its
HYBRID_NODE_CREDENTIAL. So only the managed side and that one node can sign, a node can forge assertions only to
itself, and an assertion is good for one request id, on one node, for ASSERTION_TTL_S.
"""

import hashlib
import hmac
import time
from dataclasses import dataclass

from jose import jwt
from jose.exceptions import JWTError

from scaigrid import errors

PREFIX = "sga_"
ALGORITHM = "HS256"
MAX_TOKEN_CHARS = 2048  # a real assertion is ~450 characters; anything far longer is not worth decoding
ASSERTION_TTL_S = 60  # checked once, when the node's http process receives the tunnelled request
# The node's link program hands the assertion to its own http process in this header, beside the tunnel header.
ASSERTION_HEADER = "X-Scaigrid-Tunnel-Caller"
_KEY_LABEL = b"scaigrid hybrid caller assertion v1"


@dataclass(frozen=True)
class Caller:
    """The managed side's caller of one tunnelled request."""

    node_id: str
    request_id: str
    tenant_id: str
    partner_id: str
    user_id: str
    api_key_id: str | None  # None: a ScaiKey user, no key
    role: str
    expires_at_unix: int = 0


def signing_key(credential_hash: str) -> bytes:
    """The key of a node's assertions, from the sha256 hex of its credential (hybrid_nodes.credential_hash)."""
    return hmac.new(credential_hash.encode(), _KEY_LABEL, hashlib.sha256).digest()


def credential_key(credential: str) -> bytes:
    """The same key, as the node derives it from its credential."""
    return signing_key(hashlib.sha256(credential.encode()).hexdigest())


def sign(key: bytes, caller: Caller, now_s: float | None = None) -> str:
    """An assertion of `caller`, valid ASSERTION_TTL_S from now (caller.expires_at_unix is ignored)."""
    now_s = time.time() if now_s is None else now_s
    claims = {"aud": caller.node_id, "req": caller.request_id, "tenant": caller.tenant_id,
              "partner": caller.partner_id, "user": caller.user_id, "key": caller.api_key_id, "role": caller.role,
              "exp": int(now_s) + ASSERTION_TTL_S}
    token: str = jwt.encode(claims, key, algorithm=ALGORITHM)
    return PREFIX + token


def verify(key: bytes, token: str, *, node_id: str, request_id: str, now_s: float | None = None) -> Caller:
    """The caller an assertion names, if signed with `key` for this node and request and not expired; otherwise
    AUTH_TOKEN_INVALID (401)."""
    if not token.startswith(PREFIX) or len(token) > MAX_TOKEN_CHARS:
        raise errors.auth_token_invalid("malformed caller assertion")
    try:
        # The algorithm list is pinned. aud and exp are required and checked below, to say which one is wrong, and
        # exp with no leeway against now_s: jose checks only against its own clock.
        claims = jwt.decode(token[len(PREFIX):], key, algorithms=[ALGORITHM],
                            options={"verify_aud": False, "verify_exp": False})
    except JWTError:
        raise errors.auth_token_invalid(
            "the caller assertion is malformed or its signature does not match this node's credential") from None
    try:
        caller = Caller(node_id=claims["aud"], request_id=claims["req"], tenant_id=claims["tenant"],
                        partner_id=claims["partner"], user_id=claims["user"], api_key_id=claims["key"],
                        role=claims["role"], expires_at_unix=claims["exp"])
    except KeyError:
        raise errors.auth_token_invalid("malformed caller assertion") from None
    texts = (caller.node_id, caller.request_id, caller.tenant_id, caller.partner_id, caller.user_id, caller.role)
    if (not all(isinstance(text, str) and text for text in texts) or not isinstance(caller.expires_at_unix, int)
            or not (caller.api_key_id is None or isinstance(caller.api_key_id, str))):
        raise errors.auth_token_invalid("malformed caller assertion")
    if caller.node_id != node_id:
        raise errors.auth_token_invalid("the caller assertion is for another node")
    if caller.request_id != request_id:
        raise errors.auth_token_invalid("the caller assertion is for another request")
    if caller.expires_at_unix <= (time.time() if now_s is None else now_s):
        raise errors.auth_token_invalid("the caller assertion has expired")
    return caller
