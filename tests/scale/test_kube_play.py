"""`podman kube play` of the rendered Kubernetes manifests: migrate's pod, then the http and worker pods, against
MariaDB and Redis on loopback; a chat goes through the http pod and the worker moves its usage to MariaDB.

Podman 4.3 honours Deployments, ConfigMaps, env from secrets made with `podman secret create`, securityContext and
emptyDir; it ignores Services, readiness probes and preStop hooks and rejects Jobs, so migrate's Job runs here as the
Pod its template describes, and tests/test_kubernetes_manifests.py covers the rest by schema and by assertion. The
manifests are adapted only as podman and loopback need: host networking (MariaDB and Redis listen on the host's
loopback, not on a cluster network), so the listeners on 127.0.0.1 and free ports (the ConfigMap's settings) instead of
port mappings, which podman refuses on the host's network; names made unique per run; the image under test.
"""

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from cryptography.fernet import Fernet

from appliance import devstack
from tests.backends import FakeBackend, backend, catalogue_toml, chat_model, http_call
from tests.support import containers
from tests.support.http import http_ok
from tests.support.waiting import eventually
from tests.test_kubernetes_manifests import KUBERNETES, deployments, kustomize, of_kind

MODEL = "kube/echo"
# A short flush, so the worker's move of usage from Redis to MariaDB is seen within the test.
USAGE_FLUSH_INTERVAL_S = 1


def podman(*args: str, input_text: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], input=input_text, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def for_podman(objects: list[dict[str, Any]], run_id: str, image: str, secret: str, settings: dict[str, str]
               ) -> list[dict[str, Any]]:
    """The rendered objects as podman on this host runs them: see the module's docstring for each change."""
    adapted = []
    for obj in objects:
        obj = json.loads(json.dumps(obj))  # a deep copy: the rendering stays as kustomize made it
        obj["metadata"]["name"] += "-" + run_id
        if obj["kind"] == "ConfigMap":
            obj["data"].update(settings)
        else:
            pod = obj["spec"]["template"]["spec"]
            pod["hostNetwork"] = True
            for container in pod["containers"]:
                container["image"] = image
                for source in container["envFrom"]:
                    if "configMapRef" in source:
                        source["configMapRef"]["name"] += "-" + run_id
                    if source.get("secretRef", {}).get("name") == "scaigrid":
                        source["secretRef"]["name"] = secret
                # On the host's network podman refuses port mappings: the process listens on the host itself, on
                # BIND_HOST and the port settings of the ConfigMap.
                container.pop("ports", None)
        adapted.append(obj)
    return adapted


def as_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The Pod a Job's template describes (podman rejects Jobs)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": job["metadata"]["name"],
                                                           **job["spec"]["template"]["metadata"]},
            "spec": job["spec"]["template"]["spec"]}


def container_name(pod: str, container: str) -> str:
    """Podman's name for a container of a pod it made from a Deployment (replica 0) or a Pod."""
    return f"{pod}-{container}"


