# The fleet node AMI: a current Debian (or Ubuntu) image + fleet-agent + Locust in a venv, the
# agent's units enabled (docs/ami.md). The provisioners run ami/provision.sh and ami/cleanup.sh,
# the same files tests/ami/run.sh runs in a debootstrap root.
#
# Usually run through packer/build.sh, which builds the agent for the architecture, runs Packer
# and writes the AMI id into fleet.toml. By hand:
#   Packer >= 1.7:  packer init packer/ && packer build -var agent_binary=... packer/
#   Packer 1.6:     packer build -var agent_binary=... packer/fleet-agent.pkr.hcl
# Packer 1.6 (Debian's package) has the amazon builder built in and does not know the
# `required_plugins` block that Packer >= 1.10 needs to fetch it; that block therefore lives
# alone in packer/plugins.pkr.hcl, and this file holds everything both versions read.

variable "region" {
  type        = string
  default     = "us-east-1"
  description = "AWS region to build in; the AMI is registered there (see ami_regions for copies)."
}

variable "arch" {
  type        = string
  default     = "x86_64"
  description = "x86_64 or arm64: picks the base image, the default instance type and the agent build."
  validation {
    condition     = var.arch == "x86_64" || var.arch == "arm64"
    error_message = "The arch must be x86_64 or arm64."
  }
}

variable "instance_type" {
  type        = string
  default     = ""
  description = "Build instance type. Empty: t3.small (x86_64) or t4g.small (arm64)."
}

variable "base_image_name" {
  type        = string
  default     = ""
  description = "Name filter of the base AMI. Empty: debian-12-amd64-* or debian-12-arm64-*. Ubuntu 24.04: ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-* (with base_image_owners 099720109477, ssh_username ubuntu)."
}

variable "base_image_owners" {
  type        = list(string)
  default     = ["136693071363"]
  description = "Owners of the base AMI: Debian's cloud team (136693071363), or Canonical (099720109477) for Ubuntu."
}

variable "ssh_username" {
  type        = string
  default     = "admin"
  description = "Login of the base image: admin on Debian, ubuntu on Ubuntu."
}

variable "agent_binary" {
  type        = string
  default     = ""
  description = "The fleet-agent release binary for arch. Empty: target/release/fleet-agent (x86_64) or target/aarch64-unknown-linux-gnu/release/fleet-agent (arm64) in the repository."
}

variable "locust_version" {
  type        = string
  default     = "2.47.0"
  description = "The locust release installed from PyPI into /opt/fleet/venv; keep it equal to the controller's (requirements.txt)."
}

variable "ami_name_prefix" {
  type        = string
  default     = "fleet-agent"
  description = "AMI names are <prefix>-<arch>-<UTC timestamp>."
}

variable "ami_regions" {
  type        = list(string)
  default     = []
  description = "Other regions to copy the AMI to."
}

variable "subnet_id" {
  type        = string
  default     = ""
  description = "Subnet for the build instance (needs a route to the internet for apt and PyPI). Empty: the default VPC."
}

variable "manifest" {
  type        = string
  default     = "packer-manifest.json"
  description = "Where the manifest post-processor writes the AMI id (packer/build.sh reads it)."
}

locals {
  debian_arch     = var.arch == "arm64" ? "arm64" : "amd64"
  base_image_name = var.base_image_name != "" ? var.base_image_name : "debian-12-${var.arch == "arm64" ? "arm64" : "amd64"}-*"
  instance_type   = var.instance_type != "" ? var.instance_type : (var.arch == "arm64" ? "t4g.small" : "t3.small")
  agent_binary    = var.agent_binary != "" ? var.agent_binary : (var.arch == "arm64" ? "${path.root}/../target/aarch64-unknown-linux-gnu/release/fleet-agent" : "${path.root}/../target/release/fleet-agent")
  stamp           = formatdate("YYYYMMDD-hhmmss", timestamp())
}

source "amazon-ebs" "fleet" {
  region          = var.region
  ami_regions     = var.ami_regions
  instance_type   = local.instance_type
  subnet_id       = var.subnet_id
  ssh_username    = var.ssh_username
  ami_name        = "${var.ami_name_prefix}-${var.arch}-${local.stamp}"
  ami_description = "fleet node: fleet-agent, Locust ${var.locust_version} (docs/ami.md)"
  ena_support     = true

  source_ami_filter {
    filters = {
      name                = local.base_image_name
      architecture        = var.arch
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = var.base_image_owners
    most_recent = true
  }

  # No metadata_options/imds_support here: Packer 1.6 knows neither. The build instance never
  # reads IMDS, and fleet launches every node with HttpTokens=required itself (docs/ec2.md).

  tags = {
    Name           = "${var.ami_name_prefix}-${var.arch}"
    fleet-image    = "node"
    locust-version = var.locust_version
    arch           = var.arch
    base-ami       = "{{ .SourceAMI }}"
    base-ami-name  = "{{ .SourceAMIName }}"
  }
  run_tags = {
    Name = "packer ${var.ami_name_prefix}-${var.arch}"
  }
}

build {
  sources = ["source.amazon-ebs.fleet"]

  provisioner "shell" {
    inline = ["rm -rf /tmp/fleet-ami && mkdir -p /tmp/fleet-ami"]
  }

  # ami/ as it is in the repository, and the agent next to it.
  provisioner "file" {
    source      = "${path.root}/../ami/"
    destination = "/tmp/fleet-ami"
  }

  provisioner "file" {
    source      = local.agent_binary
    destination = "/tmp/fleet-ami/fleet-agent"
  }

  provisioner "shell" {
    environment_vars = ["LOCUST_VERSION=${var.locust_version}"]
    execute_command  = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
    inline = [
      "bash /tmp/fleet-ami/provision.sh /tmp/fleet-ami/fleet-agent",
      "bash /tmp/fleet-ami/cleanup.sh",
    ]
  }

  post-processor "manifest" {
    output     = var.manifest
    strip_path = true
    custom_data = {
      arch           = var.arch
      locust_version = var.locust_version
    }
  }
}
