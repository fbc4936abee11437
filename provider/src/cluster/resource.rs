//! Resource `constellation_cluster`: schema, validation, plan rules and the mapping between
//! Terraform values and the typed [`ClusterSpec`] / [`ClusterState`] a backend works on.
//!
//! Drift: Read asks the backend which nodes are dead or fail attestation and records the
//! *observed* healthy counts in `control_plane_count` / `worker_count` (plus the reasons in
//! `unhealthy_nodes` and a warning). The configuration still asks for the full counts, so
//! the next plan shows an in-place update (`worker_count: 1 -> 2`, exit code 2 with
//! `-detailed-exitcode`) and apply calls [`ClusterBackend::update`], which replaces them.

use std::sync::Arc;

use constellation_attestation::measurements::MAX_PCR_INDEX;
use constellation_attestation::{Measurement, Measurements, Variant};
use constellation_common::secret::SecretBytes;
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::model::*;
use constellation_common::metadata::Role;
use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::image::measurements_type;
use crate::plan::{self, Planned};
use crate::resource::{ApplyRequest, BoxFuture, PlanRequest, Resource, StateOutcome};
use crate::schema::{Attribute, Block, Mode, Type};
use crate::value::Value;

/// Upper bound of each node count; a typo like 1000 should not start a thousand nodes.
pub const MAX_NODES: u32 = 100;

/// Import-ID parameter restoring `kubeconfig_path` (as written in the configuration).
pub const IMPORT_KUBECONFIG_PATH: &str = "kubeconfig_path";

/// The secret attributes generated when the configuration leaves them null.
const SECRET_ATTRS: [&str; 3] = ["master_secret", "master_secret_salt", "measurement_salt"];

/// Cluster names: 1..=30 chars of `a-z`, `0-9`, `-`, starting with a letter, no trailing `-`
/// (the name prefixes node names and DNS labels).
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 30
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "name {name:?} must be 1 to 30 characters of a-z, 0-9 and '-', start with a letter \
             and not end with '-'"
        ))
    }
}

fn check_kubernetes_version(v: &str) -> Result<(), String> {
    let parts: Vec<&str> = v.strip_prefix('v').unwrap_or("").split('.').collect();
    if parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
    {
        Ok(())
    } else {
        Err(format!(
            "{v:?} is not a Kubernetes version of the form vMAJOR.MINOR.PATCH, e.g. v1.31.1"
        ))
    }
}

fn parse_secret(hex_value: &str) -> Result<SecretBytes, String> {
    let bytes = hex::decode(hex_value)
        .map_err(|e| format!("expected {} hex characters: {e}", SECRET_LEN * 2))?;
    if bytes.len() != SECRET_LEN {
        return Err(format!(
            "expected {SECRET_LEN} bytes ({} hex characters), found {} bytes",
            SECRET_LEN * 2,
            bytes.len()
        ));
    }
    Ok(SecretBytes::new(bytes))
}

fn check_pem(pem: &str) -> Result<(), String> {
    if pem.trim_start().starts_with("-----BEGIN ") {
        Ok(())
    } else {
        Err("expected PEM text starting with \"-----BEGIN \"".into())
    }
}

fn check_endpoint(e: &str) -> Result<(), String> {
    match e.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(())
        }
        _ => Err(format!("{e:?} is not of the form host:port")),
    }
}

fn p(names: &[&str]) -> AttrPath {
    AttrPath::attr(names)
}

/// What is kept in Terraform's private state for a cluster.
#[derive(Debug, Default, Serialize, Deserialize)]
struct PrivateState {
    platform_state: String,
}

pub struct ClusterResource {
    schema: Block,
    backend: Arc<dyn ClusterBackend>,
}

impl ClusterResource {
    pub fn new(backend: Arc<dyn ClusterBackend>) -> Self {
        Self {
            schema: schema(),
            backend,
        }
    }
}

