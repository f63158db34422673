"""scaigrid-appliance against a running appliance: status, start/stop/restart, logs, a FATAL program, systemd's stop."""

import contextlib
import json
import os
import queue
import secrets
import signal
import socket
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from appliance import config as appliance_config
from appliance import devstack
from appliance.cli import cli as cli_group
from appliance.cli import program_rows
from appliance.config import keys as appliance_keys
from appliance.local import child_env
from tests.appliance_stack import ApplianceStack, start_stack
from tests.support.waiting import eventually

CLI = Path(sys.prefix) / "bin" / "scaigrid-appliance"
# Every process as status lists them: the test stacks run two http and two worker processes.
PROGRAMS = ["http_1", "http_2", "grpc", "worker_1", "worker_2", "bunker_proxy", "nginx", "events"]
SCAIGRID_PROGRAMS = ["http_1", "http_2", "grpc", "worker_1", "worker_2", "bunker_proxy"]
# How long supervisord may take to bring a program back (start, startsecs, readiness); only a bound, never asserted.
RECOVERY_S = 90.0


def status(stack: ApplianceStack) -> tuple[int, dict[str, Any]]:
    result = stack.cli("status", "--json")
    return result.returncode, json.loads(result.stdout)


def rows(stack: ApplianceStack) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in status(stack)[1]["programs"]}


def wait_for(stack: ApplianceStack, condition: Callable[[dict[str, dict[str, Any]]], bool]
             ) -> dict[str, dict[str, Any]]:
    """The programs' status rows (as `status --json` has them) once condition holds; a failure shows them."""
    def programs() -> dict[str, dict[str, Any]]:
        # In this process: a poll need not pay for starting the command each time; the outcome is checked with it.
        return {row["name"]: row for row in program_rows(stack.appliance)}

    def reached() -> dict[str, dict[str, Any]]:
        found = programs()
        return found if condition(found) else {}

    return eventually(reached, "the programs' status", RECOVERY_S, interval_s=0.5,
                      context=lambda: json.dumps(programs(), indent=1))


def all_healthy(programs: dict[str, dict[str, Any]]) -> bool:
    return all(row["state"] == "RUNNING" and row["ready"] is not False for row in programs.values())


def samples(metrics_text: str, name: str) -> dict[str, float]:
    """One metric's samples in a /metrics page, by program."""
    return {sample.labels["program"]: sample.value for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if sample.name == name}


@pytest.fixture(scope="module")
def breakable_stack(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB,
                    redis_server: devstack.Redis, s3_server: devstack.S3Server) -> Iterator[ApplianceStack]:
    """This module's second stack, for the tests that break it, in file order: a FATAL program (repaired after),
    then systemd's stop, which ends it."""
    stack = start_stack(tmp_path_factory.mktemp("breakable"), mariadb, redis_server, s3_server)
    yield stack
    stack.stop()


# --- a healthy appliance ---

def test_status_shows_every_program_running_with_its_uptime_and_readiness(appliance_stack: ApplianceStack):
    text = appliance_stack.cli("status")
    code, report = status(appliance_stack)

    assert text.returncode == 0, text.stdout + text.stderr
    table = {line.split()[0]: line.split() for line in text.stdout.splitlines()[1:]}
    assert list(table) == PROGRAMS
    for name, (_, state, uptime, ready, fatal) in table.items():
        assert (state, ready, fatal) == ("RUNNING", "-" if name == "events" else "yes", "-"), name
        assert uptime != "-", name
    assert code == 0
    assert (report["running"], report["healthy"]) == (True, True)
    assert {row["name"]: row["program"] for row in report["programs"]} == {
        name: name.rsplit("_", 1)[0] if name[-1].isdigit() else name for name in PROGRAMS}
    for row in report["programs"]:
        assert row["state"] == "RUNNING" and row["pid"] > 0 and row["uptime_s"] >= 0, row
        assert row["ready"] is (None if row["name"] == "events" else True), row
        assert (row["fatal_count"], row["last_fatal_at"]) == (0, None), row


