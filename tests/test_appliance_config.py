"""appliance.env, check-config and render as an operator runs them: all problems at once, files as readers see them."""

import configparser
import grp
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from supervisor.datatypes import boolean, byte_size

from appliance import config as appliance_config
from appliance import firstboot
from appliance.config import keys as appliance_keys
from appliance.local import child_env

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.prefix) / "bin" / "scaigrid-appliance"
# An unprivileged user other than ours, so the rendered `user=` lines and file owners show who runs what.
SERVICE_USER, SERVICE_GROUP = "nobody", "nogroup"
S3_SECRET = "s3-secret-in-appliance-env"


def write_env(path: Path, values: dict[str, str]) -> None:
    path.write_text("".join(f"{key}={value}\n" for key, value in values.items()))
    path.chmod(0o600)


def appliance_env(tmp_path: Path, **values: str | None) -> Path:
    """An appliance.env whose directories lie under tmp_path; the files it needs (secrets, TLS) made as init would."""
    base = {
        "APPLIANCE_USER": SERVICE_USER,
        "APPLIANCE_CONFIG_DIR": str(tmp_path / "etc"),
        "APPLIANCE_STATE_DIR": str(tmp_path / "lib"),
        "APPLIANCE_LOG_DIR": str(tmp_path / "log"),
        "APPLIANCE_RUN_DIR": str(tmp_path / "run"),
        "APPLIANCE_VENV": sys.prefix,
        "SYSTEMD_UNIT_DIR": str(tmp_path / "systemd"),
        "S3_ENDPOINT_URL": "http://127.0.0.1:9000",
        "S3_ACCESS_KEY_ID": "scaigrid",
        "S3_SECRET_ACCESS_KEY": S3_SECRET,
    }
    tmp_path.mkdir(exist_ok=True)
    path = tmp_path / "appliance.env"
    write_env(path, {key: value for key, value in {**base, **values}.items() if value is not None})
    appliance = appliance_config.load(path)
    firstboot.ensure_dirs(appliance)
    firstboot.ensure_secrets(appliance)
    firstboot.ensure_tls(appliance)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CLI), *args], env=child_env(), capture_output=True, text=True, timeout=60, check=False)


def snapshot(root: Path) -> dict[Path, tuple[int, int, bytes]]:
    """Every file and directory under root with its mode, mtime and content: "writes nothing" compares two."""
    result = {}
    for path in root.rglob("*"):
        stat = path.lstat()
        result[path] = (stat.st_mode, stat.st_mtime_ns if path.is_file() else 0,
                        path.read_bytes() if path.is_file() else b"")
    return result


def secret_values(path: Path) -> list[str]:
    appliance = appliance_config.load(path)
    return [*appliance_config.read_secrets(appliance).values(), S3_SECRET]


def rendered(path: Path) -> dict[str, Path]:
    config = appliance_config.load(path).config
    return {
        "supervisord": config.supervisord_conf,
        "nginx": config.config_dir / "nginx.conf",
        "env": config.scaigrid_env_file,
        "prometheus": config.config_dir / "prometheus" / "scaigrid.yml",
        "alerts": config.config_dir / "prometheus" / "scaigrid-alerts.yml",
        "drop-in": config.systemd_unit_dir / "scaigrid-appliance.service.d" / "50-generated.conf",
    }


def ini(path: Path) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(path.read_text())
    return parser


def wrote(stdout: str) -> list[str]:
    """The files render says it wrote."""
    return [line.removeprefix("wrote ") for line in stdout.splitlines() if line.startswith("wrote ")]


def problem_lines(stderr: str) -> list[str]:
    """The problems check-config lists under its header line, one per line."""
    return [line.strip() for line in stderr.splitlines()[1:]]


# --- check-config ---

