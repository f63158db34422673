// The build VM: Debian's cloud image (or the local base, var.base) booted in qemu, reached over SSH as a build-only user.

locals {
  // The local base is checked as the cloud image is: against the checksum list written beside it.
  base_url      = var.base == "local" ? "file://${abspath(var.local_base)}" : var.debian_image_url
  base_checksum = var.base == "local" ? "file:file://${abspath(dirname(var.local_base))}/SHA256SUMS" : var.debian_image_checksum
}

source "qemu" "appliance" {
  // The base is already installed: boot it as the disk instead of installing from an ISO.
  iso_url      = local.base_url
  iso_checksum = local.base_checksum
  disk_image   = true

  disk_size      = "${var.disk_size_gb}G"
  format         = "qcow2"
  disk_interface = "virtio"
  net_device     = "virtio-net"
  // Blocks freed by the cleanup's fstrim leave the qcow2 instead of staying allocated in it.
  disk_discard       = "unmap"
  disk_detect_zeroes = "unmap"
  disk_compression   = true

  accelerator = var.accelerator
  cpus        = var.cpus
  memory      = var.memory_mb
  headless    = var.headless

  output_directory = var.output_dir
  vm_name          = "${var.vm_name}.qcow2"

  // A NoCloud seed (an ISO labelled cidata) creates the build user; cloud-init reads it on the first boot.
  cd_files = [
    "${path.root}/cloud-init/build/meta-data",
    "${path.root}/cloud-init/build/user-data",
  ]
  cd_label = "cidata"

  communicator = "ssh"
  ssh_username = "packer"
  // Build-only: the user exists during the build and is deleted by shutdown_command, before the disk is final.
  ssh_password = "packer"
  ssh_timeout  = var.ssh_timeout

  // One root shell does both, because sudo stops working for a user the moment it is deleted.
  shutdown_command = "sudo sh -c 'userdel --force --remove packer && rm -f /etc/sudoers.d/90-cloud-init-users && shutdown -P now'"
  shutdown_timeout = "10m"

  // The build user's password is fixed, so its SSH is forwarded on the build host's loopback only
  // (qemu's default forward listens on every address). Packer fills in the port it picked.
  qemuargs = [
    ["-netdev", "user,id=user.0,hostfwd=tcp:127.0.0.1:{{ .SSHHostPort }}-:22"],
  ]
}
