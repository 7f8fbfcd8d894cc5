# Packer >= 1.7 only (docs/ami.md, "Packer versions"). Packer 1.10 and later no longer bundle
# the amazon builder; `packer init packer/` installs it from this block. Packer 1.6 (Debian's
# package) has it built in and rejects this block, so it is kept out of fleet-agent.pkr.hcl:
# with 1.6, give Packer that file alone.
packer {
  required_version = ">= 1.7.0"
  required_plugins {
    amazon = {
      version = ">= 1.2.0, < 2.0.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}