def test_a_stopped_program_makes_status_exit_4_until_it_is_started(appliance_stack: ApplianceStack):
    stop = appliance_stack.cli("stop", "worker")

    assert stop.returncode == 0, stop.stderr
    code, report = status(appliance_stack)
    assert code == 4
    assert report["healthy"] is False
    states = {row["name"]: row["state"] for row in report["programs"]}
    assert (states["worker_1"], states["worker_2"], states["grpc"]) == ("STOPPED", "STOPPED", "RUNNING")
    text = appliance_stack.cli("status")
    assert text.returncode == 4
    assert [line.split()[1] for line in text.stdout.splitlines() if line.startswith("worker_")] == ["STOPPED"] * 2

    start = appliance_stack.cli("start", "worker")

    assert start.returncode == 0, start.stderr
    wait_for(appliance_stack, all_healthy)
    assert status(appliance_stack)[0] == 0


def test_restart_gives_each_process_of_a_program_a_new_one_that_gets_ready(appliance_stack: ApplianceStack):
    before = {name: row["pid"] for name, row in rows(appliance_stack).items()}

    result = appliance_stack.cli("restart", "http")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stop http ...", "start http ...", "done"]
    after = {name: row["pid"] for name, row in wait_for(appliance_stack, all_healthy).items()}
    assert after["http_1"] != before["http_1"] and after["http_2"] != before["http_2"]
    assert after["grpc"] == before["grpc"]
    assert appliance_stack.get("/health/ready")[0] == 200


def test_restart_of_one_process_leaves_the_others_of_its_program_serving(appliance_stack: ApplianceStack):
    before = {name: row["pid"] for name, row in rows(appliance_stack).items()}

    result = appliance_stack.cli("restart", "http_2")

    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["stop http_2 ...", "start http_2 ...", "done"]
    after = {name: row["pid"] for name, row in wait_for(appliance_stack, all_healthy).items()}
    assert after["http_2"] != before["http_2"]
    assert after["http_1"] == before["http_1"]


def test_restart_of_a_stopped_program_starts_it_and_start_of_a_running_one_is_no_error(
        appliance_stack: ApplianceStack):
    assert appliance_stack.cli("stop", "worker").returncode == 0

    restart = appliance_stack.cli("restart", "worker")
    start = appliance_stack.cli("start", "worker")

    assert (restart.returncode, start.returncode) == (0, 0), restart.stderr + start.stderr
    assert [rows(appliance_stack)[name]["state"] for name in ("worker_1", "worker_2")] == ["RUNNING"] * 2


def test_render_then_restart_puts_the_new_config_in_force_stopping_nginx_after_the_programs(
        appliance_stack: ApplianceStack):
    path = appliance_stack.appliance.path
    original = path.read_text()
    supervisord_log = appliance_stack.config.log_dir / "supervisord.log"
    try:
        path.write_text(original + "\nHTTP_DRAIN_GRACE_S=6\n")
        assert appliance_stack.cli("render").returncode == 0
        offset = supervisord_log.stat().st_size

        result = appliance_stack.cli("restart")

        assert result.returncode == 0, result.stderr
        wait_for(appliance_stack, all_healthy)
        config = {info["name"]: info for info in appliance_stack.supervisor._call("getAllConfigInfo")}
        # The new drain grace, plus supervisord's margin, for each http process.
        assert config["http_1"]["stopwaitsecs"] == config["http_2"]["stopwaitsecs"] == 6 + 15
        # Stopped tier by tier: the programs drain while nginx still relays them; the listener sees it all.
        with supervisord_log.open() as log:
            log.seek(offset)
            stopped = [line.split("stopped: ")[1].split()[0] for line in log if "stopped: " in line]
        assert set(stopped) == set(PROGRAMS), stopped
        assert max(stopped.index(name) for name in SCAIGRID_PROGRAMS) < stopped.index("nginx") < stopped.index("events")
    finally:
        path.write_text(original)
        appliance_stack.cli("render")
        appliance_stack.cli("restart")
        wait_for(appliance_stack, all_healthy)


