"""The VM image as a customer gets it: `make image BASE=local` under software emulation, then booted under qemu.

The module's tests run in file order: the image as built (read offline); appliance 1 booted from it with the example
seed (HTTPS, the OpenAI SDK, status over SSH, what makes it its own machine, an upgrade and a rolled-back one, a clean
poweroff); then appliance 2 from the same image with another seed, which must be another machine. Each figure
packer/README.md quotes is printed at the end of the run and kept in the work directory's figures.json.
"""

from __future__ import annotations

import json
import re
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import yaml

import scaigrid
from tests import rootfs
from tests.backends import FakeBackend, chat_model
from tests.support import vm as vms
from tests.support.processes import REPO
from tests.support.waiting import eventually
from tests.support.wheels import build_wheel

# The build alone takes 10 to 20 minutes under emulation (and a fresh machine first makes the base, about 4); each
# later step waits for the appliance within its own timeout below.
pytestmark = pytest.mark.timeout(3600)

LOCAL_BASE_SCRIPT = REPO / "packer" / "scripts" / "local-base.sh"
FIRST_BOOT_SEED = REPO / "packer" / "cloud-init" / "first-boot"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")  # the build's pip_ca_cert (its default)
DEBIAN_CAS = Path("/usr/share/ca-certificates")  # the certificates of Debian's ca-certificates package
VM_NAME = "scaigrid-appliance"
USER = "admin"  # the example seed's operator login
SECRETS_DIR = "/etc/scaigrid/secrets"
TLS_CERT = "/etc/scaigrid/tls/server.crt"  # made by first boot; nginx serves it
BACKEND_PORT_IN_VM = 8080
READY_TIMEOUT_S = 1200
UPGRADE_TIMEOUT_S = 1500
POWEROFF_TIMEOUT_S = 300
MODEL = "vm/chat"
GOOD_VERSION = f"{scaigrid.__version__}.post1"
BAD_VERSION = f"{scaigrid.__version__}.post2"


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("image")


@pytest.fixture(scope="module")
def figures(work_dir: Path, request: pytest.FixtureRequest) -> Iterator[dict[str, float]]:
    """The run's measurements, printed (whatever the outcome) and written to figures.json."""
    measured: dict[str, float] = {}
    yield measured
    (work_dir / "figures.json").write_text(json.dumps(measured, indent=2) + "\n")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print("\nimage figures (" + str(work_dir / "figures.json") + "):")
        for name, value in measured.items():
            print(f"  {name}: {value:g}")


def local_base() -> tuple[Path, bool]:
    """The base disk local-base.sh makes, cached by its inputs (the script and provision.sh's packages); whether
    it was built now."""
    key = rootfs.inputs_digest(LOCAL_BASE_SCRIPT.read_bytes(), (REPO / "appliance" / "provision.sh").read_bytes())
    built = False

    def build(directory: Path) -> None:
        nonlocal built
        rootfs.run([LOCAL_BASE_SCRIPT, directory / "debian-12-local-amd64.qcow2"], timeout_s=1800)
        built = True

    with rootfs.cache_lock("vm-base.lock"):
        return rootfs.build_once(f"vm-base-{key}", build) / "debian-12-local-amd64.qcow2", built


@pytest.fixture(scope="module")
def image(work_dir: Path, figures: dict[str, float]) -> Path:
    """`make image BASE=local` with software emulation: the qcow2 (the VMDK and OVA beside it)."""
    started = time.monotonic()
    base, built = local_base()
    if built:
        figures["local base build (s)"] = round(time.monotonic() - started)
    output = work_dir / "image"
    log = work_dir / "make-image.log"
    started = time.monotonic()
    with log.open("w") as out:
        result = subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "image", "BASE=local",
                                 f"LOCAL_BASE={base}", f"IMAGE_DIR={output}", "PACKER_VARS=-var accelerator=tcg"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, timeout=3000,
                                check=False)
    assert result.returncode == 0, f"make image exited {result.returncode}:\n{log.read_text()[-6000:]}"
    figures["image build, tcg (s)"] = round(time.monotonic() - started)
    for suffix in ("qcow2", "vmdk", "ova"):
        figures[f"{suffix} size (MiB)"] = round((output / f"{VM_NAME}.{suffix}").stat().st_size / 2**20)
    return output / f"{VM_NAME}.qcow2"