fn schema() -> Block {
    let s = Type::String;
    let n = Type::Number;
    Block {
        version: 0,
        description: "A Constellation cluster: confidential nodes that attest before they get any secret.",
        attributes: vec![
            Attribute::required("name", s.clone(), "Cluster name.").forces_replacement(),
            Attribute::required("platform", s.clone(), "Platform; only `local` is supported now.")
                .forces_replacement(),
            Attribute::nested(
                "image",
                Mode::Required,
                vec![
                    Attribute::required("reference", s.clone(), "Image reference (`constellation_image.<name>.reference`)."),
                    Attribute::required("measurements", measurements_type(), "Expected measurements (`constellation_image.<name>.measurements`)."),
                ],
                "Node image and the measurements every node must attest to.",
            ),
            Attribute::required("control_plane_count", n.clone(), "Number of control-plane nodes (1..=100)."),
            Attribute::required("worker_count", n.clone(), "Number of worker nodes (0..=100)."),
            Attribute::nested(
                "attestation",
                Mode::Required,
                vec![
                    Attribute::required("variant", s.clone(), "Attestation variant, e.g. `qemu-vtpm`, `azure-sev-snp`."),
                    Attribute::optional("bootloader_version", n.clone(), "Minimum SEV-SNP boot loader SVN."),
                    Attribute::optional("tee_version", n.clone(), "Minimum SEV-SNP TEE SVN."),
                    Attribute::optional("snp_version", n.clone(), "Minimum SEV-SNP firmware SVN."),
                    Attribute::optional("microcode_version", n.clone(), "Minimum CPU microcode SVN."),
                ],
                "Attestation policy.",
            ),
            Attribute::nested(
                "network_config",
                Mode::Required,
                vec![
                    Attribute::required("pod_cidr", s.clone(), "Pod network, CIDR."),
                    Attribute::required("service_cidr", s.clone(), "Service network, CIDR."),
                    Attribute::required("node_cidr", s.clone(), "Node network, CIDR."),
                ],
                "Cluster networks; they must not overlap.",
            )
            .forces_replacement(),
            Attribute::required("kubernetes_version", s.clone(), "Kubernetes version, e.g. `v1.31.1`."),
            Attribute::optional_computed("master_secret", s.clone(), "Master secret, 32 bytes hex. Generated when not set.")
                .sensitive()
                .forces_replacement(),
            Attribute::optional_computed("master_secret_salt", s.clone(), "Master secret salt, 32 bytes hex. Generated when not set.")
                .sensitive()
                .forces_replacement(),
            Attribute::optional_computed("measurement_salt", s.clone(), "Measurement salt, 32 bytes hex. Generated when not set.")
                .sensitive()
                .forces_replacement(),
            Attribute::nested(
                "kms",
                Mode::Optional,
                vec![
                    Attribute::required("type", s.clone(), "`cluster-managed` or `kmip`."),
                    Attribute::optional("endpoint", s.clone(), "KMIP server `host:port`."),
                    Attribute::optional("server_ca_pem", s.clone(), "CA certificate of the KMIP server, PEM."),
                    Attribute::optional("client_cert_pem", s.clone(), "Client certificate for the KMIP server, PEM."),
                    Attribute::optional("client_key_pem", s.clone(), "Client key for the KMIP server, PEM.").sensitive(),
                    Attribute::optional("kek_id", s.clone(), "ID of the key-encryption key in the KMS."),
                ],
                "Where the master secret is kept. Default: cluster-managed.",
            )
            .forces_replacement(),
            Attribute::optional("kubeconfig_path", s.clone(), "When set, the admin kubeconfig is written to this file (mode 0600)."),
            Attribute::computed("id", s.clone(), "Same as `cluster_id`."),
            Attribute::computed("cluster_id", s.clone(), "Cluster ID (hex)."),
            Attribute::computed("owner_id", s.clone(), "Owner ID (hex)."),
            Attribute::computed("kubeconfig", s.clone(), "Admin kubeconfig.").sensitive().changes_on_update(),
            Attribute::computed("cluster_ca_certificate", s.clone(), "Cluster CA certificate, PEM."),
            Attribute::computed("client_certificate", s.clone(), "Admin client certificate, PEM."),
            Attribute::computed("client_key", s.clone(), "Admin client key, PEM.").sensitive(),
            Attribute::computed("host", s.clone(), "Cluster API endpoint.").changes_on_update(),
            Attribute::computed("init_secret", s.clone(), "Init secret (hex).").sensitive(),
            Attribute::computed(
                "unhealthy_nodes",
                Type::List(Box::new(s)),
                "Nodes found dead or failing attestation at the last refresh, `<node> (<role>): <reason>`.",
            )
            .changes_on_update(),
        ],
    }
}