def test_a_restarted_event_listener_reports_the_running_programs_at_once(appliance_stack: ApplianceStack):
    states_file = appliance_stack.config.program_states_file
    assert appliance_stack.cli("stop", "events").returncode == 0
    # A process an older config ran (one `http` before HTTP_PROCESSES) is on record, and no longer runs.
    recorded = json.loads(states_file.read_text())
    states_file.write_text(json.dumps({**recorded, "http": {"state": "RUNNING", "fatal_count": 0,
                                                            "last_fatal_at": None}}))
    assert appliance_stack.cli("start", "events").returncode == 0

    running = samples(appliance_stack.get("/metrics/events")[1].decode(), "scaigrid_appliance_program_running")

    # Running and stable, they send the new listener no event: it asked supervisord for their states on start.
    quiet = [*SCAIGRID_PROGRAMS, "nginx"]
    assert {name: running.get(name) for name in quiet} == dict.fromkeys(quiet, 1.0)
    # What supervisord no longer runs is forgotten: no `running 0` left to alert on.
    assert "http" not in running and "http" not in json.loads(states_file.read_text())


def test_an_unknown_program_is_refused_with_the_list_of_programs(appliance_stack: ApplianceStack):
    for command in ("restart", "logs"):
        result = appliance_stack.cli(command, "htp")

        assert result.returncode == 2
        assert result.stderr == ("scaigrid-appliance: no program 'htp'; the programs are: http (http_1, http_2), grpc, "
                                 "worker (worker_1, worker_2), bunker_proxy, nginx, events\n")


def test_logs_prints_the_last_lines_of_a_process_of_a_program_or_of_all(appliance_stack: ApplianceStack):
    log = appliance_stack.config.log_dir / "http_2.log"
    # Requests until http_2 has logged more than five lines (nginx spreads them over the processes; probes of /health
    # are not logged, an unauthenticated call is).
    eventually(lambda: appliance_stack.get("/v1/models")[0] == 401 and len(log.read_text().splitlines()) > 5,
               "http_2 logging more than five lines", 30, interval_s=0)

    one = appliance_stack.cli("logs", "http_2", "-n", "5")

    assert one.returncode == 0, one.stderr
    assert one.stdout.splitlines() == log.read_text().splitlines()[-5:]
    assert len(one.stdout.splitlines()) == 5

    program = appliance_stack.cli("logs", "http", "-n", "1")

    assert program.returncode == 0, program.stderr
    assert [line.split("|")[0].strip() for line in program.stdout.splitlines()] == ["http_1", "http_2"]

    every = appliance_stack.cli("logs", "-n", "1")

    assert every.returncode == 0, every.stderr
    assert [line.split("|")[0].strip() for line in every.stdout.splitlines()] == PROGRAMS[:-1]


def test_logs_follow_prints_new_lines_until_interrupted(appliance_stack: ApplianceStack):
    marker = secrets.token_hex(8)
    # SIGINT's default disposition for the child, as a terminal gives it: a suite started in the background (`cmd &`
    # in a script) inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt.
    follower = subprocess.Popen([str(CLI), "logs", "nginx", "-f", "-n", "0"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**child_env(), "SCAIGRID_APPLIANCE_CONFIG": str(appliance_stack.appliance.path)},
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or ()], daemon=True)
    reader.start()
    try:
        seen: list[str] = []

        def followed() -> bool:
            appliance_stack.get(f"/health?follow={marker}")
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=1))
            return any(marker in line for line in seen)

        # Requests until one shows up: the follower may still be starting when the first is logged.
        eventually(followed, "the follower printing a request", 30, interval_s=0, context=lambda: repr(seen))
        assert any(f"GET /health?follow={marker}" in line for line in seen), seen
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C, as the help says
        _, stderr = follower.communicate(timeout=10)
    assert follower.returncode == 0
    assert stderr == ""


def test_a_killed_process_is_started_again_by_supervisord_alone(appliance_stack: ApplianceStack):
    before = {name: row["pid"] for name, row in rows(appliance_stack).items()}

    os.kill(before["http_1"], signal.SIGKILL)

    programs = wait_for(appliance_stack, lambda p: all_healthy(p) and p["http_1"]["pid"] != before["http_1"])
    assert programs["http_1"]["fatal_count"] == 0
    assert programs["http_2"]["pid"] == before["http_2"]
    assert appliance_stack.get("/health/ready")[0] == 200


