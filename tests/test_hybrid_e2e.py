"""The hybrid link end to end: a node appliance enrolled to a managed side of two replicas, with the openai SDK as
the client: link state everywhere, config push, upstream and tunnelled streams, link loss, usage exactly once under
faults, credential rotation, and unenrolment (last: the module's stacks are shared)."""

import json
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from appliance import config as appliance_config
from appliance import devstack
from appliance.local import child_env
from scaigrid.settings import read_env_file
from tests.appliance_stack import ApplianceStack
from tests.hybrid_stacks import (
    STREAM_TEXT,
    Hybrid,
    Tenant,
    api,
    client,
    data,
    detailed_health,
    frozen,
    hybrid_stacks,
    kill_program,
    link_eventually,
    link_state,
    restarted,
    stream_text,
)

APPLIANCE_CLI = Path(sys.prefix) / "bin" / "scaigrid-appliance"
# The module's three stacks start (25-60 s, by the machine's load) inside the first test's time.
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory: pytest.TempPathFactory, mariadb: devstack.MariaDB,
           s3_server: devstack.S3Server) -> Iterator[Hybrid]:
    with hybrid_stacks(tmp_path_factory.mktemp("hybrid"), mariadb, s3_server) as stacks:
        yield stacks


@pytest.fixture(scope="module")
def acme(hybrid: Hybrid) -> Tenant:
    """A managed tenant allowed on the node, once its key works there."""
    tenant = hybrid.managed_tenant("acme")
    hybrid.allow_tenants(tenant.id)
    link_eventually(lambda: api(hybrid.node, "GET", "/oai/v1/models", tenant.key)[0] == 200, "acme's key on the node")
    return tenant


@pytest.fixture(autouse=True)
def fresh_backends(request: pytest.FixtureRequest) -> None:
    """Each test sees only its own requests on the FakeBackends (tests without the stacks do not start them)."""
    if "hybrid" in request.fixturenames:
        hybrid = request.getfixturevalue("hybrid")
        hybrid.managed_fake.received.clear()
        hybrid.node_fake.received.clear()


def metric(stack: ApplianceStack, name: str) -> float:
    """One sample of the link program's /metrics, scraped through nginx as Prometheus does."""
    status, body = stack.get("/metrics/link")
    assert status == 200, body
    match = re.search(rf"^{name} (\S+)$", body.decode(), re.MULTILINE)
    assert match, f"{name} not in /metrics/link"
    return float(match[1])


def status_json(stack: ApplianceStack) -> tuple[int, dict[str, Any]]:
    result = stack.cli("status", "--json")
    return result.returncode, json.loads(result.stdout)


