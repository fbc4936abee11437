//! Test support (feature `testing`): a small rcgen PKI and a launcher for the real PyKMIP server
//! (`/usr/bin/pykmip-server`). Used by this crate's tests and by cluster tests elsewhere:
//! `constellation-keyservice = { workspace = true, features = ["testing"] }` in dev-dependencies.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::kmip::{KekSource, KmipBackend, KmipSettings, RetryPolicy};
use crate::master::{MasterSecret, MasterSecretBackend};
use constellation_common::secret::SecretBytes;

/// Path of the PyKMIP server script (Debian package python3-pykmip).
pub const PYKMIP_SERVER: &str = "/usr/bin/pykmip-server";

/// Why test support failed.
#[derive(Debug, thiserror::Error)]
pub enum TestingError {
    #[error("generating test certificates: {0}")]
    Pki(#[from] rcgen::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("KMS: {0}")]
    Kms(#[from] crate::master::BackendError),
    #[error("{PYKMIP_SERVER} did not start listening on 127.0.0.1:{port} within {waited:?}; log:\n{log}")]
    KmipServerDidNotStart {
        port: u16,
        waited: Duration,
        log: String,
    },
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> TestingError {
    let what = what.into();
    move |source| TestingError::Io { what, source }
}

/// A certificate and its key issued by a [`TestPki`].
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_der: CertificateDer<'static>,
    pub cert_pem: String,
    pub key_pem: String,
    key_pkcs8_der: Vec<u8>,
}

impl IssuedCert {
    /// The certificate as a one-element chain.
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone()]
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_pkcs8_der.clone()))
    }
}

/// A throwaway CA (ECDSA P-256) that issues server and client certificates.
pub struct TestPki {
    ca: CertifiedIssuer<'static, KeyPair>,
}

