"""The appliance booted for real: a bookworm root filesystem made by appliance/provision.sh, systemd as PID 1 (nspawn).

The module's tests run in file order against one container: provisioning first (before it boots), then what the
boot brought up, then restart, a killed program, and stop, each leaving the appliance as the next one expects.
"""

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import rootfs
from tests.support.waiting import eventually

# The first test builds the root filesystem when provision.sh, its packages or constraints.txt changed (about
# 3 minutes; a cached one takes about 20 s to bring up to date) and the first test on the booted machine waits for
# first boot; later steps each wait up to READY_TIMEOUT_S for the appliance.
pytestmark = pytest.mark.timeout(600)

APPLIANCE = "scaigrid-appliance"  # on PATH through provision.sh's link
SECRETS_DIR = "/etc/scaigrid/secrets"
SUPERVISORD_LOG = "/var/log/scaigrid/supervisord.log"
UNITS = ("scaigrid.target", "scaigrid-firstboot.service", "scaigrid-migrate.service", "scaigrid-appliance.service")
# Without an S3 in the container storage stays off: bunker_proxy is not rendered. The image's default runs one http
# process per CPU: the container's processes inherit this one's CPU affinity (nspawn sets none of its own).
HTTP_PROCESSES = [f"http_{i + 1}" for i in range(len(os.sched_getaffinity(0)))]
PROGRAMS = {*HTTP_PROCESSES, "grpc", "worker_1", "nginx", "events"}
BOOT_TIMEOUT_S = 300
READY_TIMEOUT_S = 120
POLL_S = 0.5  # each poll runs a command in the container


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("appliance-boot")


@pytest.fixture(scope="module")
def provisioned(work_dir: Path) -> Iterator[rootfs.Provisioned]:
    """The cached, provisioned root filesystem, overlaid, with this tree's wheel and units installed again."""
    with rootfs.provisioned_rootfs(work_dir) as result:
        yield result


@pytest.fixture(scope="module")
def machine(provisioned: rootfs.Provisioned, work_dir: Path, request: pytest.FixtureRequest,
            ) -> Iterator[rootfs.Machine]:
    """The root filesystem booted, once its first boot is through and the API answers ready through nginx."""
    console = work_dir / "console.log"
    with rootfs.booted(provisioned.root, "scaigrid-boot-test", console) as booted:
        state = booted.wait_until_booted(BOOT_TIMEOUT_S)
        assert state in ("running", "degraded"), f"boot ended {state!r}:\n{console.read_text()[-4000:]}"
        eventually(lambda: ready_through_nginx(booted), "/health/ready through nginx", READY_TIMEOUT_S,
                   interval_s=POLL_S)
        boot_to_ready_s = time.monotonic() - booted.started_at_s
        capture = request.config.pluginmanager.getplugin("capturemanager")
        with capture.global_and_fixture_disabled():  # shown on every run, not only when a test fails
            print(f"\nappliance boot-to-ready (nspawn start to /health/ready through nginx): {boot_to_ready_s:.1f} s")
        # supervisord calls a program RUNNING only after its startsecs, which may end after the API answers ready.
        eventually(lambda: healthy(booted), "every program RUNNING and ready", READY_TIMEOUT_S, interval_s=POLL_S)
        yield booted


def ready_through_nginx(machine: rootfs.Machine) -> bool:
    answer = machine.run("curl", "-sk", "https://127.0.0.1/health/ready", check=False)
    return answer.returncode == 0 and '"ready"' in answer.stdout


def status(machine: rootfs.Machine) -> dict[str, Any]:
    """`scaigrid-appliance status --json`; exit 4 (not healthy) still prints it."""
    result = machine.run(APPLIANCE, "status", "--json", check=False)
    assert result.returncode in (0, 4), result.stderr
    return dict(json.loads(result.stdout))


def programs(machine: rootfs.Machine) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in status(machine)["programs"]}


def healthy(machine: rootfs.Machine) -> bool:
    report = status(machine)
    return bool(report["healthy"]) and {row["name"] for row in report["programs"]} == PROGRAMS


def unit(machine: rootfs.Machine, name: str) -> dict[str, str]:
    shown = machine.run("systemctl", "show", name,
                        "-p", "ActiveState,SubState,Result,MainPID,InvocationID,UnitFileState")
    return dict(line.split("=", 1) for line in shown.stdout.splitlines())