/// Decodes the spec; `None` without diagnostics while something is unknown.
fn decode_spec(v: &Value, d: &mut Decoder) -> Option<ClusterSpec> {
    let name = d.req_string(v.get("name"), &p(&["name"]));
    let name = name.and_then(|n| {
        d.check(
            check_name(&n).map(|()| n.clone()),
            &p(&["name"]),
            "Invalid cluster name",
        )
    });
    let platform = d.req_string(v.get("platform"), &p(&["platform"]));
    let platform = platform.and_then(|s| {
        d.check(
            s.parse::<Platform>(),
            &p(&["platform"]),
            "Unsupported platform",
        )
    });
    let image = decode_image(v.get("image"), d);
    let control_plane_count = d.req_uint(
        v.get("control_plane_count"),
        &p(&["control_plane_count"]),
        MAX_NODES,
    );
    if control_plane_count == Some(0) {
        d.error(
            &p(&["control_plane_count"]),
            "Invalid control_plane_count",
            "a cluster needs at least one control-plane node",
        );
    }
    let worker_count = d.req_uint(v.get("worker_count"), &p(&["worker_count"]), MAX_NODES);
    let attestation = decode_attestation(v.get("attestation"), d);
    let network = decode_network(v.get("network_config"), d);
    let kubernetes_version = d.req_string(v.get("kubernetes_version"), &p(&["kubernetes_version"]));
    let kubernetes_version = kubernetes_version.and_then(|k| {
        d.check(
            check_kubernetes_version(&k).map(|()| k.clone()),
            &p(&["kubernetes_version"]),
            "Invalid Kubernetes version",
        )
    });
    let mut secrets = Vec::new();
    for attr in SECRET_ATTRS {
        let path = p(&[attr]);
        // Null means "generate at apply"; the plan makes it unknown until then.
        let s = match d.opt_string(v.get(attr), &path) {
            Some(Some(h)) => d.check(parse_secret(&h), &path, &format!("Invalid {attr}")),
            Some(None) => {
                d.incomplete = true;
                None
            }
            None => None,
        };
        secrets.push(s);
    }
    let kms = decode_kms(v.get("kms"), d);
    if let Some(Some(path)) = d.opt_string(v.get("kubeconfig_path"), &p(&["kubeconfig_path"])) {
        if path.is_empty() {
            d.error(
                &p(&["kubeconfig_path"]),
                "Empty kubeconfig_path",
                "set a file path or leave it null",
            );
        }
    }
    let mut secrets = secrets.into_iter();
    let (master_secret, master_secret_salt, measurement_salt) = (
        secrets.next().flatten(),
        secrets.next().flatten(),
        secrets.next().flatten(),
    );
    Some(ClusterSpec {
        name: name?,
        platform: platform?,
        image: image?,
        control_plane_count: control_plane_count.filter(|c| *c > 0)?,
        worker_count: worker_count?,
        attestation: attestation?,
        network: network?,
        kubernetes_version: kubernetes_version?,
        secrets: ClusterSecrets {
            master_secret: master_secret?,
            master_secret_salt: master_secret_salt?,
            measurement_salt: measurement_salt?,
        },
        kms: kms?,
    })
}

fn decode_image(v: &Value, d: &mut Decoder) -> Option<ImageRef> {
    let base = p(&["image"]);
    let obj = d.req_object(v, &base)?;
    let reference = d.req_string(obj.get("reference"), &base.child("reference"));
    if reference.as_deref() == Some("") {
        d.error(
            &base.child("reference"),
            "Empty image reference",
            "set it to constellation_image.<name>.reference",
        );
    }
    let mpath = base.child("measurements");
    let measurements = match obj.get("measurements") {
        Value::Unknown => {
            d.incomplete = true;
            None
        }
        Value::Map(entries) => {
            let mut out = Measurements::default();
            let mut complete = true;
            for (index, m) in entries {
                let at = mpath.key(index);
                let idx = d.check(parse_pcr_index(index), &at, "Invalid PCR index");
                let expected = match d.req_object(m, &at) {
                    Some(m) => {
                        let e = d.req_string(m.get("expected"), &at.child("expected"));
                        let e = e.and_then(|e| {
                            d.check(
                                parse_digest(&e),
                                &at.child("expected"),
                                "Invalid expected measurement",
                            )
                        });
                        let w = d.opt_bool(m.get("warn_only"), &at.child("warn_only"));
                        e.zip(w)
                    }
                    None => None,
                };
                match (idx, expected) {
                    (Some(i), Some((e, w))) => {
                        out.0.insert(
                            i,
                            Measurement {
                                expected: e,
                                warn_only: w.unwrap_or(false),
                            },
                        );
                    }
                    _ => complete = false,
                }
            }
            if out.0.is_empty() && complete {
                d.error(
                    &mpath,
                    "No measurements",
                    "an empty measurements map would accept any node",
                );
                complete = false;
            }
            complete.then_some(out)
        }
        Value::Null => {
            d.error(
                &mpath,
                "Missing required attribute image.measurements",
                "set it to constellation_image.<name>.measurements",
            );
            None
        }
        other => {
            d.error(
                &mpath,
                "Wrong type for image.measurements",
                format!("expected map, found {}", other.kind()),
            );
            None
        }
    };
    Some(ImageRef {
        reference: reference.filter(|r| !r.is_empty())?,
        measurements: measurements?,
    })
}

fn parse_pcr_index(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(i) if i <= MAX_PCR_INDEX && !s.starts_with('+') => Ok(i),
        _ => Err(format!(
            "PCR index {s:?} is not a number in 0..={MAX_PCR_INDEX}"
        )),
    }
}

fn parse_digest(h: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(h).map_err(|e| format!("{h:?} is not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "expected 32 bytes (64 hex characters), found {} bytes",
            b.len()
        )
    })
}

