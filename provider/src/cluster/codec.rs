//! The mapping between Terraform values of `constellation_cluster` and the typed
//! [`ClusterSpec`] / [`ClusterState`] a backend works on: decoding with per-attribute
//! diagnostics, and writing outputs, secrets and drift back into values.

use constellation_attestation::measurements::MAX_PCR_INDEX;
use constellation_attestation::snp::SnpSettings;
use constellation_attestation::{Measurement, Measurements, Variant};
use constellation_common::secret::SecretBytes;
use serde::{Deserialize, Serialize};

use super::model::*;
use crate::decode::Decoder;
use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::value::Value;

/// Upper bound of each node count; a typo like 1000 should not start a thousand nodes.
pub const MAX_NODES: u32 = 100;

/// The secret attributes generated when the configuration leaves them null.
pub(super) const SECRET_ATTRS: [&str; 3] =
    ["master_secret", "master_secret_salt", "measurement_salt"];

/// The write-only master secret and its version (Terraform's `<name>_wo` convention).
pub(super) const MASTER_SECRET_WO: &str = "master_secret_wo";
pub(super) const MASTER_SECRET_WO_VERSION: &str = "master_secret_wo_version";

pub(super) fn check_kubernetes_version(v: &str) -> Result<(), String> {
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

pub(super) fn parse_secret(hex_value: &str) -> Result<SecretBytes, String> {
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

pub(super) fn check_pem(pem: &str) -> Result<(), String> {
    if pem.trim_start().starts_with("-----BEGIN ") {
        Ok(())
    } else {
        Err("expected PEM text starting with \"-----BEGIN \"".into())
    }
}

pub(super) fn check_endpoint(e: &str) -> Result<(), String> {
    match e.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {
            Ok(())
        }
        _ => Err(format!("{e:?} is not of the form host:port")),
    }
}

pub(super) fn p(names: &[&str]) -> AttrPath {
    AttrPath::attr(names)
}

/// What is kept in Terraform's private state for a cluster.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct PrivateState {
    pub(super) platform_state: String,
}

