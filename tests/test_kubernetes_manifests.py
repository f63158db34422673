"""The Kubernetes manifests (deploy/kubernetes): rendered by kustomize, valid against Kubernetes' schemas offline, and
holding what operators rely on (probes, grace above the drain, streaming ingress, wiring, no secret values)."""

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

from scaigrid.settings import entries, setting_parsers

REPO = Path(__file__).resolve().parents[1]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("small", "production")
# The kubectl of this machine, and the newest Kubernetes whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.32", kubernetes_validate.utils.latest_version())
# The modes' Deployments, by component label, and the setting giving each its drain grace.
DRAIN_GRACE = {"http": "HTTP_DRAIN_GRACE_S", "grpc": "GRPC_STOP_GRACE_S", "worker": "WORKER_STOP_GRACE_S",
               "bunker-proxy": "HTTP_DRAIN_GRACE_S"}
MODE_PORTS = {"http": {"http": "HTTP_PORT"}, "grpc": {"grpc": "GRPC_PORT", "metrics": "GRPC_METRICS_PORT"},
              "worker": {"metrics": "WORKER_METRICS_PORT"}, "bunker-proxy": {"http": "BUNKER_PROXY_PORT"}}
# The first step of README.md's install and upgrade procedure: everything but the modes' objects.
MIGRATE_STEP_SELECTOR = "app.kubernetes.io/component notin (http,grpc,worker,bunker-proxy)"
INGRESS = "nginx.ingress.kubernetes.io/"
# What this component uses of prometheus-operator's ServiceMonitor (monitoring.coreos.com/v1), whose CRD schema
# kubernetes-validate does not ship: any other field, or a misspelt one, fails here as strict validation would.
SERVICE_MONITOR_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["selector", "endpoints"],
            "properties": {
                "selector": {"type": "object", "additionalProperties": False,
                             "properties": {"matchLabels": {"type": "object",
                                                            "additionalProperties": {"type": "string"}}}},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False, "required": ["port"],
                    "properties": {"port": {"type": "string"}, "path": {"type": "string", "pattern": "^/"},
                                   # prometheus-operator's Duration pattern
                                   "interval": {"type": "string",
                                                "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?"
                                                           "(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}}}},
            }},
    }}