def log_size(machine: rootfs.Machine, path: str) -> int:
    return int(machine.run("stat", "-c", "%s", path).stdout)


def log_since(machine: rootfs.Machine, path: str, offset: int) -> str:
    return machine.run("tail", "-c", f"+{offset + 1}", path).stdout


def test_provisioning_is_idempotent_and_garage_needs_its_checksum(provisioned: rootfs.Provisioned) -> None:
    root = provisioned.root
    again = rootfs.provision(root, provisioned.wheel)
    stages = again.stdout.split("== stage ")[1:]
    assert [stage.split(" ==")[0] for stage in stages] == ["packages", "user", "install", "units", "garage"]
    for stage in stages[:4]:
        assert stage.rstrip().endswith("already done"), again.stdout
    assert "skipped: no --garage-url" in stages[4]

    binary = b"#!/bin/sh\necho garage v0 stand-in\n"
    (root / "srv" / "garage-download").write_bytes(binary)
    url = "file:///srv/garage-download"
    wrong = rootfs.provision(root, None, "garage", ["--garage-url", url, "--garage-sha256", "0" * 64],
                             check=False)
    assert wrong.returncode == 1
    assert "sha256 mismatch" in wrong.stderr and "nothing installed" in wrong.stderr
    assert not (root / "usr/local/bin/garage").exists()

    checksum = hashlib.sha256(binary).hexdigest()
    for expected in (f"installed /usr/local/bin/garage (sha256 {checksum})", "already done"):
        right = rootfs.provision(root, None, "garage", ["--garage-url", url, "--garage-sha256", checksum])
        assert expected in right.stdout
    assert (root / "usr/local/bin/garage").read_bytes() == binary
    # The boot below runs without Garage, as the image does until an operator enables it.
    (root / "usr/local/bin/garage").unlink()
    (root / "srv" / "garage-download").unlink()


def test_provisioning_refuses_bad_usage_before_any_stage(provisioned: rootfs.Provisioned) -> None:
    for args, message in (
        (["--stages", "user,bogus"], "unknown stage 'bogus'"),
        (["--stages", "user,install"], "the install stage needs --wheel PATH"),
        (["--stages", "user,garage", "--garage-url", "file:///srv/garage"], "needs --garage-sha256 with 64 hex"),
        (["--frobnicate"], "unknown argument: --frobnicate"),
    ):
        refused = rootfs.provision(provisioned.root, None, extra_args=args, check=False)
        assert (refused.returncode, refused.stdout) == (2, ""), refused.stderr
        assert message in refused.stderr


def test_first_boot_made_private_secrets_and_a_root_only_admin_key(machine: rootfs.Machine) -> None:
    assert unit(machine, "scaigrid-firstboot.service")["Result"] == "success"
    machine.run("test", "-f", "/var/lib/scaigrid/firstboot.done")
    modes = dict(line.split(" ", 1) for line in machine.run(
        "sh", "-c", f"stat -c '%n %a %U:%G' {SECRETS_DIR} {SECRETS_DIR}/*").stdout.splitlines())
    assert modes.pop(SECRETS_DIR) == "700 root:root"
    assert modes.pop(f"{SECRETS_DIR}/admin-key") == "600 root:root"
    assert modes and set(modes.values()) == {"600 root:root"}, modes
    # The key is a working super_admin key: /health/detailed through nginx needs admin:access.
    detailed = machine.run("sh", "-c", f'curl -sk -o /dev/null -w "%{{http_code}}" -H "Authorization: Bearer '
                                       f'$(cat {SECRETS_DIR}/admin-key)" https://127.0.0.1/health/detailed')
    assert detailed.stdout == "200"


