//! The cluster PKI: kubelet CSR admission, CA hash, admin kubeconfig, persistence.

mod common;

use constellation_common::metadata::Role;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use base64::Engine as _;
use common::*;
use constellation_attestation::FixedClock;
use constellation_joinservice::pki::{
    files, ClusterPki, CsrError, NodeIdentity, PkiError, CA_VALIDITY, CLOCK_SKEW_BACKDATE,
    LEAF_VALIDITY,
};

const NOW: u64 = 1_750_000_000;

fn pki() -> ClusterPki {
    ClusterPki::generate("test-cluster", &FixedClock::at_unix(NOW)).expect("PKI")
}

fn node() -> NodeIdentity {
    NodeIdentity {
        name: "worker-0".into(),
        role: Role::Worker,
        ips: vec!["10.0.0.7".parse().unwrap(), "fd00::7".parse().unwrap()],
        dns_names: vec!["worker-0".into(), "worker-0.cluster.internal".into()],
    }
}

#[test]
fn good_csr_gives_a_kubelet_cert_signed_by_the_ca_with_the_right_names() {
    let pki = pki();
    let node = node();
    // Subset of the node's names, with a different DNS case: still allowed.
    let csr_pem = csr(
        "system:node:worker-0",
        &["system:nodes"],
        &["WORKER-0.cluster.internal"],
        &["10.0.0.7".parse().unwrap()],
    );
    let clock = FixedClock::at_unix(NOW + 100);
    let cert_pem = pki
        .issue_kubelet_cert(csr_pem.as_bytes(), &node, &clock)
        .unwrap();

    let ca = parse_cert(pki.ca_cert_pem());
    let leaf = parse_cert(&cert_pem);
    assert_signed_by(&leaf, &ca);
    assert_eq!(
        subject(&leaf),
        vec![
            (O_OID.into(), "system:nodes".into()),
            (CN_OID.into(), "system:node:worker-0".into())
        ]
    );
    let (dns, ips) = sans(&leaf);
    assert_eq!(dns, vec!["WORKER-0.cluster.internal".to_string()]);
    assert_eq!(ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
    // serverAuth and clientAuth
    assert_eq!(
        ekus(&leaf),
        vec![
            "1.3.6.1.5.5.7.3.1".to_string(),
            "1.3.6.1.5.5.7.3.2".to_string()
        ]
    );
    assert_eq!(
        validity_unix(&leaf),
        (
            NOW + 100 - CLOCK_SKEW_BACKDATE.as_secs(),
            NOW + 100 + LEAF_VALIDITY.as_secs()
        )
    );
    assert_eq!(
        validity_unix(&ca),
        (
            NOW - CLOCK_SKEW_BACKDATE.as_secs(),
            NOW + CA_VALIDITY.as_secs()
        )
    );
}

#[test]
fn wrong_common_name_is_refused_naming_it() {
    let pki = pki();
    for cn in ["system:node:worker-1", "worker-0", "system:node:worker-00"] {
        let csr_pem = csr(cn, &["system:nodes"], &[], &[]);
        let err = pki
            .issue_kubelet_cert(csr_pem.as_bytes(), &node(), &FixedClock::at_unix(NOW))
            .unwrap_err();
        assert_eq!(
            err,
            CsrError::CommonName {
                expected: "system:node:worker-0".into(),
                found: vec![cn.into()]
            }
        );
        assert!(err.is_identity_mismatch());
        assert!(err.to_string().contains(cn));
    }
}

#[test]
fn wrong_or_missing_organization_is_refused() {
    let pki = pki();
    let csr_pem = csr("system:node:worker-0", &["system:masters"], &[], &[]);
    assert_eq!(
        pki.check_kubelet_csr(csr_pem.as_bytes(), &node())
            .unwrap_err(),
        CsrError::Organization {
            expected: "system:nodes",
            found: vec!["system:masters".into()]
        }
    );
    let csr_pem = csr("system:node:worker-0", &[], &[], &[]);
    assert!(matches!(
        pki.check_kubelet_csr(csr_pem.as_bytes(), &node()).unwrap_err(),
        CsrError::Organization { found, .. } if found.is_empty()
    ));
}

#[test]
fn extra_subject_attribute_is_refused() {
    let pki = pki();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "system:node:worker-0");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "system:nodes");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationalUnitName, "ops");
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    assert_eq!(
        pki.check_kubelet_csr(pem.as_bytes(), &node()).unwrap_err(),
        CsrError::UnexpectedSubjectAttribute {
            oid: "2.5.4.11".into(),
            value: "ops".into()
        }
    );
}

