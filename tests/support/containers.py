"""Podman for the tests beyond one machine: the cached base and services images, the ScaiGrid image, podman's API.

No container registry is reachable here, so every image starts from Debian packages: `mmdebstrap | podman import`
gives the base (what `ARG BASE` of the Containerfile gets instead of the Python slim image) and a services image
(MariaDB, Redis, nginx, and moto as the S3 stand-in) for compose and `podman kube play`. Both are built once per
machine and kept (rebuilt only when missing); the ScaiGrid image is rebuilt when its sources change. Podman itself is
configured by `make container-setup` (runc, lowered ulimits, catatonit).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.rootfs import cache_lock
from tests.support.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"
BASE_IMAGE = "localhost/scaigrid-test-base:bookworm"
SERVICES_IMAGE = "localhost/scaigrid-test-services:bookworm"
IMAGE = "localhost/scaigrid:test"
# What the Containerfile's build stage needs of a Python base: python3 with venv (ensurepip), CA certificates for a
# process that calls out over TLS, and useradd (passwd) for the image's own user.
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
# The compose stack's own services, from Debian as on the appliance; curl for their healthchecks.
SERVICES_PACKAGES = (*BASE_PACKAGES, "mariadb-server", "redis-server", "nginx", "curl")
# Where moto (the S3 stand-in, as in the rest of the tests) lives in the services image.
MOTO_VENV = "/opt/moto"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WHEELS_DIR = REPO / "build" / "container" / "wheels"
# What the ScaiGrid image is built from: a change in any of these rebuilds it.
IMAGE_SOURCES = ("Containerfile", ".containerignore", "setup.cfg", "constraints.txt", "deploy/container",
                 "scaigrid", "migrations", "appliance")
SOURCE_LABEL = "org.scaigrid.test.sources"
BUILD_TIMEOUT_S = 900
COMMAND_TIMEOUT_S = 120


class ContainerError(RuntimeError):
    """A podman (or image build) command failed; the message holds its output."""


def run(argv: Sequence[str | Path], *, timeout_s: float = COMMAND_TIMEOUT_S, input_bytes: bytes | None = None,
        env: dict[str, str] | None = None) -> str:
    """Runs a command to its end; its stdout, or ContainerError with the output's tail."""
    result = subprocess.run([str(a) for a in argv], input=input_bytes, capture_output=True, timeout=timeout_s,
                            env=env, check=False)
    if result.returncode != 0:
        raise ContainerError(f"{shlex.join(str(a) for a in argv)} exited {result.returncode}:\n"
                             f"{result.stdout.decode(errors='replace')[-3000:]}"
                             f"{result.stderr.decode(errors='replace')[-3000:]}")
    return result.stdout.decode(errors="replace")


def podman(*args: str | Path, timeout_s: float = COMMAND_TIMEOUT_S) -> str:
    """`podman ARGS`; its stdout. Raises ContainerError when it fails."""
    return run(["podman", *args], timeout_s=timeout_s)


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag], check=False).returncode == 0


def _import_rootfs(tag: str, packages: Sequence[str], hooks: Sequence[str] = ()) -> None:
    """mmdebstrap's tarball of a bookworm root filesystem with `packages`, imported into podman as `tag`."""
    mmdebstrap = ["mmdebstrap", "--variant=apt", f"--include={','.join(packages)}",
                  # Documentation and translations: nobody reads them in a container.
                  "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
                  "--dpkgopt=path-exclude=/usr/share/locale/*", "--aptopt=Acquire::Languages \"none\"",
                  *(f"--customize-hook={hook}" for hook in hooks), SUITE, "-"]
    with tempfile.TemporaryFile() as tarball:
        built = subprocess.run(mmdebstrap, stdout=tarball, stderr=subprocess.PIPE, timeout=BUILD_TIMEOUT_S,
                               check=False)
        if built.returncode != 0:
            raise ContainerError(f"mmdebstrap for {tag} exited {built.returncode}:\n{built.stderr.decode()[-3000:]}")
        tarball.seek(0)
        imported = subprocess.run(["podman", "import", "--change", f"ENV {PATH_ENV}", "--change", 'CMD ["/bin/sh"]',
                                   "-", tag], stdin=tarball, capture_output=True, timeout=BUILD_TIMEOUT_S,
                                  check=False)
        if imported.returncode != 0:
            raise ContainerError(f"podman import {tag} exited {imported.returncode}:\n{imported.stderr.decode()}")


def base_image() -> str:
    """The Debian 12 Python base (cached, built in about 2 minutes when missing); its tag for `--build-arg BASE=`."""
    with cache_lock("containers.lock"):
        if not image_exists(BASE_IMAGE):
            _import_rootfs(BASE_IMAGE, BASE_PACKAGES)
    return BASE_IMAGE


