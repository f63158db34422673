"""Private, throw-away MariaDB, Redis, Redis Sentinel and S3 (moto) servers run as local subprocesses."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from appliance.database import (
    SQL_TIMEOUT_S,
    ServiceError,
    database_statements,
    run_mariadb_client,
    sql_ident,
    sql_str,
)
from appliance.files import write_private_file

logger = logging.getLogger(__name__)

_POLL_INTERVAL_S = 0.1
_PROBE_TIMEOUT_S = 2.0
_FAILED_START_STOP_TIMEOUT_S = 10.0
_LOG_TAIL_LINES = 20
# sockaddr_un.sun_path holds 108 bytes including the terminating NUL.
_MAX_UNIX_SOCKET_PATH_BYTES = 107


def free_ports(count: int) -> list[int]:
    """Distinct TCP ports on 127.0.0.1 that were free a moment ago, for servers to listen on.

    They come from below the kernel's ephemeral range: a port from bind(0) lies inside it, and any
    outgoing connection made before our server binds could take it.
    """
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.bind(("127.0.0.1", secrets.choice(range(10000, low))))
            except OSError:
                sock.close()
                continue
            held.append(sock)  # held until all are chosen, so no port is handed out twice
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (see free_ports)."""
    return free_ports(1)[0]


class _ManagedProcess:
    """Mixin for the service handles: they all own one server process."""

    process: subprocess.Popen[bytes]

    def stop(self, timeout_s: float = 20) -> None:
        """SIGTERM the server, wait up to timeout_s, then SIGKILL; safe to call again."""
        _stop_process(self.process, timeout_s)


@dataclass
class MariaDB(_ManagedProcess):
    datadir: Path
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    root_password: str = field(repr=False)

    def admin_url(self, database: str = "") -> str:
        return _mysql_url("root", self.root_password, self.port, database)

    def execute(self, *statements: str) -> None:
        """Run SQL statements as root over TCP; raise ServiceError with the client's stderr on failure."""
        connection = ["--protocol=TCP", "--host=127.0.0.1", f"--port={self.port}", "--user=root"]
        result = run_mariadb_client(connection, self.root_password, statements, SQL_TIMEOUT_S)
        if result.returncode != 0:
            raise ServiceError(f"MariaDB on port {self.port} rejected SQL: {result.stderr.strip()}")

    def create_database(self, name: str, user: str, password: str) -> str:
        """Create a utf8mb4 database and a user owning it; return the user's asyncmy URL."""
        self.execute(*database_statements(name, user, password))
        return _mysql_url(user, password, self.port, name)

    def drop_database(self, name: str) -> None:
        self.execute(f"DROP DATABASE IF EXISTS {sql_ident(name)}")


@dataclass
class Redis(_ManagedProcess):
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class Sentinel(_ManagedProcess):
    port: int
    master_name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.port}/{self.master_name}/0"


@dataclass
class S3Server(_ManagedProcess):
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path
    # moto accepts any credentials; these are the values its documentation uses.
    access_key_id: str = "testing"
    secret_access_key: str = "testing"  # noqa: S105

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class DemoServer(_ManagedProcess):
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        """The OpenAI API root, as a backend's base_url."""
        return f"http://127.0.0.1:{self.port}/v1"


