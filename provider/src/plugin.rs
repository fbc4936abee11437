//! go-plugin handshake: magic cookie, protocol negotiation, AutoMTLS, the stdout handshake
//! line, then the gRPC server until Terraform calls GRPCController.Shutdown.

use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::Notify;
use tonic::transport::{Identity, Server, ServerTlsConfig};

use crate::resource::{DataSource, Resource};
use crate::server::{Controller, ProviderService};

pub const MAGIC_COOKIE_KEY: &str = "TF_PLUGIN_MAGIC_COOKIE";
pub const MAGIC_COOKIE_VALUE: &str =
    "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";

/// go-plugin's message for a plugin binary run by hand.
pub const NOT_A_PLUGIN_HOST: &str =
    "This binary is a plugin. These are not meant to be executed directly.\n\
Please execute the program that consumes these plugins, which will\n\
load any plugins automatically";

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{NOT_A_PLUGIN_HOST}")]
    NotLaunchedByTerraform,
    #[error("Terraform offers plugin protocol versions {offered:?}; this provider speaks 6")]
    ProtocolVersion { offered: String },
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(std::io::Error),
    #[error("cannot create the TLS certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS setup failed: {0}")]
    Tls(tonic::transport::Error),
    #[error("cannot write the handshake line: {0}")]
    Handshake(std::io::Error),
    #[error("gRPC server failed: {0}")]
    Serve(tonic::transport::Error),
    #[error("gRPC server task failed: {0}")]
    Task(String),
}

/// The self-signed server certificate go-plugin pins (SAN `localhost`).
struct ServerCert {
    cert_pem: String,
    key_pem: String,
    der_base64: String,
}

fn server_cert() -> Result<ServerCert, rcgen::Error> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::DigitalSignature,
        rcgen::KeyUsagePurpose::KeyEncipherment,
        rcgen::KeyUsagePurpose::KeyCertSign,
    ];
    params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let cert = params.self_signed(&key)?;
    Ok(ServerCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        // go-plugin reads standard base64 without padding.
        der_base64: base64::engine::general_purpose::STANDARD_NO_PAD.encode(cert.der()),
    })
}

/// Serves the provider until Terraform shuts it down.
pub async fn serve_resources(
    resources: Vec<Arc<dyn Resource>>,
    data_sources: Vec<Arc<dyn DataSource>>,
) -> Result<(), ServeError> {
    if std::env::var(MAGIC_COOKIE_KEY).ok().as_deref() != Some(MAGIC_COOKIE_VALUE) {
        return Err(ServeError::NotLaunchedByTerraform);
    }
    if let Ok(offered) = std::env::var("PLUGIN_PROTOCOL_VERSIONS") {
        if !offered.split(',').any(|v| v.trim() == "6") {
            return Err(ServeError::ProtocolVersion { offered });
        }
    }
    // More than one rustls provider may be compiled into the workspace; pick ours.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(ServeError::Listen)?;
    let addr = listener.local_addr().map_err(ServeError::Listen)?;

    let mut builder = Server::builder();
    // AutoMTLS: Terraform sends its client certificate in PLUGIN_CLIENT_CERT and pins our
    // self-signed server certificate from the handshake line, which authenticates the
    // server. The client is not authenticated: go-plugin's client certificate is a CA
    // certificate (IsCA=true) that webpki refuses as an end-entity certificate, so asking
    // for it (even optionally) makes every handshake fail ("use of closed network
    // connection"). The port is bound to loopback only.
    let cert_field = match std::env::var("PLUGIN_CLIENT_CERT") {
        Ok(client_pem) if !client_pem.is_empty() => {
            let cert = server_cert()?;
            let tls =
                ServerTlsConfig::new().identity(Identity::from_pem(&cert.cert_pem, &cert.key_pem));
            builder = builder.tls_config(tls).map_err(ServeError::Tls)?;
            cert.der_base64
        }
        _ => String::new(),
    };

    let shutdown = Arc::new(Notify::new());
    let router = builder
        .add_service(crate::tfplugin6::provider_server::ProviderServer::new(
            ProviderService::new(resources, data_sources),
        ))
        .add_service(
            crate::go_plugin::grpc_controller_server::GrpcControllerServer::new(Controller {
                shutdown: shutdown.clone(),
            }),
        );

    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "1|6|tcp|{addr}|grpc|{cert_field}").map_err(ServeError::Handshake)?;
        out.flush().map_err(ServeError::Handshake)?;
    }
    tracing::debug!(%addr, "serving tfplugin6");

    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut server = tokio::spawn(router.serve_with_incoming(incoming));
    tokio::select! {
        () = parent_gone() => {
            tracing::warn!("Terraform exited without shutting the plugin down; exiting");
            Ok(())
        }
        r = &mut server => match r {
            Ok(r) => r.map_err(ServeError::Serve),
            Err(e) => Err(ServeError::Task(e.to_string())),
        },
        () = shutdown.notified() => {
            // The server task keeps running long enough for the Shutdown response to reach
            // Terraform; then we exit without waiting for Terraform to close its connection.
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok(())
        }
    }
}

/// Resolves when the process that started us (Terraform) is gone, e.g. after a crash:
/// an orphaned plugin would otherwise serve forever and hold Terraform's output pipes.
async fn parent_gone() {
    let parent = std::os::unix::process::parent_id();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if std::os::unix::process::parent_id() != parent {
            return;
        }
    }
}
