"""The one table of the appliance's programs: supervisord, nginx, the scrape file and `status` all come from it."""

from __future__ import annotations

import ssl
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.config import Appliance, ApplianceConfig
from scaigrid.settings import Settings

# supervisord waits this much beyond a program's own grace before SIGKILL: the grace is the program's promise,
# the margin covers its last log line and exit.
STOP_MARGIN_S = 15
PROBE_TIMEOUT_S = 3.0
NGINX = "/usr/sbin/nginx"  # Debian's


@dataclass(frozen=True)
class Context:
    appliance: Appliance
    settings: Settings
    # What probes of several processes share, asked once per Context (one `status`): the workers' heartbeats.
    _shared: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def shared(self, name: str, compute: Callable[[], Any]) -> Any:
        with self._lock:
            if name not in self._shared:
                self._shared[name] = compute()
            return self._shared[name]

    def scaigrid(self, *args: str) -> str:
        return " ".join(scaigrid_argv(self.appliance.config, *args))


def scaigrid_argv(config: ApplianceConfig, *args: str) -> list[str]:
    """The `scaigrid` command of the appliance's venv on its rendered env file, as every program runs it."""
    return [str(config.venv / "bin" / "scaigrid"), "--env-file", str(config.scaigrid_env_file), *args]


def healthy(rows: list[dict[str, Any]]) -> bool:
    """Whether `status` rows say the appliance is fine: every program RUNNING, none failing its readiness probe."""
    return bool(rows) and all(row["state"] == "RUNNING" and row["ready"] is not False for row in rows)


@dataclass(frozen=True)
class Program:
    """One kind of program; supervisord runs `processes` copies of it (a group), each callable below is given the
    copy's index (0 for the first; a program of one process has only that)."""

    name: str
    command: Callable[[Context], str]
    # Where a process serves its /metrics on loopback (port, path); None when it has none.
    metrics: Callable[[Context, int], tuple[int, str] | None]
    # Whether a process (by index and pid) is ready.
    ready: Callable[[Context, int, int], bool]
    stop_wait_s: Callable[[Context], int]
    enabled: Callable[[Context], bool] = lambda ctx: True
    # None: one process named as the program. Otherwise how many, named <program>_1, <program>_2, ...: each its own
    # supervisord process, so each restarts alone, is probed and scraped alone, and has its own log.
    processes: Callable[[Context], int] | None = None
    # Settings a process gets in its environment, over the env file (scaigrid reads environment over file).
    environment: Callable[[Context, int], dict[str, str]] = lambda ctx, i: {}
    # Only nginx's master runs as root, to bind 443 and read the TLS key; its workers drop to the service user.
    as_root: bool = False
    # supervisord starts low numbers first and stops them last: nginx outlives the programs it relays while they drain.
    priority: int = 20
    stop_signal: str = "TERM"

    def process_names(self, ctx: Context) -> list[str]:
        if self.processes is None:
            return [self.name]
        return [f"{self.name}_{i + 1}" for i in range(self.processes(ctx))]


@dataclass(frozen=True)
class Process:
    """One supervisord process of a program."""

    program: Program
    name: str  # supervisord's process name, its log's name and its scrape target's
    index: int


def http_ok(url: str, *, verify_tls: bool = False) -> bool:
    context = ssl.create_default_context()
    if not verify_tls:  # probes of our own loopback listeners; the certificate may be self-signed
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S, context=context) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def grpc_serving(port: int) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def worker_alive(ctx: Context, pid: int) -> bool:
    """Whether the worker of this pid has a fresh heartbeat (`scaigrid check worker` lists them as HOST:PID)."""
    return str(pid) in ctx.shared("worker heartbeats", lambda: _beating_workers(ctx))


def _beating_workers(ctx: Context) -> set[str]:
    """The pids of the workers with a fresh heartbeat, asked once for them all."""
    argv = scaigrid_argv(ctx.appliance.config, "check", "worker")
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return {line.split()[1].rstrip(":").rsplit(":", 1)[-1] for line in result.stdout.splitlines()
            if line.startswith("worker ")}


def nginx_command(config_dir: Path, run_dir: Path) -> str:
    """nginx's master, after a graceful stop of the workers a killed master left behind.

    A master killed with -9 leaves its workers running, reparented, still holding the listening sockets: each new
    master supervisord starts then fails to bind, until supervisord gives up (FATAL) while orphans serve the old
    config. They are still in the dead master's process group, whose id is in the pid file it wrote; QUIT lets them
    finish what they serve and close their sockets at once (nginx retries its bind meanwhile). pkill -x nginx only
    touches nginx processes, should the id have been reused.
    """
    pid_file = run_dir / "nginx.pid"
    return (f"/bin/sh -c 'old=$(cat {pid_file} 2>/dev/null) && pkill -QUIT -g \"$old\" -x nginx; "
            f"exec {NGINX} -c {config_dir}/nginx.conf'")


def _grace(seconds: float) -> int:
    return int(seconds) + STOP_MARGIN_S


