"""First-boot steps (`scaigrid-appliance init`): secrets, TLS, database, render, migrate, bootstrap admin key.

Every step is idempotent: it keeps what exists, so init can run again after a failure or by hand.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import render
from appliance.config import Appliance, check_files, keys, read_secrets
from appliance.database import ServiceError, database_statements, run_sql_as_root
from appliance.files import write_private_file
from appliance.programs import scaigrid_argv

SELF_SIGNED_DAYS = 825  # the longest validity browsers and macOS accept for a TLS server certificate


def ensure_dirs(appliance: Appliance) -> None:
    """The appliance's directories. Root owns those root processes write into (supervisord's logs and socket,
    nginx's temp files), so a program running as the service user cannot plant a symlink there for root to follow;
    the service user owns only the event listener's corner."""
    config = appliance.config
    config.secrets_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(config.secrets_dir, 0o700)
    for path in (config.state_dir, config.log_dir, config.run_dir, config.state_dir / "nginx"):
        path.mkdir(parents=True, exist_ok=True)
    events_dir = config.program_states_file.parent
    events_dir.mkdir(parents=True, exist_ok=True)
    owner = render.service_user_ids(config.user)
    if owner is not None:
        os.chown(events_dir, *owner)


def ensure_secrets(appliance: Appliance) -> list[str]:
    """Creates each missing secret file (0600); returns the names created."""
    created = []
    for secret in appliance.needed_secrets():
        path = appliance.config.secrets_dir / secret.file
        if not path.exists():
            write_private_file(path, secret.make())
            created.append(secret.file)
    return created


def ensure_tls(appliance: Appliance) -> bool:
    """Makes a self-signed certificate at the default paths when there is none; True if it made one."""
    config = appliance.config
    if config.tls_cert_file or config.tls_key_file or config.tls_cert.exists():
        return False  # the operator's certificate, or one made before
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, config.hostname)])
    alt_names: list[x509.GeneralName] = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    for host in filter(None, (config.hostname, config.openai_hostname)):
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(list(dict.fromkeys(alt_names))), critical=False)
        # CA:TRUE lets clients (Prometheus' ca_file, curl --cacert) trust it directly as its own root.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    config.tls_key.parent.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    write_private_file(config.tls_key, key_pem.decode().strip())
    config.tls_cert.write_text(certificate.public_bytes(serialization.Encoding.PEM).decode())
    return True


def ensure_database(appliance: Appliance) -> None:
    config = appliance.config
    password = read_secrets(appliance)["database-password"]
    run_sql_as_root(config.database_admin_socket,
                    database_statements(config.database_name, config.database_user, password))


def scaigrid(appliance: Appliance, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(scaigrid_argv(appliance.config, *args), capture_output=True, text=True, check=False)


def ensure_admin_key(appliance: Appliance) -> bool:
    """Creates the bootstrap super_admin key into a root-only file, once; True if it made one."""
    path = appliance.config.admin_key_file
    if path.exists():
        return False
    result = scaigrid(appliance, "admin", "create-key", "--role", "super_admin", "--name", "bootstrap")
    if result.returncode != 0:
        raise StepFailed(f"creating the bootstrap admin key failed: {result.stderr.strip()}")
    write_private_file(path, result.stdout.strip())
    return True


class StepFailed(Exception):
    """A first-boot step failed; the message says which and why."""


def migrate(appliance: Appliance, say: Callable[[str], None]) -> None:
    result = scaigrid(appliance, "migrate")
    if result.returncode != 0:
        raise StepFailed(f"migrate failed (exit {result.returncode}): {result.stderr.strip()}")
    say("migrated")


def run(appliance: Appliance, *, create_database: Callable[[], None] | None, say: Callable[[str], None]) -> None:
    """The steps in order; create_database runs once the secrets exist (None: the database is someone else's)."""
    ensure_dirs(appliance)
    created = ensure_secrets(appliance)
    say(f"secrets: {'created ' + ', '.join(created) if created else 'all present'}")
    made = ensure_tls(appliance)
    say("TLS: " + ("self-signed certificate created" if made else f"using {appliance.config.tls_cert}"))
    problems = check_files(appliance)
    if problems:
        raise StepFailed("\n".join(problems))
    if create_database is not None:
        try:
            create_database()
        except ServiceError as exc:
            raise StepFailed(str(exc)) from None
        say(f"database {appliance.config.database_name} and its user are in place")
    written = render.write(Path("/"), render.outputs(appliance), appliance.config.user)
    say(f"rendered {len(written)} file(s)")
    migrate(appliance, say)
    say("bootstrap admin key: " + ("created in " if ensure_admin_key(appliance) else "kept in ")
        + str(appliance.config.admin_key_file))
    appliance.config.firstboot_marker.write_text("done\n")


def write_example_config(path: Path) -> None:
    """A documented appliance.env with every key commented out at its default (0600: operators add secrets here)."""
    lines = ["# ScaiGrid appliance config: the source of truth for every generated file.",
             "# Uncomment and change what you need, then: scaigrid-appliance check-config && scaigrid-appliance render",
             "# ScaiGrid settings (README.md, \"Settings\") may be added too, e.g. DISPATCH_STREAM_TIMEOUT_S=600.", ""]
    for key in keys():
        lines += [f"# {key.help}", f"#{key.name}={key.default}", ""]
    write_private_file(path, "\n".join(lines).rstrip())
