"""CORS for browser clients on a real http process: preflights from allowed origins, the origin echoed on answers
and errors with the headers a browser app reads, nothing for any other origin or when unconfigured."""

import http.client

import pytest

from tests.support.env import Node, create_key
from tests.support.processes import scaigrid, start_http

pytestmark = pytest.mark.timeout(60)

APP = "https://app.example.com"


def send(node: Node, method: str, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    host, _, port = node.url.removeprefix("http://").partition(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request(method, path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()


@pytest.fixture
def cors_node(migrated_env, start_mode) -> Node:
    env = {**migrated_env, "CORS_ALLOWED_ORIGINS": f"{APP}, https://Admin.Example.com:8443"}
    return Node(env, start_http(start_mode, env), create_key(env, "super_admin"))


def test_a_preflight_from_an_allowed_origin_is_answered(cors_node):
    status, headers = send(cors_node, "OPTIONS", "/v1/api-keys", {
        "Origin": APP, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204
    assert headers["access-control-allow-origin"] == APP
    assert {"POST", "DELETE", "PATCH"} <= {m.strip() for m in headers["access-control-allow-methods"].split(",")}
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in headers["access-control-allow-headers"].split(",")}
    assert int(headers["access-control-max-age"]) > 0
    # The configured origin matched case-insensitively, with its port.
    assert send(cors_node, "OPTIONS", "/v1/models", {
        "Origin": "https://admin.example.com:8443", "Access-Control-Request-Method": "GET"})[0] == 204


def test_answers_and_errors_carry_the_allowed_origin_and_the_headers_a_browser_may_read(cors_node):
    for token, expected in ((cors_node.admin_key, 200), (None, 401)):
        headers = {"Origin": APP, **({"Authorization": f"Bearer {token}"} if token else {})}
        status, answer = send(cors_node, "GET", "/v1/models", headers)
        assert status == expected
        assert answer["access-control-allow-origin"] == APP
        exposed = {h.strip().lower() for h in answer["access-control-expose-headers"].split(",")}
        assert {"x-request-id", "x-scaigrid-ratelimit-limit", "x-scaigrid-ratelimit-remaining",
                "x-scaigrid-ratelimit-reset", "retry-after"} <= exposed
        assert "origin" in answer["vary"].lower()


def test_another_origin_gets_no_cors_headers(cors_node):
    status, headers = send(cors_node, "OPTIONS", "/v1/models", {
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert status == 405 and not any(h.startswith("access-control-") for h in headers)
    status, headers = send(cors_node, "GET", "/v1/models", {
        "Origin": "https://app.example.com.evil.example", "Authorization": f"Bearer {cors_node.admin_key}"})
    assert status == 200 and not any(h.startswith("access-control-") for h in headers)


def test_without_configured_origins_there_are_no_cors_headers(node):
    status, headers = send(node, "OPTIONS", "/v1/models", {"Origin": APP, "Access-Control-Request-Method": "GET"})
    assert status == 405 and not any(h.startswith("access-control-") for h in headers)
    status, headers = send(node, "GET", "/v1/models", {"Origin": APP, "Authorization": f"Bearer {node.admin_key}"})
    assert status == 200 and not any(h.startswith("access-control-") for h in headers) and "vary" not in headers


def test_a_malformed_origin_stops_the_node_before_it_starts(migrated_env):
    result = scaigrid("check-config", "--mode", "http",
                      env={**migrated_env, "CORS_ALLOWED_ORIGINS": "https://app.example.com/path"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("scaigrid: configuration error: CORS_ALLOWED_ORIGINS: expected")
