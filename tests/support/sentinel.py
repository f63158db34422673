"""A Redis Sentinel set on loopback for failover tests: a master, a replica and three sentinels (quorum 2).

Built from appliance.devstack's own servers, then reconfigured at run time (REPLICAOF, SENTINEL SET) rather than
started with options of their own: a failover within seconds needs a down-after far below devstack's 5 s.
"""

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis as sync_redis

from appliance import devstack
from tests.support.waiting import eventually

MASTER_NAME = "scaigrid"
QUORUM = 2
# A master silent for this long is subjectively down; two sentinels agreeing make it objectively down and one of them
# starts the failover. Short, so a test sees it within seconds, and not shorter: on a loaded 2-core machine a master
# can be slow to answer for a second without being down (docs/operations.md suggests 5 s in production).
DOWN_AFTER_MS = 2000
# Also how long a sentinel leaves a replica pointing elsewhere than the master (replica_lagging's relay) before it
# "fixes" it.
FAILOVER_TIMEOUT_MS = 10000


def client(port: int) -> sync_redis.Redis:
    return sync_redis.Redis(host="127.0.0.1", port=port, socket_timeout=5, decode_responses=True)


def ask(port: int, *command: str) -> object:
    """One command to the server (or sentinel) on `port`, on a connection of its own."""
    with client(port) as connection:
        return connection.execute_command(*command)


def role(port: int) -> dict[str, str]:
    """INFO replication of the server on `port`: role, master_port, master_link_status..."""
    with client(port) as connection:
        return {key: str(value) for key, value in connection.info("replication").items()}


@dataclass
class SentinelSet:
    """The servers, as a test drives them: the master may be killed and started again as a replica."""

    base_dir: Path
    master: devstack.Redis
    replica: devstack.Redis
    sentinels: list[devstack.Sentinel]

    @property
    def url(self) -> str:
        """REDIS_URL naming every sentinel, as an operator writes it."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{MASTER_NAME}/0"

    def master_port(self, sentinel: devstack.Sentinel | None = None) -> int:
        """The master's port as a sentinel (the first, by default) names it now."""
        with client((sentinel or self.sentinels[0]).port) as connection:
            _, port = connection.sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def agreed_master(self) -> int | None:
        """The master's port if every sentinel names the same one, else None."""
        ports = {self.master_port(sentinel) for sentinel in self.sentinels}
        return ports.pop() if len(ports) == 1 else None

    def kill_master(self) -> int:
        """kill -9 of the master: no shutdown, no last write to its replica. Returns its port."""
        self.master.process.kill()
        self.master.process.wait()
        return self.master.port

    @contextlib.contextmanager
    def replica_lagging(self) -> Iterator[None]:
        """The replica behind for the block: its link to the master goes through a relay that, inside the block,
        forwards nothing more, so what the master takes meanwhile never reaches the replica (as over a slow or broken
        network). On loopback Redis replicates within a millisecond, and what the kernel buffered for a stopped
        (SIGSTOP) replica still reaches it once it resumes, so this is the way to make a replica miss writes."""
        relay = LinkRelay(self.master.port)
        try:
            ask(self.replica.port, "REPLICAOF", "127.0.0.1", str(relay.port))
            eventually(lambda: role(self.replica.port).get("master_port") == str(relay.port)
                       and role(self.replica.port).get("master_link_status") == "up", "the replica through the relay",
                       20, interval_s=0.05)
            with relay.holding():
                yield
        finally:
            relay.close()

    def replica_offset(self) -> int:
        """How far the replica got in the master's replication stream."""
        return int(role(self.replica.port)["master_repl_offset"])

    def restart_old_master(self, port: int) -> devstack.Redis:
        """The killed master started again on its port, empty (as after a crash without persistence); the sentinels
        turn it into a replica of the new master."""
        self.master = devstack.start_redis(self.base_dir / "master", port)
        return self.master

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        for server in (self.master, self.replica):
            server.stop()


class LinkRelay:
    """A TCP relay on loopback from a replica to its master that can stop passing on what the master sends."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._holding = threading.Event()
        self._released = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, name="link-relay", daemon=True).start()

    @contextlib.contextmanager
    def holding(self) -> Iterator[None]:
        """Nothing more from the master reaches the replica in the block; the link is cut at its end (what was held
        back is dropped, as a crashed master's unsent writes are)."""
        self._holding.set()
        try:
            yield
        finally:
            self.close()

    def close(self) -> None:
        self._released.set()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
            self._sockets.clear()

    def _accept(self) -> None:
        while True:
            try:
                replica, _ = self._listener.accept()
            except OSError:
                return  # closed
            try:
                master = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                replica.close()
                continue
            master.settimeout(None)
            with self._lock:
                if self._released.is_set():
                    replica.close()
                    master.close()
                    return
                self._sockets += [replica, master]
            threading.Thread(target=self._pump, args=(master, replica, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(replica, master, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, holdable: bool) -> None:
        try:
            while data := source.recv(65536):
                if holdable and self._holding.is_set():
                    self._released.wait()  # never passed on: the link is cut when the hold ends
                    return
                sink.sendall(data)
        except OSError:
            return  # the relay closed, or a side went away


def start_sentinel_set(base_dir: Path) -> SentinelSet:
    """A master, its replica in sync, and three sentinels that know both and each other; stopped by stop()."""
    master = devstack.start_redis(base_dir / "master")
    servers: list[devstack.Redis] = [master]
    sentinels: list[devstack.Sentinel] = []
    try:
        replica = devstack.start_redis(base_dir / "replica")
        servers.append(replica)
        ask(replica.port, "REPLICAOF", "127.0.0.1", str(master.port))
        eventually(lambda: role(replica.port).get("master_link_status") == "up", "the replica in sync", 20)
        for index in range(3):
            sentinel = devstack.start_sentinel(base_dir / f"sentinel-{index}", master, master_name=MASTER_NAME)
            sentinels.append(sentinel)
            ask(sentinel.port, "SENTINEL", "SET", MASTER_NAME, "quorum", str(QUORUM),
                "down-after-milliseconds", str(DOWN_AFTER_MS), "failover-timeout", str(FAILOVER_TIMEOUT_MS))

        def everyone_known() -> bool:
            # The sentinels find each other through the master's hello channel, and the replica through its INFO.
            for sentinel in sentinels:
                with client(sentinel.port) as connection:
                    state = connection.sentinel_master(MASTER_NAME)
                if int(state["num-other-sentinels"]) != 2 or int(state["num-slaves"]) != 1:
                    return False
            return True

        eventually(everyone_known, "three sentinels that know each other and the replica", 30, interval_s=0.2)
    except BaseException:
        for process in (*sentinels, *servers):
            process.stop()
        raise
    return SentinelSet(base_dir, master, replica, sentinels)
