//! Attacks on the provider process itself, as Terraform starts it: only Terraform (holding the
//! AutoMTLS client certificate it put in `PLUGIN_CLIENT_CERT`) may talk to the plugin, and other
//! local users cannot even reach its socket.

use std::io::BufRead as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use acceptance_tests::provider_binary;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const COOKIE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";
/// The HTTP/2 connection preface and an empty SETTINGS frame: what gRPC sends first.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

/// A client certificate like the one go-plugin makes per run: self-signed CA, ECDSA P-521.
struct ClientCert {
    pem: String,
    der: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn go_plugin_like_cert() -> ClientCert {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P521_SHA512).unwrap();
    let cert = params.self_signed(&key).unwrap();
    ClientCert {
        pem: cert.pem(),
        der: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// A provider process started the way Terraform starts it, and what its handshake line said.
struct Plugin {
    child: Child,
    socket: PathBuf,
    server_cert: CertificateDer<'static>,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_plugin(client_cert_pem: &str, socket_dir: &Path) -> Plugin {
    let bin = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let mut child = Command::new(bin)
        .env("TF_PLUGIN_MAGIC_COOKIE", COOKIE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "5,6")
        .env("PLUGIN_CLIENT_CERT", client_cert_pem)
        .env("PLUGIN_UNIX_SOCKET_DIR", socket_dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let fields: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(fields.len(), 6, "handshake line {line:?}");
    assert_eq!(&fields[..3], ["1", "6", "unix"], "{line}");
    use base64::Engine as _;
    let server_cert = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(fields[5])
        .unwrap();
    Plugin {
        child,
        socket: PathBuf::from(fields[3]),
        server_cert: CertificateDer::from(server_cert),
    }
}

/// The client half of go-plugin's pinning: the server certificate by its exact bytes.
#[derive(Debug)]
struct PinnedServer(CertificateDer<'static>);

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() == self.0.as_ref() {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the pinned server".into()))
        }
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(m, c, d, &algs)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(m, c, d, &algs)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Connects over the plugin's socket with `client_cert` (or none), sends gRPC's HTTP/2 preface
/// and returns how many bytes of HTTP/2 the server answered with, or the error that ended it.
async fn speak_http2(plugin: &Plugin, client_cert: Option<&ClientCert>) -> Result<usize, String> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(PinnedServer(plugin.server_cert.clone())));
    let mut config = match client_cert {
        Some(c) => builder
            .with_client_auth_cert(vec![c.der.clone()], PrivateKeyDer::Pkcs8(c.key.clone_key()))
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let unix = tokio::net::UnixStream::connect(&plugin.socket)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), unix)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(H2_PREFACE)
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), tls.read(&mut buf))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| format!("read: {e}"))?;
    // A SETTINGS frame (type 4) is the server's first HTTP/2 frame.
    if n >= 9 && buf[3] == 4 {
        Ok(n)
    } else {
        Err(format!("no HTTP/2 SETTINGS frame: {n} bytes"))
    }
}

#[tokio::test]
async fn a_local_client_without_terraforms_certificate_is_refused_at_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    let terraform = go_plugin_like_cert();
    let plugin = start_plugin(&terraform.pem, dir.path());

    // Terraform's own certificate: the server speaks gRPC's HTTP/2.
    let answered = speak_http2(&plugin, Some(&terraform)).await;
    assert!(answered.is_ok(), "Terraform's certificate: {answered:?}");

    // No certificate, or any other certificate (even one made exactly like Terraform's): not a
    // byte of HTTP/2 comes back.
    // (speak_http2 is Ok only once the server's HTTP/2 SETTINGS frame arrived.)
    let refused = speak_http2(&plugin, None).await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    let impostor = go_plugin_like_cert();
    let refused = speak_http2(&plugin, Some(&impostor)).await;
    assert!(refused.is_err(), "another certificate was served");
}

#[test]
fn the_plugin_socket_is_in_a_folder_only_its_user_can_enter() {
    let dir = tempfile::tempdir().unwrap();
    // Let other users reach the base folder, as /tmp allows: only the plugin's own folder guards.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let terraform = go_plugin_like_cert();
    let plugin = start_plugin(&terraform.pem, dir.path());
    let folder = plugin.socket.parent().unwrap();
    assert_eq!(folder.parent().unwrap(), dir.path());
    let mode = std::fs::metadata(folder).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{} has mode {mode:o}", folder.display());

    // Another local user (nobody) cannot connect; this user can.
    let uid = String::from_utf8(Command::new("id").arg("-u").output().unwrap().stdout).unwrap();
    assert_eq!(
        uid.trim(),
        "0",
        "this test acts as another user and must run as root"
    );
    let connect = "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    sys.exit(13)\n";
    let as_nobody = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            connect,
        ])
        .arg(&plugin.socket)
        .status()
        .unwrap();
    assert_eq!(
        as_nobody.code(),
        Some(13),
        "another user reached the plugin socket"
    );
    let as_owner = Command::new("/usr/bin/python3")
        .args(["-c", connect])
        .arg(&plugin.socket)
        .status()
        .unwrap();
    assert!(as_owner.success(), "the owner cannot connect: {as_owner}");
}

#[test]
fn without_automtls_the_provider_refuses_to_serve() {
    let bin = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bin)
        .env("TF_PLUGIN_MAGIC_COOKIE", COOKIE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "6")
        .env_remove("PLUGIN_CLIENT_CERT")
        .env_remove("CONSTELLATION_PROVIDER_INSECURE_PLAINTEXT")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(out.stdout.is_empty(), "a handshake line was printed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("AutoMTLS"), "{stderr}");
}