fn decode_attestation(v: &Value, d: &mut Decoder) -> Option<AttestationSpec> {
    let base = p(&["attestation"]);
    let obj = d.req_object(v, &base)?;
    let variant = d.req_string(obj.get("variant"), &base.child("variant"));
    let variant = variant.and_then(|s| {
        d.check(
            s.parse::<Variant>(),
            &base.child("variant"),
            "Unknown attestation variant",
        )
    });
    let mut tcb = [None; 4];
    let mut complete = true;
    for (slot, name) in tcb.iter_mut().zip([
        "bootloader_version",
        "tee_version",
        "snp_version",
        "microcode_version",
    ]) {
        match d.opt_uint(obj.get(name), &base.child(name), u32::from(u8::MAX)) {
            Some(v) => *slot = v.and_then(|v| u8::try_from(v).ok()),
            None => complete = false,
        }
    }
    let variant = variant?;
    complete.then_some(AttestationSpec {
        variant,
        bootloader_version: tcb[0],
        tee_version: tcb[1],
        snp_version: tcb[2],
        microcode_version: tcb[3],
    })
}

fn decode_network(v: &Value, d: &mut Decoder) -> Option<NetworkConfig> {
    let base = p(&["network_config"]);
    let obj = d.req_object(v, &base)?;
    let cidr = |name: &str, d: &mut Decoder| {
        let path = base.child(name);
        let s = d.req_string(obj.get(name), &path)?;
        d.check(
            s.parse::<Cidr>(),
            &path,
            &format!("Invalid CIDR in network_config.{name}"),
        )
    };
    let pod = cidr("pod_cidr", d);
    let service = cidr("service_cidr", d);
    let node = cidr("node_cidr", d);
    let pairs = [
        (("pod_cidr", pod), ("service_cidr", service)),
        (("pod_cidr", pod), ("node_cidr", node)),
        (("service_cidr", service), ("node_cidr", node)),
    ];
    for ((an, a), (bn, b)) in pairs {
        if let (Some(a), Some(b)) = (a, b) {
            if a.overlaps(&b) {
                d.error(
                    &base.child(bn),
                    "Overlapping networks",
                    format!("network_config.{bn} {b} overlaps network_config.{an} {a}"),
                );
            }
        }
    }
    Some(NetworkConfig {
        pod_cidr: pod?,
        service_cidr: service?,
        node_cidr: node?,
    })
}

fn decode_kms(v: &Value, d: &mut Decoder) -> Option<KmsConfig> {
    let base = p(&["kms"]);
    let Some(obj) = d.opt_object(v, &base)? else {
        return Some(KmsConfig::ClusterManaged);
    };
    let ty = d.req_string(obj.get("type"), &base.child("type"))?;
    const FIELDS: [&str; 5] = [
        "endpoint",
        "server_ca_pem",
        "client_cert_pem",
        "client_key_pem",
        "kek_id",
    ];
    match ty.as_str() {
        "cluster-managed" => {
            for f in FIELDS {
                if !obj.get(f).is_null() {
                    d.error(
                        &base.child(f),
                        &format!("kms.{f} is not used"),
                        "kms.type \"cluster-managed\" takes no other attributes",
                    );
                }
            }
            Some(KmsConfig::ClusterManaged)
        }
        "kmip" => {
            let mut vals = Vec::new();
            for f in FIELDS {
                let path = base.child(f);
                let val = match d.opt_string(obj.get(f), &path) {
                    Some(Some(s)) => {
                        let check = match f {
                            "endpoint" => check_endpoint(&s),
                            "kek_id" if s.is_empty() => Err("must not be empty".into()),
                            "kek_id" => Ok(()),
                            _ => check_pem(&s),
                        };
                        d.check(check.map(|()| s), &path, &format!("Invalid kms.{f}"))
                    }
                    Some(None) => {
                        d.error(&path, &format!("Missing kms.{f}"), "kms.type \"kmip\" needs endpoint, server_ca_pem, client_cert_pem, client_key_pem and kek_id");
                        None
                    }
                    None => None,
                };
                vals.push(val);
            }
            let mut it = vals.into_iter();
            let mut next = || it.next().flatten();
            let (endpoint, ca, cert, key, kek) = (next(), next(), next(), next(), next());
            Some(KmsConfig::Kmip(KmipConfig {
                endpoint: endpoint?,
                server_ca_pem: ca?,
                client_cert_pem: cert?,
                client_key_pem: SecretBytes::new(key?.into_bytes()),
                kek_id: kek?,
            }))
        }
        other => {
            d.error(
                &base.child("type"),
                "Unknown kms.type",
                format!("{other:?}; expected \"cluster-managed\" or \"kmip\""),
            );
            None
        }
    }
}

fn decode_outputs(v: &Value, d: &mut Decoder) -> Option<ClusterOutputs> {
    let mut s = |name: &str| d.req_string(v.get(name), &p(&[name]));
    let (cluster_id, owner_id, kubeconfig, ca, cert, key, host, init) = (
        s("cluster_id"),
        s("owner_id"),
        s("kubeconfig"),
        s("cluster_ca_certificate"),
        s("client_certificate"),
        s("client_key"),
        s("host"),
        s("init_secret"),
    );
    let init = init.and_then(|i| {
        d.check(
            hex::decode(&i),
            &p(&["init_secret"]),
            "Invalid init_secret in state",
        )
    });
    Some(ClusterOutputs {
        cluster_id: cluster_id?,
        owner_id: owner_id?,
        kubeconfig: SecretBytes::new(kubeconfig?.into_bytes()),
        cluster_ca_certificate: ca?,
        client_certificate: cert?,
        client_key: SecretBytes::new(key?.into_bytes()),
        host: host?,
        init_secret: SecretBytes::new(init?),
    })
}