@pytest.fixture
def node_secret(database_url: str, redis_url: str) -> Iterator[str]:
    """The Secret `scaigrid` as the operator makes it, as a podman secret: JSON of base64 values, fed on stdin."""
    name = "scaigrid-" + secrets.token_hex(4)
    values = {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "JWT_SIGNING_SECRET": secrets.token_hex(32),
              "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode()}
    encoded = json.dumps({key: base64.b64encode(value.encode()).decode() for key, value in values.items()})
    created = podman("secret", "create", name, "-", input_text=encoded)
    assert created.returncode == 0, created.stderr
    yield name
    podman("secret", "rm", name)


@pytest.fixture
def fake() -> Iterator[FakeBackend]:
    server = FakeBackend().start()
    yield server
    server.stop()


def play(objects: list[dict[str, Any]], path: Path) -> None:
    path.write_text(yaml.safe_dump_all(objects))
    played = podman("kube", "play", str(path), timeout_s=300)
    assert played.returncode == 0, played.stdout + played.stderr


def down(path: Path) -> None:
    podman("kube", "down", str(path), timeout_s=120)


def logs(container: str) -> str:
    result = podman("logs", "--tail", "12", container)
    return result.stdout + result.stderr


@pytest.mark.timeout(1200)
def test_http_and_worker_pods_serve_a_chat(tmp_path: Path, node_secret: str, fake: FakeBackend) -> None:
    image = containers.build_image()
    rendered = kustomize(KUBERNETES / "overlays" / "small")
    run_id = secrets.token_hex(3)
    http_port, worker_metrics_port = devstack.free_ports(2)
    settings = {"BIND_HOST": "127.0.0.1", "HTTP_PORT": str(http_port), "WORKER_METRICS_PORT": str(worker_metrics_port),
                "USAGE_FLUSH_INTERVAL_S": str(USAGE_FLUSH_INTERVAL_S)}
    (config_map,) = of_kind(rendered, "ConfigMap")
    (migrate_job,) = of_kind(rendered, "Job")
    modes = deployments(rendered)
    config_map, migrate_job, http, worker = for_podman([config_map, migrate_job, modes["http"], modes["worker"]],
                                                       run_id, image, node_secret, settings)

    # migrate first, as the Job: its pod runs to completion before anything else starts.
    migrate_file = tmp_path / "migrate.yaml"
    play([config_map, as_pod(migrate_job)], migrate_file)
    try:
        migrate = container_name(migrate_job["metadata"]["name"], "migrate")
        eventually(lambda: podman("inspect", "--format", "{{.State.Status}}", migrate).stdout.strip() == "exited",
                   "migrate's pod has run", timeout_s=180, interval_s=0.5, context=lambda: logs(migrate))
        exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", migrate).stdout.strip()
        assert exit_code == "0", logs(migrate)
    finally:
        down(migrate_file)

    app_file = tmp_path / "app.yaml"
    play([config_map, http, worker], app_file)
    try:
        http_container = container_name(http["metadata"]["name"] + "-pod-0", "http")
        worker_container = container_name(worker["metadata"]["name"] + "-pod-0", "worker")
        url = f"http://127.0.0.1:{http_port}"
        # What the readiness probe asks (podman does not): the database, Redis and the modules answer.
        eventually(lambda: http_ok(url + "/health/ready"), "the http pod is ready", timeout_s=120, interval_s=0.5,
                   ignoring=(OSError,), context=lambda: logs(http_container))

        # The operator's first steps, as deploy/kubernetes/README.md gives them (kubectl exec there).
        created = podman("exec", http_container, "scaigrid", "admin", "create-key", "--role", "super_admin")
        assert created.returncode == 0, created.stderr
        admin_key = created.stdout.strip()
        catalogue = catalogue_toml([backend("fake", fake, "echo-upstream")], [chat_model(MODEL, [("fake", 1, 1)])])
        applied = podman("exec", "-i", http_container, "scaigrid", "admin", "apply", "/dev/stdin", input_text=catalogue)
        assert applied.returncode == 0, applied.stdout + applied.stderr

        client = openai.OpenAI(base_url=url + "/oai/v1", api_key=admin_key, max_retries=0, timeout=30)
        try:
            answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello pod"}])
        finally:
            client.close()
        assert answer.choices[0].message.content
        assert [r.body["model"] for r in fake.received] == ["echo-upstream"]

        # The worker pod's probe command (an exec probe: podman would run it only through systemd) passes in its own
        # pod, and not in the http pod, whose hostname no worker heartbeat carries.
        (probe,) = {json.dumps(worker["spec"]["template"]["spec"]["containers"][0][kind]["exec"]["command"])
                    for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
        command = json.loads(probe)
        eventually(lambda: podman("exec", worker_container, *command).returncode == 0,
                   "the worker's probe passes", timeout_s=60, interval_s=1, context=lambda: logs(worker_container))
        assert podman("exec", http_container, *command).returncode != 0

        # The worker moved the chat's usage from Redis to MariaDB: the API lists it.
        def usage_models() -> list[str]:
            status, _, body = http_call("GET", url + "/v1/accounting/usage", admin_key)
            assert status == 200, body
            return [record["model"] for record in json.loads(body)["data"]["items"]]

        eventually(lambda: usage_models() == [MODEL], "the chat's usage reaches MariaDB", timeout_s=60,
                   interval_s=0.5, context=lambda: logs(worker_container))
    finally:
        down(app_file)