/// Decodes the spec; `None` without diagnostics while something is unknown.
pub(super) fn decode_spec(v: &Value, d: &mut Decoder) -> Option<ClusterSpec> {
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
            NO_CONTROL_PLANE,
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
    let master_secret = decode_master_secret(v, d);
    // Null means "generate at apply"; the plan makes it unknown until then.
    let mut salt = |attr: &str| match decode_secret(v, attr, d)? {
        Some(s) => Some(s),
        None => {
            d.incomplete = true;
            None
        }
    };
    let (master_secret_salt, measurement_salt) =
        (salt("master_secret_salt"), salt("measurement_salt"));
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
    Some(ClusterSpec {
        name: name?,
        platform: platform?,
        image: image?,
        control_plane_count: control_plane_count?,
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

/// A 32-byte hex secret attribute: `Some(None)` null, `None` unknown or invalid (recorded).
fn decode_secret(v: &Value, attr: &str, d: &mut Decoder) -> Option<Option<SecretBytes>> {
    let path = p(&[attr]);
    match d.opt_string(v.get(attr), &path)? {
        Some(h) => d
            .check(parse_secret(&h), &path, &format!("Invalid {attr}"))
            .map(Some),
        None => Some(None),
    }
}

/// `master_secret` (stored, or generated when null) or `master_secret_wo` with
/// `master_secret_wo_version` (write-only). In a state, the write-only secret is null and the
/// version says the cluster has one.
fn decode_master_secret(v: &Value, d: &mut Decoder) -> Option<MasterSecret> {
    let set = |attr: &str| !v.get(attr).is_null();
    let version_path = p(&[MASTER_SECRET_WO_VERSION]);
    if set("master_secret") && set(MASTER_SECRET_WO) {
        d.error(
            &p(&[MASTER_SECRET_WO]),
            "Conflicting master secrets",
            "set master_secret (kept in state) or master_secret_wo (write-only), not both",
        );
        return None;
    }
    if set(MASTER_SECRET_WO) && !set(MASTER_SECRET_WO_VERSION) {
        d.error(
            &version_path,
            "Missing master_secret_wo_version",
            "master_secret_wo needs master_secret_wo_version (e.g. 1): Terraform keeps no copy \
             of a write-only value, so the version is what records it in state",
        );
        return None;
    }
    if set("master_secret") && set(MASTER_SECRET_WO_VERSION) {
        d.error(
            &version_path,
            "master_secret_wo_version without master_secret_wo",
            "master_secret_wo_version versions master_secret_wo; master_secret needs none",
        );
        return None;
    }
    let version = d.opt_uint(v.get(MASTER_SECRET_WO_VERSION), &version_path, u32::MAX)?;
    match version {
        Some(version) => {
            let secret = decode_secret(v, MASTER_SECRET_WO, d)?;
            Some(MasterSecret::WriteOnly { version, secret })
        }
        None => match decode_secret(v, "master_secret", d)? {
            Some(s) => Some(MasterSecret::Stored(s)),
            None => {
                d.incomplete = true;
                None
            }
        },
    }
}

pub(super) fn decode_image(v: &Value, d: &mut Decoder) -> Option<ImageRef> {
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

pub(super) fn parse_pcr_index(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(i) if i <= MAX_PCR_INDEX && !s.starts_with('+') => Ok(i),
        _ => Err(format!(
            "PCR index {s:?} is not a number in 0..={MAX_PCR_INDEX}"
        )),
    }
}

pub(super) fn parse_digest(h: &str) -> Result<[u8; 32], String> {
    let bytes = hex::decode(h).map_err(|e| format!("{h:?} is not hex: {e}"))?;
    bytes.try_into().map_err(|b: Vec<u8>| {
        format!(
            "expected 32 bytes (64 hex characters), found {} bytes",
            b.len()
        )
    })
}

pub(super) fn decode_attestation(v: &Value, d: &mut Decoder) -> Option<AttestationSpec> {
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
    let snp = decode_snp_settings(obj, &base, d);
    let variant = variant?;
    if !refuse_snp_without_snp(variant, obj, &base, &SNP_ATTRIBUTES, d) {
        complete = false;
    }
    let snp = snp?;
    complete.then_some(AttestationSpec {
        variant,
        bootloader_version: tcb[0],
        tee_version: tcb[1],
        snp_version: tcb[2],
        microcode_version: tcb[3],
        snp,
    })
}

/// Every SEV-SNP setting of the `attestation` block.
pub(super) const SNP_ATTRIBUTES: [&str; 7] = [
    "bootloader_version",
    "tee_version",
    "snp_version",
    "microcode_version",
    "minimum_abi",
    "allowed_launch_measurements",
    "allowed_id_key_digests",
];

/// For a variant without SEV-SNP, an error on each of `names` that is set (it would check
/// nothing); true when none is.
pub(crate) fn refuse_snp_without_snp(
    variant: Variant,
    obj: &Value,
    base: &AttrPath,
    names: &[&str],
    d: &mut Decoder,
) -> bool {
    if variant.facts().sev_snp {
        return true;
    }
    let mut none = true;
    for name in names {
        if !obj.get(name).is_null() {
            d.error(
                &base.child(name),
                "SEV-SNP setting on a variant without SEV-SNP",
                format!(
                    "{name} applies to SEV-SNP variants only; variant {variant} has no SEV-SNP \
                     report to check it against"
                ),
            );
            none = false;
        }
    }
    none
}

/// A list of strings: `Some(None)` null, `None` unknown (anywhere inside) or wrongly typed.
fn opt_string_list(v: &Value, path: &AttrPath, d: &mut Decoder) -> Option<Option<Vec<String>>> {
    match v {
        Value::Null => Some(None),
        Value::List(items) => {
            let mut out = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let mut at = path.clone();
                at.0.push(crate::diag::PathStep::Index(i as i64));
                out.push(d.req_string(item, &at)?);
            }
            Some(Some(out))
        }
        Value::Unknown => {
            d.incomplete = true;
            None
        }
        other => {
            d.error(
                path,
                "Wrong type",
                format!("expected a list of strings, found {}", other.kind()),
            );
            None
        }
    }
}

/// `minimum_abi` and the allow-lists, checked by the attestation crate's own parser: an error
/// names the setting, which is the attribute's name.
pub(crate) fn decode_snp_settings(
    obj: &Value,
    base: &AttrPath,
    d: &mut Decoder,
) -> Option<SnpSettings> {
    let minimum_abi = d.opt_string(obj.get("minimum_abi"), &base.child("minimum_abi"));
    let measurements = opt_string_list(
        obj.get("allowed_launch_measurements"),
        &base.child("allowed_launch_measurements"),
        d,
    );
    let id_keys = opt_string_list(
        obj.get("allowed_id_key_digests"),
        &base.child("allowed_id_key_digests"),
        d,
    );
    let settings = SnpSettings {
        minimum_abi: minimum_abi?,
        allowed_launch_measurements: measurements?,
        allowed_id_key_digests: id_keys?,
        ..SnpSettings::default()
    };
    match settings.policy() {
        Ok(_) => Some(settings),
        Err(e) => {
            d.error(
                &base.child(e.setting),
                &format!("Invalid {}", base.child(e.setting)),
                e.to_string(),
            );
            None
        }
    }
}

pub(super) fn decode_network(v: &Value, d: &mut Decoder) -> Option<NetworkConfig> {
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

pub(super) fn decode_kms(v: &Value, d: &mut Decoder) -> Option<KmsConfig> {
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

pub(super) fn decode_outputs(v: &Value, d: &mut Decoder) -> Option<ClusterOutputs> {
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

/// The summary of the "no control plane" refusal of a configuration.
const NO_CONTROL_PLANE: &str = "Invalid control_plane_count";

pub(super) fn decode_state(v: &Value, private: &[u8]) -> Result<ClusterState, Diagnostics> {
    let mut d = Decoder::new();
    let spec = decode_spec(v, &mut d);
    // A refreshed state records the observed healthy counts: no control plane after every one
    // went down (a full restart) is a fact to repair, not a configuration to refuse.
    d.diagnostics.0.retain(|e| e.summary != NO_CONTROL_PLANE);
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

pub(super) fn text(s: &SecretBytes) -> Value {
    Value::string(String::from_utf8_lossy(s.expose()).into_owned())
}

pub(super) fn set_outputs(v: &mut Value, o: &ClusterOutputs) {
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

/// Writes the secrets kept in state; a write-only master secret leaves `master_secret` null
/// and records only its version.
pub(super) fn set_secrets(v: &mut Value, s: &ClusterSecrets) {
    let (master_secret, version) = match &s.master_secret {
        MasterSecret::Stored(secret) => (Value::string(hex::encode(secret.expose())), Value::Null),
        MasterSecret::WriteOnly { version, .. } => {
            (Value::Null, Value::Number(f64::from(*version)))
        }
    };
    v.set("master_secret", master_secret);
    v.set(MASTER_SECRET_WO, Value::Null);
    v.set(MASTER_SECRET_WO_VERSION, version);
    for (attr, secret) in SECRET_ATTRS[1..]
        .iter()
        .zip([&s.master_secret_salt, &s.measurement_salt])
    {
        v.set(attr, Value::string(hex::encode(secret.expose())));
    }
}

pub(super) fn set_unhealthy(v: &mut Value, unhealthy: &[UnhealthyNode]) {
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
pub(super) fn state_value(state: &ClusterState) -> Value {
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
                (
                    "minimum_abi",
                    spec.attestation
                        .snp
                        .minimum_abi
                        .clone()
                        .map_or(Value::Null, Value::string),
                ),
                (
                    "allowed_launch_measurements",
                    string_list(&spec.attestation.snp.allowed_launch_measurements),
                ),
                (
                    "allowed_id_key_digests",
                    string_list(&spec.attestation.snp.allowed_id_key_digests),
                ),
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
        ("kms", kms),
        ("kubeconfig_path", Value::Null),
    ]);
    set_secrets(&mut v, &spec.secrets);
    set_outputs(&mut v, &state.outputs);
    set_unhealthy(&mut v, &[]);
    v
}

fn string_list(list: &Option<Vec<String>>) -> Value {
    list.as_ref().map_or(Value::Null, |l| {
        Value::List(l.iter().cloned().map(Value::String).collect())
    })
}

pub(super) fn private_bytes(platform_state: &str) -> Vec<u8> {
    serde_json::to_vec(&PrivateState {
        platform_state: platform_state.to_owned(),
    })
    .unwrap_or_default()
}
