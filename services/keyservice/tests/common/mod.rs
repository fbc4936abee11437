//! Shared test helpers: a key service served over mutual TLS on a free loopback port.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use constellation_keyservice::testing::{IssuedCert, TestPki};
use constellation_keyservice::tls::{self, TlsConnector};
use constellation_keyservice::{serve, KeyService};
use constellation_proto::keyservice::key_service_client::KeyServiceClient;
use constellation_proto::keyservice::GetDataKeyRequest;
use constellation_proto::PROTOCOL_VERSION;
use rustls::pki_types::ServerName;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub struct RunningKeyService {
    pub addr: SocketAddr,
    pub pki: TestPki,
    pub client_cert: IssuedCert,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), constellation_keyservice::ServeError>>>,
}

impl RunningKeyService {
    /// Serves `service` with the crate's mutual-TLS server config for a fresh cluster CA.
    pub async fn start(service: KeyService) -> Self {
        Self::start_with(service, |pki, server_cert| {
            tls::mutual_tls_server_config(&[pki.ca_der()], server_cert.chain(), server_cert.key())
                .expect("server config")
        })
        .await
    }

    /// Serves `service` with a server config built by `server_config` from the CA and the
    /// server certificate.
    pub async fn start_with(
        service: KeyService,
        server_config: impl FnOnce(&TestPki, &IssuedCert) -> Arc<rustls::ServerConfig>,
    ) -> Self {
        let pki = TestPki::new("test cluster CA").expect("CA");
        let server_cert = pki
            .issue_server("key-service", &["127.0.0.1"])
            .expect("server cert");
        let client_cert = pki.issue_client("node-1").expect("client cert");
        let server_config = server_config(&pki, &server_cert);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (shutdown, stop) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, server_config, service, async {
            let _ = stop.await;
        }));
        Self {
            addr,
            pki,
            client_cert,
            shutdown: Some(shutdown),
            task: Some(task),
        }
    }

    /// A channel presenting `client` (or no certificate) and trusting this service's CA.
    pub async fn channel_with(
        &self,
        client: Option<&IssuedCert>,
    ) -> Result<Channel, tonic::transport::Error> {
        let builder = rustls::ClientConfig::builder_with_provider(tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("versions")
            .with_root_certificates({
                let mut roots = rustls::RootCertStore::empty();
                roots.add(self.pki.ca_der()).expect("root");
                roots
            });
        let mut config = match client {
            Some(cert) => builder
                .with_client_auth_cert(cert.chain(), cert.key())
                .expect("client auth"),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![tls::ALPN_H2.to_vec()];
        self.channel_with_config(Arc::new(config)).await
    }

    pub async fn channel_with_config(
        &self,
        config: Arc<rustls::ClientConfig>,
    ) -> Result<Channel, tonic::transport::Error> {
        let endpoint = Endpoint::from_shared(format!("http://{}", self.addr)).expect("endpoint");
        let server_name = ServerName::try_from("127.0.0.1").expect("server name");
        tls::connect(endpoint, TlsConnector::new(config, server_name)).await
    }

    /// A client with this cluster's client certificate, built by the crate's own helper.
    pub async fn client(&self) -> KeyServiceClient<Channel> {
        let config = tls::mutual_tls_client_config(
            &[self.pki.ca_der()],
            self.client_cert.chain(),
            self.client_cert.key(),
        )
        .expect("client config");
        KeyServiceClient::new(self.channel_with_config(config).await.expect("connect"))
    }

    pub async fn stop(mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("serve task").expect("serve result");
        }
    }
}

pub fn request(data_key_id: &str, length: u32) -> GetDataKeyRequest {
    GetDataKeyRequest {
        version: PROTOCOL_VERSION,
        data_key_id: data_key_id.to_string(),
        length,
    }
}

pub async fn data_key(client: &mut KeyServiceClient<Channel>, id: &str, length: u32) -> Vec<u8> {
    client
        .get_data_key(request(id, length))
        .await
        .expect("GetDataKey")
        .into_inner()
        .data_key
}
