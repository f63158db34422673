#!/usr/bin/env bash
# Builds the image's base from Debian packages where Debian's cloud image cannot be fetched (make image BASE=local):
# a Debian 12 disk of the same kind, with cloud-init, openssh-server, sudo, a kernel and a boot loader, as qcow2.
#
#   sudo packer/scripts/local-base.sh build/base/debian-12-local-amd64.qcow2
#
# Writes OUTPUT and OUTPUT's SHA256SUMS beside it (Packer checks the base against that list). Needs root (a loop
# device to install the boot loader), mmdebstrap, sfdisk, extlinux and qemu-img; reaches Debian's mirror only.
# Differences from the cloud image, on purpose: extlinux instead of GRUB (it installs into a mounted filesystem, so no
# partitioned loop device is needed: these hosts have no udev to make one); the appliance's Debian packages are
# already in (provision.sh's list: installing them in the build VM under software emulation costs minutes, and its
# packages stage is tested on its own); cloud-init looks for NoCloud only (no metadata service is ever probed).
set -euo pipefail

output=${1:?usage: $0 OUTPUT.qcow2}
readonly SUITE=bookworm
readonly DISK_SIZE=3G
readonly ROOT_OFFSET=1048576  # the root partition starts at 1 MiB, as partitioning tools place it
here=$(dirname "$(readlink -f "$0")")
# provision.sh's own list, so the two cannot drift apart.
appliance_packages=$(sed -n 's/^readonly PACKAGES=(\(.*\))$/\1/p' "$here/../../appliance/provision.sh")
[[ -n $appliance_packages ]] || { echo "local-base: no PACKAGES=(...) line in appliance/provision.sh" >&2; exit 1; }
packages=(
    linux-image-amd64 extlinux systemd-sysv dbus cloud-init cloud-guest-utils openssh-server sudo
    ifupdown isc-dhcp-client netbase locales ca-certificates e2fsprogs
    $appliance_packages
)
[[ $(id -u) -eq 0 ]] || { echo "local-base: must run as root (a loop device installs the boot loader)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/local-base.XXXXXX")
loop=""
cleanup() {
    if mountpoint -q "$work/mnt"; then umount "$work/mnt"; fi
    if [[ -n $loop ]]; then losetup -d "$loop"; fi
    rm -rf "$work"
}
trap cleanup EXIT

uuid=$(cat /proc/sys/kernel/random/uuid)
echo "local-base: [1/4] Debian $SUITE root filesystem (mmdebstrap, a few minutes)"
# The setup hook writes fstab before any package is configured: initramfs-tools reads the root device from it.
mmdebstrap --quiet --variant=important --include="$(IFS=,; echo "${packages[*]}")" \
    --setup-hook="mkdir -p \"\$1/etc\" && echo 'UUID=$uuid / ext4 defaults,errors=remount-ro 0 1' > \"\$1/etc/fstab\"" \
    "$SUITE" "$work/root" \
    "deb http://deb.debian.org/debian $SUITE main" \
    "deb http://deb.debian.org/debian $SUITE-updates main" \
    "deb http://deb.debian.org/debian-security $SUITE-security main"

echo "local-base: [2/4] boot loader, cloud-init and first-boot settings"
root=$work/root
mkdir -p "$root/boot/extlinux"
# Debian keeps /vmlinuz and /initrd.img pointing at the newest kernel: a kernel upgrade needs no change here.
cat >"$root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 0
PROMPT 0
LABEL debian
    LINUX /vmlinuz
    INITRD /initrd.img
    APPEND root=UUID=$uuid ro console=tty0 console=ttyS0,115200
EOF
cat >"$root/etc/cloud/cloud.cfg.d/90-scaigrid-local-base.cfg" <<'EOF'
# local-base.sh: seeds come on a NoCloud disk (label cidata); no metadata service is probed over the network.
datasource_list: [NoCloud, None]
# As Debian's cloud images: the hostname resolves (sudo asks), and a locale that needs no generating.
manage_etc_hosts: true
locale: C.UTF-8
EOF
# Each machine makes its own: the image build's cleanup removes them again anyway.
rm -f "$root"/etc/ssh/ssh_host_*
truncate -s 0 "$root/etc/machine-id"
echo "localhost" >"$root/etc/hostname"
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb

echo "local-base: [3/4] disk: one bootable partition, ext4 filled from the root filesystem"
raw=$work/disk.raw
truncate -s "$DISK_SIZE" "$raw"
echo "start=$((ROOT_OFFSET / 512)), type=83, bootable" | sfdisk --quiet "$raw"
size_kib=$(( ($(stat -c %s "$raw") - ROOT_OFFSET) / 1024 ))
mkfs.ext4 -q -L debian-root -U "$uuid" -d "$root" -E "offset=$ROOT_OFFSET" "$raw" "${size_kib}k"
mkdir "$work/mnt"
loop=$(losetup --find --show --offset "$ROOT_OFFSET" --sizelimit "$((size_kib * 1024))" "$raw")
mount "$loop" "$work/mnt"
extlinux --install "$work/mnt/boot/extlinux" >/dev/null
umount "$work/mnt"
losetup -d "$loop"
loop=""
# The MBR's code boots the partition marked bootable, whose boot record extlinux wrote.
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none

echo "local-base: [4/4] qcow2"
mkdir -p "$(dirname "$output")"
qemu-img convert -c -O qcow2 "$raw" "$output.partial"
mv "$output.partial" "$output"
(cd "$(dirname "$output")" && sha256sum "$(basename "$output")" >SHA256SUMS)
echo "local-base: $output ($(du -h "$output" | cut -f1))"