def test_an_enrolled_node_runs_its_link_and_every_view_shows_it_connected(hybrid: Hybrid):
    node, config = hybrid.node, hybrid.node.config
    state = link_state(node)
    assert state["connected"] is True and state["node_id"] == hybrid.node_id
    assert state["target"] == f"127.0.0.1:{hybrid.a.config.grpc_tls_port}"  # through A's nginx, over TLS

    text = node.cli("status")
    assert text.returncode == 0, text.stdout + text.stderr
    [line] = [line for line in text.stdout.splitlines() if line.startswith("link: ")]
    assert line.startswith(f"link: connected to 127.0.0.1:{hybrid.a.config.grpc_tls_port}; last heartbeat")
    code, as_json = status_json(node)
    assert code == 0 and as_json["link"]["connected"] is True
    assert "link" in [row["name"] for row in as_json["programs"]]

    assert metric(node, "scaigrid_link_connected") == 1
    nodes = data(hybrid.b, "GET", "/v1/hybrid/nodes", hybrid.b.admin_key)["items"]
    [listed] = [item for item in nodes if item["id"] == hybrid.node_id]
    assert listed["link"]["connected"] is True and listed["link"]["config_version"] >= 1

    # What enrolment rendered: the node's settings from link.json, a CA the service user can read, the program.
    env = read_env_file(config.scaigrid_env_file)
    assert env["HYBRID_ROLE"] == "node" and env["HYBRID_NODE_ID"] == hybrid.node_id
    assert env["HYBRID_MANAGED_URL"] == hybrid.a.url
    assert env["HYBRID_CA_FILE"] == str(config.link_ca_file)
    assert config.link_ca_file.read_bytes() == hybrid.a.config.tls_cert.read_bytes()
    assert stat.S_IMODE(config.link_ca_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(config.scaigrid_env_file.stat().st_mode) == 0o600
    assert "[program:link]" in config.supervisord_conf.read_text()
    assert "job_name: scaigrid_link" in (config.config_dir / "prometheus" / "scaigrid.yml").read_text()
    # The managed replicas do not run a link of their own.
    assert "link" not in [info.name for info in hybrid.a.supervisor.processes()]


def test_the_link_settings_belong_to_link_enroll_and_a_managed_side_never_enrols(tmp_path: Path):
    path = tmp_path / "appliance.env"
    path.write_text(f"APPLIANCE_CONFIG_DIR={tmp_path / 'etc'}\nHYBRID_NODE_ID=hn_x\nHYBRID_ROLE=node\n")
    _, problems = appliance_config.examine(path)
    assert problems == [
        "HYBRID_NODE_ID: set from CONFIG_DIR/secrets/link.json, which `scaigrid-appliance link enroll` writes; "
        "remove it and use `link enroll`",
        "HYBRID_ROLE: set from CONFIG_DIR/secrets/link.json, which `scaigrid-appliance link enroll` writes; "
        "remove it and use `link enroll`"]

    # A managed side does not enrol, nor does an enrolled node become one.
    path.write_text(f"APPLIANCE_CONFIG_DIR={tmp_path / 'etc'}\nHYBRID_ROLE=managed\n")
    refused = subprocess.run([str(APPLIANCE_CLI), "link", "enroll", "--config", str(path), "--url",
                              "https://grid.example.com", "--token", "sget_x"], env=child_env(), capture_output=True,
                             text=True, timeout=60, check=False)
    assert refused.returncode == 1
    assert "this appliance is a managed side (HYBRID_ROLE=managed in" in refused.stderr
    link_file = tmp_path / "etc" / "secrets" / "link.json"
    link_file.parent.mkdir(parents=True)
    link_file.write_text("{}")
    assert appliance_config.examine(path)[1] == [
        "HYBRID_ROLE: managed, but this appliance is enrolled as a node (CONFIG_DIR/secrets/link.json); remove the "
        "key (for a managed side: `link unenroll` first, then set it)"]


def test_a_tenant_allowed_on_the_node_reaches_it_with_its_managed_key_and_leaves_with_it(hybrid: Hybrid,
                                                                                        acme: Tenant):
    beta_id, beta_key = hybrid.managed_tenant("beta")
    status, answer = api(hybrid.node, "GET", "/oai/v1/models", beta_key)
    assert status == 401, answer  # not (yet) the node's business
    version = link_state(hybrid.node)["config_version"]

    hybrid.allow_tenants(acme.id, beta_id)
    link_eventually(lambda: api(hybrid.node, "GET", "/oai/v1/models", beta_key)[0] == 200, "beta's key on the node")
    with client(hybrid.node, beta_key) as sdk:
        models = {model.id for model in sdk.models.list()}
    assert {"site/chat", "cloud/chat"} <= models  # its own model, and the managed one through the snapshot
    assert link_eventually(lambda: link_state(hybrid.node)["config_version"] > version, "the applied version reported")
    assert data(hybrid.a, "GET", f"/v1/hybrid/nodes/{hybrid.node_id}/tenants", hybrid.a.admin_key)["tenant_ids"] \
        == sorted([acme.id, beta_id])

    hybrid.allow_tenants(acme.id)
    link_eventually(lambda: api(hybrid.node, "GET", "/oai/v1/models", beta_key)[0] == 401, "beta's key gone again")
    assert api(hybrid.node, "GET", "/oai/v1/models", acme.key)[0] == 200


def test_a_managed_model_asked_of_the_node_streams_intact_from_the_managed_backend(hybrid: Hybrid, acme: Tenant):
    assert stream_text(hybrid.node, acme.key, "cloud/chat") == STREAM_TEXT
    [seen] = hybrid.managed_fake.received
    assert seen.authorization is None and seen.body["stream"] is True  # the managed side's own backend call
    assert not hybrid.node_fake.received


def tunnel_route(hybrid: Hybrid, slug: str, node_model: str) -> None:
    """The managed admin routes a managed model to a model of the node, through a backend of provider hybrid."""
    backend_id = slug.replace("/", "-")
    data(hybrid.a, "POST", "/v1/backends", hybrid.a.admin_key, {
        "id": backend_id, "provider": "hybrid", "model": f"{hybrid.node_id}/{node_model}"}, expect=201)
    data(hybrid.a, "POST", "/v1/models", hybrid.a.admin_key, {
        "slug": slug, "modality": "chat", "routes": [{"backend": backend_id}]}, expect=201)


def test_a_tunnelled_stream_asked_of_the_other_replica_comes_from_the_node_and_a_cancel_reaches_it(
        hybrid: Hybrid, acme: Tenant):
    # The managed side's view (from either replica): A holds the link, so B must relay through A.
    [held] = [link for link in detailed_health(hybrid.b)["link"]["links"] if link["node_id"] == hybrid.node_id]
    assert held["replica"] == f"127.0.0.1:{hybrid.a.appliance.settings().server.grpc_port}"
    data(hybrid.node, "POST", "/v1/backends", hybrid.node.admin_key, {
        "id": "site-gated", "provider": "custom", "base_url": hybrid.node_fake.url, "model": "gated-3"}, expect=201)
    data(hybrid.node, "POST", "/v1/models", hybrid.node.admin_key, {
        "slug": "site/gated", "modality": "chat", "routes": [{"backend": "site-gated"}]}, expect=201)
    tunnel_route(hybrid, "onprem/chat", "site/chat")
    tunnel_route(hybrid, "onprem/gated", "site/gated")

    assert link_eventually(lambda: stream_text(hybrid.b, acme.key, "onprem/chat"), "the tunnel serving") == STREAM_TEXT
    seen = hybrid.node_fake.requests_for("paced-5-20")
    assert seen and seen[-1].authorization is None  # the node's own backend, called by the node's pipeline
    assert not hybrid.managed_fake.received

    with client(hybrid.b, acme.key) as sdk:
        stream = sdk.chat.completions.create(model="onprem/gated", messages=[{"role": "user", "content": "hi"}],
                                             stream=True)
        first = next(iter(stream))
        assert first.model == "onprem/gated"
        [held] = hybrid.node_fake.requests_for("gated-3")
        stream.close()  # the client goes away mid-stream
    assert held.gone.wait(20), "the node's backend never saw the client go"


def served_by(stack: ApplianceStack, process: str) -> float:
    """How many requests one http process of the stack has answered, from its own /metrics."""
    status, body = stack.get(f"/metrics/{process}")
    assert status == 200, body
    return sum(float(value) for value in re.findall(r"^scaigrid_requests_total\{.*\} (\S+)$", body.decode(),
                                                     re.MULTILINE))


def test_tunnels_reach_every_http_process_of_the_node_and_pass_over_a_stopped_one(hybrid: Hybrid, acme: Tenant):
    tunnel_route(hybrid, "onprem/spread", "site/chat")
    link_eventually(lambda: stream_text(hybrid.a, acme.key, "onprem/spread"), "the tunnel serving")
    before = {process: served_by(hybrid.node, process) for process in ("http_1", "http_2")}
    for _ in range(4):
        assert stream_text(hybrid.a, acme.key, "onprem/spread") == STREAM_TEXT
    assert all(served_by(hybrid.node, process) > before[process] for process in before), "one process got none"

    assert hybrid.node.cli("stop", "http_1").returncode == 0
    try:
        for _ in range(4):  # each in turn would have gone to http_1 every other time
            assert stream_text(hybrid.a, acme.key, "onprem/spread") == STREAM_TEXT
    finally:
        assert hybrid.node.cli("start", "http_1").returncode == 0


def test_the_node_rides_out_a_crash_an_outage_and_a_silence_of_the_managed_side(hybrid: Hybrid, acme: Tenant):
    reconnects = metric(hybrid.node, "scaigrid_link_reconnects_total")
    pid = kill_program(hybrid.a, "grpc")
    link_eventually(lambda: restarted(hybrid.a, "grpc", pid), "supervisord restarting A's grpc")
    link_eventually(lambda: metric(hybrid.node, "scaigrid_link_reconnects_total") > reconnects, "the link noticing")
    hybrid.wait_linked("the link back after the crash")

    hybrid.a.supervisor.stop("grpc")
    try:
        link_eventually(lambda: link_state(hybrid.node)["connected"] is False, "the link down")
        # Local service goes on: ready, the local model served to a managed key from the last-known-good config.
        assert hybrid.node.get("/health/ready")[0] == 200
        assert stream_text(hybrid.node, acme.key, "site/chat") == STREAM_TEXT
        code, as_json = status_json(hybrid.node)
        assert code == 0 and as_json["link"]["connected"] is False
        assert metric(hybrid.node, "scaigrid_link_connected") == 0
    finally:
        hybrid.a.supervisor.start("grpc")
    hybrid.wait_linked("the link back after the outage")

    with frozen(hybrid.a, "nginx"):  # the link's packets vanish: only the silence of heartbeats tells
        link_eventually(lambda: link_state(hybrid.node)["connected"] is False, "the silent link dropped")
        assert stream_text(hybrid.node, acme.key, "site/chat") == STREAM_TEXT
    hybrid.wait_linked("the link back after the silence")


def usage(hybrid: Hybrid, side: str, ids: list[str]) -> list[tuple[str, int, int, str]]:
    """(request id, tokens in, tokens out, cost) of those requests in one side's usage_records, every row."""
    sql = hybrid.node_sql if side == "node" else hybrid.managed_sql
    rows = sql("SELECT request_id, tokens_in, tokens_out, cost FROM usage_records WHERE model = 'site/chat'")
    return sorted((row["request_id"], row["tokens_in"], row["tokens_out"], str(row["cost"])) for row in rows
                  if row["request_id"] in ids)


def test_usage_on_the_node_reaches_the_managed_side_exactly_once_despite_kills_and_an_outage(
        hybrid: Hybrid, acme: Tenant):
    ids: list[str] = []

    def serve(count: int) -> None:
        with client(hybrid.node, acme.key) as sdk:
            for _ in range(count):
                raw = sdk.chat.completions.with_raw_response.create(
                    model="site/chat", messages=[{"role": "user", "content": "hi"}])
                raw.parse()
                ids.append(raw.headers["x-request-id"])

    serve(4)
    link_pid = kill_program(hybrid.node, "link")
    serve(4)
    worker_pid = kill_program(hybrid.node, "worker_1")
    hybrid.a.supervisor.stop("grpc")
    try:
        serve(4)
        link_eventually(lambda: restarted(hybrid.node, "link", link_pid)
                        and restarted(hybrid.node, "worker_1", worker_pid),
                        "supervisord restarting the node's link and worker")
        # The node's own books are complete while the managed side is away: usage waits in the outbox.
        link_eventually(lambda: len(usage(hybrid, "node", ids)) == len(ids), "the node's usage flushed")
        assert link_eventually(lambda: link_state(hybrid.node)["outbox_depth"], "usage waiting in the outbox") > 0
    finally:
        hybrid.a.supervisor.start("grpc")
    hybrid.wait_linked()
    link_eventually(lambda: link_state(hybrid.node)["outbox_depth"] == 0, "the outbox drained")

    on_node = usage(hybrid, "node", ids)
    assert len(on_node) == len(ids) == len(set(ids)) == 12
    assert usage(hybrid, "managed", ids) == on_node  # every record, once, with the node's numbers
    listed = data(hybrid.a, "GET", "/v1/accounting/usage?model=site%2Fchat&limit=1000", hybrid.a.admin_key)["items"]
    assert sorted(item["request_id"] for item in listed if item["request_id"] in ids) == sorted(ids)


def test_rotating_the_credential_while_linked_relinks_with_the_new_one_and_retires_the_old(hybrid: Hybrid):
    config = hybrid.node.config
    old = json.loads(config.link_file.read_text())["credential"]

    result = hybrid.node.cli("link", "rotate")

    assert result.returncode == 0, result.stdout + result.stderr
    new = json.loads(config.link_file.read_text())["credential"]
    assert new != old and new not in result.stdout + result.stderr
    assert read_env_file(config.scaigrid_env_file)["HYBRID_NODE_CREDENTIAL"] == new
    hybrid.wait_linked("the link with the new credential")
    assert metric(hybrid.node, "scaigrid_link_connected") == 1
    status, answer = api(hybrid.a, "GET", "/v1/hybrid/link", old)
    assert (status, answer["error"]["code"]) == (401, "NODE_CREDENTIAL_INVALID")
    assert api(hybrid.a, "GET", "/v1/hybrid/link", new)[0] == 200


def test_unenrolling_takes_the_managed_mirror_away_with_the_link(hybrid: Hybrid, acme: Tenant):
    """Last in the module: the node leaves the managed side for good."""
    assert api(hybrid.node, "GET", "/oai/v1/models", acme.key)[0] == 200

    result = hybrid.node.cli("link", "unenroll")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "forgot the managed mirror (config snapshot" in result.stdout
    link_eventually(lambda: api(hybrid.node, "GET", "/oai/v1/models", acme.key)[0] == 401, "acme's key refused")
    _, as_json = status_json(hybrid.node)
    assert as_json["link"] is None and "link" not in [row["name"] for row in as_json["programs"]]