def test_check_config_lists_every_problem_on_its_own_line_and_writes_nothing(tmp_path: Path):
    path = appliance_env(tmp_path)
    config = appliance_config.load(path).config
    (config.secrets_dir / "jwt-signing-secret").chmod(0o644)
    write_env(path, {
        **appliance_config.read_env_file(path),
        "NO_SUCH_KEY": "1",
        "HTTPS_PORT": "70000",
        "METRICS_ALLOW_NETWORKS": "10.0.0.0/8,not-a-network",
        "RATE_LIMIT_KEY_RPM": "lots",
        "REDIS_URL": "redis+sentinel://:hunter2@sentinel-without-port/mymaster",
        "DATABASE_URL": "mysql+asyncmy://someone:database-password@db/scaigrid",
        "DISPATCH_STREAM_TIMEOUT_S": "600",
        "NGINX_PROXY_READ_TIMEOUT_S": "600",
        "TLS_CERT_FILE": str(tmp_path / "missing.crt"),
    })
    before = snapshot(tmp_path)

    for command in ("check-config", "render"):
        result = cli(command, "--config", str(path))

        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        assert result.stderr.splitlines()[0] == f"scaigrid-appliance: {path} has 10 problem(s):"
        problems = {line.split(":", 1)[0]: line for line in problem_lines(result.stderr)}
        jwt_secret = str(config.secrets_dir / "jwt-signing-secret")
        assert len(problems) == 10 and problems.keys() == {
            "NO_SUCH_KEY", "HTTPS_PORT", "METRICS_ALLOW_NETWORKS", "RATE_LIMIT_KEY_RPM", "REDIS_URL", "DATABASE_URL",
            "NGINX_PROXY_READ_TIMEOUT_S", "TLS_CERT_FILE", "TLS_CERT_FILE, TLS_KEY_FILE", jwt_secret}
        assert "unknown key" in problems["NO_SUCH_KEY"]
        assert "70000" in problems["HTTPS_PORT"]
        assert "'not-a-network'" in problems["METRICS_ALLOW_NETWORKS"]
        assert "'lots'" in problems["RATE_LIMIT_KEY_RPM"]
        assert "set by the appliance" in problems["DATABASE_URL"]
        assert "600 <= 600" in problems["NGINX_PROXY_READ_TIMEOUT_S"]
        assert "missing.crt does not exist" in problems["TLS_CERT_FILE"]
        assert "mode 644" in problems[jwt_secret]
        # Neither a secret setting's value nor the appliance-owned URL's password is ever echoed.
        assert "hunter2" not in result.stderr and "database-password" not in result.stderr
        assert snapshot(tmp_path) == before


def test_check_config_ok_on_a_good_config(tmp_path: Path):
    path = appliance_env(tmp_path)

    result = cli("check-config", "--config", str(path))

    assert (result.returncode, result.stdout, result.stderr) == (0, f"{path}: ok\n", "")


def test_check_config_before_init_names_each_missing_file(tmp_path: Path):
    path = appliance_env(tmp_path)
    config = appliance_config.load(path).config
    shutil.rmtree(config.secrets_dir)
    shutil.rmtree(config.tls_cert.parent)

    result = cli("check-config", "--config", str(path))

    assert result.returncode == 2
    lines = problem_lines(result.stderr)
    assert len(lines) == 2 + 5  # certificate, key, and the five secrets of a config without Garage
    assert all("scaigrid-appliance init" in line for line in lines)


# --- render ---

def test_render_writes_every_file_once_marked_generated_and_the_env_file_private(tmp_path: Path):
    path = appliance_env(tmp_path)
    files = rendered(path)

    first = cli("render", "--config", str(path))

    assert first.returncode == 0, first.stderr
    assert sorted(wrote(first.stdout)) == sorted(map(str, files.values()))
    for name, file in files.items():
        assert "generated" in file.read_text().splitlines()[0], name
        assert file.read_text().splitlines()[0].startswith(("#", ";")), name  # a comment in every file's syntax
        assert file.stat().st_mode & 0o777 == (0o600 if name == "env" else 0o644), name
    owner = files["env"].stat()
    assert (owner.st_uid, owner.st_gid) == (pwd.getpwnam(SERVICE_USER).pw_uid, grp.getgrnam(SERVICE_GROUP).gr_gid)
    before = snapshot(tmp_path)

    second = cli("render", "--config", str(path))

    assert second.returncode == 0, second.stderr
    assert second.stdout == f"0 file(s) changed, {len(files)} unchanged\n"
    assert snapshot(tmp_path) == before


