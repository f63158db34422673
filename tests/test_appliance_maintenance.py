"""backup, restore, support-bundle and upgrade against a real appliance stack that runs from a venv of wheels."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from click.testing import CliRunner

import scaigrid
from appliance import devstack
from appliance.cli import cli
from appliance.maintenance.archive import Database, MaintenanceFailed
from tests.appliance_stack import ApplianceStack, start_stack
from tests.support.wheels import build_wheel

BASE_VERSION = scaigrid.__version__
GOOD_VERSION = f"{BASE_VERSION}.post1"
BAD_VERSION = f"{BASE_VERSION}.post2"
FUTURE_PYTHON_VERSION = f"{BASE_VERSION}.post3"
# Every API call of these tests is rate-limited; a test that writes as fast as it can must not be refused for it.
NO_RATE_LIMITS = {f"RATE_LIMIT_{level}_RPM": "1000000" for level in ("KEY", "USER", "TENANT", "PARTNER")}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("wheels")
    return {BASE_VERSION: build_wheel(work, BASE_VERSION), GOOD_VERSION: build_wheel(work, GOOD_VERSION),
            BAD_VERSION: build_wheel(work, BAD_VERSION, broken=True),
            FUTURE_PYTHON_VERSION: build_wheel(work, FUTURE_PYTHON_VERSION, python_requires=">=3.99")}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
          s3_server: devstack.S3Server, wheels: dict[str, Path]) -> Iterator[ApplianceStack]:
    """A stack whose programs and CLI run from their own venv with this tree's wheel installed, as provision.sh
    leaves an appliance (wheel kept in ../wheels, `current` linking it), so that upgrade can swap it. The venv
    borrows .venv's dependencies through a .pth file instead of installing them again."""
    base = tmp_path_factory.mktemp("maintenance")
    venv = base / "opt" / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = venv / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = wheels[BASE_VERSION]
    subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    "--no-deps", wheel], check=True, capture_output=True)
    kept = venv.parent / "wheels"
    kept.mkdir()
    shutil.copy(wheel, kept / wheel.name)
    (kept / "current").symlink_to(wheel.name)
    appliance_stack = start_stack(base / "var", mariadb, redis_server, s3_server, APPLIANCE_VENV=str(venv),
                                  **NO_RATE_LIMITS)
    yield appliance_stack
    appliance_stack.stop()


def call(stack: ApplianceStack, method: str, path: str, token: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(stack.url + path, method=method, headers={"Authorization": f"Bearer {token}"})
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=10, context=stack.tls_context()) as response:
            return response.status, json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def new_key(stack: ApplianceStack, name: str) -> tuple[str, str]:
    status, reply = call(stack, "POST", "/v1/api-keys", stack.admin_key, {"name": name, "role": "tenant_user"})
    assert status == 201, reply
    return reply["data"]["id"], reply["data"]["key"]


def key_works(stack: ApplianceStack, key: str) -> bool:
    status, _ = call(stack, "GET", "/v1/api-keys", key)
    assert status in (200, 401)
    return status == 200


def keys_until_refused(stack: ApplianceStack, admin_key: str, first: threading.Event, done: threading.Event
                       ) -> list[str]:
    """Creates API keys one after another until the API stops answering; the keys it confirmed (201)."""
    confirmed: list[str] = []
    while not done.is_set():
        try:
            status, reply = call(stack, "POST", "/v1/api-keys", admin_key, {"name": "busy", "role": "tenant_user"})
        except (OSError, ValueError):  # refused, reset, or not the API answering
            break
        if status != 201:
            break
        confirmed.append(reply["data"]["key"])
        first.set()
    first.set()
    return confirmed


def upgrade_while_writing(stack: ApplianceStack, package: Path, timeout_s: float
                          ) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """Runs `upgrade` while keys are being created, as on an appliance in use; the keys confirmed before it
    stopped the programs."""
    first, done = threading.Event(), threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        writer = pool.submit(keys_until_refused, stack, stack.admin_key, first, done)
        first.wait()
        try:
            result = stack.cli("upgrade", str(package), timeout_s=timeout_s)
        finally:
            done.set()
        return result, writer.result()