@pytest.fixture(scope="module")
def ssh_key(work_dir: Path) -> Path:
    key = work_dir / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "image-test", "-f", str(key)], check=True)
    return key


def seed(work_dir: Path, ssh_key: Path, number: int) -> Path:
    """The example first-boot seed (packer/cloud-init/first-boot), with this test's SSH key and its own instance
    id and hostname; without the example's static network-config, as the VM's address comes from qemu's DHCP."""
    user_data = yaml.safe_load((FIRST_BOOT_SEED / "user-data").read_text())
    meta_data = yaml.safe_load((FIRST_BOOT_SEED / "meta-data").read_text())
    hostname = f"grid{number}"
    user_data["hostname"], user_data["fqdn"] = hostname, f"{hostname}.example.internal"
    (user,) = user_data["users"]
    assert user["name"] == USER
    user["ssh_authorized_keys"] = [ssh_key.with_suffix(".pub").read_text().strip()]
    (env_file,) = (f for f in user_data["write_files"] if f["path"] == "/etc/scaigrid/appliance.env")
    env_file["content"] = env_file["content"].replace("grid.example.internal", f"{hostname}.example.internal") + (
        # One http process instead of one per CPU: every start of the programs is one Python process shorter
        # under emulation, where each takes tens of seconds.
        "HTTP_PROCESSES=1\n")
    meta_data.update({"instance-id": f"scaigrid-appliance-{number}", "local-hostname": hostname})
    return vms.seed_iso(work_dir / f"seed-{number}", user_data, meta_data)


@pytest.fixture(scope="module")
def backend() -> Iterator[FakeBackend]:
    """The stand-in model server: on the host's loopback, reached from the VM at HOST_FROM_GUEST only."""
    server = FakeBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def first(image: Path, work_dir: Path, ssh_key: Path, backend: FakeBackend,
          figures: dict[str, float]) -> Iterator[vms.VM]:
    """Appliance 1, once it answers ready through nginx."""
    with vms.booted(image, work_dir, seed(work_dir, ssh_key, 1), name="appliance-1", key=ssh_key, user=USER,
                    guest_forwards={BACKEND_PORT_IN_VM: backend.port}) as vm:
        vms.wait_for_ssh(vm, READY_TIMEOUT_S)
        eventually(lambda: ready(vm), "appliance 1: /health/ready through nginx", READY_TIMEOUT_S, interval_s=5,
                   ignoring=(httpx2.HTTPError,), context=vm.console_tail)
        figures["boot to HTTPS ready (qemu start to /health/ready through nginx), tcg (s)"] = round(
            time.monotonic() - vm.started_at_s)
        yield vm


@pytest.fixture(scope="module")
def second(image: Path, work_dir: Path, ssh_key: Path, figures: dict[str, float]) -> Iterator[vms.VM]:
    """Appliance 2, booted once appliance 1 is off (two VMs at once are slower on two cores than one after the
    other), and wanted only until its first boot has made what makes it a machine of its own."""
    with vms.booted(image, work_dir, seed(work_dir, ssh_key, 2), name="appliance-2", key=ssh_key, user=USER) as vm:
        vms.wait_for_ssh(vm, READY_TIMEOUT_S)
        eventually(lambda: vm.ssh("test -e /var/lib/scaigrid/firstboot.done", check=False).returncode == 0,
                   "appliance 2: first boot done", READY_TIMEOUT_S, interval_s=5, context=vm.console_tail)
        figures["second appliance: qemu start to first boot done, tcg (s)"] = round(time.monotonic() - vm.started_at_s)
        yield vm


@pytest.fixture(scope="module")
def identities() -> dict[int, dict[str, Any]]:
    """What makes each appliance its own machine, by appliance number."""
    return {}


def tls_context(vm: vms.VM) -> ssl.SSLContext:
    """Trusts the appliance's own (self-signed) certificate, whatever name it was made for."""
    context = ssl.create_default_context(cadata=ssl.get_server_certificate(("127.0.0.1", vm.https_port)))
    context.check_hostname = False
    return context