def start_mariadb(base_dir: Path, port: int | None = None, *, timeout_s: float = 60) -> MariaDB:
    """Start mariadbd on base_dir/data, initialising it on first use; reuse it (and its root password) later."""
    started_s = time.monotonic()
    deadline_s = started_s + timeout_s
    base_dir = _prepare_dir(base_dir)
    port = _pick_port(port)
    datadir = base_dir / "data"
    log_path = base_dir / "mariadb.log"
    socket_path = base_dir / "mariadb.sock"
    password_path = base_dir / "root-password"
    if len(os.fsencode(socket_path)) > _MAX_UNIX_SOCKET_PATH_BYTES:
        raise ServiceError(f"MariaDB socket path is too long for a unix socket, use a shorter base_dir: {socket_path}")

    if _unix_socket_accepts(socket_path):
        raise ServiceError(f"a MariaDB is already running on {socket_path}; stop it before starting another one")

    # The password file is written only once first-time setup has finished, so it marks a usable datadir.
    first_start = not (datadir / "mysql").is_dir()
    if first_start:
        _install_mariadb_datadir(datadir, log_path, deadline_s)
        root_password = secrets.token_hex(16)
    elif password_path.exists():
        root_password = password_path.read_text().strip()
    else:
        raise ServiceError(
            f"{datadir} exists but {password_path} does not (was the first start interrupted?); "
            f"delete {base_dir} to start from scratch"
        )

    process = _spawn(
        [
            "mariadbd",
            "--no-defaults",
            f"--datadir={datadir}",
            "--user=root",
            f"--port={port}",
            "--bind-address=127.0.0.1",
            f"--socket={socket_path}",
            "--skip-log-bin",
            "--innodb-buffer-pool-size=64M",
            "--innodb-log-file-size=16M",
            # Durability is worthless for throw-away data; these make DDL-heavy test setup much faster.
            "--innodb-flush-log-at-trx-commit=2",
            "--innodb-doublewrite=0",
            "--skip-name-resolve",
            f"--log-error={log_path}",
        ],
        log_path,
    )
    as_root_on_socket = [f"--socket={socket_path}", "--user=root", "--skip-column-names"]
    # A fresh datadir's root has no password until the setup below sets one.
    probe_password = None if first_start else root_password

    def answers_with_our_port() -> bool:
        # Checking the port makes sure our server answers, not another one that still owns the socket path.
        result = run_mariadb_client(as_root_on_socket, probe_password, ["SELECT @@port"], _PROBE_TIMEOUT_S)
        if result.returncode == 0:
            return result.stdout.strip() == str(port)
        if "Access denied" in result.stderr:
            message = f"MariaDB rejected the root password from {password_path}: {result.stderr.strip()}"
            raise _failure(message, log_path)
        return False

    _wait_until_ready("MariaDB", process, log_path, answers_with_our_port, deadline_s)
    if first_start:
        try:
            _secure_fresh_mariadb(as_root_on_socket, root_password, log_path)
            write_private_file(password_path, root_password)
        except BaseException:
            _stop_process(process, _FAILED_START_STOP_TIMEOUT_S)
            raise
    logger.info(
        "MariaDB ready on 127.0.0.1:%d after %.1fs (%s, log %s)",
        port,
        time.monotonic() - started_s,
        "new datadir" if first_start else "reused datadir",
        log_path,
    )
    return MariaDB(datadir=datadir, port=port, process=process, log_path=log_path, root_password=root_password)


def start_redis(base_dir: Path, port: int | None = None, *, timeout_s: float = 20) -> Redis:
    """Start a memory-only redis-server."""
    deadline_s = time.monotonic() + timeout_s
    base_dir = _prepare_dir(base_dir)
    port = _pick_port(port)
    log_path = base_dir / "redis.log"
    process = _spawn(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(base_dir),
            "--logfile", str(log_path),
        ],
        log_path,
    )  # fmt: skip
    _wait_until_ready("Redis", process, log_path, lambda: _redis_answers(port, ["PING"], b"+PONG\r\n"), deadline_s)
    logger.info("Redis ready on 127.0.0.1:%d (log %s)", port, log_path)
    return Redis(port=port, process=process, log_path=log_path)


def start_sentinel(
    base_dir: Path,
    master: Redis,
    port: int | None = None,
    *,
    master_name: str = "scaigrid",
    timeout_s: float = 20,
) -> Sentinel:
    """Start a redis-sentinel (quorum 1) monitoring master under master_name."""
    deadline_s = time.monotonic() + timeout_s
    base_dir = _prepare_dir(base_dir)
    port = _pick_port(port)
    log_path = base_dir / "sentinel.log"
    config_path = base_dir / "sentinel.conf"
    # Rewritten on every start because sentinel records state (ids, epochs) of the previous master in it.
    config_path.write_text(
        "\n".join(
            [
                f"port {port}",
                "bind 127.0.0.1",
                f'dir "{base_dir}"',
                f'logfile "{log_path}"',
                f"sentinel monitor {master_name} 127.0.0.1 {master.port} 1",
                f"sentinel down-after-milliseconds {master_name} 5000",
                "",
            ]
        )
    )
    process = _spawn(["redis-sentinel", str(config_path)], log_path)
    command = ["SENTINEL", "get-master-addr-by-name", master_name]
    expected = _resp_array("127.0.0.1", str(master.port))
    _wait_until_ready("Redis Sentinel", process, log_path, lambda: _redis_answers(port, command, expected), deadline_s)
    logger.info("Redis Sentinel ready on 127.0.0.1:%d for %r (log %s)", port, master_name, log_path)
    return Sentinel(port=port, master_name=master_name, process=process, log_path=log_path)


