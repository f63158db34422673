// Inputs of the appliance image build; packer/README.md explains each with an example.
// Packer 1.6.6 (Debian 12) has no regex(): patterns are checked as "regex_replace leaves nothing".

variable "base" {
  type        = string
  default     = "cloud"
  description = "What the image is built on: cloud, Debian's cloud image (debian_image_url); local, a disk of the same kind built from Debian packages by packer/scripts/local-base.sh (local_base), where cloud.debian.org cannot be reached."

  validation {
    condition     = contains(["cloud", "local"], var.base)
    error_message = "The base must be cloud or local."
  }
}

variable "local_base" {
  type        = string
  default     = "build/base/debian-12-local-amd64.qcow2"
  description = "With base = local: the disk local-base.sh wrote, checked against the SHA256SUMS it wrote beside it."

  validation {
    condition     = regex_replace(var.local_base, "^.+\\.qcow2$", "") == ""
    error_message = "The local_base must name a .qcow2 file."
  }
}

variable "debian_image_url" {
  type        = string
  default     = "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-generic-amd64.qcow2"
  description = "Debian 12 cloud image (qcow2) the appliance is built on: generic, not genericcloud, whose kernel lacks the drivers VMware and VirtualBox need for the OVA."

  validation {
    condition     = regex_replace(var.debian_image_url, "^(https|file)://.+\\.qcow2$", "") == ""
    error_message = "The debian_image_url must be an https:// or file:// URL of a .qcow2 image."
  }
}

variable "debian_image_checksum" {
  type        = string
  default     = "file:https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
  description = "Checksum of debian_image_url: sha256:<64 hex>, sha512:<128 hex>, or file:<URL of a SHA*SUMS list> (the default follows the latest image's list)."

  validation {
    condition     = regex_replace(var.debian_image_checksum, "^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128}|file:(https|file)://.+)$", "") == ""
    error_message = "The debian_image_checksum must be sha256:<64 hex digits>, sha512:<128 hex digits> or file:<URL of a checksum list>."
  }
}

variable "wheel" {
  type        = string
  description = "Path of the ScaiGrid wheel installed into the image (make image builds it into build/dist/)."

  validation {
    condition     = regex_replace(var.wheel, "^.+\\.whl$", "") == "" && fileexists(var.wheel)
    error_message = "The wheel must name an existing .whl file (make image builds one into build/dist/)."
  }
}

variable "pip_ca_cert" {
  type        = string
  default     = "/etc/ssl/certs/ca-certificates.crt"
  description = "CA bundle pip in the build VM trusts (PIP_CERT): the build host's by default, so that an index reached through a TLS-inspecting proxy the host trusts works in the VM too. Uploaded with the build's files and removed with them: never left in the image."

  validation {
    condition     = fileexists(var.pip_ca_cert)
    error_message = "The pip_ca_cert must name an existing file of PEM certificates."
  }
}

variable "garage_url" {
  type        = string
  default     = ""
  description = "Optional: https URL of a Garage binary to bundle; needs garage_sha256. Empty: no Garage."

  validation {
    condition     = var.garage_url == "" || regex_replace(var.garage_url, "^https://.+", "") == ""
    error_message = "The garage_url must be empty or an https:// URL."
  }
}

variable "garage_sha256" {
  type        = string
  default     = ""
  description = "SHA-256 (64 hex digits) the Garage binary at garage_url must have; provisioning refuses any other file."

  validation {
    condition     = var.garage_sha256 == "" || regex_replace(var.garage_sha256, "^[0-9a-f]{64}$", "") == ""
    error_message = "The garage_sha256 must be empty or 64 lowercase hex digits."
  }
}

variable "vm_name" {
  type        = string
  default     = "scaigrid-appliance"
  description = "Base name of the outputs: <vm_name>.qcow2, .vmdk, .ovf, .mf and .ova."

  validation {
    condition     = regex_replace(var.vm_name, "^[a-z0-9][a-z0-9.-]{0,62}$", "") == ""
    error_message = "The vm_name must be 1-63 characters of a-z, 0-9, dot and dash, starting with a letter or digit."
  }
}

variable "output_dir" {
  type        = string
  default     = "build/image"
  description = "Directory the qcow2, vmdk and OVA are written to; must not exist yet (packer build -force replaces it)."

  validation {
    condition     = length(var.output_dir) > 0
    error_message = "The output_dir must not be empty."
  }
}

variable "disk_size_gb" {
  type        = number
  default     = 40
  description = "Virtual disk size in GiB; the root filesystem grows to fill it on boot, and again when an operator enlarges the disk."

  validation {
    condition     = var.disk_size_gb >= 8 && var.disk_size_gb <= 4096 && floor(var.disk_size_gb) == var.disk_size_gb
    error_message = "The disk_size_gb must be a whole number from 8 to 4096: MariaDB, logs and the venv need at least 8 GiB."
  }
}

variable "memory_mb" {
  type        = number
  default     = 4096
  description = "Memory of the build VM and of the OVA's virtual hardware, in MiB."

  validation {
    condition     = var.memory_mb >= 2048 && floor(var.memory_mb) == var.memory_mb
    error_message = "The memory_mb must be a whole number of at least 2048: MariaDB, Redis and four ScaiGrid processes share it."
  }
}

variable "cpus" {
  type        = number
  default     = 2
  description = "Virtual CPUs of the build VM and of the OVA's virtual hardware."

  validation {
    condition     = var.cpus >= 1 && var.cpus <= 64 && floor(var.cpus) == var.cpus
    error_message = "The cpus must be a whole number from 1 to 64."
  }
}

variable "accelerator" {
  type        = string
  default     = "kvm"
  description = "qemu accelerator: kvm where /dev/kvm works, tcg (software emulation, several times slower) elsewhere."

  validation {
    condition     = contains(["kvm", "tcg"], var.accelerator)
    error_message = "The accelerator must be kvm or tcg."
  }
}

variable "headless" {
  type        = bool
  default     = true
  description = "Run qemu without a display window; false shows the console, for watching a build."
}

variable "ssh_timeout" {
  type        = string
  default     = "30m"
  description = "How long to wait for the build VM's SSH after boot (a Go duration); raise it with accelerator = tcg."

  validation {
    condition     = regex_replace(var.ssh_timeout, "^[0-9]+[smh]$", "") == ""
    error_message = "The ssh_timeout must be a number followed by s, m or h, e.g. 30m."
  }
}
