"""`scaigrid-appliance restore`: verify a backup and what it would leave behind, then put it back."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import scaigrid
from appliance import config as appliance_config
from appliance import firstboot
from appliance.config import Appliance, ConfigProblems, check_files, read_secrets, under
from appliance.files import private_dir, write_private_file
from appliance.maintenance import steps
from appliance.maintenance.archive import (
    CONFIG_MEMBER,
    DUMP,
    Archive,
    Database,
    MaintenanceFailed,
    Refused,
    Say,
    human_size,
    indented,
    verified,
)
from appliance.maintenance.backup import backup
from appliance.supervisor import Supervisor

# The password belongs to this machine's MariaDB account, not to the data: an older one from a backup
# would lock the programs out.
KEPT_SECRETS = ("database-password",)


def restore(appliance: Appliance, path: Path, *, say: Say, confirm: Callable[[str], bool]) -> None:
    """Verifies the archive and what it would leave behind, then: safety backup, stop, files, database, render,
    migrate, start, health gate."""
    supervisor = Supervisor(appliance.config.supervisor_socket)
    with verified(path, scaigrid.__version__, appliance.config.backups_dir) as archive:
        try:
            archived = appliance_config.load(archive.file(CONFIG_MEMBER))
        except ConfigProblems as exc:
            raise Refused(f"{path}: its appliance.env is not valid here:\n  " + "\n  ".join(exc.problems)) from None
        files = _restored_files(appliance, archive, archived)
        # Render would refuse what check-config refuses (a TLS file or secret missing), but only after the database
        # was replaced: the files as the restore will leave them are checked now.
        problems = _check_restored_files(archived, files, archive.directory / "after-restore")
        if problems:
            raise Refused(f"{path}: not restoring, the appliance would not start with its files:\n  "
                          + "\n  ".join(problems))
        # The database as the restored appliance.env names it, with this machine's password: reachable before
        # any change, or the restore would stop the appliance and then fail.
        database = Database.of(archived, read_secrets(appliance)["database-password"])
        try:
            database.sql("SELECT 1", in_database=False)
        except MaintenanceFailed as exc:
            raise Refused(f"{path}: not restoring, its database settings do not work here ({exc})") from None
        supervisor.processes()  # supervisord answers (exit 3 otherwise), before any change
        manifest = archive.manifest
        say(f"{path}: ScaiGrid {archive.version}, database {manifest['database']['name']}, made "
            f"{manifest['created_at']} on {manifest.get('hostname', '?')}; {len(manifest['files'])} files, "
            "checksums ok")
        if not confirm(f"Replace database {database.name}, appliance.env, secrets and TLS files with the backup's?"):
            raise Refused("not confirmed; nothing changed")
        say("backing up the current state first:")
        try:
            safety = backup(appliance, say=indented(say), label="pre-restore")
        except MaintenanceFailed as exc:
            raise MaintenanceFailed(f"backing up the current state failed, so nothing was changed: {exc}") from None
        try:
            say("stopping all programs ...")
            supervisor.stop()
            restored = _restore_files(appliance, archive, archived, files, say)
            dump_size = archive.file(DUMP).stat().st_size
            say(f"loading database {database.name} ({human_size(dump_size)}) ...")
            database.replace_with(archive.file(DUMP))
            steps.render(restored, say)
            firstboot.migrate(restored, say)
            steps.start(supervisor, say)
        except Exception as exc:  # whatever broke, the operator needs the way back
            raise MaintenanceFailed(f"restore failed: {exc}\nThe state before it is in {safety}: "
                                    f"scaigrid-appliance restore {safety} --yes") from None
    steps.health_gate(restored, say, failure=f"restored from {path}, but the appliance is not healthy")
    say(f"restored {path}; the state before it is in {safety}")


def _restored_files(appliance: Appliance, archive: Archive, archived: Appliance) -> dict[Path, tuple[str, int]]:
    """What the restore writes: appliance.env, the secrets (0600) and the TLS files, path -> (content, mode)."""
    config = archived.config
    files = {}
    for entry in archive.manifest["files"]:
        name = entry["path"]
        if name == CONFIG_MEMBER:
            target, mode = appliance.path, 0o600
        elif name.startswith("config/secrets/"):
            target, mode = config.secrets_dir / name.rsplit("/", 1)[1], 0o600
            if target.name in KEPT_SECRETS and target.exists():
                continue
        elif name.startswith("config/tls/"):
            target, mode = config.config_dir / "tls" / name.rsplit("/", 1)[1], int(entry["mode"], 8) & 0o644
        else:
            continue
        try:
            files[target] = (archive.file(name).read_bytes().decode(), mode)
        except UnicodeDecodeError:
            raise Refused(f"{archive.path}: {name} is not text; not restoring it") from None
    return files


def _check_restored_files(archived: Appliance, files: dict[Path, tuple[str, int]], shadow: Path) -> list[str]:
    """check_files on the files as the restore will leave them (the archive's over those already here), laid out
    under shadow: links to those already here, copies of the archive's."""
    config = archived.config
    here = [path for directory in (config.secrets_dir, config.config_dir / "tls") if directory.is_dir()
            for path in directory.iterdir()]
    for path in {*here, config.tls_cert, config.tls_key}:
        if path.exists():
            under(shadow, path).parent.mkdir(parents=True, exist_ok=True)
            under(shadow, path).symlink_to(path)
    for path, (text, mode) in files.items():
        under(shadow, path).parent.mkdir(parents=True, exist_ok=True)
        _place(under(shadow, path), text, mode)
    return [problem.replace(str(shadow), "") for problem in check_files(archived, shadow)]


def _restore_files(appliance: Appliance, archive: Archive, archived: Appliance, files: dict[Path, tuple[str, int]],
                   say: Say) -> Appliance:
    """Writes what _restored_files planned; returns the appliance as restored."""
    private_dir(archived.config.secrets_dir)
    for path, (text, mode) in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        _place(path, text, mode)
    secrets_count = sum(path.parent == archived.config.secrets_dir for path in files)
    kept = len(archive.entries("config/secrets/")) - secrets_count
    say(f"restored appliance.env, {secrets_count} secret(s), {len(archive.entries('config/tls/'))} TLS file(s)"
        + (" (kept this machine's database password)" if kept else ""))
    return appliance_config.load(appliance.path)


def _place(path: Path, text: str, mode: int) -> None:
    write_private_file(path, text.rstrip("\n"))
    path.chmod(mode)  # a certificate is 0644; everything else stays 0600
