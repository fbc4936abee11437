//! The TPM multiplexer against a real swtpm: clients share the node's TPM (the same key, the
//! same PCRs), and the transient object a client process loaded is flushed once that process
//! is killed, so swtpm's three object slots do not run out however often daemons die.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use constellation_attestation::tpm::{AkKind, Swtpm, Tpm};
use constellation_bootstrapper::tpm_mux::TpmMux;

/// A client process that loads a primary key through the multiplexer (TPM2_CreatePrimary,
/// ECC P-256 under the owner hierarchy), prints its handle and waits to be killed.
fn start_loading_client(socket: &Path) -> std::process::Child {
    let script = r#"
import socket, struct, sys, time
auth = struct.pack(">IHBH", 0x40000009, 0, 0, 0)
sensitive = struct.pack(">HHH", 4, 0, 0)
public = struct.pack(">HHIH", 0x23, 0xB, 0x00050072, 0) + struct.pack(">HHHHHHH", 0x10, 0x18, 0xB, 3, 0x10, 0, 0)
params = sensitive + struct.pack(">H", len(public)) + public + struct.pack(">H", 0) + struct.pack(">I", 0)
body = struct.pack(">I", 0x40000001) + struct.pack(">I", len(auth)) + auth + params
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(struct.pack(">HII", 0x8002, 10 + len(body), 0x131) + body)
r = s.recv(4096)
print(r[6:10].hex(), r[10:14].hex(), flush=True)
time.sleep(600)
"#;
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(socket)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_one_swtpm_and_a_killed_clients_key_is_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let swtpm = Swtpm::start(&dir.path().join("tpm")).unwrap();
    let socket = dir.path().join("tpm-mux.sock");
    let mux = TpmMux::start(&swtpm.tcti(), &socket).unwrap();
    let mut first = Tpm::open(&mux.tcti()).unwrap();
    let ak = first.attestation_key(AkKind::EcdsaP256).unwrap();
    first.pcr_extend(15, &[7u8; 32]).unwrap();
    // swtpm has three transient object slots; each round a client loads a key and is killed.
    for round in 0..5u8 {
        let mut child = start_loading_client(&socket);
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.starts_with("00000000 80"), "round {round}: {line}");
        child.kill().unwrap();
        child.wait().unwrap();
        // Another client gets a slot once the killed one's key is flushed.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut second = Tpm::open(&mux.tcti()).unwrap();
        loop {
            match second.attestation_key(AkKind::EcdsaP256) {
                Ok(key) => {
                    // The same TPM: the same deterministic key, the PCR the first client extended.
                    assert_eq!(key, ak);
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "round {round}: {e}"),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let quote = second.quote(&[round; 32], &[15]).unwrap();
        assert_ne!(quote.pcrs[&15], [0u8; 32], "round {round}");
        drop(second);
        first.quote(&[round; 32], &[0, 15]).unwrap();
    }
}