SECRET_SETTINGS = {entry.env for entry in entries() if entry.secret}


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIRECTORY`: the objects an apply would send."""
    result = subprocess.run(["kubectl", "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(KUBERNETES / "overlays" / request.param)


@pytest.fixture(scope="module")
def with_service_monitor(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The production overlay with the optional component, composed as README.md tells operators to."""
    directory = tmp_path_factory.mktemp("servicemonitor")
    # kustomize takes other kustomizations by relative path only.
    overlay = os.path.relpath(KUBERNETES / "overlays" / "production", directory)
    component = os.path.relpath(KUBERNETES / "components" / "servicemonitor", directory)
    (directory / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{overlay}]\ncomponents: [{component}]\n")
    return kustomize(directory)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def component(obj: dict[str, Any]) -> str | None:
    return obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")


def deployments(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Deployments by component label (http, grpc, worker, bunker-proxy)."""
    return {str(component(d)): d for d in of_kind(objects, "Deployment")}


def config(objects: list[dict[str, Any]]) -> dict[str, str]:
    (config_map,) = of_kind(objects, "ConfigMap")
    return dict(config_map["data"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A matchLabels / matchExpressions (In) selector against a label set, as the manifests use them."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        assert expression["operator"] == "In", expression  # the only operator these manifests use
        if labels.get(expression["key"]) not in expression["values"]:
            return False
    return True


def containers(objects: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(pod spec, container) of every Deployment and Job."""
    for workload in of_kind(objects, "Deployment") + of_kind(objects, "Job"):
        spec = workload["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            yield spec, container


def schema_errors(objects: list[dict[str, Any]], version: str) -> list[str]:
    errors = []
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}")
    return errors


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_is_valid_kubernetes(rendered: list[dict[str, Any]], version: str) -> None:
    kinds = {o["kind"] for o in rendered}
    assert kinds == {"ConfigMap", "Deployment", "Job", "Service", "Ingress", "PodDisruptionBudget",
                     "HorizontalPodAutoscaler", "NetworkPolicy", "ServiceAccount"}
    assert set(deployments(rendered)) == set(DRAIN_GRACE)
    assert schema_errors(rendered, version) == []


def test_a_misspelt_field_fails_validation(rendered: list[dict[str, Any]]) -> None:
    """Strict validation refuses what Kubernetes would drop silently (the check above is not vacuous)."""
    deployment = dict(deployments(rendered)["http"])
    deployment["spec"] = {**deployment["spec"], "terminationGracePeriod": 45}
    assert schema_errors([deployment], KUBERNETES_VERSIONS[-1]) != []


def test_service_monitor_scrapes_every_mode(with_service_monitor: list[dict[str, Any]]) -> None:
    objects = with_service_monitor
    custom = [o for o in objects if o["apiVersion"].startswith("monitoring.coreos.com/")]
    assert schema_errors([o for o in objects if o not in custom], KUBERNETES_VERSIONS[-1]) == []
    (monitor,) = custom
    jsonschema.validate(monitor, SERVICE_MONITOR_SCHEMA)
    endpoint_ports = {endpoint["port"] for endpoint in monitor["spec"]["endpoints"]}
    services = [s for s in of_kind(objects, "Service") if selects(monitor["spec"]["selector"], s["metadata"]["labels"])]
    scraped = set()
    for name, deployment in deployments(objects).items():
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        for service in services:
            if selects({"matchLabels": service["spec"]["selector"]}, pod_labels):
                scraped |= {name for port in service["spec"]["ports"] if port["name"] in endpoint_ports}
    assert scraped == set(DRAIN_GRACE)
    # Prometheus gets through the default deny to exactly those ports.
    (policy,) = [p for p in of_kind(objects, "NetworkPolicy") if p["metadata"]["name"] == "scaigrid-from-prometheus"]
    assert {port["port"] for rule in policy["spec"]["ingress"] for port in rule["ports"]} == endpoint_ports


def test_probes_ports_and_grace_follow_the_settings(rendered: list[dict[str, Any]]) -> None:
    settings = config(rendered)
    for name, deployment in deployments(rendered).items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert {"livenessProbe", "readinessProbe"} <= set(container), name
        ports = {port["name"]: port["containerPort"] for port in container["ports"]}
        assert ports == {port: int(settings[key]) for port, key in MODE_PORTS[name].items()}, name
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            handler = container.get(probe, {})
            port = (handler.get("httpGet") or handler.get("grpc") or {}).get("port")
            assert port is None or port in ports or port in ports.values(), (name, probe, port)
        # Kubernetes counts the grace from the preStop hook: SIGKILL must come after the process's own drain.
        pre_stop_s = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        drain_s = float(settings[DRAIN_GRACE[name]])
        assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + drain_s + 5, name
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        assert env["SCAIGRID_MODE"] == name.replace("-", "_")


def test_the_config_map_holds_valid_settings_and_no_secret(rendered: list[dict[str, Any]]) -> None:
    parsers = setting_parsers()
    settings = config(rendered)
    assert settings["BIND_HOST"] == "0.0.0.0"  # else the kubelet's probes and the Services cannot reach a pod
    for key, value in settings.items():
        assert key in parsers, f"{key}: not a setting"
        parsers[key](value)  # raises ValueError naming what is expected
    assert not SECRET_SETTINGS & set(settings)
    # http reads the storage Secret optionally and needs all of S3 or none: its endpoint goes with its keys.
    assert not {key for key in settings if key.startswith("S3_") and key != "S3_BUCKET"}


def test_no_secret_value_in_the_manifests(rendered: list[dict[str, Any]]) -> None:
    assert of_kind(rendered, "Secret") == []
    for _, container in containers(rendered):
        for env in container.get("env", []):
            assert env["name"] not in SECRET_SETTINGS or "value" not in env, env["name"]
        assert {source["secretRef"]["name"] for source in container["envFrom"] if "secretRef" in source}


def test_ingress_streams_outlast_the_gateway(rendered: list[dict[str, Any]]) -> None:
    stream_timeout_s = int(config(rendered)["DISPATCH_STREAM_TIMEOUT_S"])
    ingresses = {i["metadata"]["name"]: i for i in of_kind(rendered, "Ingress")}
    for name in ("scaigrid", "scaigrid-storage", "scaigrid-openai"):
        annotations = ingresses[name]["metadata"]["annotations"]
        assert annotations[INGRESS + "proxy-buffering"] == "off", name
        assert int(annotations[INGRESS + "proxy-read-timeout"]) > stream_timeout_s, name
        assert int(annotations[INGRESS + "proxy-send-timeout"]) > stream_timeout_s, name
        # Audio transcriptions take 25 MiB and a form's fields; nginx's 1m default would refuse them.
        assert int(annotations[INGRESS + "proxy-body-size"].removesuffix("m")) >= 26, name
    # OPENAI_HOSTNAME: /v1/<path> on that host is the node's /oai/v1/<path>.
    openai = ingresses["scaigrid-openai"]
    (path,) = openai["spec"]["rules"][0]["http"]["paths"]
    rewrite = openai["metadata"]["annotations"][INGRESS + "rewrite-target"]
    # ingress-nginx puts the path in a regex location (^/v1/(.*)) and fills $1 of the target from its group.
    match = re.match(path["path"], "/v1/chat/completions")
    assert match is not None
    assert re.sub(r"\$(\d)", lambda group: match[int(group[1])], rewrite) == "/oai/v1/chat/completions"


def test_objects_refer_to_each_other(rendered: list[dict[str, Any]]) -> None:
    """Services, PodDisruptionBudgets, HorizontalPodAutoscalers and Ingresses reach the pods they are meant for."""
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in deployments(rendered).items()}
    services = {s["metadata"]["name"]: s for s in of_kind(rendered, "Service")}
    for service in services.values():
        (target,) = [n for n, labels in pods.items() if selects({"matchLabels": service["spec"]["selector"]}, labels)]
        (container,) = deployments(rendered)[target]["spec"]["template"]["spec"]["containers"]
        container_ports = {port["name"] for port in container["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports, service["metadata"]["name"]
    for budget in of_kind(rendered, "PodDisruptionBudget"):
        assert [n for n, labels in pods.items() if selects(budget["spec"]["selector"], labels)] == [component(budget)]
    for autoscaler in of_kind(rendered, "HorizontalPodAutoscaler"):
        target = next(d for d in of_kind(rendered, "Deployment")
                      if d["metadata"]["name"] == autoscaler["spec"]["scaleTargetRef"]["name"])
        # A replica count in the Deployment would reset the autoscaler's on every apply.
        assert "replicas" not in target["spec"], target["metadata"]["name"]
        assert 1 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    for ingress in of_kind(rendered, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                backend = path["backend"]["service"]
                assert backend["port"]["name"] in {p["name"] for p in services[backend["name"]]["spec"]["ports"]}
    # The default deny covers every pod of the node, the migrate Job's too.
    (deny,) = [p for p in of_kind(rendered, "NetworkPolicy") if p["metadata"]["name"] == "scaigrid-default-deny"]
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in deny["spec"]
    (job,) = of_kind(rendered, "Job")
    for labels in [*pods.values(), job["spec"]["template"]["metadata"]["labels"]]:
        assert selects(deny["spec"]["podSelector"], labels)


def test_pods_run_unprivileged(rendered: list[dict[str, Any]]) -> None:
    for pod, container in containers(rendered):
        assert pod["automountServiceAccountToken"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, container["name"]
        assert security["allowPrivilegeEscalation"] is False, container["name"]
        assert security["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]


def test_migrate_applies_alone_first(rendered: list[dict[str, Any]]) -> None:
    """README.md's procedure: its first step applies the Job and what the Job needs, and none of the Deployments."""
    (job,) = of_kind(rendered, "Job")
    assert job["metadata"]["name"] == "scaigrid-migrate"
    readme = (KUBERNETES / "README.md").read_text()
    assert f"kubectl -n scaigrid delete job {job['metadata']['name']} --ignore-not-found" in readme
    assert f"-l '{MIGRATE_STEP_SELECTOR}'" in readme
    modes = re.fullmatch(r"app\.kubernetes\.io/component notin \((.*)\)", MIGRATE_STEP_SELECTOR)
    assert modes is not None
    first = {(o["kind"], o["metadata"]["name"]) for o in rendered if component(o) not in modes[1].split(",")}
    pod = job["spec"]["template"]["spec"]
    config_map = pod["containers"][0]["envFrom"][0]["configMapRef"]["name"]
    assert {("Job", job["metadata"]["name"]), ("ConfigMap", config_map), ("ServiceAccount", pod["serviceAccountName"]),
            ("NetworkPolicy", "scaigrid-database-redis")} <= first
    assert "Deployment" not in {kind for kind, _ in first}
    # One image for every mode and migrate: what migrate brought the schema to is what the pods run.
    assert len({container["image"] for _, container in containers(rendered)}) == 1