impl TestPki {
    pub fn new(ca_common_name: &str) -> Result<Self, TestingError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, ca_common_name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        Ok(Self { ca })
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.der().clone()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// A server certificate for `subject_alt_names` (IP addresses or DNS names).
    pub fn issue_server(
        &self,
        common_name: &str,
        subject_alt_names: &[&str],
    ) -> Result<IssuedCert, TestingError> {
        self.issue(
            common_name,
            subject_alt_names,
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub fn issue_client(&self, common_name: &str) -> Result<IssuedCert, TestingError> {
        self.issue(common_name, &[], ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(
        &self,
        common_name: &str,
        subject_alt_names: &[&str],
        usage: ExtendedKeyUsagePurpose,
    ) -> Result<IssuedCert, TestingError> {
        let sans: Vec<String> = subject_alt_names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.ca)?;
        Ok(IssuedCert {
            cert_der: cert.der().clone(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            key_pkcs8_der: key.serialize_der(),
        })
    }
}

/// A real PyKMIP server on a free loopback port with mutual TLS (TLS 1.2), its own CA, server and
/// client certificates and a database in a temporary directory. Killed when dropped.
/// [`stop`](Self::stop) and [`start_again`](Self::start_again) keep port, certificates and
/// database, so tests can simulate an outage.
pub struct PyKmipServer {
    dir: tempfile::TempDir,
    port: u16,
    pki: TestPki,
    client: IssuedCert,
    child: Option<Child>,
}

impl PyKmipServer {
    /// How long to wait for the server to listen (it takes about 0.8 s on the dev machine).
    pub const START_TIMEOUT: Duration = Duration::from_secs(30);

    /// Generates certificates, writes the config and starts the server, retrying on a port
    /// collision. Fails (never skips) when the server is not installed.
    pub fn start() -> Result<Self, TestingError> {
        if !Path::new(PYKMIP_SERVER).exists() {
            return Err(TestingError::Io {
                what: format!("{PYKMIP_SERVER} is required (apt-get install python3-pykmip)"),
                source: io::Error::from(io::ErrorKind::NotFound),
            });
        }
        let dir = tempfile::Builder::new()
            .prefix("pykmip-")
            .tempdir()
            .map_err(io_error("creating PyKMIP temp dir"))?;
        let pki = TestPki::new("constellation test KMIP CA")?;
        let server_cert = pki.issue_server("kmip-server", &["127.0.0.1"])?;
        let client = pki.issue_client("constellation-kms-client")?;
        let write = |name: &str, contents: &str| {
            let path = dir.path().join(name);
            fs::write(&path, contents).map_err(io_error(format!("writing {}", path.display())))
        };
        write("ca.crt", &pki.ca_pem())?;
        write("server.crt", &server_cert.cert_pem)?;
        write("server.key", &server_cert.key_pem)?;
        fs::create_dir_all(dir.path().join("policies"))
            .map_err(io_error("creating policies dir"))?;

        let mut last_error = None;
        for _ in 0..3 {
            let port = free_port()?;
            let config = format!(
                "[server]\nhostname=127.0.0.1\nport={port}\ncertificate_path={d}/server.crt\n\
                 key_path={d}/server.key\nca_path={d}/ca.crt\nauth_suite=TLS1.2\n\
                 policy_path={d}/policies\nenable_tls_client_auth=True\nlogging_level=INFO\n\
                 database_path={d}/pykmip.db\n",
                d = dir.path().display()
            );
            write("server.conf", &config)?;
            // Another process may take the port between `free_port` and the server's bind.
            match Self::launch(dir.path(), port) {
                Ok(child) => {
                    return Ok(Self {
                        dir,
                        port,
                        pki,
                        client,
                        child: Some(child),
                    })
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or(TestingError::KmipServerDidNotStart {
            port: 0,
            waited: Duration::ZERO,
            log: String::new(),
        }))
    }

    fn launch(dir: &Path, port: u16) -> Result<Child, TestingError> {
        let log = dir.join("server.log");
        let stdout =
            fs::File::create(dir.join("server.out")).map_err(io_error("creating server.out"))?;
        let stderr = stdout
            .try_clone()
            .map_err(io_error("cloning server.out handle"))?;
        let mut child = Command::new(PYKMIP_SERVER)
            .arg("-f")
            .arg(dir.join("server.conf"))
            .arg("-l")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            // Its own process group: PyKMIP forks a policy-monitor process that would outlive a
            // kill of the main process alone.
            .process_group(0)
            .spawn()
            .map_err(io_error(format!("spawning {PYKMIP_SERVER}")))?;
        let started = Instant::now();
        loop {
            if TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_ok() {
                return Ok(child);
            }
            let exited = matches!(child.try_wait(), Ok(Some(_)));
            if exited || started.elapsed() > Self::START_TIMEOUT {
                kill_process_group(&mut child);
                let read = |name: &str| fs::read_to_string(dir.join(name)).unwrap_or_default();
                return Err(TestingError::KmipServerDidNotStart {
                    port,
                    waited: started.elapsed(),
                    log: format!("{}\n{}", read("server.out"), read("server.log")),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the server and its helper processes (SIGKILL to its process group) and waits for
    /// it; the database stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_process_group(&mut child);
        }
    }

    /// Starts the server again on the same port with the same certificates and database.
    pub fn start_again(&mut self) -> Result<(), TestingError> {
        self.stop();
        self.child = Some(Self::launch(self.dir.path(), self.port)?);
        Ok(())
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`, as KMS errors name it.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.host(), self.port)
    }

    /// The directory with config, certificates, log and database.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.pki.ca_der()
    }

    /// The CA that signed the server and client certificates (e.g. to issue more clients).
    pub fn pki(&self) -> &TestPki {
        &self.pki
    }

    /// The client certificate the server accepts.
    pub fn client_cert(&self) -> &IssuedCert {
        &self.client
    }

    /// Creates an AES-256 KEK named `name` in this server and returns its KMIP unique
    /// identifier, for configurations that name an existing KEK. Uses the KMIP backend's own
    /// Create (wrapping a throwaway secret with the new key in a temporary folder).
    pub async fn create_kek(&self, name: &str) -> Result<String, TestingError> {
        #[derive(serde::Deserialize)]
        struct WrappedKekId {
            kek_id: String,
        }
        let dir = tempfile::tempdir().map_err(io_error("temporary folder for a KEK"))?;
        let kek = KekSource::Create { name: name.into() };
        let backend = KmipBackend::new(
            self.kmip_settings(kek, RetryPolicy::default()),
            dir.path(),
            "kek-maker",
        )?;
        let throwaway = MasterSecret::new(
            SecretBytes::new(vec![0x5a; 32]),
            SecretBytes::new(vec![0xa5; 32]),
        )?;
        backend.store(&throwaway).await?;
        let bytes = fs::read(backend.path()).map_err(io_error("reading the wrapped throwaway"))?;
        let wrapped: WrappedKekId =
            serde_json::from_slice(&bytes).map_err(|e| TestingError::Io {
                what: "parsing the wrapped throwaway".into(),
                source: io::Error::other(e),
            })?;
        Ok(wrapped.kek_id)
    }

    /// Settings for a [`crate::kmip::KmipBackend`] talking to this server.
    pub fn kmip_settings(&self, kek: KekSource, retry: RetryPolicy) -> KmipSettings {
        KmipSettings {
            host: self.host().to_string(),
            port: self.port,
            ca_certificates: vec![self.pki.ca_der()],
            client_cert_chain: self.client.chain(),
            client_key: self.client.key(),
            kek,
            retry,
            io_timeout: Duration::from_secs(5),
        }
    }
}

impl Drop for PyKmipServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGKILL to the process group led by `child` (started with `process_group(0)`), then reap it.
fn kill_process_group(child: &mut Child) {
    match i32::try_from(child.id()) {
        Ok(pid) => {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        Err(_) => {
            let _ = child.kill();
        }
    }
    let _ = child.wait();
}

/// A currently free loopback port (bind to port 0, read it, release it).
pub fn free_port() -> Result<u16, TestingError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(io_error("binding 127.0.0.1:0 to find a free port"))?;
    listener
        .local_addr()
        .map(|addr| addr.port())
        .map_err(io_error("reading the bound port"))
}

/// A KMS v2 client on the plugin's unix socket, as kube-apiserver connects (the URI is ignored).
pub async fn kms_client(
    socket: &Path,
) -> Result<
    constellation_proto::kmsv2::key_management_service_client::KeyManagementServiceClient<
        tonic::transport::Channel,
    >,
    tonic::transport::Error,
> {
    let path = socket.to_owned();
    let channel = tonic::transport::Endpoint::from_static("http://kms.invalid")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await?;
    Ok(
        constellation_proto::kmsv2::key_management_service_client::KeyManagementServiceClient::new(
            channel,
        ),
    )
}

/// What kube-apiserver does with the plugin: Status (must be v2 and healthy), Encrypt `dek`
/// with a request uid, Decrypt it with the key ID and annotations it got back. Panics (a test
/// helper) on any difference; returns the key ID.
pub async fn kms_round_trip(socket: &Path, dek: &[u8]) -> String {
    use constellation_proto::kmsv2::{DecryptRequest, EncryptRequest, StatusRequest};
    let mut kms = kms_client(socket).await.expect("connect to the KMS plugin");
    let status = kms.status(StatusRequest {}).await.unwrap().into_inner();
    assert_eq!(
        (status.version.as_str(), status.healthz.as_str()),
        ("v2", "ok")
    );
    let enc = kms
        .encrypt(EncryptRequest {
            plaintext: dek.to_vec(),
            uid: "uid-1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(enc.key_id, status.key_id);
    let dec = kms
        .decrypt(DecryptRequest {
            ciphertext: enc.ciphertext,
            uid: "uid-2".into(),
            key_id: enc.key_id.clone(),
            annotations: enc.annotations,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(dec.plaintext, dek);
    enc.key_id
}
