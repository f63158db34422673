"""`podman kube play` of the rendered Kubernetes manifests: migrate's pod, then a pod of each mode's Deployment, against
MariaDB, Redis and S3 on loopback; a chat goes through the http pod and the worker moves its usage to MariaDB.

Podman 4.3 honours Deployments, ConfigMaps, env from secrets made with `podman secret create`, securityContext and
emptyDir; it ignores Services, readiness probes and preStop hooks and rejects Jobs, so migrate's Job runs here as the
Pod its template describes, the probes are asked by the tests, and tests/test_kubernetes_manifests.py covers the rest
by schema and by assertion. The manifests are adapted only as podman and loopback need: host networking (MariaDB,
Redis and S3 listen on the host's loopback, not on a cluster network), so the listeners on 127.0.0.1 and free ports
(the ConfigMap's settings) instead of port mappings, which podman refuses on the host's network; names and the bucket
unique per run; a one-second usage flush, so the worker's is seen at once; the image under test.
"""

import base64
import json
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import yaml
from cryptography.fernet import Fernet
from grpc_health.v1 import health_pb2, health_pb2_grpc

from appliance import devstack
from tests.backends import FakeBackend, backend, catalogue_toml, chat_model, http_call
from tests.support import containers
from tests.support.env import s3_client
from tests.support.http import http_ok
from tests.support.waiting import eventually
from tests.test_kubernetes_manifests import KUBERNETES, deployments, kustomize, of_kind

MODEL = "kube/echo"
MODES = ("http", "grpc", "worker", "bunker-proxy")
# A short flush, so the worker's move of usage from Redis to MariaDB is seen within the test.
USAGE_FLUSH_INTERVAL_S = 1
PORT_SETTINGS = ("HTTP_PORT", "GRPC_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT", "BUNKER_PROXY_PORT")


def podman(*args: str, input_text: str | None = None, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], input=input_text, capture_output=True, text=True, timeout=timeout_s,
                          check=False)


def podman_secret(values: dict[str, str]) -> str:
    """A Secret as the operator makes it (kubectl create secret), as podman reads one: JSON of base64 values. The
    values go on stdin, never on a command line or disk."""
    name = "scaigrid-" + secrets.token_hex(4)
    encoded = json.dumps({key: base64.b64encode(value.encode()).decode() for key, value in values.items()})
    created = podman("secret", "create", name, "-", input_text=encoded)
    assert created.returncode == 0, created.stderr
    return name


def for_podman(objects: list[dict[str, Any]], run_id: str, image: str, secret_names: dict[str, str],
               settings: dict[str, str]) -> list[dict[str, Any]]:
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
                    if "secretRef" in source:
                        source["secretRef"]["name"] = secret_names[source["secretRef"]["name"]]
                # On the host's network podman refuses port mappings: the process listens on the host itself, on
                # BIND_HOST and the port settings of the ConfigMap.
                container.pop("ports", None)
        adapted.append(obj)
    return adapted


def as_pod(job: dict[str, Any]) -> dict[str, Any]:
    """The Pod a Job's template describes (podman rejects Jobs)."""
    template = job["spec"]["template"]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": job["metadata"]["name"], **template["metadata"]},
            "spec": template["spec"]}


def play(objects: list[dict[str, Any]], path: Path) -> None:
    path.write_text(yaml.safe_dump_all(objects))
    played = podman("kube", "play", str(path), timeout_s=300)
    assert played.returncode == 0, played.stdout + played.stderr


def logs(container: str) -> str:
    result = podman("logs", "--tail", "12", container)
    return result.stdout + result.stderr


@dataclass
class PlayedNode:
    """The pods podman made from the manifests, and how the tests reach them on loopback."""

    settings: dict[str, str]
    containers: dict[str, str]  # mode -> podman's container name
    worker_probe: list[str]
    admin_key: str
    fake: FakeBackend

    def url(self, port_setting: str) -> str:
        return f"http://127.0.0.1:{self.settings[port_setting]}"


