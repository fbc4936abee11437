//! The Terraform configurations the acceptance tests apply, built from one template so that a
//! schema change is made in one place. Values are HCL expressions (`"\"v1\""`, `var.workers`).

/// A `constellation_image` resource `name` on `platform` built from the bootstrapper binary at
/// `bootstrapper_path` (tests usually put a placeholder there and replace it).
pub fn image(name: &str, platform: &str, version: &str, bootstrapper_path: &str) -> String {
    format!(
        r#"resource "constellation_image" "{name}" {{
  platform          = "{platform}"
  version           = "{version}"
  bootstrapper_path = "{bootstrapper_path}"
}}
"#
    )
}

/// The `constellation_cluster` resource `c` with the qemu-vtpm attestation and the default
/// networks.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub platform: String,
    pub control_plane_count: String,
    pub worker_count: String,
    pub image_reference: String,
    pub image_measurements: String,
    pub pod_cidr: String,
    /// Further attribute lines, each `attribute = expression`.
    pub extra: Vec<String>,
}

impl Cluster {
    /// One control plane and one worker of the image resource `image` (its reference and
    /// measurements).
    pub fn of_image(name: &str, platform: &str, image: &str) -> Self {
        Self {
            name: name.into(),
            platform: platform.into(),
            control_plane_count: "1".into(),
            worker_count: "1".into(),
            image_reference: format!("constellation_image.{image}.reference"),
            image_measurements: format!("constellation_image.{image}.measurements"),
            pod_cidr: "\"10.244.0.0/16\"".into(),
            extra: Vec::new(),
        }
    }

    /// With the further attribute lines `lines`.
    pub fn with(mut self, lines: &[&str]) -> Self {
        self.extra.extend(lines.iter().map(|l| l.to_string()));
        self
    }

    pub fn hcl(&self) -> String {
        let extra: String = self.extra.iter().map(|l| format!("  {l}\n")).collect();
        format!(
            r#"resource "constellation_cluster" "c" {{
  name                = "{name}"
  platform            = "{platform}"
  control_plane_count = {cps}
  worker_count        = {workers}
  kubernetes_version  = "v1.31.1"
{extra}  image {{
    reference    = {reference}
    measurements = {measurements}
  }}
  attestation {{
    variant = "qemu-vtpm"
  }}
  network_config {{
    pod_cidr     = {pod_cidr}
    service_cidr = "10.96.0.0/12"
    node_cidr    = "192.168.178.0/24"
  }}
}}
"#,
            name = self.name,
            platform = self.platform,
            cps = self.control_plane_count,
            workers = self.worker_count,
            reference = self.image_reference,
            measurements = self.image_measurements,
            pod_cidr = self.pod_cidr,
        )
    }
}

/// `variable "<name>" { type = <type>  default = <default> }` (`default` an HCL expression).
pub fn variable(name: &str, r#type: &str, default: &str) -> String {
    format!(
        "variable \"{name}\" {{\n  type    = {}\n  default = {default}\n}}\n",
        r#type
    )
}
