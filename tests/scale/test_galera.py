"""ScaiGrid on a three-node MariaDB Galera cluster: migrate, the cluster-wide migrate lock, conflicting writes through
two nodes, and a node killed under load behind HAProxy (issue 18, point 4; docs/operations.md, "Galera").

One cluster serves the module; the test that kills a node runs last.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import CreateTable

from appliance import devstack
from appliance.database import sql_str
from appliance.files import write_private_file
from scaigrid.db import migrations
from scaigrid.db.tables import migrate_lock
from scaigrid.modules import load_modules
from scaigrid.settings import load_settings
from tests.identity import call
from tests.support.env import create_key, node_env
from tests.support.galera import GaleraCluster, galera_cluster
from tests.support.http import http_get
from tests.support.processes import REPO, ModeProcess, command_env, scaigrid, start_http
from tests.support.waiting import eventually

pytestmark = pytest.mark.timeout(600)

HAPROXY_CFG = REPO / "deploy" / "galera" / "haproxy.cfg"
CLUSTERCHECK = REPO / "deploy" / "galera" / "clustercheck.sh"
CLIENT_TIMEOUT_S = 120


@pytest.fixture(scope="module")
def cluster() -> Iterator[GaleraCluster]:
    with galera_cluster(3) as started:
        yield started


@dataclass
class GaleraDatabase:
    name: str
    urls: list[str]  # the same database through node 1, 2, 3


@pytest.fixture
def database(cluster: GaleraCluster) -> GaleraDatabase:
    name = "g_" + secrets.token_hex(6)
    return GaleraDatabase(name, cluster.create_database(name, name, secrets.token_hex(12)))


@pytest.fixture
def env_at(redis_url: str, s3_server: devstack.S3Server, s3_bucket: str) -> Callable[[str], dict[str, str]]:
    """A node's settings with DATABASE_URL at the given Galera node; the same secrets for every process."""
    shared = node_env("unset", redis_url, s3_server, s3_bucket)

    def at(database_url: str) -> dict[str, str]:
        return {**node_env(database_url, redis_url, s3_server, s3_bucket), **{
            name: shared[name] for name in ("JWT_SIGNING_SECRET", "SCAIGRID_ENCRYPTION_KEY", "SERVICE_TOKEN_SECRET")},
            # One admin key sends all the load here; the rate limits are not what these tests measure.
            **dict.fromkeys(("RATE_LIMIT_KEY_RPM", "RATE_LIMIT_USER_RPM", "RATE_LIMIT_TENANT_RPM",
                             "RATE_LIMIT_PARTNER_RPM"), "1000000")}

    return at


def expected_heads(env: dict[str, str]) -> dict[str, str]:
    modules = load_modules(load_settings(env, env_file=None).modules)
    return {stream.version_table: stream.heads()[0] for stream in migrations.streams(modules)}


def versions(cluster: GaleraCluster, database: str, tables: list[str]) -> list[dict[str, str]]:
    """Each node's version of each stream."""
    return [{table: node.query(f"SELECT version_num FROM `{database}`.`{table}`") for table in tables}
            for node in cluster.nodes]


def count(cluster: GaleraCluster, sql: str) -> list[int]:
    """The count on each node."""
    return [int(node.query(sql)) for node in cluster.nodes]