def ready(vm: vms.VM) -> bool:
    answer = httpx2.get(f"{vm.https_url}/health/ready", verify=False, timeout=10)
    return answer.status_code == 200 and answer.json().get("status") == "ready"


def status(vm: vms.VM) -> dict[str, Any]:
    """`scaigrid-appliance status --json` over SSH, as the seed's operator (with sudo: appliance.env is root's)."""
    result = vm.ssh("sudo scaigrid-appliance status --json", check=False)
    assert result.returncode in (0, 4), result.stdout + result.stderr  # 4: not healthy, the report still printed
    return dict(json.loads(result.stdout))


def healthy(vm: vms.VM) -> bool:
    report = status(vm)
    return bool(report["healthy"]) and all(row["state"] == "RUNNING" for row in report["programs"])


def admin_key(vm: vms.VM) -> str:
    """The bootstrap admin key, read over SSH (root's file): kept in memory, never printed."""
    return vm.ssh(f"sudo cat {SECRETS_DIR}/admin-key").stdout.strip()


def installed_version(vm: vms.VM) -> str:
    return vm.ssh("/opt/scaigrid/venv/bin/python -c 'import scaigrid; print(scaigrid.__version__)'").stdout.strip()


def chat(vm: vms.VM, key: str) -> tuple[str, str]:
    """One answer and one stream through the appliance with the OpenAI SDK: their texts."""
    with openai.DefaultHttpxClient(verify=tls_context(vm), timeout=120) as http:
        client = openai.OpenAI(base_url=f"{vm.https_url}/oai/v1", api_key=key, http_client=http, max_retries=0)
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
        streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    return answer.choices[0].message.content or "", streamed


def test_the_image_holds_no_machine_state_build_user_secrets_or_caches(image: Path, work_dir: Path) -> None:
    with vms.mounted(image, work_dir) as root:
        assert (root / "etc/machine-id").read_text() == ""  # systemd makes one on first boot
        assert not list((root / "etc/ssh").glob("ssh_host_*"))
        for name in ("passwd", "shadow", "group"):
            assert not re.search(r"^packer:", (root / "etc" / name).read_text(), re.M), name
        assert not (root / "home/packer").exists()
        assert not (root / "etc/sudoers.d/90-cloud-init-users").exists()
        assert not (root / "etc/ssh/sshd_config.d/00-packer-build.conf").exists()
        assert not list((root / "var/lib/cloud").glob("instances/*"))  # the operator's seed is a new instance
        # Secrets, TLS key, database and admin key are made on each appliance's first boot, never in the image.
        assert not list((root / "etc/scaigrid").glob("secrets/*"))
        assert not list((root / "etc/scaigrid").glob("tls/*.key"))
        assert not (root / "var/lib/mysql/scaigrid").exists()
        # The build's uploads (wheel, constraints, pip's CA bundle) and caches.
        assert not (root / "tmp/scaigrid-src").exists()
        assert not (root / "root/.cache").exists()
        assert not list((root / "var/cache/apt/archives").glob("*.deb"))
        assert not [p for p in (root / "var/lib/apt/lists").iterdir() if p.name not in ("lock", "partial")]
        assert (root / "usr/local/bin/scaigrid-appliance").is_symlink()
        # The CA bundle pip trusted in the build: no copy of it, nor of a certificate the build host trusts beyond
        # Debian's list (such as a TLS-inspecting proxy's CA).
        debian = set().union(*(pem_blocks(path.read_text()) for path in DEBIAN_CAS.rglob("*.crt")))
        host_only = pem_blocks(HOST_CA_BUNDLE.read_text()) - debian
        needles = [block.splitlines()[1] for block in host_only]  # a line of each one's base64
        assert vms.files_containing(root, needles) == []
        bundle = HOST_CA_BUNDLE.read_bytes()
        same_size = subprocess.run(["find", ".", "-xdev", "-type", "f", "-size", f"{len(bundle)}c"], cwd=root,
                                   capture_output=True, text=True, check=True).stdout.split()
        copies = [p for p in same_size if not p.startswith("./etc/ssl/certs/") and (root / p).read_bytes() == bundle]
        assert copies == []


