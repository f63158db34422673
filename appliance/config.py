"""The appliance's one config file (/etc/scaigrid/appliance.env): its keys, defaults, secrets and validation."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.fernet import Fernet

from scaigrid.settings import (
    ConfigError,
    Settings,
    entries,
    load_settings,
    parse_bool,
    parse_port,
    parse_positive_int,
    read_env_file,
    setting_parsers,
)

DEFAULT_CONFIG = Path("/etc/scaigrid/appliance.env")
# Streams may run for DISPATCH_STREAM_TIMEOUT_S; nginx must wait longer, or it cuts them before the gateway does.
PROXY_READ_MARGIN_S = 60


class ConfigProblems(Exception):
    """The appliance config is wrong; one line per problem, each naming its key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _name(raw: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", raw):
        raise ValueError("a user name such as scaigrid")
    return raw


def _hostname(raw: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", raw):
        raise ValueError("a DNS name or IP address such as scaigrid.example.com")
    return raw


# Paths land unquoted in nginx and supervisord configs, where these characters end or change a directive.
_PATH_UNSAFE = re.compile(r"""[\s;{}'"%$#\\]""")


def _optional_hostname(raw: str) -> str | None:
    return _hostname(raw) if raw else None


def _optional_ip(raw: str) -> str | None:
    if not raw:
        return None
    try:
        return str(ipaddress.ip_address(raw))
    except ValueError:
        raise ValueError("an IP address such as 127.0.0.1") from None


def _absolute_path(raw: str) -> Path:
    path = Path(raw)
    if not path.is_absolute() or _PATH_UNSAFE.search(raw):
        raise ValueError("an absolute path without spaces or any of ;{}'\"%$#\\")
    return path


def _optional_path(raw: str) -> Path | None:
    return _absolute_path(raw) if raw else None


def _optional_seconds(raw: str) -> int | None:
    return parse_positive_int(raw) if raw else None


def _optional_count(raw: str) -> int | None:
    return parse_positive_int(raw) if raw else None


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask, which a VM's or a container's limits narrow)."""
    return len(os.sched_getaffinity(0))


def _networks(raw: str) -> tuple[str, ...]:
    items = tuple(item.strip() for item in raw.split(",") if item.strip())
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"comma-separated networks in CIDR form, e.g. 10.0.0.0/8 ({item!r} is not one)") from None
    return items


def key(name: str, parse: Callable[[str], Any], default: str, help: str) -> Any:
    """Declares one appliance key: its name, parser, default (as written in the file) and meaning."""
    return field(metadata={"key": name, "parse": parse, "default": default, "help": help})


@dataclass(frozen=True)
class ApplianceConfig:
    hostname: str = key("APPLIANCE_HOSTNAME", _hostname, "localhost",
                        "DNS name clients use: nginx server_name and the self-signed certificate's name")
    openai_hostname: str | None = key(
        "OPENAI_HOSTNAME", _optional_hostname, "",
        "DNS name of an extra nginx server whose /v1/ is the OpenAI-compatible API (/oai/v1/); empty: none")
    user: str = key("APPLIANCE_USER", _name, "scaigrid", "unprivileged user every program but nginx's master runs as")
    config_dir: Path = key("APPLIANCE_CONFIG_DIR", _absolute_path, "/etc/scaigrid",
                           "rendered configs, secrets/ and tls/")
    state_dir: Path = key("APPLIANCE_STATE_DIR", _absolute_path, "/var/lib/scaigrid",
                          "state: first-boot marker, program-state record, backups, nginx temp files")
    log_dir: Path = key("APPLIANCE_LOG_DIR", _absolute_path, "/var/log/scaigrid", "one log per program, rotated")
    run_dir: Path = key("APPLIANCE_RUN_DIR", _absolute_path, "/run/scaigrid", "supervisord's control socket and pid")
    venv: Path = key("APPLIANCE_VENV", _absolute_path, "/opt/scaigrid/venv",
                     "virtualenv holding scaigrid and scaigrid-appliance")
    systemd_unit_dir: Path = key("SYSTEMD_UNIT_DIR", _absolute_path, "/etc/systemd/system",
                                 "where render writes scaigrid-appliance.service's drop-in (its stop timeout)")
    https_port: int = key("HTTPS_PORT", parse_port, "443", "nginx: the API over TLS")
    http_redirect_port: int = key("HTTP_REDIRECT_PORT", parse_port, "80", "nginx: plain HTTP, redirected to HTTPS")
    grpc_tls_port: int = key("GRPC_TLS_PORT", parse_port, "50443",
                             "nginx: gRPC over TLS for ScaiInfer nodes and hybrid links")
    tls_cert_file: Path | None = key("TLS_CERT_FILE", _optional_path, "",
                                     "PEM certificate (chain); empty: CONFIG_DIR/tls/server.crt, self-signed by init")
    tls_key_file: Path | None = key("TLS_KEY_FILE", _optional_path, "",
                                    "PEM private key; empty: CONFIG_DIR/tls/server.key, made by init")
    nginx_listen_address: str | None = key(
        "NGINX_LISTEN_ADDRESS", _optional_ip, "",
        "the one address nginx listens on (e.g. 127.0.0.1, as under `make run`); empty: every interface")
    metrics_allow_networks: tuple[str, ...] = key(
        "METRICS_ALLOW_NETWORKS", _networks, "",
        "networks (CIDR, comma-separated) allowed to scrape /metrics through nginx, besides loopback")
    nginx_proxy_read_timeout_s: int | None = key(
        "NGINX_PROXY_READ_TIMEOUT_S", _optional_seconds, "",
        "how long nginx waits on a quiet upstream; empty: DISPATCH_STREAM_TIMEOUT_S + 60; must exceed it")
    appliance_metrics_port: int = key("APPLIANCE_METRICS_PORT", parse_port, "9153",
                                      "/metrics of the program-state listener (programs' states, FATAL counts)")
    http_processes: int | None = key(
        "HTTP_PROCESSES", _optional_count, "",
        "http processes, each on its own loopback port from HTTP_PORT on, behind nginx; empty: one per CPU the "
        "appliance sees (counted at render)")
    worker_processes: int = key("WORKER_PROCESSES", parse_positive_int, "1",
                                "worker processes, each with its /metrics from WORKER_METRICS_PORT on")
    database_host: str = key("DATABASE_HOST", _hostname, "127.0.0.1", "MariaDB host")
    database_port: int = key("DATABASE_PORT", parse_port, "3306", "MariaDB port")
    database_name: str = key("DATABASE_NAME", _name, "scaigrid", "MariaDB database")
    database_user: str = key("DATABASE_USER", _name, "scaigrid",
                             "MariaDB user (its password: secrets/database-password)")
    database_admin_socket: Path = key("DATABASE_ADMIN_SOCKET", _absolute_path, "/run/mysqld/mysqld.sock",
                                      "local MariaDB socket where init creates the database and user as root")
    garage_enabled: bool = key("GARAGE_ENABLED", parse_bool, "false", "run a local Garage S3 for the storage proxy")
    garage_binary: Path = key("GARAGE_BINARY", _absolute_path, "/usr/local/bin/garage", "Garage executable")
    garage_s3_port: int = key("GARAGE_S3_PORT", parse_port, "3900", "Garage S3 API (loopback)")
    garage_rpc_port: int = key("GARAGE_RPC_PORT", parse_port, "3901", "Garage RPC (loopback)")
    garage_admin_port: int = key("GARAGE_ADMIN_PORT", parse_port, "3903", "Garage admin API and /metrics (loopback)")

    @property
    def http_process_count(self) -> int:
        return self.http_processes or cpu_count()

    @property
    def tls_cert(self) -> Path:
        return self.tls_cert_file or self.config_dir / "tls" / "server.crt"

    @property
    def tls_key(self) -> Path:
        return self.tls_key_file or self.config_dir / "tls" / "server.key"

    @property
    def secrets_dir(self) -> Path:
        return self.config_dir / "secrets"

    @property
    def scaigrid_env_file(self) -> Path:
        return self.config_dir / "scaigrid.env"

    @property
    def link_file(self) -> Path:
        """The hybrid link (`scaigrid-appliance link enroll`): managed URL, node id, credential; its presence
        makes the appliance a node."""
        return self.secrets_dir / LINK_FILE

    @property
    def link_ca_file(self) -> Path:
        """The CA bundle given at enrolment, copied where the service user may read it (the original may not be)
        and where backups take it (with the TLS files)."""
        return self.config_dir / "tls" / "link-ca.pem"

    @property
    def supervisor_socket(self) -> Path:
        return self.run_dir / "supervisor.sock"

    @property
    def supervisord_conf(self) -> Path:
        return self.config_dir / "supervisord.conf"

    @property
    def firstboot_marker(self) -> Path:
        return self.state_dir / "firstboot.done"

    @property
    def program_states_file(self) -> Path:
        return self.state_dir / "events" / "program-states.json"

    @property
    def admin_key_file(self) -> Path:
        return self.secrets_dir / "admin-key"

    @property
    def wheels_dir(self) -> Path:
        """Installed wheels, `current` linking the running one: provision.sh and upgrade keep them for rollback."""
        return self.venv.parent / "wheels"

    @property
    def backups_dir(self) -> Path:
        return self.state_dir / "backups"


@dataclass(frozen=True)
class Key:
    name: str
    default: str
    help: str


def keys() -> Iterator[Key]:
    for f in dataclasses.fields(ApplianceConfig):
        yield Key(f.metadata["key"], f.metadata["default"], f.metadata["help"])


@dataclass(frozen=True)
class Secret:
    """One generated secret: a 0600 file in CONFIG_DIR/secrets/."""

    file: str
    make: Callable[[], str]
    garage_only: bool = False


SECRETS = (
    Secret("database-password", lambda: secrets.token_hex(24)),
    Secret("jwt-signing-secret", lambda: secrets.token_urlsafe(48)),
    Secret("encryption-key", lambda: Fernet.generate_key().decode()),
    Secret("service-token-secret", lambda: secrets.token_hex(32)),
    Secret("storage-capability-secret", lambda: secrets.token_hex(32)),
    # Garage's own formats: a 32-byte hex RPC secret; key ids are "GK" + 24 hex digits, secrets 64 hex digits.
    Secret("garage-rpc-secret", lambda: secrets.token_hex(32), garage_only=True),
    Secret("garage-admin-token", lambda: secrets.token_urlsafe(32), garage_only=True),
    Secret("garage-s3-key-id", lambda: "GK" + secrets.token_hex(12), garage_only=True),
    Secret("garage-s3-secret", lambda: secrets.token_hex(32), garage_only=True),
)

# ScaiGrid settings the appliance sets itself: from the secrets, or fixed because nginx fronts every listener.
OWNED_SETTINGS = ("SCAIGRID_MODE", "BIND_HOST", "DATABASE_URL", "JWT_SIGNING_SECRET", "SCAIGRID_ENCRYPTION_KEY",
                  "SERVICE_TOKEN_SECRET", "STORAGE_CAPABILITY_SECRET")
# The node's end of the hybrid link comes from the link file, written by `link enroll` and `link rotate`.
LINK_FILE = "link.json"
LINK_OWNED_SETTINGS = ("HYBRID_MANAGED_URL", "HYBRID_LINK_TARGET", "HYBRID_NODE_ID", "HYBRID_NODE_CREDENTIAL",
                       "HYBRID_CA_FILE")
GARAGE_OWNED_SETTINGS = ("S3_ENDPOINT_URL", "S3_ACCESS_KEY_ID", "S3_SECRET_ACCESS_KEY")
# The appliance's defaults where ScaiGrid's do not fit: its own Redis; and the http and worker processes' ports, which
# run from HTTP_PORT and WORKER_METRICS_PORT upwards, one per process, moved where a range has room (ScaiGrid's own
# HTTP_PORT 8000 has BUNKER_PROXY_PORT 8001 right above it, WORKER_METRICS_PORT 9152 the appliance's 9153).
SETTING_DEFAULTS = {"REDIS_URL": "redis://127.0.0.1:6379/0", "HTTP_PORT": "8100", "WORKER_METRICS_PORT": "9200"}


@dataclass(frozen=True)
class Appliance:
    """A validated appliance config and the ScaiGrid settings it renders to."""

    config: ApplianceConfig
    passthrough: Mapping[str, str]  # ScaiGrid settings given in appliance.env, as written
    path: Path

    def settings_env(self, secret_values: Mapping[str, str]) -> dict[str, str]:
        """The scaigrid env file's content: passed-through settings plus what the appliance derives."""
        c = self.config
        password = quote(secret_values["database-password"], safe="")
        env = {
            **SETTING_DEFAULTS,
            **self.passthrough,
            "BIND_HOST": "127.0.0.1",
            "DATABASE_URL": f"mysql+asyncmy://{c.database_user}:{password}@{c.database_host}:{c.database_port}/"
                            f"{c.database_name}",
            "JWT_SIGNING_SECRET": secret_values["jwt-signing-secret"],
            "SCAIGRID_ENCRYPTION_KEY": secret_values["encryption-key"],
            "SERVICE_TOKEN_SECRET": secret_values["service-token-secret"],
            "STORAGE_CAPABILITY_SECRET": secret_values["storage-capability-secret"],
        }
        if c.garage_enabled:
            env |= {"S3_ENDPOINT_URL": f"http://127.0.0.1:{c.garage_s3_port}",
                    "S3_ACCESS_KEY_ID": secret_values["garage-s3-key-id"],
                    "S3_SECRET_ACCESS_KEY": secret_values["garage-s3-secret"]}
        if LINK_FILE in secret_values:
            link = json.loads(secret_values[LINK_FILE])
            env |= {"HYBRID_ROLE": "node", "HYBRID_MANAGED_URL": link["url"],
                    "HYBRID_LINK_TARGET": link["link_target"], "HYBRID_NODE_ID": link["node_id"],
                    "HYBRID_NODE_CREDENTIAL": link["credential"]}
            if link["ca_file"] is not None:
                env["HYBRID_CA_FILE"] = link["ca_file"]
        return env

    def settings(self, secret_values: Mapping[str, str] | None = None) -> Settings:
        """The ScaiGrid settings every program will run with (placeholder secrets when none are given yet)."""
        values = secret_values or {s.file: s.make() for s in SECRETS}
        return load_settings(self.settings_env(values), _NO_ENV_FILE)

    @property
    def enrolled(self) -> bool:
        """A node of a managed ScaiGrid: it runs the link program and the HYBRID_* node settings."""
        return self.config.link_file.exists()

    @property
    def storage_enabled(self) -> bool:
        """bunker_proxy runs only with an S3 to proxy: Garage's, or one named by S3_ENDPOINT_URL."""
        return self.config.garage_enabled or bool(self.passthrough.get("S3_ENDPOINT_URL"))

    def proxy_read_timeout_s(self, settings: Settings) -> int:
        return self.config.nginx_proxy_read_timeout_s or int(settings.dispatch.stream_timeout_s) + PROXY_READ_MARGIN_S

    def needed_secrets(self) -> list[Secret]:
        return [s for s in SECRETS if self.config.garage_enabled or not s.garage_only]


# load_settings falls back to /etc/scaigrid/scaigrid.env when given no file: the rendered env must not feed itself.
_NO_ENV_FILE = Path("/dev/null")


def load(path: Path = DEFAULT_CONFIG) -> Appliance:
    """Reads and validates appliance.env; ConfigProblems lists every problem, one line each, naming the key."""
    appliance, problems = examine(path)
    if appliance is None or problems:
        raise ConfigProblems(problems)
    return appliance


def examine(path: Path) -> tuple[Appliance | None, list[str]]:
    """Every problem of appliance.env, and the appliance it describes with each bad value at its default.

    The defaults stand in so that the rules across keys (and check_files) still run: one pass lists everything.
    """
    try:
        raw = read_env_file(path)
    except ConfigError as exc:
        return None, [str(exc)]
    problems: list[str] = []
    bad: set[str] = set()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ApplianceConfig):
        name = f.metadata["key"]
        text = raw.pop(name, f.metadata["default"]).strip()
        try:
            values[f.name] = f.metadata["parse"](text)
        except ValueError as exc:
            problems.append(f"{name}: expected {exc}, got {text!r}")
            bad.add(name)
            values[f.name] = f.metadata["parse"](f.metadata["default"])
    parsers = setting_parsers()
    secret_settings = {entry.env for entry in entries() if entry.secret}
    passthrough: dict[str, str] = {}
    garage = values["garage_enabled"]
    for name, text in raw.items():
        if name in OWNED_SETTINGS or (garage and name in GARAGE_OWNED_SETTINGS):
            problems.append(f"{name}: set by the appliance (from CONFIG_DIR/secrets and its own keys); remove it")
        elif name in LINK_OWNED_SETTINGS or (name == "HYBRID_ROLE" and text.strip().lower() == "node"):
            problems.append(f"{name}: set from CONFIG_DIR/secrets/{LINK_FILE}, which `scaigrid-appliance link enroll` "
                            "writes; remove it and use `link enroll`")
        elif name not in parsers:
            problems.append(f"{name}: unknown key (see the appliance keys and the ScaiGrid settings in README.md)")
        else:
            try:
                parsers[name](text.strip())
            except ValueError as exc:
                shown = "" if name in secret_settings else f", got {text!r}"
                problems.append(f"{name}: expected {exc}{shown}")
                bad.add(name)
                continue
            passthrough[name] = text.strip()
    appliance = Appliance(ApplianceConfig(**values), passthrough, path)
    if appliance.enrolled and passthrough.get("HYBRID_ROLE", "").lower() == "managed":
        problems.append(f"HYBRID_ROLE: managed, but this appliance is enrolled as a node (CONFIG_DIR/secrets/"
                        f"{LINK_FILE}); remove the key (for a managed side: `link unenroll` first, then set it)")
    try:  # rules across settings (e.g. NODE_WARNING_AFTER_S < NODE_STALE_AFTER_S), checked as the programs will
        settings = appliance.settings()
    except ConfigError as exc:
        return appliance, [*problems, str(exc)]
    config = appliance.config
    if config.openai_hostname is not None and config.openai_hostname.lower() == config.hostname.lower():
        problems.append("OPENAI_HOSTNAME: must differ from APPLIANCE_HOSTNAME (its /v1/ is another API)")
    read_timeout_s = appliance.proxy_read_timeout_s(settings)
    if read_timeout_s <= settings.dispatch.stream_timeout_s:
        problems.append(f"NGINX_PROXY_READ_TIMEOUT_S: must be above DISPATCH_STREAM_TIMEOUT_S "
                        f"({read_timeout_s} <= {settings.dispatch.stream_timeout_s:g}), or nginx cuts streams first")
    if config.garage_enabled and settings.s3.endpoint_url is None:
        problems.append("GARAGE_ENABLED: Garage is on but no S3 endpoint was derived")
    listeners = {
        "HTTPS_PORT": config.https_port, "HTTP_REDIRECT_PORT": config.http_redirect_port,
        "GRPC_TLS_PORT": config.grpc_tls_port, "APPLIANCE_METRICS_PORT": config.appliance_metrics_port,
        "HTTP_PORT": settings.server.http_port, "GRPC_PORT": settings.server.grpc_port,
        "GRPC_METRICS_PORT": settings.server.grpc_metrics_port,
        "WORKER_METRICS_PORT": settings.server.worker_metrics_port,
    }
    if appliance.storage_enabled:
        listeners["BUNKER_PROXY_PORT"] = settings.server.bunker_proxy_port
    if appliance.enrolled:
        listeners["LINK_METRICS_PORT"] = settings.server.link_metrics_port
    if config.garage_enabled:
        listeners |= {"GARAGE_S3_PORT": config.garage_s3_port, "GARAGE_RPC_PORT": config.garage_rpc_port,
                      "GARAGE_ADMIN_PORT": config.garage_admin_port}
    # (key a clash is filed under, what the port is, port): the processes after the first of a range come last, so
    # a range grown into another listener's port names its count.
    ports = [(name, name, port) for name, port in listeners.items()]
    for count_key, port_key, name, first, count in (
            ("HTTP_PROCESSES", "HTTP_PORT", "http", settings.server.http_port, config.http_process_count),
            ("WORKER_PROCESSES", "WORKER_METRICS_PORT", "worker", settings.server.worker_metrics_port,
             config.worker_processes)):
        if first + count - 1 > 65535:
            problems.append(f"{count_key}: {count} processes from {port_key} {first} run past port 65535")
            bad.add(count_key)
        ports += [(count_key, f"{port_key} + {i} ({name}_{i + 1})", first + i) for i in range(1, count)
                  if port_key not in bad]
    seen: dict[int, str] = {}
    for name, what, port in ports:
        if name in bad:  # its default stands in; a clash with that would be noise next to the value's own problem
            continue
        if port in seen:
            problems.append(f"{name}: port {port}{'' if what == name else f' ({what})'} is also {seen[port]}'s")
        seen.setdefault(port, what)
    return appliance, problems


