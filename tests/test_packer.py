"""The image build: packer accepts the template and refuses bad variables; the OVA step; the cloud-init seeds."""

import hashlib
import json
import re
import subprocess
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from appliance import config

REPO = Path(__file__).resolve().parents[1]
PACKER = REPO / "packer"
# packer validate fetches a file: checksum list over the network, which CI does not have: a literal checksum
# stands in for the default (the variable's own validation still checks the default's form).
OFFLINE_CHECKSUM = "sha512:" + "0" * 128
OVF = "{http://schemas.dmtf.org/ovf/envelope/1}"
RASD = "{http://schemas.dmtf.org/wbem/wscim/1/cim-schema/2/CIM_ResourceAllocationSettingData}"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    # validate only checks that the wheel exists; the build uploads it.
    path = tmp_path / "scaigrid-0.0.0-py3-none-any.whl"
    path.write_bytes(b"")
    return path


def packer_validate(*variables: str) -> subprocess.CompletedProcess[str]:
    args = [arg for variable in variables for arg in ("-var", variable)]
    return subprocess.run(["packer", "validate", *args, str(PACKER)], capture_output=True, text=True,
                          check=False, timeout=60)


def test_template_validates(wheel: Path) -> None:
    result = packer_validate(f"wheel={wheel}", f"debian_image_checksum={OFFLINE_CHECKSUM}")
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("variable", "message"), [
    ("disk_size_gb=4", "The disk_size_gb must be a whole number from 8 to 4096"),
    ("debian_image_checksum=md5:d41d8cd98f00b204e9800998ecf8427e",
     "The debian_image_checksum must be sha256:<64 hex digits>, sha512:<128 hex digits>"),
    ("debian_image_url=http://cloud.debian.org/debian-12-generic-amd64.qcow2",
     "The debian_image_url must be an https:// or file:// URL of a .qcow2 image."),
    ("garage_sha256=not-a-digest", "The garage_sha256 must be empty or 64 lowercase hex digits."),
    ("accelerator=hvf", "The accelerator must be kvm or tcg."),
    ("base=ubuntu", "The base must be cloud or local."),
    ("local_base=build/base/debian.img", "The local_base must name a .qcow2 file."),
    ("pip_ca_cert=/nonexistent/ca.pem", "The pip_ca_cert must name an existing file of PEM certificates."),
])
def test_bad_variable_is_refused_with_its_message(wheel: Path, variable: str, message: str) -> None:
    result = packer_validate(f"wheel={wheel}", f"debian_image_checksum={OFFLINE_CHECKSUM}", variable)
    assert result.returncode != 0
    # packer wraps messages to the terminal width.
    assert message in " ".join((result.stdout + result.stderr).split())


def test_the_local_base_is_taken_with_the_checksum_list_beside_it(wheel: Path, tmp_path: Path) -> None:
    base = tmp_path / "base" / "debian-12-local-amd64.qcow2"
    base.parent.mkdir()
    base.write_bytes(b"a disk")
    missing = packer_validate(f"wheel={wheel}", "base=local", f"local_base={base}")
    assert missing.returncode != 0
    assert f"stat {base.parent}/SHA256SUMS: no such file" in missing.stdout + missing.stderr
    (base.parent / "SHA256SUMS").write_text(f"{hashlib.sha256(b'a disk').hexdigest()}  {base.name}\n")
    result = packer_validate(f"wheel={wheel}", "base=local", f"local_base={base}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_missing_wheel_is_refused(tmp_path: Path) -> None:
    result = packer_validate(f"wheel={tmp_path / 'absent.whl'}", f"debian_image_checksum={OFFLINE_CHECKSUM}")
    assert result.returncode != 0
    assert "The wheel must name an existing .whl file" in " ".join((result.stdout + result.stderr).split())


def test_ova_carries_the_disk_and_a_descriptor_that_matches_it(tmp_path: Path) -> None:
    qcow2 = tmp_path / "appliance-test.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
    # Data in the disk, so that the comparison below shows the conversion kept it.
    subprocess.run(["qemu-io", "-c", "write -P 0xab 1M 2M", str(qcow2)], check=True, capture_output=True)
    env = {"PATH": "/usr/bin:/bin", "OUTPUT_DIR": str(tmp_path), "VM_NAME": "appliance-test", "CPUS": "4",
           "MEMORY_MB": "8192", "OVF_TEMPLATE": str(PACKER / "ova/appliance.ovf.in")}
    subprocess.run([str(PACKER / "scripts/make-ova.sh")], env=env, check=True, capture_output=True, timeout=60)

    with tarfile.open(tmp_path / "appliance-test.ova") as ova:
        # Importers read the descriptor first and then the manifest, as the OVF specification orders them.
        assert ova.getnames() == ["appliance-test.ovf", "appliance-test.mf", "appliance-test.vmdk"]
        ova.extractall(tmp_path / "unpacked", filter="data")
    unpacked = tmp_path / "unpacked"
    vmdk = unpacked / "appliance-test.vmdk"

    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(vmdk)], check=True,
                                     capture_output=True, text=True).stdout)
    assert info["format"] == "vmdk"
    assert info["format-specific"]["data"]["create-type"] == "streamOptimized"
    subprocess.run(["qemu-img", "compare", "-q", str(qcow2), str(vmdk)], check=True)

    envelope = ET.parse(unpacked / "appliance-test.ovf").getroot()
    file_ref = envelope.find(f"{OVF}References/{OVF}File")
    assert file_ref is not None
    assert file_ref.get(f"{OVF}href") == "appliance-test.vmdk"
    assert file_ref.get(f"{OVF}size") == str(vmdk.stat().st_size)
    disk = envelope.find(f"{OVF}DiskSection/{OVF}Disk")
    assert disk is not None
    assert disk.get(f"{OVF}capacity") == str(64 * 1024**2)
    quantities = {item.findtext(f"{RASD}ResourceType"): item.findtext(f"{RASD}VirtualQuantity")
                  for item in envelope.iter(f"{OVF}Item")}
    assert quantities["3"] == "4"  # CPUs
    assert quantities["4"] == "8192"  # memory, MiB

    manifest = (unpacked / "appliance-test.mf").read_text().splitlines()
    expected = [f"SHA256({name})= {hashlib.sha256((unpacked / name).read_bytes()).hexdigest()}"
                for name in ("appliance-test.ovf", "appliance-test.vmdk")]
    assert manifest == expected


def test_cloud_init_seeds_are_cloud_config() -> None:
    # cloud-init silently ignores user-data whose first line is not "#cloud-config".
    for seed in ("build", "first-boot"):
        text = (PACKER / "cloud-init" / seed / "user-data").read_text()
        assert text.splitlines()[0] == "#cloud-config", seed
        assert isinstance(yaml.safe_load(text), dict), seed
        meta = yaml.safe_load((PACKER / "cloud-init" / seed / "meta-data").read_text())
        assert meta["instance-id"], seed


def test_first_boot_example_writes_an_appliance_env_that_check_config_accepts(tmp_path: Path) -> None:
    user_data = yaml.safe_load((PACKER / "cloud-init/first-boot/user-data").read_text())
    files = {entry["path"]: entry for entry in user_data["write_files"]}
    env = files[str(config.DEFAULT_CONFIG)]
    assert re.fullmatch(r"0[0-7]{3}", env["permissions"])
    assert int(env["permissions"], 8) & 0o007 == 0, "appliance.env may hold S3 credentials: not world-readable"
    path = tmp_path / "appliance.env"
    path.write_text(env["content"])
    appliance = config.load(path)
    assert appliance.config.hostname == "grid.example.internal"
