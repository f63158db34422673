"""Helpers of the identity tests: JSON calls to a node as any HTTP client makes them, and signed ScaiKey webhooks."""

import hashlib
import hmac
import json
import secrets
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from tests.support.env import Node


@dataclass
class Reply:
    status: int
    body: dict[str, Any]

    @property
    def data(self) -> Any:
        assert self.body.get("status") == "ok", self.body
        return self.body["data"]

    @property
    def code(self) -> str:
        return str(self.body["error"]["code"])


def call(base_url: str, method: str, path: str, token: str | None = None, body: Any = None,
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> Reply:
    """One request; `token` goes into `Authorization: Bearer`."""
    request = urllib.request.Request(base_url + path, method=method, headers=dict(headers or {}))
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    if body is not None or raw is not None:
        request.data = raw if raw is not None else json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, payload = error.code, error.read()
    return Reply(status, json.loads(payload) if payload else {})


def webhook(secret: str, event_type: str, resource_id: str, data: dict[str, Any] | None = None, *,
            event_id: str | None = None, tenant_id: str | None = None, partner_id: str | None = None,
            signed_at: int | None = None) -> tuple[bytes, dict[str, str]]:
    """A ScaiKey event as body and headers, signed `t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`."""
    event_id = event_id or "evt_" + secrets.token_hex(8)
    signed_at = int(time.time()) if signed_at is None else signed_at
    body = json.dumps({
        "event_id": event_id, "event_type": event_type, "timestamp": signed_at,
        "resource": {"type": event_type.partition(".")[0], "id": resource_id}, "data": data or {},
        "tenant_id": tenant_id, "partner_id": partner_id}).encode()
    signature = hmac.new(secret.encode(), f"{signed_at}.".encode() + body, hashlib.sha256).hexdigest()
    return body, {"X-ScaiKey-Event-ID": event_id, "X-ScaiKey-Event-Type": event_type,
                  "X-ScaiKey-Timestamp": str(signed_at), "X-ScaiKey-Signature": f"t={signed_at},v1={signature}"}


def tenant(base_url: str, admin_key: str, slug: str, **fields: Any) -> dict[str, Any]:
    """A new tenant (under the caller's partner unless partner_id is given)."""
    reply = call(base_url, "POST", "/v1/tenants", admin_key, {"slug": slug, "name": slug.title(), **fields})
    assert reply.status == 201, reply.body
    return dict(reply.data)


def user_with_key(base_url: str, admin_key: str, tenant_id: str, role: str, **fields: Any) -> tuple[str, str]:
    """A new user of that tenant with that role, and an API key acting with the same role: (user id, key)."""
    reply = call(base_url, "POST", "/v1/users", admin_key, {
        "email": f"{role}-{secrets.token_hex(4)}@example.com", "role": role, "tenant_id": tenant_id, **fields})
    assert reply.status == 201, reply.body
    user_id = reply.data["id"]
    reply = call(base_url, "POST", "/v1/api-keys", admin_key, {"name": f"{role} key", "user_id": user_id})
    assert reply.status == 201, reply.body
    return user_id, str(reply.data["key"])


def users_with_keys(node: Node, tenant_row: dict[str, Any], *roles: str) -> list[tuple[str, str]]:
    """`user_with_key` for each role in turn, made by the node's admin: [(user id, key), ...]."""
    return [user_with_key(node.url, node.admin_key, tenant_row["id"], role) for role in roles]
