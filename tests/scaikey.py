"""A ScaiKey stand-in: a real aiohttp server publishing a JWKS, keys made with `cryptography`, tokens with python-jose.

It runs on its own thread and event loop so that synchronous tests (and the node subprocess) can use it. It can
rotate its signing keys and counts how often the JWKS is fetched.
"""

import base64
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from tests.threaded_server import ThreadedServer

ISSUER = "https://scaikey.test"
AUDIENCE = "scaigrid-test"


def _b64_uint(value: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes((value.bit_length() + 7) // 8, "big")).rstrip(b"=").decode()


@dataclass
class SigningKey:
    kid: str
    private_pem: str
    public_pem: str
    jwk: dict[str, str]


def make_key(kid: str) -> SigningKey:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = private.public_key().public_numbers()
    return SigningKey(
        kid=kid,
        private_pem=private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()).decode(),
        public_pem=private.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        jwk={"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256", "n": _b64_uint(numbers.n),
             "e": _b64_uint(numbers.e)})


class ScaiKey(ThreadedServer):
    name = "scaikey"

    def __init__(self) -> None:
        super().__init__()
        self.keys = [make_key("k1")]
        self.fetches = 0

    @property
    def jwks_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def _jwks(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": [key.jwk for key in self.keys]})

    def routes(self) -> list[web.RouteDef]:
        return [web.get("/.well-known/jwks.json", self._jwks)]

    def rotate(self, kid: str, keep_old: bool = False) -> SigningKey:
        """A new signing key; the old ones stay published only if keep_old."""
        key = make_key(kid)
        self.keys = [*self.keys, key] if keep_old else [key]
        return key

    def token(self, sub: str, *, key: SigningKey | None = None, ttl_s: int = 3600,
              headers: dict[str, Any] | None = None, **claims: Any) -> str:
        """A token as ScaiKey would issue it (signed with the newest key unless `key` is given)."""
        key = key or self.keys[-1]
        now = int(time.time())
        payload = {"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + ttl_s, **claims}
        return jwt.encode({k: v for k, v in payload.items() if v is not None}, key.private_pem, algorithm="RS256",
                          headers={"kid": key.kid, **(headers or {})})
