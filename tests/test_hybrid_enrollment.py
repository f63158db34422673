"""Hybrid enrolment end to end: a managed appliance stack (HTTPS through nginx) mints tokens; an appliance's
`scaigrid-appliance link` commands enrol, check, rotate and leave; reuse, expiry, races and revocation fail clearly."""

import functools
import hashlib
import json
import stat
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from appliance import devstack
from appliance.local import child_env
from tests.appliance_stack import ApplianceStack, start_stack
from tests.hybrid_stacks import run_sql
from tests.support.env import Node
from tests.support.processes import REPO, scaigrid

APPLIANCE_CLI = REPO / ".venv" / "bin" / "scaigrid-appliance"


@pytest.fixture(scope="module")
def managed(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
            s3_server: devstack.S3Server) -> Iterator[ApplianceStack]:
    stack = start_stack(tmp_path_factory.mktemp("managed"), mariadb, redis_server, s3_server, HYBRID_ROLE="managed")
    yield stack
    stack.stop()


SQL = Callable[..., Sequence[Any]]


@pytest.fixture
def sql(managed: ApplianceStack, mariadb: devstack.MariaDB) -> SQL:
    """Runs one statement on the managed side's database (committed); the rows, as mappings, if it returns any."""
    return functools.partial(run_sql, mariadb, managed.config.database_name)


