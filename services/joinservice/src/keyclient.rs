//! Data keys from the cluster's key services over mutual TLS, with a client certificate the
//! join service issues itself from the key-service CA in its PKI. Endpoints are tried in order
//! until one answers; one lazily connected channel per endpoint.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use constellation_attestation::Clock;
use constellation_common::secret::SecretBytes;
use constellation_common::tls::{mutual_tls_client_config, TlsConnector};
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::GetDataKeyRequest;
use constellation_proto::PROTOCOL_VERSION;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::pki::ClusterPki;
use crate::ticket::{DataKeyError, DataKeySource};

type Client = KeyServiceClient<tonic::transport::Channel>;

/// Key services at fixed endpoints.
pub struct KeyServiceClients {
    tls: Arc<rustls::ClientConfig>,
    endpoints: Vec<SocketAddr>,
    channels: Mutex<HashMap<SocketAddr, Client>>,
}

impl std::fmt::Debug for KeyServiceClients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyServiceClients")
            .field("endpoints", &self.endpoints)
            .finish_non_exhaustive()
    }
}

impl KeyServiceClients {
    /// A client certificate for `node_name` at `ip`, from `pki`'s key-service CA.
    pub fn new(
        pki: &ClusterPki,
        node_name: &str,
        ip: std::net::IpAddr,
        clock: &dyn Clock,
        endpoints: Vec<SocketAddr>,
    ) -> Result<Self, String> {
        let creds = pki
            .key_service_client_cert(node_name, ip, clock)
            .map_err(|e| e.to_string())?;
        let chain = creds
            .cert_chain_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            creds.key_pkcs8_der.expose().to_vec(),
        ));
        let tls = mutual_tls_client_config(
            &[CertificateDer::from(pki.key_service_ca_der().to_vec())],
            chain,
            key,
        )
        .map_err(|e| format!("key service client TLS: {e}"))?;
        Ok(Self {
            tls,
            endpoints,
            channels: Mutex::default(),
        })
    }

    fn client(&self, addr: SocketAddr) -> Result<Client, String> {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = channels.get(&addr) {
            return Ok(client.clone());
        }
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect_timeout(Duration::from_secs(3))
            .connect_with_connector_lazy(TlsConnector::new(
                self.tls.clone(),
                rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            ));
        let client = KeyServiceClient::new(channel);
        channels.insert(addr, client.clone());
        Ok(client)
    }
}

#[tonic::async_trait]
impl DataKeySource for KeyServiceClients {
    async fn data_key(&self, key_id: &str, len: usize) -> Result<SecretBytes, DataKeyError> {
        let err = |reason: String| DataKeyError {
            key_id: key_id.to_owned(),
            reason,
        };
        let length = u32::try_from(len).map_err(|_| err(format!("length {len} too large")))?;
        let mut failures = Vec::new();
        for &addr in &self.endpoints {
            let mut client = match self.client(addr) {
                Ok(client) => client,
                Err(e) => {
                    failures.push(format!("{addr}: {e}"));
                    continue;
                }
            };
            let request = GetDataKeyRequest {
                version: PROTOCOL_VERSION,
                data_key_id: key_id.to_owned(),
                length,
            };
            match client.get_data_key(request).await {
                Ok(resp) => return Ok(SecretBytes::new(resp.into_inner().data_key)),
                Err(s) => failures.push(format!("key service {addr}: {}", s.message())),
            }
        }
        Err(err(failures.join("; ")))
    }
}