@pytest.fixture(scope="module")
def played(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB, redis_server: devstack.Redis,
           s3_server: devstack.S3Server) -> Iterator[PlayedNode]:
    image = containers.build_image()
    directory = tmp_path_factory.mktemp("kube")
    run_id = secrets.token_hex(3)
    database = "kube_" + run_id
    bucket = "kube-" + run_id
    s3_client(s3_server).make_bucket(bucket)
    node_secret = podman_secret({
        "DATABASE_URL": mariadb.create_database(database, database, secrets.token_hex(12)),
        "REDIS_URL": redis_server.url,
        "JWT_SIGNING_SECRET": secrets.token_hex(32), "SCAIGRID_ENCRYPTION_KEY": Fernet.generate_key().decode()})
    storage_secret = podman_secret({
        "S3_ENDPOINT_URL": s3_server.endpoint_url, "S3_ACCESS_KEY_ID": s3_server.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3_server.secret_access_key, "STORAGE_CAPABILITY_SECRET": secrets.token_hex(32)})
    settings = {"BIND_HOST": "127.0.0.1", "S3_BUCKET": bucket, "USAGE_FLUSH_INTERVAL_S": str(USAGE_FLUSH_INTERVAL_S),
                **dict(zip(PORT_SETTINGS, map(str, devstack.free_ports(len(PORT_SETTINGS))), strict=True))}
    rendered = kustomize(KUBERNETES / "overlays" / "small")
    (config_map,) = of_kind(rendered, "ConfigMap")
    (migrate_job,) = of_kind(rendered, "Job")
    modes = deployments(rendered)
    config_map, migrate_job, *adapted = for_podman(
        [config_map, migrate_job, *(modes[mode] for mode in MODES)], run_id, image,
        {"scaigrid": node_secret, "scaigrid-storage": storage_secret}, settings)
    fake = FakeBackend().start()
    try:
        # migrate first, as the Job: its pod runs to completion before any mode's pod starts.
        migrate_file = directory / "migrate.yaml"
        play([config_map, as_pod(migrate_job)], migrate_file)
        try:
            migrate = f"{migrate_job['metadata']['name']}-migrate"
            eventually(lambda: podman("inspect", "--format", "{{.State.Status}}", migrate).stdout.strip() == "exited",
                       "migrate's pod has run", timeout_s=180, interval_s=0.5, context=lambda: logs(migrate))
            exit_code = podman("inspect", "--format", "{{.State.ExitCode}}", migrate).stdout.strip()
            assert exit_code == "0", logs(migrate)
        finally:
            podman("kube", "down", str(migrate_file))

        app_file = directory / "app.yaml"
        play([config_map, *adapted], app_file)
        try:
            # Podman names a Deployment's first pod <name>-pod-0, and its containers <pod>-<container>.
            names = {mode: f"{d['metadata']['name']}-pod-0-{d['spec']['template']['spec']['containers'][0]['name']}"
                     for mode, d in zip(MODES, adapted, strict=True)}
            http_url = f"http://127.0.0.1:{settings['HTTP_PORT']}"
            # What the readiness probe asks (podman does not): the database, Redis and the modules answer.
            eventually(lambda: http_ok(http_url + "/health/ready"), "the http pod is ready", timeout_s=120,
                       interval_s=0.5, ignoring=(OSError,), context=lambda: logs(names["http"]))
            # The operator's first steps, as deploy/kubernetes/README.md gives them (kubectl exec there).
            created = podman("exec", names["http"], "scaigrid", "admin", "create-key", "--role", "super_admin")
            assert created.returncode == 0, created.stderr
            catalogue = catalogue_toml([backend("fake", fake, "echo-upstream")], [chat_model(MODEL, [("fake", 1, 1)])])
            applied = podman("exec", "-i", names["http"], "scaigrid", "admin", "apply", "/dev/stdin",
                             input_text=catalogue)
            assert applied.returncode == 0, applied.stdout + applied.stderr
            worker_container = modes["worker"]["spec"]["template"]["spec"]["containers"][0]
            yield PlayedNode(settings, names, worker_container["livenessProbe"]["exec"]["command"],
                             created.stdout.strip(), fake)
        finally:
            podman("kube", "down", str(app_file), timeout_s=180)
    finally:
        fake.stop()
        podman("secret", "rm", node_secret, storage_secret)
        mariadb.drop_database(database)


