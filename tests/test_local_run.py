"""`make run` (appliance.local): the whole appliance on private services over HTTPS, loopback only; the banner's
commands and the README's first call work as printed; var/local.env is kept across restarts; Ctrl-C stops all."""

import json
import os
import re
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import devstack, local
from scaigrid.settings import read_env_file
from tests.appliance_stack import free_listener_ports
from tests.support.processes import REPO
from tests.support.waiting import eventually

README = (REPO / "README.md").read_text()


def readme_block(section: str, language: str) -> str:
    """The first fenced `language` block of the README section titled `section`."""
    text = README.split(f"### {section}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(rf"```{language}\n(.*?)```", text, re.S)
    assert match, f"no {language} block in README.md's {section!r}"
    return match[1]


def make_run_env(**values: str) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), **values}


@contextmanager
def make_run(tmp_path: Path, env: dict[str, str], name: str) -> Iterator[str]:
    """`make run` (python -m appliance.local) until ready; yields its output so far; Ctrl-C at the end, exit 0."""
    output = tmp_path / f"{name}.out"
    with output.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "appliance.local", "--var", str(tmp_path / "var")],
                               cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        def ready() -> bool:
            assert run.poll() is None, output.read_text()
            return "Ctrl-C stops everything" in output.read_text()

        eventually(ready, "make run ready", 100, interval_s=0.2, context=output.read_text)
        yield output.read_text()
        run.send_signal(signal.SIGINT)
        assert run.wait(90) == 0, output.read_text()
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    text = output.read_text()
    assert "supervisord exited with 0" in text, text
    assert "MariaDB, Redis, S3 and the demo model stopped" in text


def banner_command(text: str, label: str) -> list[str]:
    """The command in backquotes on the banner line starting with `label`."""
    match = re.search(rf"^  {label}\s+`([^`]+)`", text, re.M)
    assert match, text
    return shlex.split(match[1])


def api(url: str, key: str, var: Path, method: str = "GET") -> tuple[int, dict[str, object]]:
    context = ssl.create_default_context(cafile=str(var / "etc" / "tls" / "server.crt"))
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)


def listed(url: str, key: str, var: Path) -> set[str]:
    status, body = api(f"{url}/oai/v1/models", key, var)
    assert status == 200, body
    return {item["id"] for item in body["data"]}  # type: ignore[attr-defined]


def models_requests(url: str, process: str, var: Path) -> float:
    """How many /v1/models requests one http process answered, from its own /metrics (through nginx)."""
    context = ssl.create_default_context(cafile=str(var / "etc" / "tls" / "server.crt"))
    with urllib.request.urlopen(f"{url}/metrics/{process}", timeout=10, context=context) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == "scaigrid_http_requests_total" and "models" in sample.labels["route"])