fn decode_state(v: &Value, private: &[u8]) -> Result<ClusterState, Diagnostics> {
    let mut d = Decoder::new();
    let spec = decode_spec(v, &mut d);
    let outputs = decode_outputs(v, &mut d);
    let state = d.finish(spec.zip(outputs))?;
    let private: PrivateState = if private.is_empty() {
        PrivateState::default()
    } else {
        serde_json::from_slice(private).map_err(|e| {
            Diagnostics::from(Diagnostic::error(
                "Private state of the cluster is unreadable",
                e.to_string(),
            ))
        })?
    };
    Ok(ClusterState {
        spec: state.0,
        outputs: state.1,
        platform_state: private.platform_state,
    })
}

fn text(s: &SecretBytes) -> Value {
    Value::string(String::from_utf8_lossy(s.expose()).into_owned())
}

fn set_outputs(v: &mut Value, o: &ClusterOutputs) {
    v.set("id", Value::string(o.cluster_id.clone()));
    v.set("cluster_id", Value::string(o.cluster_id.clone()));
    v.set("owner_id", Value::string(o.owner_id.clone()));
    v.set("kubeconfig", text(&o.kubeconfig));
    v.set(
        "cluster_ca_certificate",
        Value::string(o.cluster_ca_certificate.clone()),
    );
    v.set(
        "client_certificate",
        Value::string(o.client_certificate.clone()),
    );
    v.set("client_key", text(&o.client_key));
    v.set("host", Value::string(o.host.clone()));
    v.set(
        "init_secret",
        Value::string(hex::encode(o.init_secret.expose())),
    );
}

fn set_secrets(v: &mut Value, s: &ClusterSecrets) {
    for (attr, secret) in
        SECRET_ATTRS
            .iter()
            .zip([&s.master_secret, &s.master_secret_salt, &s.measurement_salt])
    {
        v.set(attr, Value::string(hex::encode(secret.expose())));
    }
}

fn set_unhealthy(v: &mut Value, unhealthy: &[UnhealthyNode]) {
    v.set(
        "unhealthy_nodes",
        Value::List(
            unhealthy
                .iter()
                .map(|n| Value::string(format!("{} ({}): {}", n.name, n.role.as_str(), n.reason)))
                .collect(),
        ),
    );
}

/// The full Terraform value of a state built from scratch (import).
fn state_value(state: &ClusterState) -> Value {
    let spec = &state.spec;
    let opt = |v: Option<u8>| v.map_or(Value::Null, |v| Value::Number(f64::from(v)));
    let kms = match &spec.kms {
        KmsConfig::ClusterManaged => Value::Null,
        KmsConfig::Kmip(k) => Value::object([
            ("type", Value::string("kmip")),
            ("endpoint", Value::string(k.endpoint.clone())),
            ("server_ca_pem", Value::string(k.server_ca_pem.clone())),
            ("client_cert_pem", Value::string(k.client_cert_pem.clone())),
            ("client_key_pem", text(&k.client_key_pem)),
            ("kek_id", Value::string(k.kek_id.clone())),
        ]),
    };
    let mut v = Value::object([
        ("name", Value::string(spec.name.clone())),
        ("platform", Value::string(spec.platform.as_str())),
        (
            "image",
            Value::object([
                ("reference", Value::string(spec.image.reference.clone())),
                (
                    "measurements",
                    crate::image::measurements_to_value(&spec.image.measurements),
                ),
            ]),
        ),
        (
            "control_plane_count",
            Value::Number(f64::from(spec.control_plane_count)),
        ),
        ("worker_count", Value::Number(f64::from(spec.worker_count))),
        (
            "attestation",
            Value::object([
                ("variant", Value::string(spec.attestation.variant.as_str())),
                (
                    "bootloader_version",
                    opt(spec.attestation.bootloader_version),
                ),
                ("tee_version", opt(spec.attestation.tee_version)),
                ("snp_version", opt(spec.attestation.snp_version)),
                ("microcode_version", opt(spec.attestation.microcode_version)),
            ]),
        ),
        (
            "network_config",
            Value::object([
                ("pod_cidr", Value::string(spec.network.pod_cidr.to_string())),
                (
                    "service_cidr",
                    Value::string(spec.network.service_cidr.to_string()),
                ),
                (
                    "node_cidr",
                    Value::string(spec.network.node_cidr.to_string()),
                ),
            ]),
        ),
        (
            "kubernetes_version",
            Value::string(spec.kubernetes_version.clone()),
        ),
        (
            "master_secret",
            Value::string(hex::encode(spec.secrets.master_secret.expose())),
        ),
        (
            "master_secret_salt",
            Value::string(hex::encode(spec.secrets.master_secret_salt.expose())),
        ),
        (
            "measurement_salt",
            Value::string(hex::encode(spec.secrets.measurement_salt.expose())),
        ),
        ("kms", kms),
        ("kubeconfig_path", Value::Null),
    ]);
    set_secrets(&mut v, &spec.secrets);
    set_outputs(&mut v, &state.outputs);
    set_unhealthy(&mut v, &[]);
    v
}

