"""deploy/compose, checked in seconds (make test): the file as docker-compose reads it, and its nginx as nginx does."""

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaigrid.settings import load_settings

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "deploy" / "compose"
SCAIGRID_SERVICES = ("migrate", "http", "grpc", "worker", "bunker_proxy")


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """compose.yaml with .env.example's values, as `docker-compose config` resolves it."""
    env_file = tmp_path_factory.mktemp("compose") / ".env"
    env_file.write_text((COMPOSE_DIR / ".env.example").read_text() + f"ENV_FILE={env_file}\n")
    result = subprocess.run(["docker-compose", "--env-file", str(env_file), "--file", str(COMPOSE_DIR / "compose.yaml"),
                             "config"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout))


def test_every_service_has_a_healthcheck_and_scaigrid_waits_for_migrate(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"mariadb", "redis", "s3", "nginx", *SCAIGRID_SERVICES}
    for name, service in services.items():
        assert service["healthcheck"]["test"][0] == "CMD-SHELL", name
    for name in ("http", "grpc", "worker"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert services[name]["environment"]["SCAIGRID_MODE"] == name
    assert services["migrate"]["restart"] == "no"
    assert services["http"]["scale"] == 2


def test_only_loopback_is_published_by_default(compose: dict[str, Any]) -> None:
    published = {name: service["ports"] for name, service in compose["services"].items() if "ports" in service}
    assert set(published) == {"nginx", "grpc"}
    for ports in published.values():
        # docker-compose 1.29 prints short syntax: ADDRESS:PUBLISHED:TARGET.
        assert all(str(port).startswith("127.0.0.1:") for port in ports), ports


def test_a_stopped_replica_has_time_to_drain(compose: dict[str, Any]) -> None:
    drain_grace_s = load_settings({}, env_file=None).server.http_drain_grace_s
    for name in SCAIGRID_SERVICES[1:]:
        grace = compose["services"][name]["stop_grace_period"]
        assert grace.endswith("s") and float(grace[:-1]) > drain_grace_s, (name, grace)


def test_nginx_config_is_valid_and_outwaits_the_longest_stream(tmp_path: Path) -> None:
    template = (COMPOSE_DIR / "nginx.conf.in").read_text()
    rendered = (template.replace("@RESOLVER@", "127.0.0.1").replace("@SUFFIX@", ".dns.podman")
                .replace("@OPENAI_HOSTNAME@", "api.example.test").replace("@SERVER_NAME@", "_")
                .replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;"))
    directives = [line for line in rendered.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in directives if "@" in line]
    config = tmp_path / "nginx.conf"
    config.write_text(rendered)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    result = subprocess.run([nginx, "-t", "-q", "-c", str(config), "-e", str(tmp_path / "error.log")],
                            capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    stream_timeout_s = load_settings({}, env_file=None).dispatch.stream_timeout_s
    timeouts_s = [int(line.split()[1].rstrip("s;")) for line in rendered.splitlines()
                  if line.strip().startswith("proxy_read_timeout")]
    assert timeouts_s and min(timeouts_s) > stream_timeout_s
    assert rendered.count("proxy_buffering off;") >= 4
