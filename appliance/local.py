"""`make run`: the whole appliance on this machine: private MariaDB, Redis and S3 under ./var/, first-boot steps,
then supervisord with every program and nginx on unprivileged ports; Ctrl-C stops it all."""

import argparse
import getpass
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from minio import Minio

from appliance import config as appliance_config
from appliance import devstack, firstboot, logs
from appliance.cli import program_rows
from appliance.config import Appliance, ConfigProblems
from appliance.database import ServiceError
from appliance.files import write_private_file
from appliance.programs import PROGRAMS, healthy
from appliance.supervisor import SUPERVISORD, Supervisor, SupervisorUnavailable

REPO = Path(__file__).resolve().parents[1]
# The outbound-address guard is on, as on an appliance: shared backends (the platform's) may be on localhost; a
# developer whose tenants' backends or webhook receivers are there says so, e.g. `WEBHOOK_ALLOW_PRIVATE_TARGETS=true`.
GUARD_KEYS = ("WEBHOOK_ALLOW_PRIVATE_TARGETS", "BACKEND_ALLOW_PRIVATE_TARGETS")
# Settings a developer may override from the shell, e.g. `HTTPS_PORT=9443 make run`, besides GUARD_KEYS.
PORT_KEYS = ("HTTPS_PORT", "HTTP_REDIRECT_PORT", "GRPC_TLS_PORT", "APPLIANCE_METRICS_PORT", "HTTP_PORT",
                  "GRPC_PORT", "BUNKER_PROXY_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT", "LINK_METRICS_PORT")
LOCAL_PORTS = {"HTTPS_PORT": "8443", "HTTP_REDIRECT_PORT": "8080", "GRPC_TLS_PORT": "8444"}
READY_TIMEOUT_S = 90.0
BUCKET = "scaigrid"


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def child_env() -> dict[str, str]:
    # Settings come from the env file alone, never from a stray variable in the developer's shell.
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR") if key in os.environ}


def write_config(var: Path, redis: devstack.Redis, s3: devstack.S3Server, mariadb: devstack.MariaDB,
                 overrides: dict[str, str]) -> Path:
    """var/appliance.env: the appliance's keys pointed at ./var/, this venv and the private services."""
    values = {
        "APPLIANCE_HOSTNAME": "localhost",
        "APPLIANCE_USER": getpass.getuser(),
        "APPLIANCE_CONFIG_DIR": str(var / "etc"),
        "APPLIANCE_STATE_DIR": str(var / "lib"),
        "APPLIANCE_LOG_DIR": str(var / "log"),
        "APPLIANCE_RUN_DIR": str(var / "run"),
        "APPLIANCE_VENV": sys.prefix,
        "SYSTEMD_UNIT_DIR": str(var / "etc" / "systemd"),
        **LOCAL_PORTS,
        "DATABASE_PORT": str(mariadb.port),
        "APP_ENV": "development",
        "REDIS_URL": redis.url,
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "S3_ACCESS_KEY_ID": s3.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        "S3_BUCKET": BUCKET,
        **overrides,
    }
    path = var / "appliance.env"
    lines = ["# written by `make run` on every start; the appliance's own lives in /etc/scaigrid/appliance.env",
             *(f"{key}={value}" for key, value in values.items())]
    write_private_file(path, "\n".join(lines))
    return path


def first_boot(appliance: Appliance, mariadb: devstack.MariaDB) -> None:
    """The appliance's first-boot steps, except that the database comes from our private MariaDB's root."""
    config = appliance.config

    def create_database() -> None:
        password = appliance_config.read_secrets(appliance)["database-password"]
        mariadb.create_database(config.database_name, config.database_user, password)

    firstboot.run(appliance, create_database=create_database, say=lambda message: say(f"  {message}"))


def wait_until_ready(appliance: Appliance, supervisord: subprocess.Popen[bytes]) -> list[str]:
    """Waits for every program to be RUNNING and ready; returns the problems if that does not happen."""
    supervisor = Supervisor(appliance.config.supervisor_socket)
    deadline = time.monotonic() + READY_TIMEOUT_S
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        if supervisord.poll() is not None:
            return [f"supervisord exited with {supervisord.returncode}"]
        try:
            rows = program_rows(appliance)
        except SupervisorUnavailable:
            supervisor.wait_until_up(1.0)
            continue
        fatal = [row for row in rows if row["state"] == "FATAL"]
        if fatal:
            return [f"{row['name']} is FATAL" for row in fatal]
        if healthy(rows):
            return []
        time.sleep(0.5)
    return [f"{row['name']}: {row['state']}, ready {row['ready']}" for row in rows] or ["supervisord never answered"]