def installed_version(stack: ApplianceStack) -> str:
    result = subprocess.run([stack.config.venv / "bin" / "scaigrid", "version"], capture_output=True, text=True,
                            check=True)
    return result.stdout.strip()


def secret_values(stack: ApplianceStack) -> dict[str, str]:
    return {path.name: path.read_text().strip() for path in stack.config.secrets_dir.iterdir()}


def tables(mariadb: devstack.MariaDB, database: str) -> set[str]:
    result = subprocess.run(["mariadb", "--no-defaults", "--protocol=TCP", "--host=127.0.0.1", f"--port={mariadb.port}",
                             "--user=root", "--batch", "--skip-column-names", "-e",
                             f"SELECT table_name FROM information_schema.tables WHERE table_schema = '{database}'"],
                            env={**os.environ, "MYSQL_PWD": mariadb.root_password}, capture_output=True, text=True,
                            check=True)
    return set(result.stdout.split())


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def resealed(source: Path, target: Path, name: str, change: Callable[[bytes], bytes]) -> Path:
    """A copy of a backup with one member changed and its checksum in the manifest to match: not damaged."""
    content = members(source)
    content[name] = change(content[name])
    manifest = json.loads(content["manifest.json"])
    (entry,) = (entry for entry in manifest["files"] if entry["path"] == name)
    entry.update(sha256=hashlib.sha256(content[name]).hexdigest(), size=len(content[name]))
    content["manifest.json"] = json.dumps(manifest).encode()
    with tarfile.open(target, "w:gz") as tar:
        for member_name, data in content.items():  # the manifest first, as in the original
            info = tarfile.TarInfo(member_name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return target


def rewritten(source: Path, target: Path, change: Callable[[str, bytes], bytes]) -> Path:
    """A copy of a tar.gz with each member's content passed through change (the manifest's checksums untouched)."""
    with tarfile.open(source) as old, tarfile.open(target, "w:gz") as new:
        for member in old.getmembers():
            data = change(member.name, old.extractfile(member).read())  # type: ignore[union-attr]
            member.size = len(data)
            new.addfile(member, io.BytesIO(data))
    return target


def running_pids(stack: ApplianceStack) -> dict[str, int]:
    processes = stack.supervisor.processes()
    assert all(p.state == "RUNNING" for p in processes), processes
    return {p.name: p.pid for p in processes}


@pytest.mark.parametrize("command", ["backup", "restore", "support-bundle", "upgrade"])
def test_help_has_an_example(command: str) -> None:
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0 and "Example:  scaigrid-appliance " + command in result.output


# Starts the module's stack first (three wheels and a venv, ~25 s), then a stop/restore/start cycle.
@pytest.mark.timeout(300)
def test_restore_brings_back_the_data_and_files_of_the_backup(stack: ApplianceStack, mariadb: devstack.MariaDB,
                                                              tmp_path: Path) -> None:
    kept_id, kept_key = new_key(stack, "made before the backup")
    archive = tmp_path / "backup.tar.gz"
    made = stack.cli("backup", "--output", str(archive))
    assert made.returncode == 0, made.stderr
    assert archive.stat().st_mode & 0o777 == 0o600
    assert re.search(r"database \S+: [\d.]+ KB", made.stdout), made.stdout
    assert not any(value in made.stdout + made.stderr for value in secret_values(stack).values())

    content = members(archive)
    manifest = json.loads(content["manifest.json"])
    assert manifest["software_version"] == installed_version(stack) == BASE_VERSION
    assert manifest["database"]["name"] == stack.config.database_name
    assert manifest["database"]["migrations"]["alembic_version"]
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert {"database.sql", "config/appliance.env", "config/secrets/admin-key", "config/tls/server.key"} <= set(listed)
    assert all(hashlib.sha256(content[name]).hexdigest() == entry["sha256"] for name, entry in listed.items())

    # After the backup: a key revoked, another made, a table added, a secret changed.
    assert call(stack, "DELETE", f"/v1/api-keys/{kept_id}", stack.admin_key)[0] == 200
    assert not key_works(stack, kept_key)
    _, later_key = new_key(stack, "made after the backup")
    mariadb.execute(f"CREATE TABLE `{stack.config.database_name}`.made_after_backup (id INT PRIMARY KEY)")
    jwt_secret = stack.config.secrets_dir / "jwt-signing-secret"
    original_secret = jwt_secret.read_text()
    jwt_secret.write_text("changed after the backup\n")

    restored = stack.cli("restore", str(archive), "--yes")
    assert restored.returncode == 0, restored.stdout + restored.stderr
    for step in ("checksums ok", "stopping all programs", "loading database", "migrated", "starting all programs",
                 "all programs running and ready"):
        assert step in restored.stdout
    assert key_works(stack, kept_key) and not key_works(stack, later_key)
    assert "made_after_backup" not in tables(mariadb, stack.config.database_name)
    assert jwt_secret.read_text() == original_secret and jwt_secret.stat().st_mode & 0o777 == 0o600
    assert stack.cli("status").returncode == 0
    safety = re.search(r"the state before it is in (\S+)", restored.stdout)
    assert safety and Path(safety[1]).is_file()


def test_restore_refuses_a_foreign_damaged_or_other_version_archive_before_touching_anything(
        stack: ApplianceStack, tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    assert stack.cli("backup", "--output", str(good)).returncode == 0

    def other_version(name: str, data: bytes) -> bytes:
        return data.replace(f'"software_version": "{BASE_VERSION}"'.encode(), b'"software_version": "0.0.1"')

    def damaged_dump(name: str, data: bytes) -> bytes:
        return data.replace(b"CREATE TABLE", b"CREATE TABLE IF NOT EXISTS", 1) if name == "database.sql" else data

    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        tar.add(stack.appliance.path, arcname="appliance.env")
    cases = {
        rewritten(good, tmp_path / "other.tar.gz", other_version):
            f"a backup of ScaiGrid 0.0.1; this appliance runs {BASE_VERSION}. Restore it with version 0.0.1 "
            "installed, then upgrade.",
        rewritten(good, tmp_path / "damaged.tar.gz", damaged_dump):
            "database.sql does not match its checksum: the archive is damaged",
        truncated: "cannot read it as a backup archive",
        foreign: "is not a ScaiGrid appliance backup",
        # Valid, but the appliance could not render with it: found before the database is replaced.
        resealed(good, tmp_path / "no-cert.tar.gz", "config/appliance.env",
                 lambda env: env + b"TLS_CERT_FILE=/nonexistent/server.crt\nTLS_KEY_FILE=/nonexistent/server.key\n"):
            "the appliance would not start with its files:\n  TLS_CERT_FILE: /nonexistent/server.crt does not exist",
    }
    before = running_pids(stack)
    backups_before = set(stack.config.backups_dir.glob("*"))
    for archive, message in cases.items():
        result = stack.cli("restore", str(archive), "--yes")
        assert result.returncode == 1 and message in result.stderr, (archive.name, result.stdout, result.stderr)
        assert "stopping" not in result.stdout
    assert running_pids(stack) == before  # nothing was stopped or restarted
    assert set(stack.config.backups_dir.glob("*")) == backups_before  # not even the safety backup was started


@pytest.mark.timeout(300)
def test_restore_refuses_a_dump_holding_client_commands_before_stopping_anything(stack: ApplianceStack,
                                                                               tmp_path: Path) -> None:
    good = tmp_path / "good.tar.gz"
    assert stack.cli("backup", "--output", str(good)).returncode == 0
    marker = tmp_path / "marker"
    # Each would run `touch` as the user restore runs as (root on an appliance) if the client read it.
    payloads = {"shell": f"\\! touch {marker}\n", "system": f"SELECT 1; system touch {marker};\n",
                "conditional": f"/*!50000 \\! touch {marker} */;\n",
                "after-a-quote-in-a-comment": f"-- it's\n\\! touch {marker}\n",
                "nbe": f"SET sql_mode='NO_BACKSLASH_ESCAPES'; SELECT 'a\\'; \\! touch {marker}; -- '\n"}
    before = running_pids(stack)
    for name, payload in payloads.items():
        archive = resealed(good, tmp_path / f"{name}.tar.gz", "database.sql",
                           lambda dump, payload=payload: dump + payload.encode())  # type: ignore[misc]
        result = stack.cli("restore", str(archive), "--yes")
        assert result.returncode == 1, (name, result.stdout, result.stderr)
        assert "database.sql holds a mariadb client command" in result.stderr, (name, result.stderr)
        assert "stopping" not in result.stdout
    assert not marker.exists()
    assert running_pids(stack) == before  # nothing was stopped or restarted


def test_the_dump_is_loaded_in_the_clients_sandbox(mariadb: devstack.MariaDB, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    dump = tmp_path / "database.sql"
    dump.write_text(f"CREATE TABLE t (id INT);\n\\! touch {marker}\nINSERT INTO t VALUES (1);\n")
    database = Database("127.0.0.1", mariadb.port, "restore_sandbox", "root", mariadb.root_password)
    with pytest.raises(MaintenanceFailed, match="sandbox"):
        database.replace_with(dump)
    assert not marker.exists()


def test_support_bundle_has_configs_logs_versions_status_and_no_secret(stack: ApplianceStack,
                                                                        tmp_path: Path) -> None:
    bundle = tmp_path / "support.tar.gz"
    result = stack.cli("support-bundle", "--output", str(bundle))
    assert result.returncode == 0, result.stderr
    content = members(bundle)

    config_dir = "files" + str(stack.config.config_dir)
    nginx_conf = (stack.config.config_dir / "nginx.conf").read_bytes()
    assert content[f"{config_dir}/nginx.conf"] == nginx_conf  # the real file: it holds no secret
    assert f"{config_dir}/supervisord.conf" in content and "files" + str(stack.appliance.path) in content
    assert b"\nDATABASE_URL=<redacted>\n" in content[f"{config_dir}/scaigrid.env"]
    for process in ("http_1", "http_2", "grpc", "worker_1", "worker_2", "bunker_proxy", "nginx", "supervisord"):
        assert content[f"logs/{process}.log"], process
    first_http_line = content["logs/http_2.log"].decode().splitlines()[0]
    assert first_http_line in (stack.config.log_dir / "http_2.log").read_text()
    versions = content["versions.txt"].decode()
    for expected in (f"scaigrid: {BASE_VERSION}", "nginx: nginx version: nginx/", "supervisord: 4.",
                     "mariadb server: 10."):
        assert expected in versions, versions
    status = json.loads(content["status.json"])
    assert status["running"] and {"http_1", "http_2", "grpc", "worker_1", "nginx"} <= {
        p["name"] for p in status["programs"]}

    leaked = [(name, secret) for secret, value in secret_values(stack).items()
              for name, data in content.items() if value.encode() in data or quote(value, safe="").encode() in data]
    assert leaked == []
    tls_key = stack.config.tls_key.read_text()
    key_body = [line for line in tls_key.splitlines() if line and not line.startswith("-----")]
    assert not any(b"PRIVATE KEY" in data or any(line.encode() in data for line in key_body)
                   for data in content.values())
    assert not any(value in result.stdout + result.stderr for value in secret_values(stack).values())


def test_support_bundle_hides_commented_out_secrets_and_takes_only_the_programs_logs(stack: ApplianceStack,
                                                                                     tmp_path: Path) -> None:
    old_secret = "old-" + secrets.token_hex(16)
    config_text = stack.appliance.path.read_text()
    log_dir = stack.config.log_dir
    # garage.log is a program's log name (Garage is off here): planted as a link to the TLS key.
    planted, stray = log_dir / "garage.log", log_dir / "notes.log"
    bundle = tmp_path / "support.tar.gz"
    try:
        stack.appliance.path.write_text(config_text + f"#S3_SECRET_ACCESS_KEY={old_secret}\n"
                                        f"  ; export SCAIKEY_CLIENT_SECRET = {old_secret}\n")
        planted.symlink_to(stack.config.tls_key)
        stray.write_text(f"not a program's log {old_secret}\n")
        result = stack.cli("support-bundle", "--output", str(bundle))
    finally:
        stack.appliance.path.write_text(config_text)
        planted.unlink(missing_ok=True)
        stray.unlink(missing_ok=True)
    assert result.returncode == 0, result.stderr
    content = members(bundle)

    appliance_env = content["files" + str(stack.appliance.path)].decode()
    assert "\n#S3_SECRET_ACCESS_KEY=<redacted>\n  ; export SCAIKEY_CLIENT_SECRET =<redacted>\n" in appliance_env
    assert not any(old_secret.encode() in data for data in content.values())
    assert "logs/notes.log" not in content
    assert content["logs/garage.log"].startswith(b"(left out: not a regular file")
    assert not any(b"PRIVATE KEY" in data for data in content.values())


def test_upgrade_refuses_what_is_not_a_scaigrid_wheel_before_touching_anything(stack: ApplianceStack,
                                                                              tmp_path: Path) -> None:
    not_a_wheel = tmp_path / "scaigrid-9.9.9-py3-none-any.whl"
    not_a_wheel.write_text("not a zip archive")
    before = running_pids(stack)
    result = stack.cli("upgrade", str(not_a_wheel))
    assert result.returncode == 1 and "is not a wheel" in result.stderr, result.stderr
    assert "stopping" not in result.stdout
    assert running_pids(stack) == before


# A stop, pip install, migrate and start cycle, then waiting for all programs to be ready.
@pytest.mark.timeout(300)
def test_upgrade_installs_the_wheel_and_keeps_the_data(stack: ApplianceStack, wheels: dict[str, Path]) -> None:
    _, key = new_key(stack, "made before the upgrade")
    result = stack.cli("upgrade", str(wheels[GOOD_VERSION]), timeout_s=280)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = ("[1/6] stopping", "[2/6] backup", "[3/6] installing", "[4/6] render and migrate", "[5/6] start",
             "[6/6] health gate", f"upgraded to {GOOD_VERSION}")
    positions = [result.stdout.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), result.stdout  # stopped before the backup
    assert installed_version(stack) == GOOD_VERSION
    assert stack.cli("status").returncode == 0
    assert key_works(stack, key)
    assert (stack.config.wheels_dir / "current").resolve().name == wheels[GOOD_VERSION].name


# The broken http program must be seen dying three times (or FATAL), then the whole rollback cycle; then a check
# of every key written during the upgrade's start.
@pytest.mark.timeout(360)
def test_a_failed_upgrade_rolls_back_to_the_previous_wheel_and_database(stack: ApplianceStack,
                                                                        wheels: dict[str, Path]) -> None:
    before = installed_version(stack)
    current = (stack.config.wheels_dir / "current").resolve()
    result, written = upgrade_while_writing(stack, wheels[BAD_VERSION], timeout_s=340)
    assert result.returncode == 4, result.stdout + result.stderr
    assert re.search(r"not healthy: http_\d (is FATAL|keeps exiting)", result.stdout), result.stdout
    assert f"upgrade to {BAD_VERSION} failed" in result.stderr and f"rolled back to {before}" in result.stderr
    assert "restoring the database from the backup" in result.stdout
    assert installed_version(stack) == before
    assert stack.cli("status").returncode == 0
    # The backup was made once the programs had stopped: nothing they confirmed is lost by the rollback.
    assert written and all(key_works(stack, key) for key in written)
    assert (stack.config.wheels_dir / "current").resolve() == current
    requirements = re.search(r"installed packages \(for a rollback\): (\S+)", result.stdout)
    assert requirements and "\nalembic==" in "\n" + Path(requirements[1]).read_text()


# A stop and backup, a refused install, and a rollback that reinstalls the same packages, then the health gate.
@pytest.mark.timeout(240)
def test_an_upgrade_failing_before_migrate_rolls_back_and_leaves_the_database_alone(
        stack: ApplianceStack, wheels: dict[str, Path]) -> None:
    before = installed_version(stack)
    result, written = upgrade_while_writing(stack, wheels[FUTURE_PYTHON_VERSION], timeout_s=220)
    assert result.returncode == 4, result.stdout + result.stderr
    assert "requires a different Python" in result.stdout
    assert f"rolled back to {before} (database untouched)" in result.stderr
    assert "the database was not touched" in result.stdout and "restoring the database" not in result.stdout
    assert installed_version(stack) == before
    assert stack.cli("status").returncode == 0
    assert written and all(key_works(stack, key) for key in written)
