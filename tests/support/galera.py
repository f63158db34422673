"""A three-node MariaDB Galera cluster on loopback for the tests: galera-4, rsync SST, each node its own ports.

Node 1 is initialised and bootstraps the cluster (--wsrep-new-cluster); nodes 2 and 3 start with empty datadirs
and receive node 1's by rsync state transfer, one after the other (two transfers at once on two shared cores only
take longer). mariadbd runs as `mysql`, as Debian runs it: the SST scripts it spawns then run as mysql too, so
every datadir and log lives in a directory of mysql's own (pytest's temp dirs are root's, 0700).
"""

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from appliance import devstack
from appliance.database import run_mariadb_client, sql_str
from tests.support.waiting import eventually

PROVIDER = "/usr/lib/galera/libgalera_smm.so"
START_TIMEOUT_S = 120  # a joiner's rsync SST of a fresh datadir takes a few seconds; a loaded CI machine more
# Small enough for three servers and the processes under test on two shared cores.
BUFFER_POOL = "32M"
GCACHE = "32M"


@dataclass
class GaleraNode(devstack.MariaDB):
    """One node: a MariaDB (execute, create_database, admin_url, stop) that also knows its Galera ports."""

    index: int = 0
    gcomm_port: int = 0
    ist_port: int = 0
    sst_port: int = 0
    base_dir: Path = field(default_factory=Path)

    def query(self, sql: str) -> str:
        """The first column of the first row, as the client prints it (as root over TCP)."""
        connection = ["--protocol=TCP", "--host=127.0.0.1", f"--port={self.port}", "--user=root",
                      "--skip-column-names", "--connect-timeout=2"]
        result = run_mariadb_client(connection, self.root_password, [sql], 10)
        if result.returncode != 0:
            raise devstack.ServiceError(f"node {self.index} rejected {sql!r}: {result.stderr.strip()}")
        return result.stdout.split("\n", 1)[0].split("\t", 1)[0]

    def status(self, variable: str) -> str:
        return self.query(f"SELECT VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS "
                          f"WHERE VARIABLE_NAME = {sql_str(variable.upper())}")

    def synced(self, cluster_size: int) -> bool:
        return self.status("wsrep_local_state_comment") == "Synced" and self.status("wsrep_cluster_size") == str(
            cluster_size)

    def tail(self) -> str:
        return devstack.log_tail(self.log_path)

    def kill(self) -> None:
        """kill -9, as a crashed machine would leave it."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()

    def url(self, user: str, password: str, database: str) -> str:
        """The asyncmy URL of a user's database on this node."""
        return devstack._mysql_url(user, password, self.port, database)  # one URL format