# Two starts of the whole appliance, each up to a minute or so: beyond the default test timeout.
@pytest.mark.timeout(400)
def test_make_run_works_as_printed_and_keeps_local_env_across_restarts(tmp_path):
    # The first start runs two http processes (HTTP_PROCESSES=2 make run), the second one per CPU (the default).
    ports = free_listener_ports(max(2, len(os.sched_getaffinity(0))), 1)
    base = devstack.free_port_block(len(local.SERVICES))
    var = tmp_path / "var"
    var.mkdir()
    # The operator's kept settings: this stack is a managed side (docs/hybrid.md), on ports of its own.
    (var / "local.env").write_text("HYBRID_ROLE=managed\n" + "".join(f"{k}={v}\n" for k, v in ports.items()))
    env = make_run_env(SERVICES_BASE_PORT=str(base))
    url = f"https://127.0.0.1:{ports['HTTPS_PORT']}"
    with make_run(tmp_path, {**env, "HTTP_PROCESSES": "2"}, "first") as text:
        assert url in text
        admin_key = (var / "etc" / "secrets" / "admin-key").read_text().strip()
        assert admin_key in text  # printed for the developer, as the issue asks of make run
        # The README's first call, verbatim but for this run's port and key, answers as the README says.
        example = readme_block("Using the node from an OpenAI SDK", "python")
        example = example.replace("8443", ports["HTTPS_PORT"]).replace("sgk_...", admin_key)
        answer = subprocess.run([sys.executable, "-c", example], cwd=tmp_path, capture_output=True, text=True,
                                timeout=60, env=env)
        assert (answer.returncode, answer.stdout) == (0, "hello from the node\n"), answer.stderr
        # The banner's commands run as printed.
        status = subprocess.run(banner_command(text, "programs"), capture_output=True, text=True, timeout=60,
                                env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        assert [line.split()[:2] for line in status.stdout.splitlines() if line.startswith("http_")] == [
            ["http_1", "RUNNING"], ["http_2", "RUNNING"]]
        # Both serve: nginx spreads requests, each on its own connection, over the two.
        for _ in range(10):
            assert api(f"{url}/v1/models", admin_key, var)[0] == 200
        assert all(models_requests(url, name, var) > 0 for name in ("http_1", "http_2"))
        check = subprocess.run([*banner_command(text, "scaigrid CLI")[:-2], "check-config", "--mode", "http"],
                               capture_output=True, text=True, timeout=60, env=env)
        assert check.returncode == 0, check.stderr
        assert oct((var / "etc" / "scaigrid.env").stat().st_mode & 0o777) == "0o600"
        # Loopback only: nginx takes 127.0.0.1, so another address of this machine is refused.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.2", int(ports["HTTPS_PORT"]))) != 0
        # The private services are on the ports SERVICES_BASE_PORT names, in the documented order.
        written = read_env_file(var / "appliance.env")
        assert written["DATABASE_PORT"] == str(base) and written["REDIS_URL"] == f"redis://127.0.0.1:{base + 1}/0"
        assert written["S3_ENDPOINT_URL"] == f"http://127.0.0.1:{base + 2}"
        # The README's commands remove the demo model.
        removal = readme_block("Using the node from an OpenAI SDK", "sh").replace("8443", ports["HTTPS_PORT"])
        removed = subprocess.run(["bash", "-c", removal], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert removed.returncode == 0 and json.loads(removed.stdout)["status"] == "ok", removed.stdout
        assert "demo/echo" not in listed(url, admin_key, var)
        assert (var / "local.env").read_text().startswith("HYBRID_ROLE=managed\n")

    # Started again with nothing in the environment but the base port: the kept settings still hold.
    with make_run(tmp_path, env, "second"):
        status_code, body = api(f"{url}/v1/hybrid/nodes", admin_key, var)
        assert status_code == 200, body  # still the managed side: enrolled nodes keep working
        assert "demo/echo" not in listed(url, admin_key, var)  # removed stays removed
    assert (var / "local.env").read_text().startswith("HYBRID_ROLE=managed\n")
    supervisord_log = (var / "log" / "supervisord.log").read_text()
    for name in ("http_1", "http_2", "grpc", "worker_1", "bunker_proxy"):
        assert f"stopped: {name} (exit status 0)" in supervisord_log, supervisord_log


def test_a_key_make_run_sets_itself_in_local_env_is_refused_by_name(tmp_path):
    var = tmp_path / "var"
    var.mkdir()
    (var / "local.env").write_text("DATABASE_PORT=3306\nNO_SUCH_KEY=1\n")
    result = subprocess.run([sys.executable, "-m", "appliance.local", "--var", str(var)], cwd=REPO,
                            capture_output=True, text=True, timeout=60, env=make_run_env())
    assert result.returncode == 2, result.stdout
    assert "DATABASE_PORT: set by make run or the appliance" in result.stdout
    assert "NO_SUCH_KEY: unknown key" in result.stdout
    assert not (var / "mariadb").exists()  # refused before anything started