def start_s3(base_dir: Path, port: int | None = None, *, timeout_s: float = 30) -> S3Server:
    """Start moto in server mode as an in-memory S3 endpoint."""
    deadline_s = time.monotonic() + timeout_s
    base_dir = _prepare_dir(base_dir)
    port = _pick_port(port)
    log_path = base_dir / "s3.log"
    process = _spawn([_moto_server_executable(), "-H", "127.0.0.1", "-p", str(port)], log_path)
    server = S3Server(port=port, process=process, log_path=log_path)
    _wait_until_ready("S3 (moto)", process, log_path, lambda: http_answers(server.endpoint_url), deadline_s)
    logger.info("S3 (moto) ready at %s (log %s)", server.endpoint_url, log_path)
    return server


def start_demo(base_dir: Path, port: int | None = None, *, timeout_s: float = 30) -> DemoServer:
    """Start `make run`'s demo model server (appliance/demo.py)."""
    deadline_s = time.monotonic() + timeout_s
    base_dir = _prepare_dir(base_dir)
    port = _pick_port(port)
    log_path = base_dir / "demo.log"
    process = _spawn([sys.executable, "-m", "appliance.demo", "--port", str(port)], log_path)
    server = DemoServer(port=port, process=process, log_path=log_path)
    _wait_until_ready("demo model", process, log_path, lambda: http_answers(server.url + "/models"), deadline_s)
    logger.info("demo model ready at %s (log %s)", server.url, log_path)
    return server