@dataclass
class GaleraCluster:
    nodes: list[GaleraNode]
    base_dir: Path
    root_password: str = field(repr=False)

    def create_database(self, name: str, user: str, password: str) -> list[str]:
        """Creates the database and its user (on node 1; Galera replicates both); returns its URL on each node."""
        self.nodes[0].create_database(name, user, password)
        return [node.url(user, password, name) for node in self.nodes]

    def wait_synced(self, nodes: list[GaleraNode] | None = None, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until every given node (all by default) is Synced in a cluster of that many."""
        members = self.nodes if nodes is None else nodes
        for node in members:
            eventually(lambda node=node: node.synced(len(members)),  # type: ignore[misc]
                       f"node {node.index} Synced in a cluster of {len(members)}", timeout_s, interval_s=0.2,
                       ignoring=(devstack.ServiceError,), context=lambda node=node: node.tail())  # type: ignore[misc]

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.stop(timeout_s=30)
        shutil.rmtree(self.base_dir, ignore_errors=True)


def _mysql_owned_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    mysql = pwd.getpwnam("mysql")
    os.chown(path, mysql.pw_uid, mysql.pw_gid)
    return path


def _mariadbd(node: GaleraNode, addresses: str, *, bootstrap: bool) -> subprocess.Popen[bytes]:
    provider_options = ";".join([
        f"gmcast.listen_addr=tcp://127.0.0.1:{node.gcomm_port}",
        f"ist.recv_addr=127.0.0.1:{node.ist_port}",
        f"gcache.size={GCACHE}",
        # Galera's default failure detection (evs.suspect_timeout PT5S), as operators run it: the failover test
        # measures how long writes stall after a node dies.
    ])
    argv = [
        "mariadbd", "--no-defaults", f"--datadir={node.datadir}", "--user=mysql", f"--port={node.port}",
        "--bind-address=127.0.0.1", f"--socket={node.base_dir / 'mariadb.sock'}",
        f"--pid-file={node.base_dir / 'mariadb.pid'}", f"--log-error={node.log_path}", "--skip-name-resolve",
        f"--innodb-buffer-pool-size={BUFFER_POOL}", "--innodb-log-file-size=16M",
        "--innodb-flush-log-at-trx-commit=2", "--innodb-doublewrite=0",
        # What Galera requires of every node.
        "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2", "--default-storage-engine=InnoDB",
        "--wsrep-on=ON", f"--wsrep-provider={PROVIDER}", "--wsrep-cluster-name=scaigrid-test",
        f"--wsrep-cluster-address=gcomm://{addresses}", f"--wsrep-node-name=node{node.index}",
        f"--wsrep-node-address=127.0.0.1:{node.gcomm_port}", f"--wsrep-provider-options={provider_options}",
        "--wsrep-sst-method=rsync", f"--wsrep-sst-receive-address=127.0.0.1:{node.sst_port}",
        "--wsrep-slave-threads=1",
        *(["--wsrep-new-cluster"] if bootstrap else []),
    ]
    with node.log_path.open("ab") as log:
        # Own session, so that kill() reaches the SST script and rsync a node may be running.
        return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)


def start_node(node: GaleraNode, addresses: str, *, bootstrap: bool = False) -> None:
    """(Re)starts a node's mariadbd; it joins the cluster at `addresses` (or bootstraps one)."""
    node.process = _mariadbd(node, addresses, bootstrap=bootstrap)


def start_cluster(size: int = 3) -> GaleraCluster:
    """Starts `size` nodes and returns once all are Synced in one cluster."""
    base_dir = _mysql_owned_dir(Path(tempfile.mkdtemp(prefix="galera-")) / "c")
    os.chmod(base_dir.parent, 0o755)  # mysql must reach its directory inside
    root_password = secrets.token_hex(16)
    nodes = []
    ports = devstack.free_ports(4 * size)
    for index in range(1, size + 1):
        node_dir = _mysql_owned_dir(base_dir / f"n{index}")
        port, gcomm_port, ist_port, sst_port = ports[4 * (index - 1):4 * index]
        nodes.append(GaleraNode(
            datadir=_mysql_owned_dir(node_dir / "data"), port=port, process=None,  # type: ignore[arg-type]
            log_path=node_dir / "mariadb.log", root_password=root_password, index=index, gcomm_port=gcomm_port,
            ist_port=ist_port, sst_port=sst_port, base_dir=node_dir))
    cluster = GaleraCluster(nodes, base_dir.parent, root_password)
    addresses = ",".join(f"127.0.0.1:{node.gcomm_port}" for node in nodes)
    try:
        first = nodes[0]
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={first.datadir}", "--user=mysql",
                        "--auth-root-authentication-method=normal"], stdin=subprocess.DEVNULL,
                       capture_output=True, timeout=START_TIMEOUT_S, check=True)
        start_node(first, addresses, bootstrap=True)
        socket_path = first.base_dir / "mariadb.sock"

        def secured() -> bool:
            # A fresh datadir's root has no password: set it (and loopback's root) once, as devstack does.
            password = sql_str(root_password)
            result = run_mariadb_client([f"--socket={socket_path}", "--user=root"], None, [
                f"ALTER USER 'root'@'localhost' IDENTIFIED BY {password}",
                f"CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY {password}",
                f"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY {password}",
                "GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION",
                "DROP USER IF EXISTS ''@'localhost'"], 10)
            if first.process.poll() is not None:
                raise devstack.ServiceError(f"node 1 exited while starting:\n{first.tail()}")
            return result.returncode == 0

        eventually(secured, "node 1 answering on its socket", START_TIMEOUT_S, interval_s=0.2, context=first.tail)
        cluster.wait_synced(nodes[:1])
        for joined in range(2, size + 1):
            start_node(nodes[joined - 1], addresses)
            cluster.wait_synced(nodes[:joined])
    except BaseException:
        for node in nodes:
            if node.process is not None:
                node.kill()
        shutil.rmtree(cluster.base_dir, ignore_errors=True)
        raise
    return cluster


@contextlib.contextmanager
def galera_cluster(size: int = 3) -> Iterator[GaleraCluster]:
    started_s = time.monotonic()
    cluster = start_cluster(size)
    print(f"Galera: {size} nodes Synced after {time.monotonic() - started_s:.1f} s")  # shown with -s
    try:
        yield cluster
    finally:
        cluster.stop()
