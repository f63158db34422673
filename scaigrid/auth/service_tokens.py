"""Service tokens for internal callers (gRPC clients, workers): `sst_<payload>.<signature>`.

payload = base64url(JSON {"svc": name, "exp": unix seconds}), signature = base64url(HMAC-SHA256(SERVICE_TOKEN_SECRET,
"sst_" + payload)). Stateless: every process holding the secret verifies without a database, a token stops working
when it expires, and rotating the secret retires every token at once.
"""

import base64
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass

from scaigrid import errors
from scaigrid.settings import Secret

PREFIX = "sst_"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class ServiceIdentity:
    name: str
    expires_at_unix: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _signature(secret: Secret, signed: str) -> str:
    return _b64(hmac.new(secret.reveal().encode(), signed.encode(), hashlib.sha256).digest())


def mint(secret: Secret, name: str, ttl_s: int, now_s: float | None = None) -> str:
    """A token naming the service `name`, valid for ttl_s seconds."""
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError("a service name is 1-64 letters, digits, dots, dashes or underscores")
    now_s = time.time() if now_s is None else now_s
    payload = _b64(json.dumps({"svc": name, "exp": int(now_s) + ttl_s}, separators=(",", ":")).encode())
    return f"{PREFIX}{payload}.{_signature(secret, PREFIX + payload)}"


def verify(secret: Secret | None, token: str, now_s: float | None = None) -> ServiceIdentity:
    """The service a token names; raises SERVICE_TOKEN_INVALID (401) for anything else, the gRPC side included."""
    if secret is None:
        raise errors.service_token_invalid("this node accepts no service tokens (SERVICE_TOKEN_SECRET is not set)")
    signed, dot, signature = token.rpartition(".")
    if not dot or not signed.startswith(PREFIX):
        raise errors.service_token_invalid("malformed service token")
    if not hmac.compare_digest(signature.encode(), _signature(secret, signed).encode()):
        raise errors.service_token_invalid("the service token's signature does not match")
    payload = signed[len(PREFIX):]
    try:
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        name, expires_at = claims["svc"], claims["exp"]
    except (ValueError, TypeError, KeyError):
        raise errors.service_token_invalid("malformed service token") from None
    if not isinstance(name, str) or not isinstance(expires_at, int):
        raise errors.service_token_invalid("malformed service token")
    if expires_at <= (time.time() if now_s is None else now_s):
        raise errors.service_token_invalid("the service token has expired")
    return ServiceIdentity(name, expires_at)
