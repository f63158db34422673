"""Root filesystems for the appliance boot test: mmdebstrap + appliance/provision.sh, cached, booted by nspawn."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import select
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[1]
PROVISION = REPO / "appliance" / "provision.sh"
CONSTRAINTS = REPO / "constraints.txt"
CACHE_DIR = Path("/var/cache/scaigrid-tests")
SUITE = "bookworm"
# Enough to boot with systemd as PID 1; provision.sh's packages stage installs the appliance's own packages.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3", "python3-venv", "ca-certificates", "curl", "openssl")
# Where provision.sh and its inputs appear inside the root filesystem while it runs.
PROVISION_MOUNT = "/mnt/provision"
CONSTRAINTS_MOUNT = "/mnt/constraints.txt"
CA_BUNDLE_MOUNT = "/mnt/ca-certificates.crt"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
WHEEL_MOUNT = "/mnt/wheel"
# Commands entered into a container get this environment, never the test process's (venv, pytest variables).
CONTAINER_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
BUILD_TIMEOUT_S = 900
POWEROFF_TIMEOUT_S = 120


class RootfsError(RuntimeError):
    """Building, provisioning or booting a root filesystem failed; the message holds the command's output."""


def run(argv: Sequence[str | Path], *, timeout_s: float = BUILD_TIMEOUT_S, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=timeout_s, env=env,
                            check=False)
    if result.returncode != 0:
        raise RootfsError(f"{shlex.join(str(a) for a in argv)} exited {result.returncode}:\n"
                          f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


def inputs_digest(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()[:16]


def base_key() -> str:
    """What the cached, provisioned root filesystem depends on; a change of any of these rebuilds it."""
    return inputs_digest(PROVISION.read_bytes(), " ".join((SUITE, *BASE_PACKAGES)).encode(), CONSTRAINTS.read_bytes())


@contextlib.contextmanager
def cache_lock(name: str = "lock") -> Iterator[None]:
    """One builder of a cache at a time (CACHE_DIR/`name` locks it): test runs on the same machine share the caches."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / name, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_once(name: str, build: Callable[[Path], None]) -> Path:
    """CACHE_DIR/name, built by build(partial dir) unless a complete one is there; older builds of its kind go."""
    target = CACHE_DIR / name
    if target.is_dir():
        return target
    kind = name.rsplit("-", 1)[0]
    for stale in CACHE_DIR.glob(f"{kind}-*"):  # other inputs' builds, and a build that was cut short
        shutil.rmtree(stale, ignore_errors=True)
    partial = CACHE_DIR / f"{name}.partial"
    partial.mkdir(parents=True)
    build(partial)
    partial.rename(target)
    return target


def project_wheel(directory: Path) -> Path:
    """A wheel of the working tree as it is now."""
    # Built from a copy: setuptools' build/ in the tree would carry files deleted since into the wheel.
    source = directory / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache"))
    run([REPO / ".venv" / "bin" / "python", "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--no-deps", "-w", directory, source])
    shutil.rmtree(source)
    (wheel,) = directory.glob("scaigrid-*.whl")
    return wheel


def provision(root: Path, wheel: Path | None, stages: str | None = None, extra_args: Sequence[str] = (),
              check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs appliance/provision.sh inside root (a container, not booted), dependencies pinned by constraints.txt.

    Dependencies come from the index, installed by the root filesystem's own Python: Debian's 3.11.2 needs some
    that this venv's Python does not (async-timeout for redis below 3.11.3), so a wheelhouse built here falls short.
    pip trusts what this host trusts (HOST_CA_BUNDLE): the index may be reached through a TLS-inspecting proxy.
    """
    binds = {REPO / "appliance": f"{PROVISION_MOUNT}/appliance", REPO / "systemd": f"{PROVISION_MOUNT}/systemd",
             CONSTRAINTS: CONSTRAINTS_MOUNT, HOST_CA_BUNDLE: CA_BUNDLE_MOUNT}
    argv = [f"{PROVISION_MOUNT}/appliance/provision.sh", *(["--stages", stages] if stages else []), *extra_args]
    if wheel is not None:
        binds[wheel.parent] = WHEEL_MOUNT
        argv += ["--wheel", f"{WHEEL_MOUNT}/{wheel.name}"]
    return run_in(root, argv, binds=binds, env={"PIP_CONSTRAINT": CONSTRAINTS_MOUNT, "PIP_CERT": CA_BUNDLE_MOUNT},
                  check=check)


def run_in(root: Path, argv: Sequence[str], *, binds: dict[Path, str] | None = None,
           env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """One command in root as a container that is not booted: its own /proc, /dev and /run, the host's network."""
    options = [f"--bind-ro={source}:{target}" for source, target in (binds or {}).items()]
    options += [f"--setenv={name}={value}" for name, value in (env or {}).items()]
    # --pipe keeps the command's stderr apart from its stdout.
    command = ["systemd-nspawn", "-D", str(root), "--register=no", "--keep-unit", "--quiet", "--pipe", *options, "--",
               *argv]
    with own_cgroup(f"run-{os.getpid()}") as enter:
        result = subprocess.run(enter(command), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=BUILD_TIMEOUT_S, check=False)
    if check and result.returncode != 0:
        raise RootfsError(f"{shlex.join(argv)} in {root} exited {result.returncode}:\n"
                          f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
    return result


def base_rootfs() -> Path:
    """The cached bookworm root filesystem after a full provision.sh run; built when its inputs changed."""
    def build(root: Path) -> None:
        run(["mmdebstrap", "--quiet", "--variant=apt", "--include=" + ",".join(BASE_PACKAGES), SUITE, root])
        with tempfile.TemporaryDirectory() as wheel_dir:
            provision(root, project_wheel(Path(wheel_dir)))

    with cache_lock():
        return build_once(f"rootfs-{base_key()}", build)


@contextlib.contextmanager
def overlay(lower: Path, work_dir: Path) -> Iterator[Path]:
    """A writable view of lower whose changes land in work_dir: the cached root filesystem stays as built."""
    upper, scratch, merged = work_dir / "upper", work_dir / "overlay-work", work_dir / "root"
    for path in (upper, scratch, merged):
        path.mkdir(parents=True)
    run(["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={lower},upperdir={upper},workdir={scratch}", merged])
    try:
        yield merged
    finally:
        if subprocess.run(["umount", str(merged)], capture_output=True, check=False).returncode != 0:
            # Still busy (a process of a container that would not die): detach it, so the next run starts clean.
            subprocess.run(["umount", "--lazy", str(merged)], check=False)


@dataclass(frozen=True)
class Provisioned:
    root: Path  # the overlaid root filesystem, not booted
    wheel: Path  # this tree's wheel, as installed into root


@contextlib.contextmanager
def provisioned_rootfs(work_dir: Path) -> Iterator[Provisioned]:
    """The cached root filesystem, overlaid, with this working tree's wheel and units installed again."""
    base = base_rootfs()
    wheel = project_wheel(work_dir / "wheel")
    with overlay(base, work_dir / "overlay") as root:
        provision(root, wheel, stages="install,units")
        yield Provisioned(root, wheel)


def _cgroup_hierarchies() -> list[Path]:
    """The cgroup trees nspawn places itself in: the unified one, and on a hybrid host the name=systemd one too."""
    base = Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]
    return [base / name for name in ("systemd", "unified") if (base / name / "cgroup.procs").exists()]


@contextlib.contextmanager
def own_cgroup(name: str) -> Iterator[Callable[[Sequence[str]], list[str]]]:
    """A cgroup of our own for one nspawn: without a host systemd, nspawn makes its payload/ cgroup beside itself,
    so two containers in the same cgroup would share it. Yields a wrapper that starts a command inside it."""
    groups = [hierarchy / "scaigrid-tests" / name for hierarchy in _cgroup_hierarchies()]
    for group in groups:
        group.mkdir(parents=True, exist_ok=True)
    join = " ".join(shlex.quote(str(group / "cgroup.procs")) for group in groups)

    def enter(argv: Sequence[str]) -> list[str]:
        return ["sh", "-c", f'echo $$ | tee {join} >/dev/null && exec "$@"', "sh", *argv]

    try:
        yield enter
    finally:
        for group in groups:
            for directory, _, _ in sorted(os.walk(group), key=lambda entry: -len(entry[0])):
                with contextlib.suppress(OSError):  # still busy: a process outlived its container
                    os.rmdir(directory)


@dataclass
class Machine:
    """A root filesystem booted by systemd-nspawn with systemd as PID 1, entered through its leader's namespaces."""

    name: str
    leader: int  # the container's systemd, as a host pid
    started_at_s: float  # time.monotonic() just before nspawn started

    def run(self, *argv: str, check: bool = True, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        command = ["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *argv]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=CONTAINER_ENV,
                                check=False)
        if check and result.returncode != 0:
            raise RootfsError(f"{shlex.join(argv)} in {self.name} exited {result.returncode}:\n"
                              f"{result.stdout[-4000:]}{result.stderr[-4000:]}")
        return result

    def wait_until_booted(self, timeout_s: float) -> str:
        """Waits for systemd to finish the boot transaction; returns its state (running, degraded, ...)."""
        deadline_s = time.monotonic() + timeout_s

        def state() -> str:
            # Until systemd is up, systemctl fails at once: "offline", or nothing when its bus is not there yet.
            result = self.run("systemctl", "is-system-running", "--wait", check=False,
                              timeout_s=max(deadline_s - time.monotonic(), 1))
            return "" if result.stdout.strip() == "offline" else result.stdout.strip()

        return eventually(state, f"systemd in {self.name} through its boot", timeout_s, interval_s=0.1)



def _child_named(pid: int, comm: str) -> int | None:
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == comm:
                    return int(child)
    return None


@contextlib.contextmanager
def booted(root: Path, name: str, console_log: Path, *, timeout_s: float = 30) -> Iterator[Machine]:
    """Boots root with systemd as PID 1 on a private network (its own loopback: ports 80 and 443 are its own)."""
    command = ["systemd-nspawn", "-D", str(root), "--boot", "--register=no", "--keep-unit", "-M", name,
               "--console=passive", "--private-network"]
    with own_cgroup(name) as enter, open(console_log, "wb") as log:
        started_at_s = time.monotonic()
        process = subprocess.Popen(enter(command), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        leader_fd = None
        try:
            def leader_started() -> int | None:
                if process.poll() is not None:
                    raise RootfsError(f"nspawn exited in {root}:\n{console_log.read_text()[-4000:]}")
                return _child_named(process.pid, "systemd")

            leader = eventually(leader_started, f"nspawn starting systemd in {root}", timeout_s, interval_s=0.05,
                                context=lambda: console_log.read_text()[-4000:])
            leader_fd = os.pidfd_open(leader)  # signals reach this process even after its pid is reused
            yield Machine(name, leader, started_at_s)
        finally:
            if leader_fd is None:
                process.kill()
                process.wait()
            else:
                _poweroff(process, leader_fd)


def _poweroff(nspawn: subprocess.Popen[bytes], leader_fd: int, timeout_s: float = POWEROFF_TIMEOUT_S) -> None:
    """SIGRTMIN+4 asks systemd for a clean poweroff; returns when the container's PID 1 is gone, not only nspawn."""
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(leader_fd, signal.SIGRTMIN + 4)
    try:
        nspawn.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        nspawn.kill()
        nspawn.wait()
    # nspawn can exit while the kernel still tears the container down; its root must stay mounted until that ends.
    if not select.select([leader_fd], [], [], timeout_s)[0]:
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(leader_fd, signal.SIGKILL)
        select.select([leader_fd], [], [], timeout_s)
    os.close(leader_fd)
