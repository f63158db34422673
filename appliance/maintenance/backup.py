"""`scaigrid-appliance backup`: the database dump, appliance.env, secrets and TLS files in one 0600 archive."""

from __future__ import annotations

import datetime
import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import scaigrid
from appliance.config import Appliance
from appliance.files import private_dir
from appliance.maintenance.archive import (
    CONFIG_MEMBER,
    DUMP,
    FORMAT,
    MANIFEST,
    MEMBER_NAME,
    Database,
    Refused,
    Say,
    add_member,
    human_size,
    new_archive,
    sha256_file,
    stamp,
)


def backup(appliance: Appliance, *, say: Say, output: Path | None = None, label: str = "") -> Path:
    """Dumps the database and copies appliance.env, secrets and TLS files into one 0600 archive with a manifest."""
    config = appliance.config
    version = scaigrid.__version__
    created = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    target = output or config.backups_dir / f"scaigrid-{version}-{stamp(created)}{'-' + label if label else ''}.tar.gz"
    if target.exists():
        raise Refused(f"{target} exists; choose another --output")
    if output is None:
        private_dir(config.backups_dir)
    database = Database.of(appliance)
    files = _config_files(appliance)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".backup-") as work:
        dump = Path(work) / DUMP
        say(f"dumping database {database.name} ...")
        database.dump(dump)
        say(f"  database {database.name}: {human_size(dump.stat().st_size)}")
        revisions = database.migration_revisions()
        secrets_count = sum(name.startswith("config/secrets/") for name in files)
        tls_count = sum(name.startswith("config/tls/") for name in files)
        say(f"  appliance.env, {secrets_count} secret(s), {tls_count} TLS file(s): "
            f"{human_size(sum(len(data) for data, _ in files.values()))}")
        for name, path in (("TLS_CERT_FILE", config.tls_cert), ("TLS_KEY_FILE", config.tls_key)):
            if path.parent != config.config_dir / "tls":
                say(f"  note: {name} {path} is outside {config.config_dir / 'tls'} and not in the backup")
        manifest = {
            "format": FORMAT,
            "software_version": version,
            "created_at": created.isoformat(),
            "hostname": config.hostname,
            "database": {"name": database.name, "migrations": revisions},
            "files": [_entry(DUMP, sha256_file(dump), dump.stat().st_size, 0o600),
                      *(_entry(name, hashlib.sha256(data).hexdigest(), len(data), mode)
                        for name, (data, mode) in files.items())],
        }
        with new_archive(target) as tar:
            add_member(tar, MANIFEST, json.dumps(manifest, indent=2).encode(), 0o600)
            with dump.open("rb") as source:
                add_member(tar, DUMP, source, 0o600, size=dump.stat().st_size)
            for name, (data, mode) in files.items():
                add_member(tar, name, data, mode)
    say(f"wrote {target} ({human_size(target.stat().st_size)}, mode 0600: it holds the secrets, keep it safe)")
    return target


def _config_files(appliance: Appliance) -> dict[str, tuple[bytes, int]]:
    """appliance.env, every secret and the files of CONFIG_DIR/tls: archive name -> (content, mode)."""
    config = appliance.config
    files = {CONFIG_MEMBER: (appliance.path.read_bytes(), 0o600)}
    for kind, directory in (("secrets", config.secrets_dir), ("tls", config.config_dir / "tls")):
        for path in sorted(directory.iterdir()) if directory.is_dir() else []:
            name = f"config/{kind}/{path.name}"
            if path.is_file() and MEMBER_NAME.fullmatch(name):
                mode = 0o600 if kind == "secrets" else path.stat().st_mode & 0o644
                files[name] = (path.read_bytes(), mode)
    return files


def _entry(name: str, sha256: str, size: int, mode: int) -> dict[str, Any]:
    return {"path": name, "sha256": sha256, "size": size, "mode": f"{mode:04o}"}