def appliance_config(directory: Path) -> Path:
    """An appliance's config whose CONFIG_DIR is under `directory`: all that `link` needs of an appliance."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "appliance.env"
    path.write_text(f"APPLIANCE_HOSTNAME=site-a.example\nAPPLIANCE_CONFIG_DIR={directory / 'etc'}\n"
                    f"APPLIANCE_STATE_DIR={directory / 'lib'}\nAPPLIANCE_LOG_DIR={directory / 'log'}\n"
                    f"APPLIANCE_RUN_DIR={directory / 'run'}\n")
    return path


def link(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(APPLIANCE_CLI), "link", *args],
                          env={**child_env(), "SCAIGRID_APPLIANCE_CONFIG": str(config)},
                          capture_output=True, text=True, timeout=60, check=False)


def link_json(config: Path) -> Path:
    return config.parent / "etc" / "secrets" / "link.json"


def stored_credential(config: Path) -> str:
    return str(json.loads(link_json(config).read_text())["credential"])


def api(stack: ApplianceStack, method: str, path: str, *, bearer: str | None = None,
        body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if bearer is not None:
        headers["Authorization"] = f"Bearer {bearer}"
    request = urllib.request.Request(stack.url + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=15, context=stack.tls_context()) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def mint(stack: ApplianceStack, **body: Any) -> str:
    status, answer = api(stack, "POST", "/v1/hybrid/enrollment-tokens", bearer=stack.admin_key, body=body)
    assert status == 201, answer
    return str(answer["data"]["token"])


def enroll(stack: ApplianceStack, config: Path, token: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return link(config, "enroll", "--url", stack.url, "--token", token, "--ca-file", str(stack.config.tls_cert),
                *extra)


def enrolled(stack: ApplianceStack, config: Path) -> str:
    result = enroll(stack, config, mint(stack))
    assert result.returncode == 0, result.stderr
    return stored_credential(config)


def test_enrolment_keeps_the_credential_0600_here_and_only_its_hash_there(
        managed: ApplianceStack, sql: SQL, tmp_path: Path):
    minted = subprocess.run([str(APPLIANCE_CLI.parent / "scaigrid"), "--env-file",
                             str(managed.config.scaigrid_env_file), "admin", "hybrid-token", "--name", "site-a"],
                            env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert minted.returncode == 0, minted.stderr
    token = minted.stdout.strip()
    assert token.startswith("sget_") and "\n" not in token

    config = appliance_config(tmp_path / "a")
    result = enroll(managed, config, token, "--name", "site-a")
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(link_json(config).stat().st_mode) == 0o600
    saved = json.loads(link_json(config).read_text())
    credential = saved["credential"]
    assert credential.startswith("sgn_") and saved["node_id"].startswith("hn_")
    assert credential not in result.stdout + result.stderr and saved["node_id"] in result.stdout

    [node] = sql("SELECT * FROM hybrid_nodes WHERE id = :id", id=saved["node_id"])
    [token_row] = sql("SELECT * FROM hybrid_enrollment_tokens WHERE node_id = :id", id=saved["node_id"])
    assert node["credential_hash"] == hashlib.sha256(credential.encode()).hexdigest()
    assert node["name"] == "site-a" and node["software_version"]
    assert not any(credential in str(value) for value in node.values())
    assert not any(token in str(value) for value in token_row.values()) and token_row["used_at"] is not None

    status = link(config, "status", "--json")
    assert status.returncode == 0, status.stdout + status.stderr
    assert json.loads(status.stdout) == {"enrolled": True, "url": managed.url, "node_id": saved["node_id"],
                                         "accepted": True, "problem": None}
    again = enroll(managed, config, mint(managed))
    assert again.returncode == 1
    assert f"already enrolled as {saved['node_id']}; `link unenroll` first" in again.stderr


def test_a_used_expired_or_wrong_token_is_refused_with_its_code(
        managed: ApplianceStack, sql: SQL, tmp_path: Path):
    token = mint(managed)
    assert enroll(managed, appliance_config(tmp_path / "first"), token).returncode == 0

    second = appliance_config(tmp_path / "second")
    reused = enroll(managed, second, token)
    assert reused.returncode == 1 and "ENROLLMENT_TOKEN_USED: " in reused.stderr
    wrong = enroll(managed, second, "sget_" + "x" * 43)
    assert wrong.returncode == 1 and "ENROLLMENT_TOKEN_INVALID: " in wrong.stderr

    expiring = mint(managed, ttl_s=60)
    sql("UPDATE hybrid_enrollment_tokens SET expires_at = UTC_TIMESTAMP(6) - INTERVAL 1 SECOND "  # without waiting
        "WHERE token_hash = :hash", hash=hashlib.sha256(expiring.encode()).hexdigest())
    expired = enroll(managed, second, expiring)
    assert expired.returncode == 1 and "ENROLLMENT_TOKEN_EXPIRED: " in expired.stderr
    assert len(expired.stderr.strip().splitlines()) == 1
    assert not link_json(second).exists()

    status, answer = api(managed, "POST", "/v1/hybrid/enrollment-tokens", bearer=managed.admin_key,
                         body={"ttl_s": 3601})
    assert status == 422 and answer["error"]["details"][0]["field"] == "ttl_s"


def test_of_concurrent_enrolments_with_one_token_exactly_one_wins(managed: ApplianceStack, sql: SQL):
    token = mint(managed)
    body = {"token": token, "name": "racer", "software_version": "test"}
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: api(managed, "POST", "/v1/hybrid/enroll", body=body), range(8)))
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] + [409] * 7, answers
    assert all(answer["error"]["code"] == "ENROLLMENT_TOKEN_USED" for status, answer in answers if status == 409)
    assert sql("SELECT COUNT(*) AS n FROM hybrid_nodes WHERE name = 'racer'")[0]["n"] == 1


def test_rotation_keeps_the_old_credential_until_the_switch_then_revokes_it(managed: ApplianceStack, tmp_path: Path):
    config = appliance_config(tmp_path / "a")
    old = enrolled(managed, config)

    status, answer = api(managed, "POST", "/v1/hybrid/link/rotate", bearer=old)
    assert status == 200
    new = answer["data"]["credential"]
    assert api(managed, "GET", "/v1/hybrid/link", bearer=old)[0] == 200  # not switched yet: the old one still works
    status, answer = api(managed, "GET", "/v1/hybrid/link", bearer=new)  # the switch
    assert status == 200 and answer["data"]["rotated_at"] is not None
    status, answer = api(managed, "GET", "/v1/hybrid/link", bearer=old)
    assert (status, answer["error"]["code"]) == (401, "NODE_CREDENTIAL_INVALID")

    # The CLI does the same with the credential it stored (still the first one: the API call above bypassed it).
    link_json(config).write_text(json.dumps({**json.loads(link_json(config).read_text()), "credential": new}))
    rotated = link(config, "rotate")
    assert rotated.returncode == 0, rotated.stderr
    newest = stored_credential(config)
    assert newest not in (old, new) and newest not in rotated.stdout
    assert api(managed, "GET", "/v1/hybrid/link", bearer=new)[0] == 401
    assert link(config, "status").returncode == 0


def test_unenroll_revokes_the_node_and_removes_the_link(managed: ApplianceStack, tmp_path: Path):
    config = appliance_config(tmp_path / "a")
    credential = enrolled(managed, config)
    node_id = json.loads(link_json(config).read_text())["node_id"]

    result = link(config, "unenroll")
    assert result.returncode == 0, result.stderr
    assert not link_json(config).exists()
    status, answer = api(managed, "GET", "/v1/hybrid/link", bearer=credential)
    assert (status, answer["error"]["code"]) == (401, "NODE_CREDENTIAL_INVALID")
    status, answer = api(managed, "GET", "/v1/hybrid/nodes?limit=100", bearer=managed.admin_key)
    assert {item["id"]: item["status"] for item in answer["data"]["items"]}[node_id] == "revoked"
    status_result = link(config, "status")
    assert status_result.returncode == 1 and "not enrolled" in status_result.stdout


def test_a_node_revoked_by_the_admin_is_refused_and_can_leave_only_by_force(managed: ApplianceStack, tmp_path: Path):
    config = appliance_config(tmp_path / "a")
    enrolled(managed, config)
    node_id = json.loads(link_json(config).read_text())["node_id"]
    status, answer = api(managed, "DELETE", f"/v1/hybrid/nodes/{node_id}", bearer=managed.admin_key)
    assert status == 200 and answer["data"]["status"] == "revoked"

    status_result = link(config, "status")
    assert status_result.returncode == 1 and "NODE_CREDENTIAL_INVALID" in status_result.stdout
    refused = link(config, "unenroll")
    assert refused.returncode == 1 and "NODE_CREDENTIAL_INVALID" in refused.stderr and link_json(config).exists()
    forced = link(config, "unenroll", "--force")
    assert forced.returncode == 0 and f"still has {node_id}" in forced.stdout
    assert not link_json(config).exists()


def test_unenroll_refuses_while_the_managed_side_is_unreachable_unless_forced(managed: ApplianceStack,
                                                                               tmp_path: Path):
    config = appliance_config(tmp_path / "a")
    enrolled(managed, config)
    saved = json.loads(link_json(config).read_text())
    [closed_port] = devstack.free_ports(1)
    link_json(config).write_text(json.dumps({**saved, "url": f"https://127.0.0.1:{closed_port}"}))
    refused = link(config, "unenroll")
    assert refused.returncode == 1 and "cannot reach" in refused.stderr and link_json(config).exists()
    forced = link(config, "unenroll", "--force")
    assert forced.returncode == 0 and f"still has {saved['node_id']}: revoke it there" in forced.stdout
    assert not link_json(config).exists()
    assert api(managed, "GET", "/v1/hybrid/link", bearer=saved["credential"])[0] == 200


def test_plain_http_and_an_unverified_certificate_are_refused(managed: ApplianceStack, tmp_path: Path):
    config = appliance_config(tmp_path / "a")
    token = mint(managed)
    plain = link(config, "enroll", "--url", managed.url.replace("https://", "http://"), "--token", token)
    assert plain.returncode == 1 and "must use https://" in plain.stderr
    unverified = link(config, "enroll", "--url", managed.url, "--token", token)  # self-signed, no --ca-file
    assert unverified.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr
    assert not link_json(config).exists()
    assert enroll(managed, config, token).returncode == 0  # neither attempt spent the token


def test_node_credentials_and_api_keys_do_not_stand_in_for_each_other(managed: ApplianceStack, tmp_path: Path):
    credential = enrolled(managed, appliance_config(tmp_path / "a"))
    status, answer = api(managed, "GET", "/v1/hybrid/link", bearer=managed.admin_key)
    assert (status, answer["error"]["code"]) == (401, "NODE_CREDENTIAL_INVALID")
    status, answer = api(managed, "GET", "/v1/hybrid/nodes", bearer=credential)
    assert status == 401
    tenant_admin = subprocess.run([str(APPLIANCE_CLI.parent / "scaigrid"), "--env-file",
                                   str(managed.config.scaigrid_env_file), "admin", "create-key", "--role",
                                   "tenant_admin"], env=child_env(), capture_output=True, text=True, timeout=60,
                                  check=True).stdout.strip()
    status, answer = api(managed, "POST", "/v1/hybrid/enrollment-tokens", bearer=tenant_admin, body={})
    assert (status, answer["error"]["code"]) == (403, "AUTHZ_PERMISSION_DENIED")


def test_a_server_not_managed_answers_hybrid_not_managed(node: Node):
    def post(path: str, bearer: str | None, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {bearer}"} if bearer else {})}
        request = urllib.request.Request(node.url + path, method="POST", headers=headers,
                                         data=json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    for path, bearer, body in (("/v1/hybrid/enrollment-tokens", node.admin_key, {}),
                               ("/v1/hybrid/enroll", None, {"token": "sget_x", "name": "a", "software_version": "1"})):
        status, answer = post(path, bearer, body)
        assert (status, answer["error"]["code"]) == (404, "HYBRID_NOT_MANAGED"), path
    refused = scaigrid("admin", "hybrid-token", env=node.env)
    assert refused.returncode == 1 and "HYBRID_ROLE is not `managed`" in refused.stderr