def _wheels(target: Path, *requirements: str) -> None:
    """Wheels of `requirements` and all they need, pinned by constraints.txt, built on the host into `target`."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    run([sys.executable, "-m", "pip", "wheel", "--quiet", "-c", REPO / "constraints.txt", "--wheel-dir", target,
         *requirements], timeout_s=BUILD_TIMEOUT_S)


def services_image() -> str:
    """MariaDB, Redis, nginx (Debian's) and moto's S3 server in one image (cached, about 3 minutes when missing)."""
    with cache_lock("containers.lock"):
        if not image_exists(SERVICES_IMAGE):
            with tempfile.TemporaryDirectory() as scratch:
                wheels = Path(scratch) / "wheels"
                _wheels(wheels, "moto[server]")
                install = (f"python3 -m venv {MOTO_VENV} && {MOTO_VENV}/bin/pip install --quiet --no-index "
                           f"--no-cache-dir --find-links /tmp/wheels 'moto[server]' && rm -rf /tmp/wheels")
                _import_rootfs(SERVICES_IMAGE, SERVICES_PACKAGES, hooks=(
                    f"copy-in {wheels} /tmp", f'chroot "$1" sh -c {shlex.quote(install)}'))
    return SERVICES_IMAGE


def _sources_digest() -> str:
    """A digest of the tracked files the image is built from (git ls-files, so caches and builds stay out)."""
    listed = run(["git", "-C", REPO, "ls-files", "-z", "--", *IMAGE_SOURCES]).split("\0")
    digest = hashlib.sha256()
    for name in sorted(filter(None, listed)):
        path = REPO / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_image(tag: str | None = None, *, labels: dict[str, str] | None = None) -> str:
    """The ScaiGrid image from this tree, on the cached base; returns its tag, by default IMAGE-<digest of the
    sources>, so that trees with other sources (git worktrees side by side) keep their own image instead of
    rebuilding one tag in turn. Built only when missing, or when its sources or `labels` differ from the tag's."""
    base = base_image()
    sources = _sources_digest()
    tag = tag or f"{IMAGE}-{sources}"
    wanted = {SOURCE_LABEL: sources, **(labels or {})}
    with cache_lock("containers.lock"):
        if image_exists(tag):
            have = podman("image", "inspect", "--format", "{{json .Labels}}", tag)
            if all(f'"{key}":"{value}"' in have for key, value in wanted.items()):
                return tag
        _wheels(WHEELS_DIR, f"{REPO}[container]")
        label_args = [arg for key, value in wanted.items() for arg in ("--label", f"{key}={value}")]
        # --format docker: an OCI image would drop the HEALTHCHECK.
        podman("build", "--format", "docker", "--build-arg", f"BASE={base}", *label_args, "--tag", tag,
               "--file", REPO / "Containerfile", REPO, timeout_s=BUILD_TIMEOUT_S)
    return tag


def relabelled(tag: str, new_tag: str, labels: dict[str, str]) -> str:
    """`tag` with `labels` added, as `new_tag`: a new image (its own id) of the same code in a second, as a release
    of an unchanged tree would be. Returns `new_tag`."""
    label_lines = "".join(f'LABEL {key}="{value}"\n' for key, value in labels.items())
    run(["podman", "build", "--format", "docker", "--tag", new_tag, "--file", "-", str(REPO / "deploy" / "container")],
        input_bytes=f"FROM {tag}\n{label_lines}".encode(), timeout_s=BUILD_TIMEOUT_S)
    return new_tag


def image_id(tag: str) -> str:
    return podman("image", "inspect", "--format", "{{.Id}}", tag).strip()


def image_size_bytes(tag: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag))


def health(container: str) -> bool:
    """Runs the container's HEALTHCHECK once (there is no systemd here to run it on a timer); True when healthy."""
    return subprocess.run(["podman", "healthcheck", "run", container], capture_output=True, timeout=COMMAND_TIMEOUT_S,
                          check=False).returncode == 0


@contextlib.contextmanager
def healthchecks_driven(label: str, interval_s: float = 2.0) -> Iterator[None]:
    """Runs the healthchecks of the running containers labelled `label` every `interval_s` in a thread, as systemd's
    timers would where there is systemd: compose's service_healthy conditions wait on what they record."""
    stop = threading.Event()

    def drive() -> None:
        while not stop.is_set():
            listed = subprocess.run(["podman", "ps", "--filter", f"label={label}", "--format", "{{.Names}}"],
                                    capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
            # All at once: one after another, a dozen containers' checks would take longer than the interval.
            checks = [subprocess.Popen(["podman", "healthcheck", "run", name], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL) for name in listed.stdout.split()]
            for check in checks:
                try:
                    check.wait(timeout=COMMAND_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    check.kill()
                    check.wait()
            stop.wait(interval_s)

    driver = threading.Thread(target=drive, name="healthchecks", daemon=True)
    driver.start()
    try:
        yield
    finally:
        stop.set()
        driver.join(timeout=COMMAND_TIMEOUT_S)


@contextlib.contextmanager
def api_service(directory: Path) -> Iterator[str]:
    """`podman system service` on a unix socket in `directory`: the Docker API that docker-compose talks to.
    Yields the DOCKER_HOST value; stops the service at the end."""
    socket_path = directory / "podman.sock"
    log = open(directory / "podman-service.log", "wb")  # noqa: SIM115 -- open for the service's whole life
    service = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{socket_path}"],
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        docker_host = f"unix://{socket_path}"
        eventually(lambda: subprocess.run(["curl", "-sf", "--unix-socket", str(socket_path), "http://d/_ping"],
                                          capture_output=True, check=False).returncode == 0,
                   "podman's API answers", timeout_s=30, interval_s=0.2)
        yield docker_host
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(service.pid, signal.SIGTERM)
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(service.pid, signal.SIGKILL)
            service.wait()
        log.close()
