// What the build does in the VM: the same provisioning as a bare-host install, then the image cleanup;
// and on the build host afterwards: the VMDK and OVA.

locals {
  // Everything the build uploads goes in one folder, which the cleanup removes. The wheel keeps its name:
  // pip refuses a wheel whose file name is not name-version-tags.whl.
  upload_dir  = "/tmp/scaigrid-src"
  wheel_in_vm = "${local.upload_dir}/${basename(var.wheel)}"
}

build {
  sources = ["source.qemu.appliance"]

  // cloud-init may still be growing the root filesystem when SSH first answers. Only the wait matters here:
  // a failed optional module (say, locale) must not stop the build, so its report is shown and passed over.
  provisioner "shell" {
    inline = [
      "cloud-init status --wait --long || true",
      "mkdir -p ${local.upload_dir}",
    ]
  }

  provisioner "file" {
    source      = var.wheel
    destination = local.wheel_in_vm
  }

  provisioner "file" {
    source      = "${path.root}/../appliance/provision.sh"
    destination = "${local.upload_dir}/provision.sh"
  }

  // No trailing slash: uploads the folder itself, as upload_dir/systemd.
  provisioner "file" {
    source      = "${path.root}/../systemd"
    destination = local.upload_dir
  }

  // pip installs the versions the project tests (constraints.txt), trusting the CA bundle the build was given.
  provisioner "file" {
    source      = "${path.root}/../constraints.txt"
    destination = "${local.upload_dir}/constraints.txt"
  }

  provisioner "file" {
    source      = var.pip_ca_cert
    destination = "${local.upload_dir}/pip-ca.pem"
  }

  provisioner "shell" {
    // provision.sh reads GARAGE_URL and GARAGE_SHA256 (empty values skip its garage stage); pip its PIP_ variables.
    environment_vars = [
      "GARAGE_URL=${var.garage_url}",
      "GARAGE_SHA256=${var.garage_sha256}",
      "PIP_CONSTRAINT=${local.upload_dir}/constraints.txt",
      "PIP_CERT=${local.upload_dir}/pip-ca.pem",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    inline = [
      "bash ${local.upload_dir}/provision.sh --wheel ${local.wheel_in_vm} --units-dir ${local.upload_dir}/systemd",
    ]
  }

  provisioner "file" {
    source      = "${path.root}/files/scaigrid-ssh-host-keys.service"
    destination = "${local.upload_dir}/scaigrid-ssh-host-keys.service"
  }

  provisioner "shell" {
    environment_vars = ["UPLOAD_DIR=${local.upload_dir}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    script           = "${path.root}/scripts/cleanup.sh"
  }

  post-processor "shell-local" {
    environment_vars = [
      "OUTPUT_DIR=${var.output_dir}",
      "VM_NAME=${var.vm_name}",
      "CPUS=${var.cpus}",
      "MEMORY_MB=${var.memory_mb}",
      "OVF_TEMPLATE=${abspath(path.root)}/ova/appliance.ovf.in",
    ]
    inline = ["${abspath(path.root)}/scripts/make-ova.sh"]
  }
}