def pem_blocks(text: str) -> set[str]:
    return set(re.findall(r"-----BEGIN CERTIFICATE-----\n.*?-----END CERTIFICATE-----", text, re.S))


def test_first_boot_brings_every_program_up_running_and_ready(first: vms.VM) -> None:
    eventually(lambda: healthy(first), "every program RUNNING and ready", READY_TIMEOUT_S, interval_s=5)
    report = status(first)
    programs = {row["name"]: row for row in report["programs"]}
    assert {"http_1", "grpc", "worker_1", "nginx", "events"} <= set(programs), programs
    assert all(row["state"] == "RUNNING" and row["ready"] is not False for row in programs.values()), programs
    assert first.ssh("systemctl is-active scaigrid.target scaigrid-appliance.service").stdout.split() == [
        "active", "active"]


def test_the_openai_sdk_chats_and_streams_through_the_appliance(first: vms.VM, backend: FakeBackend) -> None:
    key = admin_key(first)
    base_url = f"http://{vms.HOST_FROM_GUEST}:{BACKEND_PORT_IN_VM}/v1"
    with httpx2.Client(base_url=first.https_url, verify=tls_context(first), timeout=60,
                      headers={"Authorization": f"Bearer {key}"}) as admin:
        made = admin.post("/v1/backends", json={"id": "stand-in", "provider": "custom", "base_url": base_url,
                                                "model": "plain"})
        assert made.status_code == 201, made.text
        model = chat_model(MODEL, [("stand-in", 1, 1)])
        routes = model.pop("routes")
        made = admin.post("/v1/models", json=model)
        assert made.status_code == 201, made.text
        routed = admin.put(f"/v1/routing/{MODEL}", json={"routes": routes})
        assert routed.status_code == 200, routed.text
    before = len(backend.received)
    assert chat(first, key) == ("hello there", "tok0 tok1 tok2 ")
    # Both came from the stand-in on the host, through the VM's one way out to it.
    assert [r.body["model"] for r in backend.received[before:]] == ["plain", "plain"]


def test_the_appliance_is_its_own_machine_with_private_secrets(first: vms.VM,
                                                               identities: dict[int, dict[str, Any]]) -> None:
    assert first.ssh("getent passwd packer", check=False).returncode == 2  # no such user
    assert first.ssh("test -e /home/packer", check=False).returncode == 1
    assert first.ssh("sudo grep -rl packer /etc/sudoers /etc/sudoers.d", check=False).stdout == ""
    assert first.ssh("hostname").stdout.strip() == "grid1"
    modes = dict(line.split(" ", 1) for line in first.ssh(
        f"sudo sh -c \"stat -c '%n %a %U' {SECRETS_DIR} {SECRETS_DIR}/* /etc/scaigrid/appliance.env\"",
    ).stdout.splitlines())
    assert modes.pop(SECRETS_DIR) == "700 root"
    assert {"admin-key", "database-password"} <= {Path(path).name for path in modes}
    assert set(modes.values()) == {"600 root"}, modes
    identities[1] = identity(first)
    assert re.fullmatch(r"[0-9a-f]{32}", identities[1]["machine-id"])
    assert identities[1]["ssh host keys"]


def identity(vm: vms.VM) -> dict[str, Any]:
    """Machine id, SSH host keys, TLS certificate, and digests of the database password and admin key (the secrets
    themselves never leave the VM)."""
    sums = vm.ssh(f"sudo sha256sum {TLS_CERT} {SECRETS_DIR}/database-password {SECRETS_DIR}/admin-key").stdout
    digests = {path: digest for digest, path in (line.split() for line in sums.splitlines())}
    return {"machine-id": vm.ssh("cat /etc/machine-id").stdout.strip(), "ssh host keys": vm.host_keys(),
            "tls certificate": digests[TLS_CERT], "database password": digests[f"{SECRETS_DIR}/database-password"],
            "admin key": digests[f"{SECRETS_DIR}/admin-key"]}


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    work = tmp_path_factory.mktemp("wheels")
    return {GOOD_VERSION: build_wheel(work, GOOD_VERSION), BAD_VERSION: build_wheel(work, BAD_VERSION, broken=True)}


