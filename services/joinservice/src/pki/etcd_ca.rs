//! The etcd CA's leaves: each etcd member's certificate (one certificate for its client and peer
//! listeners, and for dialing its peers) and the certificates of etcd's clients (the control
//! planes' daemons). etcd checks both sides of both kinds of traffic against this CA only
//! (`--client-cert-auth`, `--peer-client-cert-auth`), so a Kubernetes or key-service certificate
//! opens nothing in etcd.

use std::net::IpAddr;

use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
pub use constellation_store::EtcdCredentials;
use rcgen::{ExtendedKeyUsagePurpose, SanType};

use super::keyservice_ca::issue_leaf;
use super::*;

/// Prefix of an etcd member certificate's common name; the member (node) name follows.
pub const ETCD_MEMBER_COMMON_NAME_PREFIX: &str = "constellation etcd member ";
/// Prefix of an etcd client certificate's common name; the client's name follows.
pub const ETCD_CLIENT_COMMON_NAME_PREFIX: &str = "constellation etcd client ";

impl ClusterPki {
    /// A fresh certificate for etcd member `member_name` listening on `ips` (one year): server
    /// and client usage, since a member both serves and dials its peers. `localhost` is among the
    /// names so local tooling can reach a member on loopback.
    pub fn etcd_member_cert(
        &self,
        member_name: &str,
        ips: &[IpAddr],
        clock: &dyn Clock,
    ) -> Result<EtcdCredentials, PkiError> {
        let mut sans: Vec<SanType> = ips.iter().copied().map(SanType::IpAddress).collect();
        sans.push(SanType::DnsName("localhost".try_into().map_err(
            |e: rcgen::Error| PkiError::Generate {
                what: "etcd member certificate",
                reason: e.to_string(),
            },
        )?));
        self.etcd_leaf(
            &format!("{ETCD_MEMBER_COMMON_NAME_PREFIX}{member_name}"),
            sans,
            vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            clock,
        )
    }

    /// A fresh client certificate for `client_name` (one year): client usage only, so it cannot
    /// serve as a member.
    pub fn etcd_client_cert(
        &self,
        client_name: &str,
        clock: &dyn Clock,
    ) -> Result<EtcdCredentials, PkiError> {
        self.etcd_leaf(
            &format!("{ETCD_CLIENT_COMMON_NAME_PREFIX}{client_name}"),
            Vec::new(),
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            clock,
        )
    }

    fn etcd_leaf(
        &self,
        common_name: &str,
        sans: Vec<SanType>,
        usages: Vec<ExtendedKeyUsagePurpose>,
        clock: &dyn Clock,
    ) -> Result<EtcdCredentials, PkiError> {
        let leaf = issue_leaf(
            &self.etcd_ca,
            "etcd certificate",
            common_name,
            sans,
            usages,
            clock,
        )?;
        let cert_pem = der::pem::encode_string(
            "CERTIFICATE",
            der::pem::LineEnding::LF,
            &leaf.cert_chain_der[0],
        )
        .map_err(|e| PkiError::Generate {
            what: "etcd certificate",
            reason: e.to_string(),
        })?;
        let key_pem = der::pem::encode_string(
            "PRIVATE KEY",
            der::pem::LineEnding::LF,
            leaf.key_pkcs8_der.expose(),
        )
        .map_err(|e| PkiError::Generate {
            what: "etcd key",
            reason: e.to_string(),
        })?;
        Ok(EtcdCredentials {
            ca_cert_pem: self.etcd_ca.cert_pem.clone(),
            cert_pem,
            key_pem: SecretBytes::new(key_pem.into_bytes()),
        })
    }
}