def test_a_killed_nginx_master_is_replaced_and_the_workers_it_left_behind_leave(appliance_stack: ApplianceStack):
    """Its workers outlive a master killed with -9 and hold the listening sockets: without the graceful stop the
    next master gives them, every new master failed to bind until supervisord gave up (FATAL)."""
    master = rows(appliance_stack)["nginx"]["pid"]
    workers = [int(pid) for pid in os.listdir("/proc") if pid.isdigit() and parent_of(int(pid)) == master]
    assert workers

    os.kill(master, signal.SIGKILL)

    programs = wait_for(appliance_stack, lambda p: all_healthy(p) and p["nginx"]["pid"] != master)
    assert programs["nginx"]["fatal_count"] == 0
    eventually(lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers), "the old workers gone", 30)
    assert appliance_stack.get("/health/ready")[0] == 200


def parent_of(pid: int) -> int:
    with contextlib.suppress(OSError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return 0


# --- failures and stops (on the module's second stack) ---

@pytest.mark.timeout(240)  # a stack start, then supervisord's backoff through five failed starts, then a start
def test_a_program_that_keeps_failing_goes_fatal_and_is_reported(breakable_stack: ApplianceStack):
    config = breakable_stack.config
    assert breakable_stack.cli("stop", "nginx").returncode == 0
    # Another web server took the HTTPS port (Debian's own nginx, left enabled): every start of ours fails. nginx
    # gives up binding after its own fixed retries, so each failed start is quick however busy the machine is.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", config.https_port))
        squatter.listen()

        start = breakable_stack.cli("start", "nginx")

        assert start.returncode == 1
        assert start.stderr.startswith("scaigrid-appliance: nginx: ")
        wait_for(breakable_stack, lambda programs: programs["nginx"]["state"] == "FATAL")

    code, report = status(breakable_stack)
    assert code == 4 and report["healthy"] is False
    nginx = {row["name"]: row for row in report["programs"]}["nginx"]
    assert nginx["fatal_count"] >= 1 and nginx["last_fatal_at"] is not None
    text = breakable_stack.cli("status")
    assert text.returncode == 4
    nginx_line = next(line for line in text.stdout.splitlines() if line.startswith("nginx "))
    assert nginx_line.split()[1] == "FATAL" and f"{nginx['fatal_count']}x, last" in nginx_line
    # nginx is down: the listener is read on its own loopback port this time.
    with urllib.request.urlopen(f"http://127.0.0.1:{config.appliance_metrics_port}/metrics", timeout=10) as page:
        body = page.read().decode()
    assert samples(body, "scaigrid_appliance_program_fatal_total")["nginx"] >= 1
    assert samples(body, "scaigrid_appliance_program_running")["nginx"] == 0
    assert samples(body, "scaigrid_appliance_program_running")["http_1"] == 1

    # The other listener is gone: nginx starts again; the FATAL stays on record, in status and in the metric.
    assert breakable_stack.cli("start", "nginx").returncode == 0
    programs = wait_for(breakable_stack, all_healthy)
    assert programs["nginx"]["fatal_count"] == nginx["fatal_count"]
    assert status(breakable_stack)[0] == 0
    code, page_through_nginx = breakable_stack.get("/metrics/events")
    assert code == 200
    assert samples(page_through_nginx.decode(), "scaigrid_appliance_program_fatal_total")["nginx"] >= 1
    assert samples(page_through_nginx.decode(), "scaigrid_appliance_program_running")["nginx"] == 1


def test_systemd_stop_drains_every_program_and_then_status_says_not_running(breakable_stack: ApplianceStack):
    logs = {name: breakable_stack.config.log_dir / f"{name}.log" for name in ("supervisord", "http_1", "http_2")}
    starts = {name: path.stat().st_size for name, path in logs.items()}

    assert breakable_stack.stop() == 0  # SIGTERM to supervisord, as systemd's stop sends it

    written = {name: path.read_bytes()[starts[name]:].decode() for name, path in logs.items()}
    for name in [*SCAIGRID_PROGRAMS, "nginx"]:
        assert f"stopped: {name} (exit status 0)" in written["supervisord"], written["supervisord"]
    assert "FATAL" not in written["supervisord"] and "gave up" not in written["supervisord"]
    assert "drained: 0 in-flight request(s) finished, 0 cut" in written["http_1"]
    assert "drained: 0 in-flight request(s) finished, 0 cut" in written["http_2"]

    result = breakable_stack.cli("status")

    assert result.returncode == 3
    assert result.stderr.startswith(
        f"scaigrid-appliance: cannot reach supervisord at {breakable_stack.config.supervisor_socket}")
    assert "is scaigrid-appliance.service running?" in result.stderr


# --- the command itself ---

def test_config_is_taken_before_or_after_the_command(tmp_path):
    """`scaigrid-appliance --config F status` (as `make run` prints it) and `status --config F` are one command."""
    given, other = tmp_path / "given.env", tmp_path / "other.env"
    runner = CliRunner(env={"SCAIGRID_APPLIANCE_CONFIG": str(other)})
    for argv in (["--config", str(given), "check-config"], ["check-config", "--config", str(given)],
                 ["--config", str(other), "check-config", "--config", str(given)]):
        result = runner.invoke(cli_group, argv, prog_name="scaigrid-appliance")
        assert result.exit_code == 2 and f"{given} has 1 problem(s)" in result.output, (argv, result.output)
    result = runner.invoke(cli_group, ["check-config"], prog_name="scaigrid-appliance")
    assert f"{other} has 1 problem(s)" in result.output  # neither: $SCAIGRID_APPLIANCE_CONFIG


def test_every_command_has_help_with_an_example():
    runner = CliRunner()
    for name, command in cli_group.commands.items():
        if command.hidden:
            continue

        result = runner.invoke(cli_group, [name, "--help"], prog_name="scaigrid-appliance")

        assert result.exit_code == 0, name
        assert "Example:" in result.output and f"scaigrid-appliance {name}" in result.output, name


def test_init_without_a_config_writes_a_documented_one_then_applies_its_defaults(tmp_path: Path):
    config_path = tmp_path / "fresh" / "appliance.env"
    # With no config, init goes on with every default (/etc/scaigrid, /var/lib/scaigrid, /run/mysqld/...): it runs in
    # a mount namespace whose /etc and /var are copy-on-write and /run empty, so this machine's stay untouched.
    mounts = " && ".join(
        f"mkdir -p {tmp_path}/{d}-upper {tmp_path}/{d}-work && mount -t overlay overlay "
        f"-o lowerdir=/{d},upperdir={tmp_path}/{d}-upper,workdir={tmp_path}/{d}-work /{d}" for d in ("etc", "var"))
    script = f"{mounts} && mount -t tmpfs tmpfs /run && exec {CLI} init --config {config_path}"

    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=child_env(),
                            capture_output=True, text=True, timeout=60, check=False)

    assert result.stdout.splitlines()[0].startswith(f"wrote {config_path}: every key at its default")
    assert config_path.stat().st_mode & 0o777 == 0o600
    text = config_path.read_text()
    for key in appliance_keys():
        assert f"# {key.help}\n#{key.name}={key.default}\n" in text, key.name
    (tmp_path / "empty.env").write_text("")
    assert appliance_config.load(config_path).config == appliance_config.load(tmp_path / "empty.env").config
    # It went on: secrets made (0600) where the defaults say, then it stopped at the missing MariaDB, saying so.
    secrets_dir = tmp_path / "etc-upper" / "scaigrid" / "secrets"
    assert secrets_dir.stat().st_mode & 0o777 == 0o700
    assert {path.name: path.stat().st_mode & 0o777 for path in secrets_dir.iterdir()} == {
        secret.file: 0o600 for secret in appliance_config.SECRETS if not secret.garage_only}
    assert result.returncode == 1
    assert "/run/mysqld/mysqld.sock" in result.stderr