def test_render_root_writes_under_that_root_only(tmp_path: Path):
    path = appliance_env(tmp_path / "host")
    config = appliance_config.load(path).config
    image = tmp_path / "image"
    # An image build brings its own secrets and certificate: render reads them under the root too.
    for directory in (config.secrets_dir, config.tls_cert.parent):
        shutil.copytree(directory, appliance_config.under(image, directory))
    before = snapshot(tmp_path / "host")

    result = cli("render", "--config", str(path), "--root", str(image))

    assert result.returncode == 0, result.stderr
    assert snapshot(tmp_path / "host") == before
    for file in rendered(path).values():
        assert appliance_config.under(image, file).is_file()
    assert sorted(wrote(result.stdout)) == sorted(str(appliance_config.under(image, file))
                                                  for file in rendered(path).values())


def test_render_diff_shows_changes_writes_nothing_and_never_prints_a_secret(tmp_path: Path):
    path = appliance_env(tmp_path, HTTPS_PORT="8443")
    config = appliance_config.load(path).config
    old_secrets = secret_values(path)

    new = cli("render", "--config", str(path), "--diff")

    assert new.returncode == 0, new.stderr
    for file in rendered(path).values():
        assert f"+++ {file}" in new.stdout
    assert not any(value in new.stdout for value in old_secrets)
    assert cli("render", "--config", str(path)).returncode == 0

    write_env(path, {**appliance_config.read_env_file(path), "HTTPS_PORT": "9443"})
    jwt = config.secrets_dir / "jwt-signing-secret"
    jwt.write_text("a-rotated-jwt-secret-value")
    before = snapshot(tmp_path)

    changed = cli("render", "--config", str(path), "--diff")

    assert changed.returncode == 0, changed.stderr
    assert re.search(r"^-\s+listen 8443 ssl", changed.stdout, re.MULTILINE)
    assert re.search(r"^\+\s+listen 9443 ssl", changed.stdout, re.MULTILINE)
    assert f"+++ {config.scaigrid_env_file}\n(holds secrets: content not shown)" in changed.stdout
    assert not any(value in changed.stdout for value in [*old_secrets, "a-rotated-jwt-secret-value"])
    assert snapshot(tmp_path) == before


# --- what supervisord, systemd, nginx and Prometheus will read ---

def test_supervisord_programs_restart_stop_in_time_and_cap_their_logs(tmp_path: Path):
    path = appliance_env(tmp_path, HTTP_DRAIN_GRACE_S="45", GRPC_STOP_GRACE_S="12", WORKER_STOP_GRACE_S="20",
                         HTTP_PROCESSES="3", WORKER_PROCESSES="2")
    assert cli("render", "--config", str(path)).returncode == 0
    config = appliance_config.load(path).config
    files = rendered(path)
    supervisord = ini(files["supervisord"])

    programs = {s.removeprefix("program:"): supervisord[s] for s in supervisord.sections() if s.startswith("program:")}
    assert sorted(programs) == ["bunker_proxy", "grpc", "http_1", "http_2", "http_3", "nginx", "worker_1", "worker_2"]
    for name, program in programs.items():
        assert boolean(program["autorestart"]), name
        assert int(program["startsecs"]) > 0 and int(program["startretries"]) > 0, name
        assert boolean(program["stopasgroup"]) and boolean(program["killasgroup"]), name
        assert program["stdout_logfile"] == str(config.log_dir / f"{name}.log"), name
        assert byte_size(program["stdout_logfile_maxbytes"]) > 0 and int(program["stdout_logfile_backups"]) > 0, name
        # Only nginx's master runs as root (port 443, the TLS key); its workers drop to the user in nginx.conf.
        assert program.get("user") == (None if name == "nginx" else SERVICE_USER), name
    grace_s = {"http_1": 45, "http_3": 45, "bunker_proxy": 45, "nginx": 45, "grpc": 12, "worker_2": 20}
    for name, seconds in grace_s.items():
        assert int(programs[name]["stopwaitsecs"]) > seconds, name
    # supervisord stops high priorities first: nginx goes after the programs whose streams it relays.
    assert all(int(programs["nginx"]["priority"]) < int(programs[name]["priority"]) for name in grace_s
               if name != "nginx")
    assert f"user {SERVICE_USER};" in files["nginx"].read_text().splitlines()

    events = supervisord["eventlistener:events"]
    assert events["events"] == "PROCESS_STATE" and boolean(events["autorestart"]) and events["user"] == SERVICE_USER
    socket = supervisord["unix_http_server"]
    assert (socket["chmod"], socket["chown"]) == ("0770", f"root:{SERVICE_GROUP}")

    # A program of several processes is a group; its processes stop together, each draining in its own time.
    groups = {s.removeprefix("group:"): supervisord[s]["programs"].split(",") for s in supervisord.sections()
              if s.startswith("group:")}
    assert groups == {"http": ["http_1", "http_2", "http_3"], "worker": ["worker_1", "worker_2"]}
    for name in groups:
        assert supervisord[f"group:{name}"]["priority"] == programs[f"{name}_1"]["priority"], name
    grouped = {member for members in groups.values() for member in members}
    stop_waits_s = [int(section.get("stopwaitsecs", "10")) for section in supervisord.values()
                    if section.name.startswith(("program:", "eventlistener:"))
                    and section.name.removeprefix("program:") not in grouped]
    stop_waits_s += [max(int(programs[member]["stopwaitsecs"]) for member in members) for members in groups.values()]
    # supervisord stops groups one after another: systemd must wait out all of them before it kills.
    assert int(ini(files["drop-in"])["Service"]["TimeoutStopSec"]) > sum(stop_waits_s)


