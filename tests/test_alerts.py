"""The alerting rules rendered beside the scrape file: promtool accepts both, its unit tests (tests/alerts/) see every
alert fire and stay quiet, and the event listener serves the disk and certificate metrics two of them watch."""

import datetime
import os
import shlex
import shutil
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance import config as appliance_config
from appliance import devstack, render
from appliance.events import CRASH_STATES, HostCollector, ProgramStates
from appliance.local import child_env
from tests.appliance_stack import ApplianceStack
from tests.support.prometheus import api, query, running
from tests.support.waiting import eventually
from tests.test_appliance_config import appliance_env, cli, ini

PROMTOOL = "/usr/bin/promtool"
UNIT_TESTS = Path(__file__).parent / "alerts"
NOT_AFTER = datetime.datetime(2031, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], cwd=cwd, env=child_env(), capture_output=True, text=True, timeout=60,
                          check=False)


def certificate(directory: Path, not_after: datetime.datetime) -> tuple[Path, Path]:
    """A self-signed certificate and its key, valid until not_after: the operator's own (TLS_CERT_FILE)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")])
    built = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)).not_valid_after(not_after)
             .sign(key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    cert, key_file = directory / "operator.crt", directory / "operator.key"
    cert.write_bytes(built.public_bytes(Encoding.PEM))
    key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    key_file.chmod(0o600)
    return cert, key_file


@pytest.fixture
def appliance(tmp_path: Path) -> Iterator[appliance_config.Appliance]:
    """A rendered appliance whose certificate is the operator's, expiring at NOT_AFTER."""
    cert, key = certificate(tmp_path / "operator", NOT_AFTER)
    path = appliance_env(tmp_path / "appliance", TLS_CERT_FILE=str(cert), TLS_KEY_FILE=str(key),
                         APPLIANCE_METRICS_PORT=str(devstack.free_port()))
    result = cli("render", "--config", str(path))
    assert result.returncode == 0, result.stderr
    yield appliance_config.load(path)


def rules_file(appliance: appliance_config.Appliance) -> Path:
    return appliance.config.config_dir / "prometheus" / render.RULES_FILE_NAME


def scrape_file(appliance: appliance_config.Appliance) -> Path:
    return appliance.config.config_dir / "prometheus" / "scaigrid.yml"


def test_promtool_accepts_the_rules_and_the_scrape_file_that_loads_them(appliance: appliance_config.Appliance):
    scrape = scrape_file(appliance)

    checked_rules = promtool("check", "rules", str(rules_file(appliance)))
    checked_config = promtool("check", "config", str(scrape))

    assert checked_rules.returncode == 0, checked_rules.stdout + checked_rules.stderr
    assert checked_config.returncode == 0, checked_config.stdout + checked_config.stderr
    parsed = yaml.safe_load(scrape.read_text())
    assert parsed["rule_files"] == [str(rules_file(appliance))]
    # The chaos run shortens both intervals with a plain text replace of these two lines.
    assert "\n  scrape_interval: 15s\n" in scrape.read_text()
    assert "\n  evaluation_interval: 15s\n" in scrape.read_text()
    groups = yaml.safe_load(rules_file(appliance).read_text())["groups"]
    assert [group["name"] for group in groups] == ["scaigrid-appliance"]
    for rule in groups[0]["rules"]:
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


def test_every_alert_fires_and_stays_quiet_in_promtools_unit_tests(appliance: appliance_config.Appliance,
                                                                   tmp_path: Path):
    # The unit tests name the rules file as a sibling: run them beside a copy of the one just rendered.
    directory = tmp_path / "promtool"
    directory.mkdir()
    shutil.copy(rules_file(appliance), directory / render.RULES_FILE_NAME)
    test_files = sorted(UNIT_TESTS.glob("*.yml"))
    for test_file in test_files:
        shutil.copy(test_file, directory / test_file.name)

    result = promtool("test", "rules", *(path.name for path in test_files), cwd=directory)

    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {rule["alert"] for rule in yaml.safe_load(rules_file(appliance).read_text())["groups"][0]["rules"]}
    fired, quiet = set(), set()
    for test_file in test_files:
        for test in yaml.safe_load(test_file.read_text())["tests"]:
            for case in test["alert_rule_test"]:
                (fired if case["exp_alerts"] else quiet).add(case["alertname"])
    assert fired == alerts, "alerts no unit test sees firing: " + ", ".join(sorted(alerts - fired))
    assert quiet == alerts, "alerts no unit test sees quiet: " + ", ".join(sorted(alerts - quiet))


