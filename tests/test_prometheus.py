"""Debian's Prometheus, given the rendered scrape file, scrapes a running appliance through nginx: every process a
target, and the sum over the http processes counts every request exactly, across a killed and restarted one."""

import json
import os
import signal
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance.local import child_env
from tests.appliance_stack import ApplianceStack
from tests.backends import FakeBackend, catalogue_toml
from tests.support.prometheus import api, query, running
from tests.support.waiting import eventually

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
def key(appliance_stack: ApplianceStack, fake: FakeBackend, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A key of a tenant user, and the model it calls routed to the fake backend."""
    catalogue = tmp_path_factory.mktemp("catalogue") / "catalogue.toml"
    catalogue.write_text(catalogue_toml([{"id": "fake", "provider": "custom", "base_url": fake.url, "model": MODEL}],
                                        [{"slug": MODEL, "modality": "chat", "routes": [{"backend": "fake"}]}]))
    scaigrid_cli(appliance_stack, "admin", "apply", str(catalogue))
    created = scaigrid_cli(appliance_stack, "admin", "create-key", "--role", "tenant_user")
    eventually(lambda: chat(appliance_stack, created) == 200, "a chat completion through nginx", 30)
    return created


@pytest.fixture(scope="module")
def prometheus(appliance_stack: ApplianceStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Prometheus with the stack's scrape file, scraping every second; its API's URL."""
    with running(appliance_stack.config.config_dir / "prometheus" / "scaigrid.yml",
                 tmp_path_factory.mktemp("prometheus")) as url:
        yield url


def status_rows(stack: ApplianceStack) -> list[dict[str, Any]]:
    return list(json.loads(stack.cli("status", "--json").stdout)["programs"])


# scaigrid_requests_total has a series once a request names a model: the key fixture makes one through nginx first.
def test_prometheus_scrapes_every_process_through_nginx(appliance_stack: ApplianceStack, prometheus: str, key: str):
    rows = status_rows(appliance_stack)
    programs = [row["name"] for row in rows]
    scraped = {row["name"]: row["program"] for row in rows if row["name"] != "nginx"}  # nginx is the way in

    def all_scraped() -> bool:
        targets = api(prometheus, "targets")["activeTargets"]
        return (len(targets) == len(scraped) and all(target["health"] == "up" for target in targets)
                and bool(query(prometheus, "scaigrid_requests_total"))
                and len(query(prometheus, RUNNING_BY_PROGRAM)) == len(programs))

    try:
        eventually(all_scraped, "every target scraped", SCRAPED_TIMEOUT_S)
    except AssertionError:
        print(json.dumps(api(prometheus, "targets")["activeTargets"], indent=1))  # each target's lastError
        raise

    targets = api(prometheus, "targets")["activeTargets"]
    # One job per program, one target per process, labelled with it.
    assert {target["labels"]["process"]: target["labels"]["job"] for target in targets} == {
        name: f"scaigrid_{program}" for name, program in scraped.items()}
    assert {target["scrapeUrl"] for target in targets} == {
        f"https://localhost:{appliance_stack.config.https_port}/metrics/{name}" for name in scraped}
    assert set(query(prometheus, "up").values()) == {1.0}
    requests = query(prometheus, "scaigrid_requests_total")
    assert any(f"model={MODEL}" in series and "status=ok" in series for series in requests), requests
    assert query(prometheus, RUNNING_BY_PROGRAM) == {f"program={name}": 1.0 for name in programs}


def own_counts(stack: ApplianceStack) -> dict[str, float]:
    """Each http process's scaigrid_requests_total (all series), read from its own /metrics: what it counted."""
    counts = {}
    for row in status_rows(stack):
        if row["program"] == "http":
            status, body = stack.get(f"/metrics/{row['name']}")
            assert status == 200, body
            counts[row["name"]] = sum(sample.value for family in text_string_to_metric_families(body.decode())
                                      for sample in family.samples if sample.name == "scaigrid_requests_total")
    return counts


def prometheus_total(prometheus: str) -> float:
    return sum(query(prometheus, "sum(scaigrid_requests_total)").values())


def send(stack: ApplianceStack, key: str, count: int) -> None:
    """`count` chat completions through nginx, each on its own connection, so nginx spreads them over the processes."""
    assert [chat(stack, key) for _ in range(count)] == [200] * count


# Two rounds of requests (30 and 20: within the key's default 60 per minute), each waited for in Prometheus, and a
# process's restart in between.
@pytest.mark.timeout(240)
def test_the_sum_over_http_processes_counts_every_request_exactly_and_a_restart_never_makes_it_go_back(
        appliance_stack: ApplianceStack, prometheus: str, key: str):
    before = own_counts(appliance_stack)
    assert len(before) >= 2  # the test stacks run two http processes
    eventually(lambda: prometheus_total(prometheus) == sum(before.values()), "Prometheus caught up", SCRAPED_TIMEOUT_S,
               context=lambda: repr(query(prometheus, "scaigrid_requests_total")))
    started_at = api(prometheus, "query", query="time()")["result"][0]

    send(appliance_stack, key, 30)

    after = own_counts(appliance_stack)
    assert sum(after.values()) - sum(before.values()) == 30
    assert all(after[name] > before[name] for name in before), (before, after)  # every process served some
    eventually(lambda: prometheus_total(prometheus) == sum(before.values()) + 30, "the 30 requests in Prometheus",
               SCRAPED_TIMEOUT_S, context=lambda: repr(query(prometheus, "scaigrid_requests_total")))

    # kill -9 one process: supervisord starts it again, and its counters start again from zero.
    killed = next(row for row in status_rows(appliance_stack) if row["name"] == "http_1")
    os.kill(killed["pid"], signal.SIGKILL)
    eventually(lambda: all(row["state"] == "RUNNING" and row["ready"] is not False
                           for row in status_rows(appliance_stack)) and
               next(row["pid"] for row in status_rows(appliance_stack) if row["name"] == "http_1") != killed["pid"],
               "http_1 started again and ready", SCRAPED_TIMEOUT_S)
    send(appliance_stack, key, 20)

    restarted = own_counts(appliance_stack)
    assert restarted["http_1"] > 0  # the new process served some: its counter went down from after["http_1"] to this
    # What every process counts now: the killed one's count is gone with it, nothing else.
    assert sum(restarted.values()) == sum(after.values()) - after["http_1"] + 20
    eventually(lambda: prometheus_total(prometheus) == sum(restarted.values()), "the 20 requests in Prometheus",
               SCRAPED_TIMEOUT_S, context=lambda: repr(query(prometheus, "scaigrid_requests_total")))
    # Prometheus saw the restarted process's counter reset, and rate() over the whole run never goes negative.
    resets = query(prometheus, 'sum(resets(scaigrid_requests_total{process="http_1"}[10m]))')
    assert len(resets) == 1 and min(resets.values()) >= 1, resets
    ended_at = api(prometheus, "query", query="time()")["result"][0]
    for promql in ("sum(rate(scaigrid_requests_total[5s]))", "sum(increase(scaigrid_requests_total[10s]))"):
        series = api(prometheus, "query_range", query=promql, start=str(started_at), end=str(ended_at), step="1")
        values = [float(value) for result in series["result"] for _, value in result["values"]]
        assert values and min(values) >= 0, (promql, values)