def under(root: Path, path: Path) -> Path:
    """Where an absolute path of the appliance lies when its root is elsewhere (an image being built)."""
    return root / path.relative_to("/")


def check_files(appliance: Appliance, root: Path = Path("/")) -> list[str]:
    """Problems with the files the configs will point at: TLS material and generated secrets."""
    config = appliance.config
    problems = []
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        problems.append("TLS_CERT_FILE, TLS_KEY_FILE: set both (your certificate and its key) or neither")
    cert, key = under(root, config.tls_cert), under(root, config.tls_key)
    for name, path in (("TLS_CERT_FILE", cert), ("TLS_KEY_FILE", key)):
        if not path.is_file():
            hint = "set it to your certificate" if getattr(config, name.lower()) else "run `scaigrid-appliance init`"
            problems.append(f"{name}: {path} does not exist ({hint})")
    if cert.is_file() and key.is_file():
        problems += _tls_problems(cert, key)
    for secret in appliance.needed_secrets():
        path = under(root, config.secrets_dir / secret.file)
        if not path.is_file():
            problems.append(f"{path}: missing secret (run `scaigrid-appliance init`)")
        elif path.stat().st_mode & 0o077:
            problems.append(f"{path}: readable by others (mode {path.stat().st_mode & 0o777:o}); chmod 600 it")
    return problems