def free_port_block(count: int) -> int:
    """The first of `count` consecutive TCP ports on 127.0.0.1 that were free a moment ago (see free_ports)."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        first = secrets.choice(range(10000, low - count))
        held: list[socket.socket] = []
        try:
            for port in range(first, first + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()


def _prepare_dir(base_dir: Path) -> Path:
    base_dir.mkdir(parents=True, exist_ok=True)
    # Absolute, because mariadbd resolves relative paths against its datadir, not our cwd.
    return base_dir.resolve()


def _pick_port(port: int | None) -> int:
    if port is None:
        return free_port()
    # Otherwise a readiness probe could be answered by whatever already listens there.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Only a live listener should count as "in use", not a TIME_WAIT leftover of a previous run.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            raise ServiceError(f"port {port} on 127.0.0.1 is already in use: {exc}") from exc
    return port


def _spawn(argv: Sequence[str], log_path: Path) -> subprocess.Popen[bytes]:
    logger.debug("starting %s", " ".join(argv))
    try:
        with log_path.open("ab") as log:
            # Own session: a Ctrl-C in the developer's terminal must not kill the servers behind our back.
            return subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
    except OSError as exc:
        raise ServiceError(f"cannot run {argv[0]}: {exc}") from exc


def _wait_until_ready(
    name: str, process: subprocess.Popen[bytes], log_path: Path, is_ready: Callable[[], bool], deadline_s: float
) -> None:
    """Poll is_ready until it holds; on early exit, timeout or error stop the process and raise ServiceError."""
    try:
        while True:
            if process.poll() is not None:
                raise _failure(f"{name} exited with code {process.returncode} while starting", log_path)
            if is_ready():
                return
            if time.monotonic() >= deadline_s:
                raise _failure(f"{name} (pid {process.pid}) did not become ready in time", log_path)
            time.sleep(_POLL_INTERVAL_S)
    except BaseException:
        _stop_process(process, _FAILED_START_STOP_TIMEOUT_S)
        raise


def _stop_process(process: subprocess.Popen[bytes], timeout_s: float) -> None:
    if process.poll() is not None:
        return
    _signal_group(process, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d ignored SIGTERM for %.0fs, killing it", process.pid, timeout_s)
        _signal_group(process, signal.SIGKILL)
        process.wait()


def _signal_group(process: subprocess.Popen[bytes], signum: int) -> None:
    # The whole group, so that children of wrapper scripts (e.g. a pyenv shim) go too.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signum)


def _failure(message: str, log_path: Path) -> ServiceError:
    return ServiceError(f"{message}\n--- last lines of {log_path} ---\n{log_tail(log_path)}")


def log_tail(log_path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"(log unreadable: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _install_mariadb_datadir(datadir: Path, log_path: Path, deadline_s: float) -> None:
    argv = [
        "mariadb-install-db",
        "--no-defaults",
        f"--datadir={datadir}",
        "--user=root",
        "--auth-root-authentication-method=normal",
    ]
    logger.info("initialising MariaDB datadir %s", datadir)
    try:
        with log_path.open("ab") as log:
            result = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=max(deadline_s - time.monotonic(), 1),
                check=False,
            )
    except subprocess.TimeoutExpired as exc:
        raise _failure("mariadb-install-db did not finish in time", log_path) from exc
    except OSError as exc:
        raise ServiceError(f"cannot run mariadb-install-db: {exc}") from exc
    if result.returncode != 0:
        raise _failure(f"mariadb-install-db failed with code {result.returncode}", log_path)


def _secure_fresh_mariadb(as_root_on_socket: list[str], root_password: str, log_path: Path) -> None:
    password = sql_str(root_password)
    statements = [
        f"ALTER USER 'root'@'localhost' IDENTIFIED BY {password}",
        # With --skip-name-resolve, TCP logins from 127.0.0.1 only match accounts for that literal address.
        f"CREATE USER IF NOT EXISTS 'root'@'127.0.0.1' IDENTIFIED BY {password}",
        f"ALTER USER 'root'@'127.0.0.1' IDENTIFIED BY {password}",
        "GRANT ALL PRIVILEGES ON *.* TO 'root'@'127.0.0.1' WITH GRANT OPTION",
        # Anonymous accounts are more specific than 'user'@'%'-style matches and make real logins fail.
        "DROP USER IF EXISTS ''@'localhost'",
        f"DROP USER IF EXISTS ''@{sql_str(socket.gethostname())}",
    ]
    result = run_mariadb_client(as_root_on_socket, None, statements, SQL_TIMEOUT_S)
    if result.returncode != 0:
        raise _failure(f"setting up the fresh MariaDB failed: {result.stderr.strip()}", log_path)


def _mysql_url(user: str, password: str, port: int, database: str) -> str:
    return f"mysql+asyncmy://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{port}/{database}"


def _unix_socket_accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
        return True


def _resp_array(*items: str) -> bytes:
    """Encode items as a RESP array of bulk strings, the form of both Redis commands and list replies."""
    parts = [b"*%d\r\n" % len(items)]
    for item in items:
        data = item.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _redis_answers(port: int, command: Sequence[str], expected: bytes) -> bool:
    """True when the Redis-protocol server on port replies to command with exactly the bytes expected."""
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=_PROBE_TIMEOUT_S) as conn:
            conn.sendall(_resp_array(*command))
            while len(reply) < len(expected):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                reply += chunk
    except OSError:
        return False
    return reply == expected


def http_answers(url: str) -> bool:
    # No proxies: an HTTP(S)_PROXY from the environment would answer for a server that is not up yet.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=_PROBE_TIMEOUT_S):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def _moto_server_executable() -> str:
    # Prefer the one installed next to this interpreter (the venv's) over whatever PATH offers.
    beside_python = Path(sys.executable).parent / "moto_server"
    if beside_python.exists():
        return str(beside_python)
    on_path = shutil.which("moto_server")
    if on_path is None:
        raise ServiceError(f"moto_server is neither in {beside_python.parent} nor on PATH")
    return on_path
