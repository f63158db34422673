"""Debian's Prometheus, given the rendered scrape file, scrapes a running appliance through nginx: every target up."""

import json
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from appliance import devstack
from appliance.local import child_env
from tests.appliance_stack import ApplianceStack
from tests.backends import FakeBackend, catalogue_toml
from tests.support.waiting import eventually

PROMETHEUS = "/usr/bin/prometheus"
MODEL = "scraped-chat"
# Prometheus scrapes every 1 s here (15 s as rendered) and may need a few rounds to see everything; only a bound.
SCRAPED_TIMEOUT_S = 60
# The event listener's gauge as an operator queries it: one series per program, labelled by the program.
RUNNING_BY_PROGRAM = "max by (program) (scaigrid_appliance_program_running)"


def scaigrid_cli(stack: ApplianceStack, *args: str) -> str:
    """`scaigrid ARGS` on the stack's rendered env file, as an operator on the appliance runs it."""
    argv = [str(stack.config.venv / "bin" / "scaigrid"), "--env-file", str(stack.config.scaigrid_env_file), *args]
    result = subprocess.run(argv, env=child_env(), capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def chat(stack: ApplianceStack, key: str) -> int:
    request = urllib.request.Request(
        f"{stack.url}/oai/v1/chat/completions", method="POST",
        data=json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30, context=stack.tls_context()) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeBackend]:
    server = FakeBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def prometheus(appliance_stack: ApplianceStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus on a free loopback port with the stack's scrape file, scraping every second; its API's URL."""
    directory = tmp_path_factory.mktemp("prometheus")
    config = yaml.safe_load((appliance_stack.config.config_dir / "prometheus" / "scaigrid.yml").read_text())
    config["global"]["scrape_interval"] = "1s"  # the scrape configs stay as rendered
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = devstack.free_port()
    with (directory / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [PROMETHEUS, f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        eventually(lambda: answers(f"{url}/-/ready") or process.poll() is not None, "prometheus ready", 60)
        assert process.poll() is None, devstack.log_tail(directory / "prometheus.log")
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def api(url: str, path: str, **params: str) -> Any:
    with urllib.request.urlopen(f"{url}/api/v1/{path}?{urllib.parse.urlencode(params)}", timeout=10) as response:
        reply = json.load(response)
    assert reply["status"] == "success", reply
    return reply["data"]


def query(url: str, promql: str) -> dict[str, float]:
    """An instant query's results, each series named by its labels (as `k=v,...`), with its value."""
    return {",".join(f"{k}={v}" for k, v in sorted(series["metric"].items())): float(series["value"][1])
            for series in api(url, "query", query=promql)["result"]}


def test_prometheus_scrapes_every_program_through_nginx(appliance_stack: ApplianceStack, prometheus: str,
                                                        fake: FakeBackend, tmp_path: Path):
    # scaigrid_requests_total has a series once a request names a model: one chat completion through nginx first.
    catalogue = tmp_path / "catalogue.toml"
    catalogue.write_text(catalogue_toml([{"id": "fake", "provider": "custom", "base_url": fake.url, "model": MODEL}],
                                        [{"slug": MODEL, "modality": "chat", "routes": [{"backend": "fake"}]}]))
    scaigrid_cli(appliance_stack, "admin", "apply", str(catalogue))
    key = scaigrid_cli(appliance_stack, "admin", "create-key", "--role", "tenant_user")
    eventually(lambda: chat(appliance_stack, key) == 200, "a chat completion through nginx", 30)
    programs = [row["name"] for row in json.loads(appliance_stack.cli("status", "--json").stdout)["programs"]]
    scraped_programs = [name for name in programs if name != "nginx"]  # nginx is the way in, not a target

    def scraped() -> bool:
        targets = api(prometheus, "targets")["activeTargets"]
        return (len(targets) == len(scraped_programs) and all(target["health"] == "up" for target in targets)
                and bool(query(prometheus, "scaigrid_requests_total"))
                and len(query(prometheus, RUNNING_BY_PROGRAM)) == len(programs))

    try:
        eventually(scraped, "every target scraped", SCRAPED_TIMEOUT_S)
    except AssertionError:
        print(json.dumps(api(prometheus, "targets")["activeTargets"], indent=1))  # each target's lastError
        raise

    targets = api(prometheus, "targets")["activeTargets"]
    assert sorted(target["labels"]["job"] for target in targets) == sorted(
        f"scaigrid_{name}" for name in scraped_programs)
    assert {target["scrapeUrl"] for target in targets} == {
        f"https://localhost:{appliance_stack.config.https_port}/metrics{'' if name == 'http' else '/' + name}"
        for name in scraped_programs}
    assert set(query(prometheus, "up").values()) == {1.0}
    requests = query(prometheus, "scaigrid_requests_total")
    assert any(f"model={MODEL}" in series and "status=ok" in series for series in requests), requests
    assert query(prometheus, RUNNING_BY_PROGRAM) == {f"program={name}": 1.0 for name in programs}
