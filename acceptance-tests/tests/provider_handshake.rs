//! The go-plugin handshake of the built provider, without Terraform: magic-cookie check and
//! the handshake line (plus its latency).

use std::io::BufRead as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use acceptance_tests::provider_binary;

const COOKIE: &str = "d602bf8f470bc67ca7faa0386276bbdd4330efaf76d1a219cb4d6991ca9872b2";

#[test]
fn refuses_to_run_without_the_magic_cookie() {
    let bin = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let out = Command::new(bin)
        .env_remove("TF_PLUGIN_MAGIC_COOKIE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("This binary is a plugin. These are not meant to be executed directly."),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn prints_the_handshake_line_quickly() {
    let bin = provider_binary().unwrap_or_else(|e| panic!("{e}"));
    let sockets = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env("PLUGIN_UNIX_SOCKET_DIR", sockets.path())
        .env("TF_PLUGIN_MAGIC_COOKIE", COOKIE)
        .env("PLUGIN_PROTOCOL_VERSIONS", "5,6")
        .env(
            "PLUGIN_CLIENT_CERT",
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let read = child
        .stdout
        .take()
        .map(|s| std::io::BufReader::new(s).read_line(&mut line));
    let elapsed = start.elapsed();
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(matches!(read, Some(Ok(n)) if n > 0), "no handshake line");
    let fields: Vec<&str> = line.trim_end().split('|').collect();
    assert_eq!(fields.len(), 6, "{line}");
    assert_eq!(&fields[..3], ["1", "6", "unix"]);
    // The socket, in a folder of its own inside PLUGIN_UNIX_SOCKET_DIR.
    let socket = std::path::Path::new(fields[3]);
    assert_eq!(
        socket.parent().and_then(|p| p.parent()),
        Some(sockets.path()),
        "{line}"
    );
    assert_eq!(fields[4], "grpc");
    // Server certificate: standard base64 without padding, long enough for go-plugin to use.
    let cert = fields[5];
    assert!(cert.len() > 50, "{line}");
    assert!(
        cert.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/'),
        "{line}"
    );
    eprintln!("provider start + handshake line: {elapsed:?}");
    assert!(elapsed.as_secs() < 5, "handshake took {elapsed:?}");
}