def test_migrate_through_one_node_reaches_every_node(cluster, database, env_at):
    env = env_at(database.urls[0])
    result = scaigrid("migrate", env=env, timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    heads = expected_heads(env)
    assert len(heads) >= 2  # core and at least one module stream (scaibunker)
    assert versions(cluster, database.name, list(heads)) == [heads] * 3
    assert count(cluster, f"SELECT COUNT(*) FROM `{database.name}`.tenants") == [1, 1, 1]
    assert count(cluster, f"SELECT COUNT(*) FROM `{database.name}`.scaigrid_migrate_lock") == [0, 0, 0]  # released


def test_two_migrate_runs_on_two_nodes_take_turns(cluster, database, env_at):
    """The node-local GET_LOCK lets both runs through; the lock row makes them take turns."""
    first = cluster.nodes[0]
    lock_ddl = str(CreateTable(migrate_lock).compile(dialect=mysql.dialect()))
    # A live run elsewhere holds the lock: its row, on no server of ours, expiring in an hour.
    first.execute(f"USE `{database.name}`", lock_ddl,
                  "INSERT INTO scaigrid_migrate_lock VALUES ('migrate', 'elsewhere:1:run', 'db9:3306', "
                  "UTC_TIMESTAMP() + INTERVAL 1 HOUR)")
    refused = scaigrid("migrate", env={**env_at(database.urls[1]), "MIGRATE_LOCK_TIMEOUT_S": "1"})
    assert refused.returncode == 1
    assert "held the lock for more than 1 s (elsewhere:1:run on db9:3306)" in refused.stdout, refused.stdout

    runs = [subprocess.Popen([sys.executable, "-m", "scaigrid", "migrate"], env=command_env(env_at(url)), cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for url in database.urls[1:]]
    try:
        lock = sql_str(f"scaigrid_migrate.{database.name}")
        # Each run holds its own node's GET_LOCK: the old lock alone would have let both migrate now.
        eventually(lambda: all(node.query(f"SELECT IS_USED_LOCK({lock}) IS NOT NULL") == "1"
                               for node in cluster.nodes[1:]), "both runs past their node's GET_LOCK", 60)
        assert [run.poll() for run in runs] == [None, None]
        assert count(cluster, "SELECT COUNT(*) FROM information_schema.TABLES "
                              f"WHERE TABLE_SCHEMA = {sql_str(database.name)} AND TABLE_NAME = 'partners'") == [0] * 3
        # The holder finishes; the two waiting runs, on two nodes, race for the row.
        first.execute(f"DELETE FROM `{database.name}`.scaigrid_migrate_lock")
        outputs = [run.communicate(timeout=300)[0] for run in runs]
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.communicate()
    assert [run.returncode for run in runs] == [0, 0], outputs
    core_head = migrations.CORE.heads()[0]
    assert sum(f"base -> {core_head}" in output for output in outputs) == 1, outputs  # one applied, one found it done
    assert count(cluster, f"SELECT COUNT(*) FROM `{database.name}`.tenants") == [1, 1, 1]

    # A run that died on another node left its row behind: taken over once it has expired.
    first.execute(f"INSERT INTO `{database.name}`.scaigrid_migrate_lock VALUES ('migrate', 'dead:1:run', "
                  "'db9:3306', UTC_TIMESTAMP() - INTERVAL 1 SECOND)")
    taken_over = scaigrid("migrate", env={**env_at(database.urls[2]), "MIGRATE_LOCK_TIMEOUT_S": "10"})
    assert taken_over.returncode == 0, taken_over.stdout
    assert count(cluster, f"SELECT COUNT(*) FROM `{database.name}`.scaigrid_migrate_lock") == [0, 0, 0]


@dataclass
class Outcome:
    started_s: float
    ended_s: float
    status: int  # 0: no answer (connection failed or timed out)
    what: str


def timed(base_url: str, method: str, path: str, token: str, body: object = None) -> Outcome:
    """One request, with a client's patience (the OpenAI SDK waits 10 minutes): a slow answer is not a failure."""
    started_s = time.monotonic()
    request = urllib.request.Request(base_url + path, method=method, headers={"Authorization": f"Bearer {token}"})
    if body is not None:
        request.data = json.dumps(body).encode()
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=CLIENT_TIMEOUT_S) as response:
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except (OSError, urllib.error.URLError) as exc:
        status, method = 0, f"{method} ({type(exc).__name__}: {exc})"
    return Outcome(started_s, time.monotonic(), status, f"{method} {path}")


def metric(base_url: str, name: str) -> float:
    status, _, body = http_get(base_url + "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines() if line.startswith(name + " "))


def two_http_processes(start_mode, env_at, urls: list[str]) -> tuple[list[str], str, str]:
    """`migrate` (through the first URL), then one http process per URL; their base URLs, a super_admin key and a
    tenant budget."""
    envs = [env_at(url) for url in urls]
    result = scaigrid("migrate", env=envs[0], timeout_s=300)
    assert result.returncode == 0, result.stdout + result.stderr
    processes: list[ModeProcess] = [start_http(start_mode, env) for env in envs]
    bases = [f"http://127.0.0.1:{env['HTTP_PORT']}" for env in envs]
    assert all(process.process.poll() is None for process in processes)
    admin = create_key(envs[0], "super_admin")
    budget = call(bases[0], "POST", "/v1/accounting/budgets", admin,
                  {"scope": "tenant", "period": "monthly", "limit_type": "cost", "limit_value": "100"})
    assert budget.status == 201, budget.body
    return bases, admin, budget.data["id"]


def test_conflicting_writes_through_two_nodes_are_retried_not_500(cluster, database, env_at, start_mode):
    """Two http processes, each on its own node, change the same budget and create keys at once: Galera fails the
    later of two conflicting commits in certification (1213); every request still succeeds."""
    bases, admin, budget_id = two_http_processes(start_mode, env_at, database.urls[1:])
    writers, rounds = 6, 15

    def writer(index: int) -> list[Outcome]:
        base = bases[index % 2]
        outcomes = []
        for round_ in range(rounds):
            outcomes.append(timed(base, "PUT", f"/v1/accounting/budgets/{budget_id}", admin,
                                  {"limit_value": str(1000 + 100 * index + round_)}))
            if round_ % 5 == 0:
                outcomes.append(timed(base, "POST", "/v1/api-keys", admin, {"name": f"w{index}-{round_}"}))
        return outcomes

    with ThreadPoolExecutor(2 * writers) as pool:
        outcomes = [outcome for batch in pool.map(writer, range(2 * writers)) for outcome in batch]
    statuses = sorted({(outcome.what.split(" ")[0], outcome.status) for outcome in outcomes})
    assert statuses == [("POST", 201), ("PUT", 200)], [o for o in outcomes if o.status not in (200, 201)][:5]
    retried = sum(metric(base, "scaigrid_db_conflicts_retried_total") for base in bases)
    print(f"conflicting writes: {len(outcomes)} requests, {retried:g} transactions retried")
    assert retried > 0  # conflicts did happen, and were absorbed
    # Every key created once (none lost, none doubled), seen alike on every node; one budget, the same everywhere.
    keys = sum(outcome.what.startswith("POST") for outcome in outcomes)
    assert count(cluster, f"SELECT COUNT(*) FROM `{database.name}`.api_keys WHERE name LIKE 'w%'") == [keys] * 3
    limits = {node.query(f"SELECT cost_limit FROM `{database.name}`.budgets WHERE id = {sql_str(budget_id)}")
              for node in cluster.nodes}
    assert len(limits) == 1


@dataclass
class HAProxy:
    process: subprocess.Popen[bytes]
    port: int
    stats_socket: Path
    log_path: Path

    def servers_up(self) -> dict[str, bool]:
        """Each server's state as HAProxy's stats say."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(str(self.stats_socket))
            sock.sendall(b"show stat\n")
            answer = b"".join(iter(lambda: sock.recv(65536), b"")).decode()
        header, *rows = answer.lstrip("# ").splitlines()
        columns = header.split(",")
        stats = [dict(zip(columns, row.split(","), strict=False)) for row in rows if row]
        return {row["svname"]: row["status"] == "UP" for row in stats if row["svname"].startswith("node")}


@pytest.fixture
def haproxy(cluster: GaleraCluster, tmp_path: Path) -> Iterator[HAProxy]:
    """deploy/galera/haproxy.cfg in front of the cluster, as an operator runs it; returned once every node is up."""
    password = secrets.token_hex(12)
    cluster.nodes[0].execute(f"CREATE USER IF NOT EXISTS 'clustercheck'@'127.0.0.1' IDENTIFIED BY {sql_str(password)}")
    # Installed as an operator would: the script, with its credentials next to it.
    check = tmp_path / CLUSTERCHECK.name
    shutil.copy(CLUSTERCHECK, check)
    write_private_file(tmp_path / "clustercheck.cnf", f"[client]\nuser=clustercheck\npassword={password}\n")
    port = devstack.free_port()
    stats_socket = tmp_path / "haproxy.sock"
    log_path = tmp_path / "haproxy.log"
    env = {**os.environ, "GALERA_LISTEN": f"127.0.0.1:{port}", "GALERA_CHECK": str(check),
           "GALERA_STATS_SOCKET": str(stats_socket),
           **{f"GALERA_NODE{node.index}": f"127.0.0.1:{node.port}" for node in cluster.nodes}}
    checked = subprocess.run(["haproxy", "-c", "-f", str(HAPROXY_CFG)], env=env, capture_output=True, text=True,
                             check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with log_path.open("wb") as log:
        process = subprocess.Popen(["haproxy", "-db", "-f", str(HAPROXY_CFG)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    proxy = HAProxy(process, port, stats_socket, log_path)
    try:
        eventually(lambda: proxy.servers_up() == {"node1": True, "node2": True, "node3": True},
                   "HAProxy seeing all three nodes up", 60, interval_s=0.2, ignoring=(OSError,),
                   context=lambda: devstack.log_tail(log_path))
        yield proxy
    finally:
        process.terminate()
        process.wait(10)


def test_a_node_killed_under_load_behind_haproxy(cluster, database, env_at, start_mode, haproxy):
    """Two http processes reach the cluster through HAProxy; node 1, the one HAProxy sends every connection to, is
    killed (-9) while requests that read and write MariaDB flow. Only requests in flight at the kill may fail."""
    proxied = database.urls[0].replace(f":{cluster.nodes[0].port}/", f":{haproxy.port}/")
    bases, admin, budget_id = two_http_processes(start_mode, env_at, [proxied, proxied])
    assert cluster.nodes[0].query("SELECT COUNT(*) FROM information_schema.PROCESSLIST "
                                  f"WHERE DB = {sql_str(database.name)}") != "0"  # the processes are on node 1
    stop = threading.Event()
    outcomes: list[Outcome] = []  # appended to by every load thread (list.append is atomic)

    def load(index: int) -> None:
        base, round_ = bases[index % 2], 0
        while not stop.is_set():
            round_ += 1
            if round_ % 2:
                outcomes.append(timed(base, "GET", f"/v1/accounting/budgets/{budget_id}", admin))
            else:
                outcomes.append(timed(base, "POST", "/v1/api-keys", admin, {"name": f"load{index}-{round_}"}))

    def succeeded_since(since_s: float) -> int:
        return sum(o.status in (200, 201) and o.started_s > since_s for o in list(outcomes))

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(load, index) for index in range(8)]
        try:
            eventually(lambda: succeeded_since(0) >= 100, "100 requests served before the kill", 120)
            killed_s = time.monotonic()
            cluster.nodes[0].kill()
            dead_s = time.monotonic()  # reaped: its sockets are closed (tearing down takes some tens of ms)
            eventually(lambda: not haproxy.servers_up()["node1"], "HAProxy marking node 1 down", 30)
            marked_down_s = time.monotonic() - killed_s
            eventually(lambda: succeeded_since(killed_s) >= 100, "100 requests served after the kill", 120)
        finally:
            stop.set()
        for future in futures:
            future.result()
    failed = [outcome for outcome in outcomes if outcome.status not in (200, 201)]
    # In flight at the kill: started before the server was gone, not answered before it was killed.
    in_flight = [outcome for outcome in outcomes if outcome.started_s <= dead_s and outcome.ended_s >= killed_s]
    after = [outcome for outcome in outcomes if outcome.started_s > killed_s]
    recovered_s = {method: min((o.ended_s for o in after if o.status in (200, 201) and o.what.startswith(method)),
                               default=float("inf")) - killed_s for method in ("GET", "POST")}
    stalled_s = {method: max((o.ended_s - o.started_s for o in outcomes if o.what.startswith(method)), default=0.0)
                 for method in ("GET", "POST")}
    print(f"Galera failover: {len(outcomes)} requests, {len(failed)} failed, {len(in_flight)} in flight at the kill "
          f"(which took {dead_s - killed_s:.2f} s), node 1 marked down after {marked_down_s:.1f} s; after the kill the "
          f"first read succeeded at {recovered_s['GET']:.1f} s, the first write at {recovered_s['POST']:.1f} s; "
          f"longest read {stalled_s['GET']:.1f} s, longest write {stalled_s['POST']:.1f} s")
    assert [(round(o.started_s - killed_s, 2), round(o.ended_s - killed_s, 2), o.status, o.what[:60])
            for o in failed if o not in in_flight] == []
    assert sum(outcome.status in (200, 201) for outcome in after) > 20  # the service went on, on node 2
    assert haproxy.servers_up() == {"node1": False, "node2": True, "node3": True}