fn private_bytes(platform_state: &str) -> Vec<u8> {
    serde_json::to_vec(&PrivateState {
        platform_state: platform_state.to_owned(),
    })
    .unwrap_or_default()
}

fn write_kubeconfig(path: &str, kubeconfig: &SecretBytes) -> Result<(), Diagnostic> {
    // Atomic, 0600, through an exclusively created random temporary: a file or symlink planted
    // next to the kubeconfig fails the write instead of receiving the admin credentials.
    constellation_common::secret_file::write_private_atomic(
        std::path::Path::new(path),
        kubeconfig.expose(),
    )
    .map_err(|e| {
        Diagnostic::error("Cannot write kubeconfig", format!("{path}: {e}"))
            .at(p(&["kubeconfig_path"]))
    })
}

fn remove_kubeconfig(path: &str) {
    if let Err(e) = std::fs::remove_file(path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(path, error = %e, "cannot remove kubeconfig");
        }
    }
}

fn generate_secret() -> String {
    let mut b = [0u8; SECRET_LEN];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex::encode(b)
}

fn backend_error(op: &str) -> impl Fn(ClusterError) -> Diagnostics + '_ {
    move |e| Diagnostics::from(e.to_diagnostic(op))
}

impl Resource for ClusterResource {
    fn type_name(&self) -> &'static str {
        "constellation_cluster"
    }

    fn schema(&self) -> &Block {
        &self.schema
    }

    fn validate(&self, config: &Value) -> Diagnostics {
        let mut d = Decoder::new();
        let _ = decode_spec(config, &mut d);
        d.diagnostics
    }

    fn plan(&self, req: PlanRequest<'_>) -> Result<Planned, Diagnostics> {
        if !req.proposed.is_null() {
            let diags = self.validate(req.config);
            if diags.has_errors() {
                return Err(diags);
            }
        }
        Ok(plan::plan(&self.schema, req.prior, req.proposed))
    }

    fn apply<'a>(
        &'a self,
        req: ApplyRequest<'a>,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            if req.planned.is_null() {
                let prior = decode_state(req.prior, req.private)?;
                let progress = LogProgress {
                    cluster: prior.spec.name.clone(),
                };
                self.backend
                    .delete(&prior, &progress)
                    .await
                    .map_err(backend_error("delete"))?;
                if let Some(path) = req.prior.get("kubeconfig_path").as_str() {
                    remove_kubeconfig(path);
                }
                return Ok(StateOutcome::default());
            }
            let mut new_state = req.planned.clone();
            let mut given = [true; 3];
            for (attr, given) in SECRET_ATTRS.iter().zip(&mut given) {
                if new_state.get(attr).is_unknown() {
                    new_state.set(attr, Value::string(generate_secret()));
                    *given = false;
                }
            }
            let given = GivenSecrets {
                master_secret: given[0],
                master_secret_salt: given[1],
                measurement_salt: given[2],
            };
            let mut d = Decoder::new();
            let spec = decode_spec(&new_state, &mut d);
            let spec = d.finish(spec)?;
            let progress = LogProgress {
                cluster: spec.name.clone(),
            };
            let result = if req.prior.is_null() {
                let created = self
                    .backend
                    .create(&spec, given, &progress)
                    .await
                    .map_err(backend_error("create"))?;
                // A resumed create keeps the secrets the interrupted one used.
                set_secrets(&mut new_state, &created.spec.secrets);
                created
            } else {
                let prior = decode_state(req.prior, req.private)?;
                let mut updated = if prior.spec == spec {
                    // Only provider-side attributes (kubeconfig_path) changed.
                    prior.clone()
                } else {
                    self.backend
                        .update(&prior, &spec, &progress)
                        .await
                        .map_err(backend_error("update"))?
                };
                // Identity and credentials stay as planned; only host and kubeconfig may move.
                let (host, kubeconfig) = (
                    updated.outputs.host.clone(),
                    updated.outputs.kubeconfig.clone(),
                );
                updated.outputs = ClusterOutputs {
                    host,
                    kubeconfig,
                    ..prior.outputs
                };
                updated
            };
            set_outputs(&mut new_state, &result.outputs);
            set_unhealthy(&mut new_state, &[]);
            if let Some(path) = new_state.get("kubeconfig_path").as_str() {
                write_kubeconfig(path, &result.outputs.kubeconfig)?;
            }
            if let Some(old) = req.prior.get("kubeconfig_path").as_str() {
                if new_state.get("kubeconfig_path").as_str() != Some(old) {
                    remove_kubeconfig(old);
                }
            }
            Ok(StateOutcome {
                state: new_state,
                private: private_bytes(&result.platform_state),
                warnings: Diagnostics::default(),
            })
        })
    }

    fn read<'a>(
        &'a self,
        current: &'a Value,
        private: &'a [u8],
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let prior = decode_state(current, private)?;
            match self
                .backend
                .read(&prior)
                .await
                .map_err(backend_error("read"))?
            {
                ClusterReadResult::Gone => {
                    tracing::warn!(cluster = %prior.spec.name, "cluster is gone; removing it from state");
                    Ok(StateOutcome::default())
                }
                ClusterReadResult::Present { state, unhealthy } => {
                    let mut v = current.clone();
                    let count = |role| unhealthy.iter().filter(|n| n.role == role).count() as u32;
                    let cp = prior
                        .spec
                        .control_plane_count
                        .saturating_sub(count(Role::ControlPlane));
                    let workers = prior
                        .spec
                        .worker_count
                        .saturating_sub(count(Role::Worker));
                    v.set("control_plane_count", Value::Number(f64::from(cp)));
                    v.set("worker_count", Value::Number(f64::from(workers)));
                    v.set("host", Value::string(state.outputs.host.clone()));
                    v.set("kubeconfig", text(&state.outputs.kubeconfig));
                    set_unhealthy(&mut v, &unhealthy);
                    let mut warnings = Diagnostics::default();
                    if !unhealthy.is_empty() {
                        let list: Vec<String> = unhealthy
                            .iter()
                            .map(|n| format!("{} ({}): {}", n.name, n.role.as_str(), n.reason))
                            .collect();
                        warnings.push(Diagnostic::warning(
                            format!(
                                "Cluster {} has {} unhealthy node(s)",
                                prior.spec.name,
                                unhealthy.len()
                            ),
                            format!(
                                "{}. They are not counted in control_plane_count/worker_count; \
                                 `terraform apply` replaces them.",
                                list.join("; ")
                            ),
                        ));
                    }
                    Ok(StateOutcome {
                        state: v,
                        private: private_bytes(&state.platform_state),
                        warnings,
                    })
                }
            }
        })
    }

    fn import<'a>(
        &'a self,
        id: &'a str,
        provider: &'a crate::provider_config::ProviderConfig,
    ) -> BoxFuture<'a, Result<StateOutcome, Diagnostics>> {
        Box::pin(async move {
            let mut import_id: ImportId = id.parse().map_err(backend_error("import"))?;
            // A provider-side attribute: no platform keeps it.
            let kubeconfig_path = import_id.params.remove(IMPORT_KUBECONFIG_PATH);
            if kubeconfig_path.as_deref() == Some("") {
                return Err(backend_error("import")(ClusterError::ImportId {
                    id: id.to_owned(),
                    reason: format!("parameter {IMPORT_KUBECONFIG_PATH:?} is empty"),
                }));
            }
            let state = self
                .backend
                .import(&import_id, provider)
                .map_err(backend_error("import"))?;
            let mut value = state_value(&state);
            if let Some(path) = kubeconfig_path {
                value.set("kubeconfig_path", Value::string(path));
            }
            Ok(StateOutcome {
                state: value,
                private: private_bytes(&state.platform_state),
                warnings: Diagnostics::default(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config() -> Value {
        let m = crate::image::measurements_to_value(&Measurements(
            [
                (4, Measurement::enforce([1; 32])),
                (9, Measurement::warn_only([2; 32])),
            ]
            .into(),
        ));
        let mut v = Value::object(schema().attributes.iter().map(|a| (a.name, Value::Null)));
        v.set("name", Value::string("demo"));
        v.set("platform", Value::string("local"));
        v.set(
            "image",
            Value::object([("reference", Value::string("/img")), ("measurements", m)]),
        );
        v.set("control_plane_count", Value::Number(1.0));
        v.set("worker_count", Value::Number(2.0));
        v.set(
            "attestation",
            Value::object([
                ("variant", Value::string("qemu-vtpm")),
                ("bootloader_version", Value::Null),
                ("tee_version", Value::Null),
                ("snp_version", Value::Null),
                ("microcode_version", Value::Null),
            ]),
        );
        v.set(
            "network_config",
            Value::object([
                ("pod_cidr", Value::string("10.244.0.0/16")),
                ("service_cidr", Value::string("10.96.0.0/12")),
                ("node_cidr", Value::string("192.168.178.0/24")),
            ]),
        );
        v.set("kubernetes_version", Value::string("v1.31.1"));
        v
    }

    fn errors_at(v: &Value) -> Vec<String> {
        let d = {
            let mut d = Decoder::new();
            let _ = decode_spec(v, &mut d);
            d.diagnostics
        };
        d.0.iter()
            .map(|d| {
                d.attribute
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn a_good_config_validates_and_needs_only_secrets() {
        let v = config();
        assert!(errors_at(&v).is_empty());
        let mut d = Decoder::new();
        assert!(decode_spec(&v, &mut d).is_none());
        assert!(d.incomplete, "null secrets are generated at apply");
        let mut v = v;
        for a in SECRET_ATTRS {
            v.set(a, Value::string("ab".repeat(32)));
        }
        let mut d = Decoder::new();
        let spec = decode_spec(&v, &mut d).unwrap();
        assert_eq!(spec.worker_count, 2);
        assert_eq!(spec.image.measurements.0.len(), 2);
        assert!(spec.image.measurements.0[&9].warn_only);
        assert!(!format!("{spec:?}").contains(&"ab".repeat(32)));
    }

    #[test]
    fn each_bad_input_points_at_its_attribute() {
        type Edit = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(&str, Edit)> = vec![
            (
                "network_config.pod_cidr",
                Box::new(|v| {
                    v.set("network_config", {
                        let mut n = v.get("network_config").clone();
                        n.set("pod_cidr", Value::string("10.244.0.0"));
                        n
                    })
                }),
            ),
            (
                "network_config.service_cidr",
                Box::new(|v| {
                    v.set("network_config", {
                        let mut n = v.get("network_config").clone();
                        n.set("service_cidr", Value::string("10.244.128.0/17"));
                        n
                    })
                }),
            ),
            (
                "master_secret",
                Box::new(|v| v.set("master_secret", Value::string("zz"))),
            ),
            (
                "measurement_salt",
                Box::new(|v| v.set("measurement_salt", Value::string("abcd"))),
            ),
            (
                "attestation.variant",
                Box::new(|v| {
                    v.set("attestation", {
                        let mut a = v.get("attestation").clone();
                        a.set("variant", Value::string("sgx"));
                        a
                    })
                }),
            ),
            (
                "attestation.tee_version",
                Box::new(|v| {
                    v.set("attestation", {
                        let mut a = v.get("attestation").clone();
                        a.set("tee_version", Value::Number(300.0));
                        a
                    })
                }),
            ),
            (
                r#"image.measurements["4"].expected"#,
                Box::new(|v| {
                    v.set("image", {
                        let mut i = v.get("image").clone();
                        let mut m = i.get("measurements").clone();
                        m.set(
                            "4",
                            Value::object([
                                ("expected", Value::string("xyz")),
                                ("warn_only", Value::Bool(false)),
                            ]),
                        );
                        i.set("measurements", m);
                        i
                    })
                }),
            ),
            (
                r#"image.measurements["24"]"#,
                Box::new(|v| {
                    v.set("image", {
                        let mut i = v.get("image").clone();
                        let mut m = i.get("measurements").clone();
                        m.set(
                            "24",
                            Value::object([
                                ("expected", Value::string("00".repeat(32))),
                                ("warn_only", Value::Bool(false)),
                            ]),
                        );
                        i.set("measurements", m);
                        i
                    })
                }),
            ),
            (
                "control_plane_count",
                Box::new(|v| v.set("control_plane_count", Value::Number(0.0))),
            ),
            (
                "worker_count",
                Box::new(|v| v.set("worker_count", Value::Number(101.0))),
            ),
            ("name", Box::new(|v| v.set("name", Value::string("Demo_1")))),
            (
                "platform",
                Box::new(|v| v.set("platform", Value::string("azure"))),
            ),
            (
                "kubernetes_version",
                Box::new(|v| v.set("kubernetes_version", Value::string("1.31"))),
            ),
            (
                "kms.type",
                Box::new(|v| v.set("kms", Value::object([("type", Value::string("vault"))]))),
            ),
            (
                "kms.endpoint",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("kmip")),
                            ("endpoint", Value::string("nohost")),
                            (
                                "server_ca_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_cert_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_key_pem",
                                Value::string("-----BEGIN PRIVATE KEY-----"),
                            ),
                            ("kek_id", Value::string("k")),
                        ]),
                    )
                }),
            ),
            (
                "kms.client_key_pem",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("kmip")),
                            ("endpoint", Value::string("kms:5696")),
                            (
                                "server_ca_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            (
                                "client_cert_pem",
                                Value::string("-----BEGIN CERTIFICATE-----"),
                            ),
                            ("kek_id", Value::string("k")),
                        ]),
                    )
                }),
            ),
            (
                "kms.endpoint",
                Box::new(|v| {
                    v.set(
                        "kms",
                        Value::object([
                            ("type", Value::string("cluster-managed")),
                            ("endpoint", Value::string("kms:5696")),
                        ]),
                    )
                }),
            ),
        ];
        for (path, edit) in cases {
            let mut v = config();
            edit(&mut v);
            assert_eq!(errors_at(&v), vec![path.to_owned()], "case {path}");
        }
    }

    #[test]
    fn unknown_inputs_are_skipped_during_validate() {
        let mut v = config();
        v.set("network_config", Value::Unknown);
        v.set("worker_count", Value::Unknown);
        v.set(
            "image",
            Value::object([
                ("reference", Value::Unknown),
                ("measurements", Value::Unknown),
            ]),
        );
        assert!(errors_at(&v).is_empty());
    }
}
