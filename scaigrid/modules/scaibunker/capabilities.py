"""Storage capabilities: HS256 JWTs (python-jose, algorithm pinned) that any process holding the secret verifies.

Claims, short to keep tokens compact: aud "scaibunker:storage" (the purpose: no other token signed with the same key
passes), jti (capability id), ten (tenant), pfx (key prefix inside the tenant's namespace), vrb (verbs, comma
separated), mxb (largest object in bytes), iat, exp. No database, no Redis: bunker_proxy has neither.
"""

import re
import time
from dataclasses import dataclass

from jose import jwt
from jose.exceptions import ExpiredSignatureError, JWTError

from scaigrid import errors
from scaigrid.settings import Secret

AUDIENCE = "scaibunker:storage"
ALGORITHM = "HS256"
VERBS = ("GET", "PUT", "HEAD", "DELETE", "LIST")
MAX_TOKEN_CHARS = 2048  # a real capability is ~350 characters; anything far longer is not worth decoding
MAX_KEY_CHARS = 1024
MAX_SEGMENT_CHARS = 255
# A segment of a key or prefix: printable, no slash or backslash, no percent sign (so no encoded or double-encoded
# traversal survives), and never "." or "..".
_SEGMENT = re.compile(r"^[^/\\%\x00-\x1f\x7f]{1,255}$")
_CLAIMS = ("jti", "ten", "pfx", "vrb", "mxb", "exp")


@dataclass(frozen=True)
class Capability:
    id: str
    tenant_id: str
    prefix: str  # "" or ends with "/"
    verbs: frozenset[str]
    max_bytes: int
    expires_at_unix: int

    def allows(self, verb: str, key: str) -> None:
        """Raises CAPABILITY_DENIED unless this capability grants `verb` on `key` (a key checked by key_problem)."""
        if verb not in self.verbs:
            raise errors.capability_denied(f"this capability does not grant {verb}")
        if not key.startswith(self.prefix):
            raise errors.capability_denied(f"the key is outside this capability's prefix {self.prefix!r}")


def key_problem(key: str) -> str | None:
    """Why `key` (already percent-decoded once) is not a valid object key or prefix, or None when it is."""
    if not key:
        return "the key is empty"
    if len(key) > MAX_KEY_CHARS:
        return f"the key is longer than {MAX_KEY_CHARS} characters"
    if not key.isprintable():
        return "the key contains control or non-printable characters"
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            return "the key has an empty, '.' or '..' segment"
        if not _SEGMENT.fullmatch(segment):
            return (f"a key segment contains a backslash or '%' (encoded twice?), "
                    f"or exceeds {MAX_SEGMENT_CHARS} characters")
    return None


def prefix_problem(prefix: str) -> str | None:
    """Why `prefix` is not a valid capability prefix: "" (the whole tenant namespace) or a key ending with "/"."""
    if prefix == "":
        return None
    if not prefix.endswith("/"):
        return "a prefix ends with '/' (e.g. sandboxes/sb-1/), so that sb-1/ never reaches sb-10/"
    return key_problem(prefix[:-1])


def mint(secret: Secret, capability: Capability, now_s: float | None = None) -> str:
    now_s = time.time() if now_s is None else now_s
    claims = {"aud": AUDIENCE, "jti": capability.id, "ten": capability.tenant_id, "pfx": capability.prefix,
              "vrb": ",".join(v for v in VERBS if v in capability.verbs), "mxb": capability.max_bytes,
              "iat": int(now_s), "exp": capability.expires_at_unix}
    token: str = jwt.encode(claims, secret.reveal(), algorithm=ALGORITHM)
    return token


def verify(secret: Secret | None, token: str) -> Capability:
    """The capability a token carries; CAPABILITY_EXPIRED or CAPABILITY_INVALID (401) for anything else."""
    if secret is None:
        raise errors.capability_invalid("this node accepts no storage capabilities (STORAGE_CAPABILITY_SECRET unset)")
    if len(token) > MAX_TOKEN_CHARS:
        raise errors.capability_invalid()
    try:
        # jose compares signatures in constant time; the algorithm list is pinned, so "none" or RS256 never pass.
        claims = jwt.decode(token, secret.reveal(), algorithms=[ALGORITHM], audience=AUDIENCE,
                            options={"require_exp": True, "require_aud": True, "require_jti": True, "leeway": 0})
    except ExpiredSignatureError:
        raise errors.capability_expired() from None
    except JWTError:
        raise errors.capability_invalid() from None
    if not all(name in claims for name in _CLAIMS):
        raise errors.capability_invalid()
    jti, tenant_id, prefix, verbs, max_bytes, expires_at = (claims[name] for name in _CLAIMS)
    if not (isinstance(jti, str) and isinstance(tenant_id, str) and tenant_id and isinstance(prefix, str)
            and isinstance(verbs, str) and isinstance(max_bytes, int) and isinstance(expires_at, int)):
        raise errors.capability_invalid()
    return Capability(jti, tenant_id, prefix, frozenset(verbs.split(",")) & set(VERBS), max_bytes, expires_at)