def upgrade(vm: vms.VM, wheel: Path, work_dir: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    """`sudo scaigrid-appliance upgrade` of the wheel, copied in; what it said is also kept in work_dir."""
    vm.copy_in(wheel, f"/tmp/{wheel.name}")
    started = time.monotonic()
    result = vm.ssh(f"sudo scaigrid-appliance upgrade /tmp/{wheel.name}", check=False, timeout_s=UPGRADE_TIMEOUT_S)
    took_s = time.monotonic() - started
    (work_dir / f"upgrade-{wheel.name}.log").write_text(f"exit {result.returncode} after {took_s:.0f} s\n"
                                                        f"{result.stdout}{result.stderr}")
    return result, took_s


def test_an_upgrade_to_the_next_version_passes_the_health_gate(first: vms.VM, wheels: dict[str, Path],
                                                               work_dir: Path, figures: dict[str, float]) -> None:
    result, took_s = upgrade(first, wheels[GOOD_VERSION], work_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[6/6] health gate" in result.stdout and f"upgraded to {GOOD_VERSION}" in result.stdout
    figures["upgrade, tcg (s)"] = round(took_s)
    assert installed_version(first) == GOOD_VERSION
    assert healthy(first)
    assert chat(first, admin_key(first)) == ("hello there", "tok0 tok1 tok2 ")


def test_an_upgrade_that_fails_the_gate_is_rolled_back(first: vms.VM, wheels: dict[str, Path], work_dir: Path,
                                                       figures: dict[str, float]) -> None:
    result, took_s = upgrade(first, wheels[BAD_VERSION], work_dir)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"upgrade to {BAD_VERSION} failed" in result.stderr and f"rolled back to {GOOD_VERSION}" in result.stderr
    figures["failed upgrade rolled back, tcg (s)"] = round(took_s)
    assert installed_version(first) == GOOD_VERSION
    eventually(lambda: healthy(first), "every program RUNNING and ready after the rollback", READY_TIMEOUT_S,
               interval_s=5)
    # The appliance answers as before: the catalogue made before both upgrades, the same key.
    assert chat(first, admin_key(first)) == ("hello there", "tok0 tok1 tok2 ")


def test_poweroff_drains_every_program_and_each_exits_0(first: vms.VM, work_dir: Path,
                                                        figures: dict[str, float]) -> None:
    names = [row["name"] for row in status(first)["programs"]]
    offsets = {log: int(first.ssh(f"stat -c %s /var/log/scaigrid/{log}").stdout)
               for log in ("supervisord.log", "http_1.log")}
    started = time.monotonic()
    first.ssh("sudo systemctl poweroff", check=False)  # SSH may lose its connection on the way down
    assert first.wait_for_exit(POWEROFF_TIMEOUT_S) == 0, first.console_tail()
    figures["poweroff, tcg (s)"] = round(time.monotonic() - started)
    with vms.mounted(work_dir / f"{first.name}.qcow2", work_dir) as root:
        logs = {log: (root / "var/log/scaigrid" / log).read_bytes()[offset:].decode()
                for log, offset in offsets.items()}
    supervisord = logs["supervisord.log"]
    for name in names:
        if name != "events":  # the event listener is stopped by signal like the rest, but says nothing of it
            assert f"stopped: {name} (exit status 0)" in supervisord, supervisord
    assert "SIGKILL" not in supervisord and "FATAL" not in supervisord, supervisord
    assert "drained:" in logs["http_1.log"], logs["http_1.log"]


def test_a_second_appliance_from_the_same_image_is_another_machine(second: vms.VM,
                                                                   identities: dict[int, dict[str, Any]]) -> None:
    assert second.ssh("hostname").stdout.strip() == "grid2"
    identities[2] = identity(second)
    first_one, second_one = identities[1], identities[2]
    for what in first_one:
        assert second_one[what] != first_one[what], what
    assert not first_one["ssh host keys"] & second_one["ssh host keys"]