def start_supervisord(appliance: Appliance) -> subprocess.Popen[bytes]:
    config = appliance.config
    with (config.log_dir / "supervisord.out").open("ab") as out:
        return subprocess.Popen([SUPERVISORD, "-n", "-c", str(config.supervisord_conf)], cwd=REPO, env=child_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def interrupt(signum: int, frame: object) -> None:
    """The first Ctrl-C starts an orderly stop; further ones are ignored so no server is left behind."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def stop_supervisord(supervisord: subprocess.Popen[bytes] | None) -> None:
    if supervisord is None or supervisord.poll() is not None:
        return
    say("stopping the programs (each drains within its grace period)")
    supervisord.send_signal(signal.SIGTERM)
    try:
        supervisord.wait(300)
    except subprocess.TimeoutExpired:
        supervisord.kill()
        supervisord.wait()
    say(f"supervisord exited with {supervisord.returncode}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--var", type=Path, default=REPO / "var", help="state directory (default ./var)")
    args = parser.parse_args()
    var: Path = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)

    services: list[devstack.MariaDB | devstack.Redis | devstack.S3Server] = []
    supervisord: subprocess.Popen[bytes] | None = None
    # Ctrl-C reaches only us (children run in their own sessions); we stop them in order below.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        say(f"starting MariaDB, Redis and S3 under {var}")
        mariadb = devstack.start_mariadb(var / "mariadb")
        services.append(mariadb)
        redis = devstack.start_redis(var / "redis")
        services.append(redis)
        s3 = devstack.start_s3(var / "s3")
        services.append(s3)
        client = Minio(f"127.0.0.1:{s3.port}", access_key=s3.access_key_id, secret_key=s3.secret_access_key,
                       secure=False)
        if not client.bucket_exists(BUCKET):  # moto keeps buckets in memory: a new one on every start
            client.make_bucket(BUCKET)

        overrides = {key: os.environ[key] for key in (*PORT_KEYS, *GUARD_KEYS) if key in os.environ}
        appliance = appliance_config.load(write_config(var, redis, s3, mariadb, overrides))
        say("first-boot steps:")
        first_boot(appliance, mariadb)

        config = appliance.config
        say(f"starting supervisord ({config.supervisord_conf})")
        supervisord = start_supervisord(appliance)
        problems = wait_until_ready(appliance, supervisord)
        if problems:
            say("not ready: " + "; ".join(problems))
            for name in [program.name for program in PROGRAMS]:
                lines = logs.tail(config.log_dir / f"{name}.log", 5)
                if lines:
                    say(f"last lines of {config.log_dir / name}.log:")
                    print("".join(lines), end="", flush=True)
            return 1

        url = f"https://127.0.0.1:{config.https_port}"
        tool = f"{sys.prefix}/bin/scaigrid-appliance --config {appliance.path}"
        say("ready:")
        print(f"  API            {url}/v1/ and {url}/oai/v1/  (self-signed: curl --cacert {config.tls_cert})",
              flush=True)
        print(f"  admin key      {config.admin_key_file.read_text().strip()}  (also in {config.admin_key_file})",
              flush=True)
        print(f"  gRPC for nodes 127.0.0.1:{config.grpc_tls_port} (TLS)", flush=True)
        print(f"  programs       `{tool} status`; logs in {config.log_dir}", flush=True)
        print(f"  metrics        {url}/metrics and /metrics/<program>; Prometheus config "
              f"{config.config_dir}/prometheus/scaigrid.yml", flush=True)
        say("Ctrl-C stops everything")
        while supervisord.poll() is None:
            time.sleep(0.5)
        say(f"supervisord exited with {supervisord.returncode}; see {config.log_dir}/supervisord.log")
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except ConfigProblems as exc:
        say("bad appliance config:\n  " + "\n  ".join(exc.problems))
        return 2
    except (ServiceError, firstboot.StepFailed) as exc:
        say(f"failed: {exc}")
        return 1
    finally:
        stop_supervisord(supervisord)
        for service in reversed(services):
            service.stop()
        if services:
            say("MariaDB, Redis and S3 stopped")


if __name__ == "__main__":
    sys.exit(main())
