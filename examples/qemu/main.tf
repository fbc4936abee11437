# A Constellation cluster on the QEMU platform: one control plane and two workers, each a VM
# (qemu-system-x86_64, OVMF, its own swtpm vTPM, a LUKS2 state disk opened with dm-crypt)
# booting the node image that constellation_image builds; every node attests against the PCRs
# that constellation_image precalculated from the image and the firmware.
#
#   make demo PLATFORM=qemu               # builds, applies this with Terraform 1.15.5, verifies
#   terraform init -plugin-dir=<mirror>   # see docs/index.md
#   terraform apply                       # needs $CONSTELLATION_KERNEL_DIR (make image-kernel)
#   attest verify cluster --endpoint <node>:30081 ...   # what `make demo` prints for each node
#
# Under TCG (no usable /dev/kvm) the VMs emulate their CPU; they are measured-boot VMs with a
# vTPM, not confidential VMs: TCG cannot emulate SEV-SNP or TDX memory encryption, so they
# attest with the qemu-vtpm variant.
#
# No Kubernetes control plane runs on the nodes yet (no Kubernetes binaries on this machine):
# the kubeconfig is issued by the cluster's CA but points at an endpoint where nothing listens.
#
# The cluster lives in .constellation/clusters/qemu-demo (each VM's console log is
# nodes/<name>/console.log there). Its journal.json (mode 0600) holds
# the cluster's secrets, like the Terraform state: an apply interrupted while creating the
# cluster resumes from it, and the cluster can be imported back into a state:
#
#   terraform import constellation_cluster.qemu \
#     'constellation-cluster://?platform=qemu&name=qemu-demo&kubeconfig_path=./kubeconfig'

terraform {
  required_providers {
    constellation = {
      source  = "edgelesssys/constellation"
      version = "0.1.0"
    }
  }
}

variable "image_version" {
  type    = string
  default = "v0.1.0"
}

variable "bootstrapper_path" {
  description = "constellation-bootstrapper binary; null = $CONSTELLATION_BOOTSTRAPPER or the binary next to the provider"
  type        = string
  default     = null
}

resource "constellation_image" "qemu" {
  platform          = "qemu"
  version           = var.image_version
  bootstrapper_path = var.bootstrapper_path
}

resource "constellation_cluster" "qemu" {
  name                = "qemu-demo"
  platform            = "qemu"
  control_plane_count = 1
  worker_count        = 2
  kubernetes_version  = "v1.31.1"
  # The provider writes the admin kubeconfig here (mode 0600) and removes it on destroy.
  kubeconfig_path = "${path.module}/kubeconfig"

  image {
    reference    = constellation_image.qemu.reference
    measurements = constellation_image.qemu.measurements
  }

  attestation {
    variant = "qemu-vtpm"
  }

  network_config {
    pod_cidr     = "10.244.0.0/16"
    service_cidr = "10.96.0.0/12"
    node_cidr    = "192.168.178.0/24"
  }
}

output "cluster_id" {
  value = constellation_cluster.qemu.cluster_id
}

output "kubeconfig_path" {
  value = constellation_cluster.qemu.kubeconfig_path
}

output "measurements" {
  value = constellation_image.qemu.measurements
}

output "master_secret" {
  value     = constellation_cluster.qemu.master_secret
  sensitive = true
}