#[test]
fn extra_san_ip_is_refused_naming_it() {
    let pki = pki();
    let foreign: IpAddr = "10.0.0.8".parse().unwrap();
    let csr_pem = csr(
        "system:node:worker-0",
        &["system:nodes"],
        &["worker-0"],
        &["10.0.0.7".parse().unwrap(), foreign],
    );
    let err = pki
        .issue_kubelet_cert(csr_pem.as_bytes(), &node(), &FixedClock::at_unix(NOW))
        .unwrap_err();
    assert_eq!(
        err,
        CsrError::IpNotAllowed {
            found: foreign,
            allowed: node().ips
        }
    );
    assert!(err.to_string().contains("10.0.0.8"));
}

#[test]
fn foreign_dns_name_is_refused_naming_it() {
    let pki = pki();
    let csr_pem = csr(
        "system:node:worker-0",
        &["system:nodes"],
        &["kubernetes.default.svc"],
        &[],
    );
    assert_eq!(
        pki.check_kubelet_csr(csr_pem.as_bytes(), &node())
            .unwrap_err(),
        CsrError::DnsNameNotAllowed {
            found: "kubernetes.default.svc".into(),
            allowed: node().dns_names
        }
    );
}

#[test]
fn tampered_signature_and_garbage_are_refused() {
    let pki = pki();
    let good = kubelet_csr(&node());
    let (label, mut der) = der::pem::decode_vec(good.as_bytes()).unwrap();
    let last = der.len() - 1;
    der[last] ^= 0x01;
    let tampered = der::pem::encode_string(label, der::pem::LineEnding::LF, &der).unwrap();
    assert_eq!(
        pki.check_kubelet_csr(tampered.as_bytes(), &node())
            .unwrap_err(),
        CsrError::BadSignature
    );

    assert!(matches!(
        pki.check_kubelet_csr(b"not a csr", &node()).unwrap_err(),
        CsrError::NotPem { .. }
    ));
    // A certificate is not a CSR.
    assert!(matches!(
        pki.check_kubelet_csr(pki.ca_cert_pem().as_bytes(), &node()).unwrap_err(),
        CsrError::NotPem { reason, .. } if reason.contains("CERTIFICATE")
    ));
}

#[test]
fn ca_hash_matches_kubeadms_openssl_recipe() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    let ca_path = dir.path().join("ca.crt");
    std::fs::write(&ca_path, pki.ca_cert_pem()).unwrap();
    // kubeadm docs: openssl x509 -pubkey -in ca.crt | openssl pkey -pubin -outform der | sha256
    let script = format!(
        "openssl x509 -pubkey -noout -in {} | openssl pkey -pubin -outform der | openssl dgst -sha256 -hex",
        ca_path.display()
    );
    let out = Command::new("sh")
        .arg("-c")
        .arg(&script)
        .output()
        .expect("openssl is required for this test (apt-get install openssl)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let hex = text.trim().rsplit(' ').next().unwrap();
    assert_eq!(pki.ca_cert_hash(), format!("sha256:{hex}"));
    assert_eq!(hex.len(), 64);
}