@pytest.mark.timeout(1200)
def test_a_chat_goes_through_the_http_pod_and_its_usage_through_the_worker(played: PlayedNode) -> None:
    url = played.url("HTTP_PORT")
    client = openai.OpenAI(base_url=url + "/oai/v1", api_key=played.admin_key, max_retries=0, timeout=30)
    try:
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello pod"}])
    finally:
        client.close()
    assert answer.choices[0].message.content
    assert [r.body["model"] for r in played.fake.received] == ["echo-upstream"]

    def usage_models() -> list[str]:
        status, _, body = http_call("GET", url + "/v1/accounting/usage", played.admin_key)
        assert status == 200, body
        return [record["model"] for record in json.loads(body)["data"]["items"]]

    # The worker pod moved the chat's usage from Redis to MariaDB.
    eventually(lambda: usage_models() == [MODEL], "the chat's usage reaches MariaDB", timeout_s=60, interval_s=0.5,
               context=lambda: logs(played.containers["worker"]))


@pytest.mark.timeout(120)
def test_the_worker_probe_passes_on_its_own_heartbeat_only(played: PlayedNode) -> None:
    """The exec probe (which podman would run only through systemd) as the kubelet runs it, in the worker's pod; in
    another pod, whose hostname no worker heartbeat carries, the same command fails."""
    eventually(lambda: podman("exec", played.containers["worker"], *played.worker_probe).returncode == 0,
               "the worker's probe passes", timeout_s=60, interval_s=1,
               context=lambda: logs(played.containers["worker"]))
    assert podman("exec", played.containers["http"], *played.worker_probe).returncode != 0


@pytest.mark.timeout(120)
def test_the_grpc_pod_answers_its_probes(played: PlayedNode) -> None:
    def status() -> int:
        with grpc.insecure_channel(f"127.0.0.1:{played.settings['GRPC_PORT']}") as channel:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2).status

    # Readiness: the standard gRPC health of the whole server, SERVING once the database and Redis answered.
    eventually(lambda: status() == health_pb2.HealthCheckResponse.SERVING, "the grpc pod is SERVING", timeout_s=60,
               interval_s=0.5, ignoring=(grpc.RpcError,), context=lambda: logs(played.containers["grpc"]))
    # Liveness: its metrics listener.
    assert http_ok(played.url("GRPC_METRICS_PORT") + "/metrics")


@pytest.mark.timeout(120)
def test_the_bunker_proxy_pod_is_ready_on_s3_alone(played: PlayedNode) -> None:
    """bunker_proxy gets the storage Secret only (no database or Redis credential) and is ready on S3."""
    url = played.url("BUNKER_PROXY_PORT")
    eventually(lambda: http_ok(url + "/health/ready"), "the bunker_proxy pod is ready", timeout_s=60, interval_s=0.5,
               ignoring=(OSError,), context=lambda: logs(played.containers["bunker-proxy"]))
    assert http_ok(url + "/health")
    # Names only: the values are secrets, never printed.
    environment = podman("exec", played.containers["bunker-proxy"], "env").stdout.splitlines()
    names = {line.split("=", 1)[0] for line in environment}
    assert "S3_SECRET_ACCESS_KEY" in names
    assert not {"DATABASE_URL", "REDIS_URL", "SCAIGRID_ENCRYPTION_KEY"} & names