PROGRAMS: tuple[Program, ...] = (
    Program(
        "http",
        command=lambda ctx: ctx.scaigrid("run", "--mode", "http"),
        metrics=lambda ctx, i: (ctx.settings.server.http_port + i, "/metrics"),
        ready=lambda ctx, i, pid: http_ok(f"http://127.0.0.1:{ctx.settings.server.http_port + i}/health/ready"),
        stop_wait_s=lambda ctx: _grace(ctx.settings.server.http_drain_grace_s),
        processes=lambda ctx: ctx.appliance.config.http_process_count,
        # Each on its own port, behind nginx's upstream: HTTP_PORT, HTTP_PORT + 1, ...
        environment=lambda ctx, i: {"HTTP_PORT": str(ctx.settings.server.http_port + i)},
    ),
    Program(
        "grpc",
        command=lambda ctx: ctx.scaigrid("run", "--mode", "grpc"),
        metrics=lambda ctx, i: (ctx.settings.server.grpc_metrics_port, "/metrics"),
        ready=lambda ctx, i, pid: grpc_serving(ctx.settings.server.grpc_port),
        stop_wait_s=lambda ctx: _grace(ctx.settings.server.grpc_stop_grace_s),
    ),
    Program(
        # Copies are safe: an exclusive job takes a Redis lock per tick (scaigrid/worker/jobs.py), so it runs once.
        "worker",
        command=lambda ctx: ctx.scaigrid("run", "--mode", "worker"),
        metrics=lambda ctx, i: (ctx.settings.server.worker_metrics_port + i, "/metrics"),
        ready=lambda ctx, i, pid: worker_alive(ctx, pid),
        stop_wait_s=lambda ctx: _grace(ctx.settings.worker.stop_grace_s),
        processes=lambda ctx: ctx.appliance.config.worker_processes,
        environment=lambda ctx, i: {"WORKER_METRICS_PORT": str(ctx.settings.server.worker_metrics_port + i)},
    ),
    Program(
        "bunker_proxy",
        command=lambda ctx: ctx.scaigrid("run", "--mode", "bunker_proxy"),
        metrics=lambda ctx, i: (ctx.settings.server.bunker_proxy_port, "/metrics"),
        ready=lambda ctx, i, pid: http_ok(f"http://127.0.0.1:{ctx.settings.server.bunker_proxy_port}/health/ready"),
        stop_wait_s=lambda ctx: _grace(ctx.settings.server.http_drain_grace_s),
        enabled=lambda ctx: ctx.appliance.storage_enabled,
    ),
    Program(
        # The hybrid link to the managed ScaiGrid: its own program, so that a slow job never delays a heartbeat and
        # scaling out workers never opens a second link.
        "link",
        command=lambda ctx: ctx.scaigrid("run", "--mode", "link"),
        metrics=lambda ctx, i: (ctx.settings.server.link_metrics_port, "/metrics"),
        # Ready means running and reporting; whether the link is up is its state (status shows it), not readiness:
        # the appliance serves its own models without the managed side.
        ready=lambda ctx, i, pid: http_ok(f"http://127.0.0.1:{ctx.settings.server.link_metrics_port}/metrics"),
        # On SIGTERM its tunnels (requests of the http process) get the http drain grace to finish.
        stop_wait_s=lambda ctx: _grace(ctx.settings.server.http_drain_grace_s),
        enabled=lambda ctx: ctx.appliance.enrolled,
    ),
    Program(
        "garage",
        command=lambda ctx: f"{ctx.appliance.config.garage_binary} -c {ctx.appliance.config.config_dir}/garage.toml "
                            "server",
        metrics=lambda ctx, i: (ctx.appliance.config.garage_admin_port, "/metrics"),
        ready=lambda ctx, i, pid: http_ok(f"http://127.0.0.1:{ctx.appliance.config.garage_admin_port}/health"),
        stop_wait_s=lambda ctx: STOP_MARGIN_S,
        enabled=lambda ctx: ctx.appliance.config.garage_enabled,
        priority=10,
    ),
    Program(
        "nginx",
        command=lambda ctx: nginx_command(ctx.appliance.config.config_dir, ctx.appliance.config.run_dir),
        metrics=lambda ctx, i: None,
        ready=lambda ctx, i, pid: http_ok(f"https://127.0.0.1:{ctx.appliance.config.https_port}/health"),
        # QUIT is nginx's graceful stop: open streams finish, as long as the http drain allows.
        stop_wait_s=lambda ctx: _grace(ctx.settings.server.http_drain_grace_s),
        as_root=True,
        priority=10,
        stop_signal="QUIT",
    ),
)

# The event listener is not a program (supervisord runs it as [eventlistener:...]) but is scraped like one.
EVENTS_NAME = "events"
EVENTS_STOP_WAIT_S = 10


def enabled_programs(ctx: Context) -> list[Program]:
    return [program for program in PROGRAMS if program.enabled(ctx)]


def processes(ctx: Context) -> list[Process]:
    """Every supervisord process of the enabled programs, in the table's order."""
    return [Process(program, name, index) for program in enabled_programs(ctx)
            for index, name in enumerate(program.process_names(ctx))]


def scrape_targets(ctx: Context) -> list[tuple[str, str, int, str]]:
    """(program, process, loopback port, path) of every /metrics the appliance serves, the event listener's
    included."""
    targets = []
    for process in processes(ctx):
        metrics = process.program.metrics(ctx, process.index)
        if metrics is not None:
            targets.append((process.program.name, process.name, *metrics))
    targets.append((EVENTS_NAME, EVENTS_NAME, ctx.appliance.config.appliance_metrics_port, "/metrics"))
    return targets