def test_garage_runs_as_a_program_and_the_storage_proxy_points_at_it(tmp_path: Path):
    path = appliance_env(tmp_path, GARAGE_ENABLED="true", GARAGE_S3_PORT="13900", S3_ENDPOINT_URL=None,
                         S3_ACCESS_KEY_ID=None, S3_SECRET_ACCESS_KEY=None)
    assert cli("render", "--config", str(path)).returncode == 0
    config = appliance_config.load(path).config
    secrets = appliance_config.read_secrets(appliance_config.load(path))

    supervisord = ini(config.supervisord_conf)
    assert f"{config.config_dir}/garage.toml" in supervisord["program:garage"]["command"]
    assert supervisord["program:garage"]["user"] == SERVICE_USER
    assert "program:bunker_proxy" in supervisord
    garage_toml = config.config_dir / "garage.toml"
    assert "generated" in garage_toml.read_text().splitlines()[0]
    assert garage_toml.stat().st_mode & 0o777 == 0o600
    assert f'rpc_secret = "{secrets["garage-rpc-secret"]}"' in garage_toml.read_text()
    env = appliance_config.read_env_file(config.scaigrid_env_file)
    assert env["S3_ENDPOINT_URL"] == "http://127.0.0.1:13900"
    assert env["S3_ACCESS_KEY_ID"] == secrets["garage-s3-key-id"]
    assert env["S3_SECRET_ACCESS_KEY"] == secrets["garage-s3-secret"]
    jobs = {job["job_name"] for job in yaml.safe_load(rendered(path)["prometheus"].read_text())["scrape_configs"]}
    assert {"scaigrid_garage", "scaigrid_bunker_proxy"} <= jobs

    # With Garage on, the appliance owns the S3 settings: one given by hand is a problem, not silently overridden.
    write_env(path, {**appliance_config.read_env_file(path), "S3_ENDPOINT_URL": "http://elsewhere:9000"})
    result = cli("check-config", "--config", str(path))
    assert result.returncode == 2
    assert problem_lines(result.stderr) == [
        "S3_ENDPOINT_URL: set by the appliance (from CONFIG_DIR/secrets and its own keys); remove it"]


def test_without_s3_or_garage_there_is_no_storage_proxy_anywhere(tmp_path: Path):
    path = appliance_env(tmp_path, S3_ENDPOINT_URL=None, S3_ACCESS_KEY_ID=None, S3_SECRET_ACCESS_KEY=None)

    result = cli("render", "--config", str(path))

    assert result.returncode == 0, result.stderr
    files = rendered(path)
    for name in ("supervisord", "nginx", "prometheus"):
        assert "bunker_proxy" not in files[name].read_text(), name
    jobs = {job["job_name"] for job in yaml.safe_load(files["prometheus"].read_text())["scrape_configs"]}
    assert jobs == {"scaigrid_http", "scaigrid_grpc", "scaigrid_worker", "scaigrid_events"}