#[test]
fn admin_kubeconfig_embeds_ca_and_a_system_masters_client_cert() {
    let pki = pki();
    let clock = FixedClock::at_unix(NOW);
    let admin = pki.admin_client_cert(&clock).unwrap();
    let yaml = pki.kubeconfig("203.0.113.5:6443", &admin).unwrap();
    let doc: serde_yaml::Value = serde_yaml::from_str(&yaml).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let s = |v: &serde_yaml::Value| v.as_str().unwrap().to_owned();

    assert_eq!(s(&doc["apiVersion"]), "v1");
    assert_eq!(s(&doc["kind"]), "Config");
    assert_eq!(s(&doc["clusters"][0]["name"]), "test-cluster");
    assert_eq!(
        s(&doc["clusters"][0]["cluster"]["server"]),
        "https://203.0.113.5:6443"
    );
    let ca_pem = b64
        .decode(s(
            &doc["clusters"][0]["cluster"]["certificate-authority-data"]
        ))
        .unwrap();
    assert_eq!(ca_pem, pki.ca_cert_pem().as_bytes());
    assert_eq!(s(&doc["current-context"]), "kubernetes-admin@test-cluster");
    assert_eq!(
        s(&doc["contexts"][0]["name"]),
        "kubernetes-admin@test-cluster"
    );
    assert_eq!(s(&doc["contexts"][0]["context"]["cluster"]), "test-cluster");
    assert_eq!(
        s(&doc["contexts"][0]["context"]["user"]),
        "kubernetes-admin"
    );
    assert_eq!(s(&doc["users"][0]["name"]), "kubernetes-admin");
    let cert_pem = b64
        .decode(s(&doc["users"][0]["user"]["client-certificate-data"]))
        .unwrap();
    let key_pem = b64
        .decode(s(&doc["users"][0]["user"]["client-key-data"]))
        .unwrap();
    assert_eq!(key_pem, admin.key_pem.expose());

    let leaf = parse_cert(std::str::from_utf8(&cert_pem).unwrap());
    assert_signed_by(&leaf, &parse_cert(pki.ca_cert_pem()));
    assert_eq!(
        subject(&leaf),
        vec![
            (O_OID.into(), "system:masters".into()),
            (CN_OID.into(), "kubernetes-admin".into())
        ]
    );
    assert_eq!(ekus(&leaf), vec!["1.3.6.1.5.5.7.3.2".to_string()]);
    // The embedded key is the one the certificate was issued for.
    let key = rcgen::KeyPair::from_pem(std::str::from_utf8(&key_pem).unwrap()).unwrap();
    use der::Encode;
    assert_eq!(
        rcgen::PublicKeyData::subject_public_key_info(&key),
        leaf.tbs_certificate
            .subject_public_key_info
            .to_der()
            .unwrap()
    );
    assert!(!format!("{admin:?}").contains("PRIVATE KEY"));
}

#[test]
fn pki_survives_a_round_trip_through_a_directory() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    pki.write_to_dir(dir.path()).unwrap();

    for file in pki.shared_files() {
        let path = dir.path().join(file.relative_path);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        let want = if file.is_private_key { 0o600 } else { 0o644 };
        assert_eq!(mode, want, "{}", file.relative_path);
        assert_eq!(std::fs::read(&path).unwrap(), file.content.expose());
    }
    assert!(dir.path().join("etcd/ca.key").exists());

    let loaded = ClusterPki::load_from_dir(dir.path(), "test-cluster").unwrap();
    assert_eq!(loaded.ca_cert_hash(), pki.ca_cert_hash());
    assert_eq!(loaded.ca_cert_pem(), pki.ca_cert_pem());
    assert_eq!(loaded.shared_files(), pki.shared_files());
    // The reloaded CA still signs verifiable certificates.
    let cert = loaded
        .issue_kubelet_cert(
            kubelet_csr(&node()).as_bytes(),
            &node(),
            &FixedClock::at_unix(NOW),
        )
        .unwrap();
    assert_signed_by(&parse_cert(&cert), &parse_cert(pki.ca_cert_pem()));
}

#[test]
fn loading_refuses_a_key_that_does_not_match_its_certificate() {
    let pki = pki();
    let dir = tempfile::tempdir().unwrap();
    pki.write_to_dir(dir.path()).unwrap();
    let other = dir.path().join(files::FRONT_PROXY_CA_KEY);
    std::fs::copy(&other, dir.path().join(files::CA_KEY)).unwrap();
    let err = ClusterPki::load_from_dir(dir.path(), "test-cluster").unwrap_err();
    assert!(
        matches!(&err, PkiError::KeyMismatch { key, .. } if key.ends_with(files::CA_KEY)),
        "{err}"
    );

    std::fs::remove_file(dir.path().join(files::SERVICE_ACCOUNT_PUB)).unwrap();
    assert!(matches!(
        ClusterPki::load_from_dir(dir.path(), "test-cluster").unwrap_err(),
        PkiError::Io { .. }
    ));
}
