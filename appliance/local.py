"""`make run`: the whole appliance on this machine: private MariaDB, Redis and S3 under ./var/, first-boot steps,
then supervisord with every program and nginx on unprivileged ports; Ctrl-C stops it all."""

import argparse
import getpass
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from minio import Minio

from appliance import config as appliance_config
from appliance import devstack, firstboot, logs
from appliance.cli import program_rows
from appliance.config import Appliance, ConfigProblems
from appliance.config import keys as appliance_keys
from appliance.database import ServiceError
from appliance.files import write_private_file
from appliance.programs import Context, healthy, processes
from appliance.supervisor import SUPERVISORD, Supervisor, SupervisorUnavailable
from scaigrid.settings import ConfigError, parse_port, read_env_file, setting_parsers

REPO = Path(__file__).resolve().parents[1]
# The outbound-address guard is on, as on an appliance: shared backends (the platform's, such as the demo model) may be
# on localhost; a developer whose tenants' backends or webhook receivers are there says so, e.g.
# `WEBHOOK_ALLOW_PRIVATE_TARGETS=true` in var/local.env.
# make run's own listeners, unprivileged; PORT_KEYS are every listener, which tests move all at once.
PORT_KEYS = ("HTTPS_PORT", "HTTP_REDIRECT_PORT", "GRPC_TLS_PORT", "APPLIANCE_METRICS_PORT", "HTTP_PORT",
             "GRPC_PORT", "BUNKER_PROXY_PORT", "GRPC_METRICS_PORT", "WORKER_METRICS_PORT", "LINK_METRICS_PORT")
LOCAL_DEFAULTS = {"HTTPS_PORT": "8443", "HTTP_REDIRECT_PORT": "8080", "GRPC_TLS_PORT": "8444",
                  # Only this machine reaches a development appliance; an operator may widen it in var/local.env.
                  "NGINX_LISTEN_ADDRESS": "127.0.0.1", "APP_ENV": "development"}
# make run's own setting: its private services take this port and the next ones (SERVICES in that order).
BASE_PORT_KEY, DEFAULT_BASE_PORT = "SERVICES_BASE_PORT", 8450
SERVICES = ("MariaDB", "Redis", "S3", "demo model")
# Keys make run itself sets, from where it runs and the services it started: an override would point at nothing.
MAKE_RUN_KEYS = ("APPLIANCE_USER", "APPLIANCE_CONFIG_DIR", "APPLIANCE_STATE_DIR", "APPLIANCE_LOG_DIR",
                 "APPLIANCE_RUN_DIR", "APPLIANCE_VENV", "SYSTEMD_UNIT_DIR", "DATABASE_HOST", "DATABASE_PORT",
                 "DATABASE_ADMIN_SOCKET")
LOCAL_ENV = "local.env"
LOCAL_ENV_HEADER = """\
# make run's settings, kept across restarts: make run reads this file at every start and never writes it again.
# Any key of docs/appliance.md's appliance.env table or any ScaiGrid setting of README.md, KEY=VALUE, e.g.
#   HYBRID_ROLE=managed                  # this stack is the managed side of docs/hybrid.md
#   HTTPS_PORT=9443                      # move a listener
#   WEBHOOK_ALLOW_PRIVATE_TARGETS=true   # tenants' webhooks may reach localhost
# and make run's own SERVICES_BASE_PORT (default 8450): MariaDB, Redis, S3 and the demo model take it and the next
# three ports. The same keys in the environment (`HTTPS_PORT=9443 make run`) win over this file for one start.
"""
READY_TIMEOUT_S = 90.0
BUCKET = "scaigrid"
DEMO_SLUG, DEMO_BACKEND = "demo/echo", "demo-echo"
DEMO_MARKER = "demo-model.created"


def say(message: str) -> None:
    print(f"[make run] {message}", flush=True)


def child_env() -> dict[str, str]:
    # Settings come from the env file alone, never from a stray variable in the developer's shell. PYTHONPATH
    # passes so that a checkout put first on the path (a worktree on a shared venv) is what every program runs.
    return {key: os.environ[key] for key in ("PATH", "HOME", "LANG", "TMPDIR", "PYTHONPATH") if key in os.environ}


class LocalProblems(Exception):
    """var/local.env (or the environment) names a key make run cannot take; one line per problem."""


