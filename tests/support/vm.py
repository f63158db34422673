"""A VM image booted under qemu's software emulation for the image test: NoCloud seeds, SSH in, the disk read offline.

The VM's user-mode network is restricted: it reaches nothing but the forwards given here, which listen on the host's
loopback only (SSH, HTTPS) or lead from one guest address to one loopback port (a stand-in backend).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from appliance import devstack
from tests.support.waiting import eventually

# The guest address that leads to a host service (guestfwd); no other leaves the VM.
HOST_FROM_GUEST = "10.0.2.100"
SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
               "-o", "BatchMode=yes", "-o", "ConnectTimeout=10")


def seed_iso(directory: Path, user_data: dict[str, Any], meta_data: dict[str, str]) -> Path:
    """A NoCloud seed: an ISO labelled cidata holding user-data (cloud-config) and meta-data."""
    directory.mkdir(parents=True)
    (directory / "user-data").write_text("#cloud-config\n" + yaml.safe_dump(user_data, sort_keys=False))
    (directory / "meta-data").write_text(yaml.safe_dump(meta_data, sort_keys=False))
    iso = directory / "seed.iso"
    subprocess.run(["xorriso", "-as", "genisoimage", "-quiet", "-output", str(iso), "-volid", "cidata", "-joliet",
                    "-rock", str(directory / "user-data"), str(directory / "meta-data")],
                   check=True, capture_output=True, timeout=60)
    return iso


@dataclass
class VM:
    name: str
    process: subprocess.Popen[bytes]
    console: Path
    key: Path
    user: str
    ssh_port: int
    https_port: int
    started_at_s: float

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def ssh(self, command: str, *, check: bool = True, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """One shell command in the VM as the seed's user (sudo for root)."""
        result = subprocess.run(["ssh", *SSH_OPTIONS, "-i", str(self.key), "-p", str(self.ssh_port),
                                 f"{self.user}@127.0.0.1", command],
                                capture_output=True, text=True, timeout=timeout_s, check=False)
        if check and result.returncode != 0:
            raise AssertionError(f"{command!r} in {self.name} exited {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def copy_in(self, local: Path, remote: str) -> None:
        subprocess.run(["scp", *SSH_OPTIONS, "-i", str(self.key), "-P", str(self.ssh_port), str(local),
                        f"{self.user}@127.0.0.1:{remote}"], check=True, capture_output=True, timeout=120)

    def answers_ssh(self) -> bool:
        return self.process.poll() is None and self.ssh("true", check=False, timeout_s=30).returncode == 0

    def host_keys(self) -> set[str]:
        """The SSH host keys the VM presents, as ssh-keyscan lines."""
        scan = subprocess.run(["ssh-keyscan", "-p", str(self.ssh_port), "127.0.0.1"], capture_output=True, text=True,
                              timeout=60, check=True)
        return {line.split(" ", 1)[1] for line in scan.stdout.splitlines() if line and not line.startswith("#")}

    def console_tail(self, size: int = 6000) -> str:
        return self.console.read_text(errors="replace")[-size:] if self.console.exists() else ""

    def wait_for_exit(self, timeout_s: float) -> int:
        return self.process.wait(timeout_s)

    def stop(self) -> None:
        """Ends qemu, as pulling the plug would (the overlay is thrown away with the work directory)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)


@contextlib.contextmanager
def booted(image: Path, work_dir: Path, seed: Path, *, name: str, key: Path, user: str,
           guest_forwards: dict[int, int] | None = None) -> Iterator[VM]:
    """`image` booted under qemu (tcg) from an overlay in work_dir, so the image itself stays as built.

    guest_forwards maps a port of HOST_FROM_GUEST, as the VM sees it, to a port of the host's loopback.
    """
    disk = work_dir / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image), str(disk)],
                   check=True, timeout=60)
    ssh_port, https_port = devstack.free_ports(2)
    # restrict=on: the guest reaches no address outside the VM but the guestfwd ones; hostfwd listens on loopback.
    netdev = ["user", "id=net0", "restrict=on", f"hostfwd=tcp:127.0.0.1:{ssh_port}-:22",
              f"hostfwd=tcp:127.0.0.1:{https_port}-:443"]
    # cmd: opens one connection to the host service per guest connection (a tcp: chardev would be one for all).
    netdev += [f"guestfwd=tcp:{HOST_FROM_GUEST}:{guest}-cmd:socat - TCP:127.0.0.1:{host}"
               for guest, host in (guest_forwards or {}).items()]
    console = work_dir / f"{name}-console.log"
    # The image's own virtual hardware (packer's memory_mb and cpus defaults).
    argv = ["qemu-system-x86_64", "-machine", "pc,accel=tcg", "-m", "4096", "-smp", "2",
            "-drive", f"file={disk},if=virtio,format=qcow2,discard=unmap",
            "-drive", f"file={seed},media=cdrom,readonly=on",
            "-netdev", ",".join(netdev), "-device", "virtio-net-pci,netdev=net0",
            "-display", "none", "-serial", f"file:{console}", "-monitor", "none", "-no-reboot"]
    log = (work_dir / f"{name}-qemu.log").open("wb")
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    vm = VM(name, process, console, key, user, ssh_port, https_port, time.monotonic())
    try:
        yield vm
    finally:
        vm.stop()
        log.close()


def wait_for_ssh(vm: VM, timeout_s: float) -> None:
    eventually(vm.answers_ssh, f"SSH of {vm.name}", timeout_s, interval_s=5,
               context=lambda: f"qemu exit: {vm.process.poll()}\nconsole:\n{vm.console_tail()}")


@contextlib.contextmanager
def mounted(disk: Path, work_dir: Path) -> Iterator[Path]:
    """The root filesystem of a (qcow2) disk, mounted read-only: a sparse raw copy, a loop device at the partition."""
    raw = work_dir / f"{disk.stem}.raw"
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(disk), str(raw)], check=True, timeout=600)
    table = json.loads(subprocess.run(["sfdisk", "--json", str(raw)], capture_output=True, text=True, check=True,
                                      timeout=60).stdout)
    (partition,) = table["partitiontable"]["partitions"]
    offset = int(partition["start"]) * 512
    mount_point = work_dir / f"{disk.stem}.mnt"
    mount_point.mkdir()
    loop = subprocess.run(["losetup", "--find", "--show", "--read-only", "--offset", str(offset), str(raw)],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    try:
        # noload: a read-only look replays no journal.
        subprocess.run(["mount", "-o", "ro,noload", loop, str(mount_point)], check=True, timeout=60)
        try:
            yield mount_point
        finally:
            subprocess.run(["umount", str(mount_point)], check=True, timeout=60)
    finally:
        subprocess.run(["losetup", "-d", loop], check=True, timeout=60)
        raw.unlink()


def files_containing(root: Path, needles: Sequence[str], *, skip: Sequence[str] = ("proc", "sys", "dev")) -> list[str]:
    """Paths under root (a mounted image) of the regular files holding any of the needles."""
    if not needles:
        return []
    argv = ["grep", "-rlF", "--no-messages", *(arg for needle in needles for arg in ("-e", needle)),
            *(f"--exclude-dir={name}" for name in skip), "."]
    result = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=900, check=False)
    return sorted(line.removeprefix("./") for line in result.stdout.splitlines())