def samples(text: str) -> Samples:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=5) as response:
        return samples(response.read().decode())


def test_the_event_listener_serves_free_space_and_certificate_expiry(appliance: appliance_config.Appliance,
                                                                    tmp_path: Path):
    """The listener as the rendered supervisord.conf starts it (outside supervisord: it waits for events on stdin)."""
    config = appliance.config
    supervisord = ini(config.supervisord_conf)
    argv = shlex.split(supervisord["eventlistener:events"]["command"])
    log = tmp_path / "events.log"
    with log.open("wb") as stderr, subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                    stderr=stderr, env=child_env()) as process:
        try:
            url = f"http://127.0.0.1:{config.appliance_metrics_port}/metrics"
            served = eventually(lambda: scrape(url), "the listener's metrics", 30, ignoring=(OSError,),
                                context=lambda: devstack.log_tail(log))
        finally:
            process.send_signal(signal.SIGTERM)
            assert process.wait(10) == 0, devstack.log_tail(log)
    for path in (config.log_dir, config.state_dir):
        stat = os.statvfs(path)
        labels = (("path", str(path)),)
        assert served["scaigrid_appliance_filesystem_size_bytes", labels] == stat.f_blocks * stat.f_frsize
        # Other programs of the machine write meanwhile: the same within a few MiB.
        assert abs(served["scaigrid_appliance_filesystem_avail_bytes", labels]
                   - stat.f_bavail * stat.f_frsize) < 64 * 2**20
    assert served["scaigrid_appliance_tls_certificate_expiry_timestamp_seconds",
                  (("path", str(config.tls_cert)),)] == NOT_AFTER.timestamp()


def test_a_missing_directory_or_unreadable_certificate_is_left_out_not_an_error(tmp_path: Path):
    (tmp_path / "not-a-certificate.pem").write_text("garbage")
    registry = CollectorRegistry()
    registry.register(HostCollector([tmp_path, tmp_path / "gone", tmp_path], tmp_path / "not-a-certificate.pem"))

    served = samples(generate_latest(registry).decode())

    assert {labels for name, labels in served if name.startswith("scaigrid_appliance_filesystem")} == {
        (("path", str(tmp_path)),)}
    assert not any(name.startswith("scaigrid_appliance_tls") for name, _ in served)


def test_crash_counters_exist_at_zero_before_the_first_crash(tmp_path: Path):
    """increase() sees no rise in a series that first appears at 1: a program's first crash would go unreported."""
    registry = CollectorRegistry()
    states = ProgramStates(tmp_path / "states.json", registry)
    states.seed({"http_1": "RUNNING", "nginx": "RUNNING"})

    before = samples(generate_latest(registry).decode())
    states.record("http_1", "EXITED", 1.0)
    after = samples(generate_latest(registry).decode())

    for program in ("http_1", "nginx"):
        for state in CRASH_STATES:
            labels = (("program", program), ("state", state))
            assert before["scaigrid_appliance_program_transitions_total", labels] == 0
    assert after["scaigrid_appliance_program_transitions_total", (("program", "http_1"), ("state", "EXITED"))] == 1
    # A listener restarted later knows the programs from its states file and counts from 0 again at once.
    again = samples(generate_latest(_restarted(tmp_path)).decode())
    assert again["scaigrid_appliance_program_transitions_total", (("program", "nginx"), ("state", "EXITED"))] == 0


def _restarted(tmp_path: Path) -> CollectorRegistry:
    registry = CollectorRegistry()
    ProgramStates(tmp_path / "states.json", registry)
    return registry