def test_units_are_up_and_pass_systemd_analyze_verify(machine: rootfs.Machine) -> None:
    assert unit(machine, "scaigrid.target")["ActiveState"] == "active"
    assert unit(machine, "scaigrid.target")["UnitFileState"] == "enabled"
    assert unit(machine, "scaigrid-appliance.service")["SubState"] == "running"
    assert unit(machine, "scaigrid-firstboot.service")["SubState"] == "exited"
    migrate = unit(machine, "scaigrid-migrate.service")
    assert (migrate["ActiveState"], migrate["Result"]) == ("inactive", "success")  # ran, then done
    for name in ("mariadb.service", "redis-server.service"):
        assert unit(machine, name)["ActiveState"] == "active"
    # supervisord runs nginx: Debian's own units stay off (they would take port 80 and start a second supervisord).
    for name in ("nginx.service", "supervisor.service"):
        assert (unit(machine, name)["ActiveState"], unit(machine, name)["UnitFileState"]) == ("inactive", "disabled")
    # Verified where every binary and unit they name exists, as on an installed appliance.
    verify = machine.run("systemd-analyze", "verify", *(f"/etc/systemd/system/{name}" for name in UNITS), check=False)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")


def test_every_program_is_running_and_ready(machine: rootfs.Machine) -> None:
    report = status(machine)
    assert report["running"] and report["healthy"], report
    assert {row["name"]: row["state"] for row in report["programs"]} == dict.fromkeys(PROGRAMS, "RUNNING")
    assert ready_through_nginx(machine)


def test_mariadb_takes_a_pool_of_connections_for_every_http_process(machine: rootfs.Machine) -> None:
    """One pool per http process, one process per CPU: Debian's 151 connections would not do on a large VM."""
    answer = machine.run("mariadb", "--batch", "--skip-column-names", "-e", "SELECT @@max_connections").stdout
    assert int(answer) == 1000


def test_restart_migrates_again_and_brings_every_program_back(machine: rootfs.Machine) -> None:
    before = unit(machine, "scaigrid-appliance.service")
    migrate_before = unit(machine, "scaigrid-migrate.service")["InvocationID"]
    log_offset = log_size(machine, SUPERVISORD_LOG)
    machine.run("systemctl", "restart", "scaigrid-appliance.service", timeout_s=READY_TIMEOUT_S)
    eventually(lambda: healthy(machine), "every program RUNNING and ready after the restart", READY_TIMEOUT_S,
               interval_s=POLL_S)
    after = unit(machine, "scaigrid-appliance.service")
    assert after["SubState"] == "running" and after["MainPID"] != before["MainPID"]
    assert unit(machine, "scaigrid-migrate.service")["InvocationID"] != migrate_before
    assert all(row["fatal_count"] == 0 for row in programs(machine).values())
    log = log_since(machine, SUPERVISORD_LOG, log_offset)
    for name in PROGRAMS - {"events"}:
        assert f"stopped: {name} (exit status 0)" in log, log
    assert "FATAL" not in log and "SIGKILL" not in log, log
    assert ready_through_nginx(machine)


def test_a_killed_program_is_restarted_by_supervisord(machine: rootfs.Machine) -> None:
    pid = programs(machine)["http_1"]["pid"]
    log_offset = log_size(machine, SUPERVISORD_LOG)
    machine.run("kill", "-KILL", str(pid))
    eventually(lambda: healthy(machine) and programs(machine)["http_1"]["pid"] != pid, "http_1 restarted",
               READY_TIMEOUT_S, interval_s=POLL_S)
    log = log_since(machine, SUPERVISORD_LOG, log_offset)
    assert "exited: http_1 (terminated by SIGKILL; not expected)" in log, log
    assert programs(machine)["http_1"]["fatal_count"] == 0
    assert ready_through_nginx(machine)


def test_stop_drains_every_program_and_leaves_the_unit_inactive(machine: rootfs.Machine) -> None:
    log_offset = log_size(machine, SUPERVISORD_LOG)
    http_log_offset = log_size(machine, "/var/log/scaigrid/http_1.log")
    machine.run("systemctl", "stop", "scaigrid-appliance.service", timeout_s=READY_TIMEOUT_S)
    stopped = unit(machine, "scaigrid-appliance.service")
    assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success")
    log = log_since(machine, SUPERVISORD_LOG, log_offset)
    for name in PROGRAMS - {"events"}:
        assert f"stopped: {name} (exit status 0)" in log, log
    assert "SIGKILL" not in log, log
    assert "drained:" in log_since(machine, "/var/log/scaigrid/http_1.log", http_log_offset)
    # Nothing of the appliance outlives its unit, and supervisord's socket went with it.
    assert machine.run("pgrep", "-f", "supervisord|scaigrid run|nginx", check=False).returncode == 1
    assert machine.run("test", "-e", "/run/scaigrid/supervisor.sock", check=False).returncode == 1