def overrides(var: Path, environ: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """The operator's keys: var/local.env, then the environment over it; and a note for each variable ignored.

    A key of local.env that make run or the appliance sets itself is refused (the operator wrote it on purpose); the
    same variable in the shell is only ignored, as it may be there for something else.
    """
    path = var / LOCAL_ENV
    if not path.exists():
        write_private_file(path, LOCAL_ENV_HEADER)
    try:
        kept = read_env_file(path)
    except ConfigError as exc:
        raise LocalProblems(str(exc)) from None
    known = {k.name for k in appliance_keys()} | set(setting_parsers()) | {BASE_PORT_KEY}
    owned = {*MAKE_RUN_KEYS, *appliance_config.OWNED_SETTINGS, *appliance_config.LINK_OWNED_SETTINGS}
    problems = [f"{path}: {name}: " + ("set by make run or the appliance; remove it" if name in owned else
                                       "unknown key (see docs/appliance.md and README.md's Settings)")
                for name in kept if name in owned or name not in known]
    if problems:
        raise LocalProblems("\n".join(problems))
    notes = [f"ignoring {name} from the environment: make run or the appliance sets it"
             for name in sorted(owned & set(environ) - {"APPLIANCE_USER"})]
    return {**kept, **{name: environ[name] for name in known - owned if name in environ}}, notes


def base_port(values: Mapping[str, str]) -> int:
    raw = values.get(BASE_PORT_KEY, str(DEFAULT_BASE_PORT))
    try:
        port = parse_port(raw)
    except ValueError:
        raise LocalProblems(f"{BASE_PORT_KEY}: expected a port, got {raw!r}") from None
    if port + len(SERVICES) - 1 > 65535:
        raise LocalProblems(f"{BASE_PORT_KEY}: {port} leaves no room for {len(SERVICES)} ports")
    return port


def write_config(var: Path, redis: devstack.Redis, s3: devstack.S3Server, mariadb: devstack.MariaDB,
                 overrides: dict[str, str]) -> Path:
    """var/appliance.env: the appliance's keys pointed at ./var/, this venv and the private services, under the
    operator's overrides (var/local.env and the environment)."""
    values = {
        "APPLIANCE_HOSTNAME": "localhost",
        **LOCAL_DEFAULTS,
        "REDIS_URL": redis.url,
        "S3_ENDPOINT_URL": s3.endpoint_url,
        "S3_ACCESS_KEY_ID": s3.access_key_id,
        "S3_SECRET_ACCESS_KEY": s3.secret_access_key,
        "S3_BUCKET": BUCKET,
        "APPLIANCE_USER": getpass.getuser(),
        "APPLIANCE_CONFIG_DIR": str(var / "etc"),
        "APPLIANCE_STATE_DIR": str(var / "lib"),
        "APPLIANCE_LOG_DIR": str(var / "log"),
        "APPLIANCE_RUN_DIR": str(var / "run"),
        "APPLIANCE_VENV": sys.prefix,
        "SYSTEMD_UNIT_DIR": str(var / "etc" / "systemd"),
        "DATABASE_PORT": str(mariadb.port),
        # Last, so they win: make run's operator cannot name MAKE_RUN_KEYS (`overrides` refuses them), while a test
        # stack may (its appliance's own venv, for upgrade).
        **{key: value for key, value in overrides.items() if key != BASE_PORT_KEY},
    }
    path = var / "appliance.env"
    lines = [f"# written by `make run` at every start from {var / LOCAL_ENV} and the environment: edit that file,",
             "# not this one (the appliance's own lives in /etc/scaigrid/appliance.env)",
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
    """supervisord -n, its own output beside appliance.env, standing in for the journal systemd gives it.

    Not in the log directory: supervisord prints a failed log write's traceback to its output, and a write to a full
    disk failing in turn raises out of its loop; supervisord then dies, leaving its programs behind."""
    config = appliance.config
    with (appliance.path.parent / "supervisord.out").open("ab") as out:
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


def demo_model(appliance: Appliance, var: Path, demo: devstack.DemoServer) -> None:
    """Routes `demo/echo` to the demo server, once: an operator who deleted the model does not get it back. Later
    starts only move its backend to the demo server's port, should SERVICES_BASE_PORT have changed."""
    marker = var / DEMO_MARKER
    created = marker.exists()
    if created and marker.read_text().strip() == demo.url:
        return
    tables: list[tuple[str, dict[str, object]]] = [
        ("backends", {"id": DEMO_BACKEND, "provider": "custom", "base_url": demo.url, "model": "echo"})]
    if not created:
        tables.append(("models", {"slug": DEMO_SLUG, "display_name": "Demo: echoes your last message (make run only)",
                                  "modality": "chat", "routes": [{"backend": DEMO_BACKEND}]}))
    catalogue = var / "demo-model.toml"
    catalogue.write_text("".join(f"[[{table}]]\n" + "".join(f"{key} = {toml_value(value)}\n"
                                                             for key, value in item.items())
                                 for table, item in tables))
    result = firstboot.scaigrid(appliance, "admin", "apply", str(catalogue))
    if result.returncode != 0:
        raise firstboot.StepFailed(f"adding the demo model failed: {(result.stdout + result.stderr).strip()}")
    marker.write_text(demo.url + "\n")
    say(f"  {'moved the demo model to ' + demo.url if created else 'added the demo model ' + DEMO_SLUG}")


def toml_value(value: object) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key} = {toml_value(item)}" for key, item in value.items()) + "}"
    return json.dumps(value)  # a JSON string is a TOML basic string