# --- against a running appliance: Prometheus as the chaos run starts it, on the rendered files ---

FIRED_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def prometheus(appliance_stack: ApplianceStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus as the chaos run starts it: a 1 s copy of the stack's scrape file, which loads the rendered rules."""
    with running(scrape_file(appliance_stack.appliance), tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def firing(prometheus: str, alertname: str) -> list[dict[str, str]]:
    return [alert["labels"] for alert in api(prometheus, "alerts")["alerts"]
            if alert["labels"]["alertname"] == alertname and alert["state"] == "firing"]


def test_prometheus_evaluates_every_rule_on_series_the_appliance_serves(appliance_stack: ApplianceStack,
                                                                        prometheus: str):
    config = appliance_stack.config
    groups = api(prometheus, "rules")["groups"]
    assert [group["name"] for group in groups] == ["scaigrid-appliance"]
    rendered = yaml.safe_load(rules_file(appliance_stack.appliance).read_text())["groups"][0]["rules"]
    assert [rule["name"] for rule in groups[0]["rules"]] == [rule["alert"] for rule in rendered]
    # What the rules select, under the names and labels the scrape gives it (a typo would leave an alert mute).
    present = [
        'scaigrid_appliance_program_running{program="worker_2"}',
        'scaigrid_appliance_program_transitions_total{program="worker_2", state="EXITED"}',
        'scaigrid_dependency_up{dependency="database", job="scaigrid_grpc"}',
        'scaigrid_dependency_up{dependency="redis", job="scaigrid_grpc"}',
        'scaigrid_http_requests_total{route="/health/ready", job="scaigrid_http"}',
        'scaigrid_job_last_success_timestamp_seconds{exported_job="worker_heartbeat", job="scaigrid_worker"}',
        'scaigrid_webhook_outbox_due{job="scaigrid_worker"}',
        f'scaigrid_appliance_filesystem_avail_bytes{{path="{config.log_dir}"}}',
        f'scaigrid_appliance_filesystem_size_bytes{{path="{config.state_dir}"}}',
        'up{job="scaigrid_events"}',
    ]
    eventually(lambda: all(query(prometheus, promql) for promql in present), "every watched series scraped",
               FIRED_TIMEOUT_S, context=lambda: repr({promql: query(prometheus, promql) for promql in present}))
    expiry = query(prometheus, "scaigrid_appliance_tls_certificate_expiry_timestamp_seconds")
    assert list(expiry.values()) == [x509.load_pem_x509_certificate(config.tls_cert.read_bytes())
                                     .not_valid_after_utc.timestamp()]
    eventually(lambda: all(rule["health"] == "ok" for rule in api(prometheus, "rules")["groups"][0]["rules"]),
               "every rule evaluated without error", FIRED_TIMEOUT_S)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", ["worker_2", "events"])
def test_a_kill_9_that_supervisord_undoes_at_once_still_fires_the_crash_alert(appliance_stack: ApplianceStack,
                                                                              prometheus: str, name: str):
    """The event listener's own crash too: supervisord hands it the event of its end once it runs again."""
    supervisor = appliance_stack.supervisor
    eventually(lambda: query(prometheus, f'scaigrid_appliance_program_transitions_total{{program="{name}", '
                                         'state="EXITED"}'), f"{name}'s crash counter scraped", FIRED_TIMEOUT_S)
    assert not [labels for labels in firing(prometheus, "ScaigridProgramCrashed") if labels["program"] == name]
    killed = next(info for info in supervisor.processes() if info.name == name)

    os.kill(killed.pid, signal.SIGKILL)

    eventually(lambda: [labels for labels in firing(prometheus, "ScaigridProgramCrashed") if labels["program"] == name],
               f"ScaigridProgramCrashed for {name}", FIRED_TIMEOUT_S,
               context=lambda: repr(api(prometheus, "alerts")["alerts"]))
    eventually(lambda: next(info for info in supervisor.processes() if info.name == name).state == "RUNNING",
               f"{name} running again", FIRED_TIMEOUT_S)