def _tls_problems(cert_path: Path, key_path: Path) -> list[str]:
    """What nginx would refuse at its next start, said now: unreadable PEM, or a key that is not the certificate's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except ValueError:
        return [f"TLS_CERT_FILE: {cert_path} is not a PEM certificate"]
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (ValueError, TypeError):
        return [f"TLS_KEY_FILE: {key_path} is not an unencrypted PEM private key"]
    problems = []
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if (key.public_key().public_bytes(serialization.Encoding.PEM, public)
            != certificate.public_key().public_bytes(serialization.Encoding.PEM, public)):
        problems.append(f"TLS_KEY_FILE: {key_path} is not the key of {cert_path}")
    if key_path.stat().st_mode & 0o077:
        problems.append(f"TLS_KEY_FILE: {key_path} is readable by others; chmod 600 it")
    return problems


def read_secrets(appliance: Appliance, root: Path = Path("/")) -> dict[str, str]:
    """The generated secrets, and the link file when the appliance is enrolled (it holds the node credential)."""
    secrets_dir = under(root, appliance.config.secrets_dir)
    values = {s.file: (secrets_dir / s.file).read_text().strip() for s in appliance.needed_secrets()}
    if (secrets_dir / LINK_FILE).exists():
        values[LINK_FILE] = (secrets_dir / LINK_FILE).read_text()
    return values