def banner(appliance: Appliance, var: Path) -> None:
    config = appliance.config
    url = f"https://127.0.0.1:{config.https_port}"
    tool = f"{sys.prefix}/bin/scaigrid-appliance --config {appliance.path}"
    say("ready:")
    lines = [
        f"API            {url}/v1/ and {url}/oai/v1/  (self-signed: curl --cacert {config.tls_cert})",
        f"admin key      {config.admin_key_file.read_text().strip()}  (also in {config.admin_key_file})",
        f"first call     model {DEMO_SLUG} streams your last message back (README.md, \"Using the node from an "
        "OpenAI SDK\")",
        f"gRPC for nodes 127.0.0.1:{config.grpc_tls_port} (TLS)",
        f"programs       `{tool} status`; logs in {config.log_dir}",
        f"scaigrid CLI   `{sys.prefix}/bin/scaigrid --env-file {config.scaigrid_env_file} admin ...`",
        f"metrics        {url}/metrics/<process> (http_1, grpc, ...: `status` lists them); Prometheus config "
        f"{config.config_dir}/prometheus/scaigrid.yml",
        f"settings       {var / LOCAL_ENV} (kept across restarts; `make run` again applies them)",
    ]
    if config.openai_hostname:
        lines.insert(1, f"OpenAI SDKs    base_url https://{config.openai_hostname}:{config.https_port}/v1 "
                        f"(that name must resolve to {config.nginx_listen_address or 'this machine'})")
    for line in lines:
        print(f"  {line}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--var", type=Path, default=REPO / "var", help="state directory (default ./var)")
    args = parser.parse_args()
    var: Path = args.var.resolve()
    var.mkdir(parents=True, exist_ok=True)

    services: list[devstack.MariaDB | devstack.Redis | devstack.S3Server | devstack.DemoServer] = []
    supervisord: subprocess.Popen[bytes] | None = None
    # Ctrl-C reaches only us (children run in their own sessions); we stop them in order below.
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    try:
        values, notes = overrides(var, os.environ)
        for note in notes:
            say(note)
        port = base_port(values)
        say(f"starting MariaDB, Redis, S3 and the demo model under {var} on 127.0.0.1:{port}-{port + 3} "
            f"({BASE_PORT_KEY} moves them)")
        mariadb = devstack.start_mariadb(var / "mariadb", port)
        services.append(mariadb)
        redis = devstack.start_redis(var / "redis", port + 1)
        services.append(redis)
        s3 = devstack.start_s3(var / "s3", port + 2)
        services.append(s3)
        demo = devstack.start_demo(var / "demo", port + 3)
        services.append(demo)
        client = Minio(f"127.0.0.1:{s3.port}", access_key=s3.access_key_id, secret_key=s3.secret_access_key,
                       secure=False)
        if not client.bucket_exists(BUCKET):  # moto keeps buckets in memory: a new one on every start
            client.make_bucket(BUCKET)

        appliance = appliance_config.load(write_config(var, redis, s3, mariadb, values))
        say("first-boot steps:")
        first_boot(appliance, mariadb)
        demo_model(appliance, var, demo)

        config = appliance.config
        say(f"starting supervisord ({config.supervisord_conf})")
        supervisord = start_supervisord(appliance)
        problems = wait_until_ready(appliance, supervisord)
        if problems:
            say("not ready: " + "; ".join(problems))
            for name in [process.name for process in processes(Context(appliance, appliance.settings()))]:
                lines = logs.tail(config.log_dir / f"{name}.log", 5)
                if lines:
                    say(f"last lines of {config.log_dir / name}.log:")
                    print("".join(lines), end="", flush=True)
            return 1

        banner(appliance, var)
        say("Ctrl-C stops everything")
        while supervisord.poll() is None:
            time.sleep(0.5)
        say(f"supervisord exited with {supervisord.returncode}; see {config.log_dir}/supervisord.log")
        return 1
    except KeyboardInterrupt:
        say("stopping")
        return 0
    except LocalProblems as exc:
        say("bad make run settings:\n  " + str(exc).replace("\n", "\n  "))
        return 2
    except ConfigProblems as exc:
        say("bad appliance config (from var/local.env or the environment):\n  " + "\n  ".join(exc.problems))
        return 2
    except (ServiceError, firstboot.StepFailed) as exc:
        say(f"failed: {exc}")
        if isinstance(exc, ServiceError) and "already in use" in str(exc):
            say(f"another make run (or another server) holds that port: set {BASE_PORT_KEY} in {var / LOCAL_ENV}")
        return 1
    finally:
        stop_supervisord(supervisord)
        for service in reversed(services):
            service.stop()
        if services:
            say("MariaDB, Redis, S3 and the demo model stopped")


if __name__ == "__main__":
    sys.exit(main())
