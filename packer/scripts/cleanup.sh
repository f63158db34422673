#!/bin/sh
# Last step inside the build VM (as root): removes what would make every appliance booted from the image the same machine.
set -eu
: "${UPLOAD_DIR:?set by the build: the folder of its uploads}"

echo "cleanup: machine-id (systemd makes a new one on first boot)"
# Emptied rather than deleted, as in Debian's own cloud images: systemd writes a new ID into it on boot.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id
ln -s /etc/machine-id /var/lib/dbus/machine-id

echo "cleanup: SSH host keys (new ones on first boot)"
rm -f /etc/ssh/ssh_host_*
install -m 0644 "$UPLOAD_DIR/scaigrid-ssh-host-keys.service" /etc/systemd/system/
systemctl enable scaigrid-ssh-host-keys.service
rm -f /etc/ssh/sshd_config.d/00-packer-build.conf

echo "cleanup: cloud-init state and the build's hostname (the operator's NoCloud seed is read as a new instance)"
cloud-init clean --logs --seed
truncate -s 0 /etc/hostname

echo "cleanup: build uploads (the wheel, constraints, pip's CA bundle), pip and apt caches, logs"
rm -rf "$UPLOAD_DIR"
rm -rf /root/.cache
apt-get clean
rm -rf /var/lib/apt/lists/*
journalctl --rotate
journalctl --vacuum-time=1s
# journald maps its open files (vacuumed above), so the journal directory is left alone.
find /var/log -path /var/log/journal -prune -o -type f \( -name '*.gz' -o -name '*.[0-9]' \) -exec rm -f {} +
find /var/log -path /var/log/journal -prune -o -type f -exec truncate -s 0 {} +

echo "cleanup: trim free blocks (they leave the qcow2)"
fstrim --all --verbose
