"""The container image: every SCAIGRID_MODE runs from it against real services, healthy by its HEALTHCHECK, as a
non-root user, and `podman stop` drains (dumb-init passes SIGTERM on); no secrets, no build tools, a reported size."""

import json
import secrets
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from scaigrid.worker import heartbeat
from tests.support import containers
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(1200)

# The image (with the base, when missing) takes minutes to build the first time; every test here shares it.
MAX_IMAGE_BYTES = 450_000_000
STOP_TIMEOUT_S = 45


@pytest.fixture(scope="module")
def image() -> str:
    tag = containers.build_image()
    print(f"\nimage {tag}: {containers.image_size_bytes(tag) / 1e6:.0f} MB")
    return tag


@pytest.fixture
def run_container(image: str, tmp_path: Path) -> Iterator[Callable[..., str]]:
    """Starts the image detached on the host's network (its settings name loopback services and ports: nothing
    leaves 127.0.0.1), with settings through a 0600 env file; removes every container it started."""
    started: list[str] = []

    def start(mode: str, env: dict[str, str]) -> str:
        name = f"scaigrid-test-{mode.replace('_', '-')}-{secrets.token_hex(4)}"
        env_file = tmp_path / f"{name}.env"
        env_file.touch(mode=0o600)
        # The image binds 0.0.0.0 (other containers must reach it); on the host's network that means loopback.
        env_file.write_text("".join(f"{k}={v}\n" for k, v in {**env, "SCAIGRID_MODE": mode,
                                                              "BIND_HOST": "127.0.0.1"}.items()))
        containers.podman("run", "--detach", "--name", name, "--network", "host", "--env-file", env_file, image)
        started.append(name)
        return name

    yield start
    for name in started:
        subprocess.run(["podman", "rm", "--force", "--time", "0", name], capture_output=True, check=False)


def logs(name: str) -> str:
    result = subprocess.run(["podman", "logs", name], capture_output=True, text=True, check=False)
    return result.stdout + result.stderr


def state(name: str) -> dict[str, object]:
    return dict(json.loads(containers.podman("inspect", "--format", "{{json .State}}", name)))


def exited(name: str) -> dict[str, object] | None:
    current = state(name)
    return current if current["Status"] == "exited" else None


def wait_healthy(name: str, timeout_s: float = 90) -> None:
    eventually(lambda: containers.health(name), f"{name} healthy by its HEALTHCHECK", timeout_s=timeout_s,
               interval_s=1, context=lambda: logs(name)[-3000:])


def test_image_is_small_non_root_and_holds_no_secrets_or_build_tools(image: str) -> None:
    (inspected,) = json.loads(containers.podman("image", "inspect", image))
    config = inspected["Config"]
    assert config["User"] == "10001:10001"
    assert inspected["Healthcheck"]["Test"] == ["CMD-SHELL", "scaigrid-healthcheck"]
    assert config["Entrypoint"][0].endswith("dumb-init")
    assert "BIND_HOST=0.0.0.0" in config["Env"]
    secret_words = ("SECRET", "PASSWORD", "KEY", "TOKEN", "CREDENTIAL")
    assert not [e for e in config["Env"] if any(w in e.split("=")[0] for w in secret_words)]
    size_bytes = containers.image_size_bytes(image)
    assert size_bytes < MAX_IMAGE_BYTES, f"image is {size_bytes / 1e6:.0f} MB"
    # What the final stage must not carry: compilers, pip (and its cache), the wheels, the host's CA bundle or pip.conf.
    probe = ("id -u; for p in gcc cc pip pip3; do command -v $p; done; ls /wheels /root/.cache/pip "
             "/etc/pip.conf /etc/ssl/certs/host-ca.crt 2>/dev/null; /opt/scaigrid/bin/python -m pip --version "
             "2>/dev/null; scaigrid --help >/dev/null && echo cli-ok")
    found = containers.podman("run", "--rm", "--entrypoint", "sh", image, "-c", probe).split()
    assert found == ["10001", "cli-ok"], found


@pytest.mark.timeout(600)
def test_every_mode_runs_healthy_and_stops_by_draining(
        run_container: Callable[..., str], env: dict[str, str], redis_url: str) -> None:
    migrate = run_container("migrate", env)
    done = eventually(lambda: exited(migrate), "migrate exits", timeout_s=180, interval_s=0.5,
                      context=lambda: logs(migrate)[-3000:])
    assert done["ExitCode"] == 0, logs(migrate)[-3000:]

    names = {mode: run_container(mode, env) for mode in ("http", "grpc", "worker", "bunker_proxy")}
    for name in names.values():
        wait_healthy(name)
    for mode, name in names.items():
        user = containers.podman("exec", name, "id", "-u").strip()
        assert user == "10001", f"{mode} runs as uid {user}"
        # PID 1 is dumb-init; scaigrid is its child, which is what gets SIGTERM passed on.
        assert containers.podman("exec", name, "cat", "/proc/1/comm").strip() == "dumb-init"

    with urllib.request.urlopen(f"http://127.0.0.1:{env['HTTP_PORT']}/health/ready", timeout=5) as response:
        assert response.status == 200

    # The healthcheck says no when what it checks is away: the worker's heartbeat gone from Redis.
    containers.podman("stop", "--time", str(STOP_TIMEOUT_S), names["worker"])
    client = redis.Redis.from_url(redis_url)
    try:
        for key in client.scan_iter(heartbeat.KEY_PREFIX + "*"):
            client.delete(key)
    finally:
        client.close()
    assert not containers.health(names["worker"])

    # podman stop sends SIGTERM to PID 1; the process drains and exits 0 well before the SIGKILL timeout.
    for mode in ("http", "grpc", "bunker_proxy"):
        started_s = time.monotonic()
        containers.podman("stop", "--time", str(STOP_TIMEOUT_S), names[mode])
        stop_s = time.monotonic() - started_s
        final = state(names[mode])
        assert final["ExitCode"] == 0, f"{mode} exit {final['ExitCode']}: {logs(names[mode])[-2000:]}"
        assert stop_s < STOP_TIMEOUT_S - 5, f"{mode} took {stop_s:.1f} s to stop"
    assert "drained" in logs(names["http"]), logs(names["http"])[-2000:]
