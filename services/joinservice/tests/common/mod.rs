//! Helpers shared by the join service's integration tests: CSRs made with rcgen, and checks of
//! issued certificates made independently with x509-cert and aws-lc-rs.
#![allow(dead_code)]

use constellation_common::metadata::Role;
use std::net::IpAddr;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};
use der::{DecodePem, Encode};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{ExtendedKeyUsage, SubjectAltName};
use x509_cert::Certificate;

use constellation_joinservice::pki::NodeIdentity;

pub const CN_OID: &str = "2.5.4.3";
pub const O_OID: &str = "2.5.4.10";

/// A PEM CSR with the given subject (CN, then each O) and SANs.
pub fn csr(cn: &str, orgs: &[&str], dns: &[&str], ips: &[IpAddr]) -> String {
    let key = KeyPair::generate().expect("P-256 key");
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    for o in orgs {
        dn.push(DnType::OrganizationName, *o);
    }
    params.distinguished_name = dn;
    params.subject_alt_names = dns
        .iter()
        .map(|d| SanType::DnsName((*d).try_into().expect("IA5 DNS name")))
        .chain(ips.iter().map(|ip| SanType::IpAddress(*ip)))
        .collect();
    params
        .serialize_request(&key)
        .expect("CSR")
        .pem()
        .expect("PEM")
}

/// A good kubelet CSR for `node`, asking for all of its names.
pub fn kubelet_csr(node: &NodeIdentity) -> String {
    let dns: Vec<&str> = node.dns_names.iter().map(String::as_str).collect();
    csr(
        &format!("system:node:{}", node.name),
        &["system:nodes"],
        &dns,
        &node.ips,
    )
}

pub fn worker(name: &str, ip: &str) -> NodeIdentity {
    NodeIdentity {
        name: name.into(),
        role: Role::Worker,
        ips: vec![ip.parse().expect("IP")],
        dns_names: vec![name.into()],
    }
}

pub fn parse_cert(pem: &str) -> Certificate {
    Certificate::from_pem(pem.as_bytes()).expect("certificate PEM")
}

/// Panics unless `leaf` names `ca` as issuer and its signature verifies with the CA's key.
pub fn assert_signed_by(leaf: &Certificate, ca: &Certificate) {
    assert_eq!(leaf.tbs_certificate.issuer, ca.tbs_certificate.subject);
    let tbs = leaf.tbs_certificate.to_der().expect("TBS DER");
    let ca_key = ca
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .raw_bytes();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, ca_key)
        .verify(&tbs, leaf.signature.raw_bytes())
        .expect("leaf signature verifies with the CA key");
}

/// Subject attributes as (OID, value) in encoding order.
pub fn subject(cert: &Certificate) -> Vec<(String, String)> {
    cert.tbs_certificate
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .map(|atv| {
            (
                atv.oid.to_string(),
                String::from_utf8(atv.value.value().to_vec()).expect("UTF-8 attribute"),
            )
        })
        .collect()
}

/// (DNS names, IPs) of the SAN extension.
pub fn sans(cert: &Certificate) -> (Vec<String>, Vec<IpAddr>) {
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    if let Some((_, san)) = cert.tbs_certificate.get::<SubjectAltName>().expect("SAN") {
        for name in san.0 {
            match name {
                GeneralName::DnsName(d) => dns.push(d.to_string()),
                GeneralName::IpAddress(o) => {
                    let b = o.as_bytes();
                    ips.push(match b.len() {
                        4 => IpAddr::from(<[u8; 4]>::try_from(b).expect("v4")),
                        _ => IpAddr::from(<[u8; 16]>::try_from(b).expect("v6")),
                    });
                }
                other => panic!("unexpected SAN {other:?}"),
            }
        }
    }
    (dns, ips)
}

/// Extended key usage OIDs.
pub fn ekus(cert: &Certificate) -> Vec<String> {
    cert.tbs_certificate
        .get::<ExtendedKeyUsage>()
        .expect("EKU")
        .map(|(_, eku)| eku.0.iter().map(|o| o.to_string()).collect())
        .unwrap_or_default()
}

/// (notBefore, notAfter) as Unix seconds.
pub fn validity_unix(cert: &Certificate) -> (u64, u64) {
    let v = &cert.tbs_certificate.validity;
    (
        v.not_before.to_unix_duration().as_secs(),
        v.not_after.to_unix_duration().as_secs(),
    )
}