# --- the operator's guide ---

def test_every_appliance_key_is_documented_with_its_default():
    guide = (REPO / "docs" / "appliance.md").read_text()
    rows = dict(re.findall(r"^\| `([A-Z0-9_]+)` \| (.*?) \|", guide, re.MULTILINE))
    documented = {key.name: ("—" if not key.default else f"`{key.default}`")
                  for key in appliance_keys()}
    assert rows == documented


# --- several http and worker processes ---

def test_each_http_and_worker_process_gets_its_own_port_upstream_server_and_scrape_target(tmp_path: Path):
    path = appliance_env(tmp_path, HTTP_PROCESSES="3", WORKER_PROCESSES="2", HTTP_PORT="18100",
                         WORKER_METRICS_PORT="19200")

    assert cli("render", "--config", str(path)).returncode == 0

    files = rendered(path)
    supervisord = ini(files["supervisord"])
    # Each process's port is in its own environment, which the scaigrid settings take over the env file's.
    environments = {name: supervisord[f"program:{name}"]["environment"] for name in
                    ("http_1", "http_2", "http_3", "worker_1", "worker_2")}
    assert [re.findall(r'(?:HTTP_PORT|WORKER_METRICS_PORT)="(\d+)"', text) for text in environments.values()] == [
        ["18100"], ["18101"], ["18102"], ["19200"], ["19201"]]
    nginx = files["nginx"].read_text()
    upstream = nginx.split("upstream scaigrid_http {")[1].split("}")[0]
    assert re.findall(r"server 127\.0\.0\.1:(\d+) max_fails=0;", upstream) == ["18100", "18101", "18102"]
    assert "least_conn;" in upstream and "keepalive" in upstream
    for name, port in (("http_2", 18101), ("worker_2", 19201)):
        assert f"location = /metrics/{name} {{" in nginx
        assert f"proxy_pass http://127.0.0.1:{port}/metrics;" in nginx
    jobs = {job["job_name"]: job for job in yaml.safe_load(files["prometheus"].read_text())["scrape_configs"]}
    http_targets = jobs["scaigrid_http"]["static_configs"]
    assert [(target["labels"]["process"], target["labels"]["__metrics_path__"]) for target in http_targets] == [
        ("http_1", "/metrics/http_1"), ("http_2", "/metrics/http_2"), ("http_3", "/metrics/http_3")]


def test_http_processes_default_to_one_per_cpu_the_appliance_may_use(tmp_path: Path):
    path = appliance_env(tmp_path)

    assert cli("render", "--config", str(path)).returncode == 0

    supervisord = ini(rendered(path)["supervisord"])
    cpus = len(os.sched_getaffinity(0))
    assert supervisord["group:http"]["programs"].split(",") == [f"http_{i + 1}" for i in range(cpus)]
    assert supervisord["group:worker"]["programs"] == "worker_1"


def test_check_config_names_the_listener_a_range_of_processes_runs_into(tmp_path: Path):
    # ScaiGrid's own defaults: BUNKER_PROXY_PORT 8001 right above HTTP_PORT 8000, the event listener's 9153 above 9152.
    path = appliance_env(tmp_path)
    write_env(path, {**appliance_config.read_env_file(path), "HTTP_PROCESSES": "3", "HTTP_PORT": "8000",
                     "WORKER_PROCESSES": "2", "WORKER_METRICS_PORT": "9152"})

    result = cli("check-config", "--config", str(path))

    assert result.returncode == 2
    assert problem_lines(result.stderr) == [
        "HTTP_PROCESSES: port 8001 (HTTP_PORT + 1 (http_2)) is also BUNKER_PROXY_PORT's",
        "WORKER_PROCESSES: port 9153 (WORKER_METRICS_PORT + 1 (worker_2)) is also APPLIANCE_METRICS_PORT's"]

    write_env(path, {**appliance_config.read_env_file(path), "HTTP_PORT": "65534", "WORKER_METRICS_PORT": "9200"})
    result = cli("check-config", "--config", str(path))
    assert problem_lines(result.stderr) == ["HTTP_PROCESSES: 3 processes from HTTP_PORT 65534 run past port 65535"]
