# A Constellation cluster on the local platform: one control plane and two workers, each a
# node process with its own TPM, all attesting against the image's measurements.
#
#   terraform init -plugin-dir=<mirror>   # see docs/index.md
#   terraform apply
#   attest verify cluster --endpoint <node>:30081 ...   # what `make demo` prints for each node
#
# No Kubernetes control plane runs on the nodes yet (no Kubernetes binaries on this machine):
# the kubeconfig is issued by the cluster's CA but points at an endpoint where nothing listens.
#
# The cluster lives in .constellation/clusters/local-demo. Its journal.json (mode 0600) holds
# the cluster's secrets, like the Terraform state: an apply interrupted while creating the
# cluster resumes from it, and the cluster can be imported back into a state:
#
#   terraform import constellation_cluster.local \
#     'constellation-cluster://?platform=local&name=local-demo&kubeconfig_path=./kubeconfig'

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

resource "constellation_image" "local" {
  platform          = "local"
  version           = var.image_version
  bootstrapper_path = var.bootstrapper_path
}

resource "constellation_cluster" "local" {
  name                = "local-demo"
  platform            = "local"
  control_plane_count = 1
  worker_count        = 2
  kubernetes_version  = "v1.31.1"
  # The provider writes the admin kubeconfig here (mode 0600) and removes it on destroy.
  kubeconfig_path = "${path.module}/kubeconfig"

  image {
    reference    = constellation_image.local.reference
    measurements = constellation_image.local.measurements
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
  value = constellation_cluster.local.cluster_id
}

output "kubeconfig_path" {
  value = constellation_cluster.local.kubeconfig_path
}

output "measurements" {
  value = constellation_image.local.measurements
}

output "master_secret" {
  value     = constellation_cluster.local.master_secret
  sensitive = true
}
