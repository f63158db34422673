"""A whole appliance stack for tests: first-boot steps, then supervisord with every program and nginx, random ports."""

from __future__ import annotations

import secrets
import signal
import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance import config as appliance_config
from appliance import devstack, local
from appliance.config import Appliance
from appliance.supervisor import Supervisor

# Every listener of the appliance, on a free port each, so stacks never collide with each other or `make run`.
PORT_KEYS = local.PORT_KEYS


@dataclass
class ApplianceStack:
    appliance: Appliance
    supervisord: subprocess.Popen[bytes]
    var: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def config(self) -> appliance_config.ApplianceConfig:
        return self.appliance.config

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.config.https_port}"

    @property
    def admin_key(self) -> str:
        return self.config.admin_key_file.read_text().strip()

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor(self.config.supervisor_socket)

    def tls_context(self) -> ssl.SSLContext:
        """Trusts the stack's self-signed certificate, as a client given its CA file would."""
        return ssl.create_default_context(cafile=str(self.config.tls_cert))

    def get(self, path: str, **headers: str) -> tuple[int, bytes]:
        request = urllib.request.Request(self.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10, context=self.tls_context()) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def cli(self, *args: str, check: bool = False, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """Runs `scaigrid-appliance ARGS` against this stack's config, as an operator would."""
        return subprocess.run([str(self.config.venv / "bin" / "scaigrid-appliance"), *args],
                              env={**local.child_env(), "SCAIGRID_APPLIANCE_CONFIG": str(self.appliance.path)},
                              capture_output=True, text=True, timeout=timeout_s, check=check)

    def stop(self) -> int:
        """SIGTERM to supervisord, as systemd's stop does; returns its exit status."""
        if self.supervisord.poll() is None:
            self.supervisord.send_signal(signal.SIGTERM)
            try:
                self.supervisord.wait(120)
            except subprocess.TimeoutExpired:
                self.supervisord.kill()
                self.supervisord.wait()
        return self.supervisord.returncode


def start_stack(var: Path, mariadb: devstack.MariaDB, redis: devstack.Redis, s3: devstack.S3Server,
                **overrides: str) -> ApplianceStack:
    """Renders and starts a stack under var/ on the session's services (its own database, Redis db and bucket)."""
    var.mkdir(parents=True, exist_ok=True)
    suffix = secrets.token_hex(4)
    bucket = f"appliance-{suffix}"
    devstack_client(s3).make_bucket(bucket)
    # Several processes of each scaled program, as a customer's VM runs them: every program test sees N > 1.
    counts = {"HTTP_PROCESSES": "2", "WORKER_PROCESSES": "2"} | {key: overrides[key] for key in (
        "HTTP_PROCESSES", "WORKER_PROCESSES") if key in overrides}
    values = {
        **counts,
        **free_listener_ports(int(counts["HTTP_PROCESSES"]), int(counts["WORKER_PROCESSES"])),
        "DATABASE_NAME": f"appl_{suffix}",
        "DATABASE_USER": f"appl_{suffix}",
        "S3_BUCKET": bucket,
        # Tests stop stacks often; a long drain would only make them slow.
        "HTTP_DRAIN_GRACE_S": "5",
        **overrides,
    }
    path = local.write_config(var, redis, s3, mariadb, values)
    appliance = appliance_config.load(path)
    local.first_boot(appliance, mariadb)
    supervisord = local.start_supervisord(appliance)
    stack = ApplianceStack(appliance, supervisord, var)
    problems = local.wait_until_ready(appliance, supervisord)
    if problems:
        stack.stop()
        log_paths = sorted(appliance.config.log_dir.glob("*.log"))
        logs = "\n".join(f"--- {path.name}\n{devstack.log_tail(path)}" for path in log_paths)
        raise RuntimeError(f"appliance stack not ready: {problems}\n{logs}")
    return stack


def free_listener_ports(http_processes: int, worker_processes: int) -> dict[str, str]:
    """Every listener of PORT_KEYS on a free port, HTTP_PORT and WORKER_METRICS_PORT with room for their processes
    (each process listens on the next port)."""
    sizes = {key: {"HTTP_PORT": http_processes, "WORKER_METRICS_PORT": worker_processes}.get(key, 1)
             for key in PORT_KEYS}
    port = devstack.free_port_block(sum(sizes.values()))
    ports = {}
    for key, size in sizes.items():
        ports[key] = str(port)
        port += size
    return ports


def devstack_client(s3: devstack.S3Server) -> Any:
    from minio import Minio

    return Minio(f"127.0.0.1:{s3.port}", access_key=s3.access_key_id, secret_key=s3.secret_access_key, secure=False)
