//! Attacks on a node's TPM by another local user: a TPM that anyone on the machine can talk to
//! quotes for anyone (impersonating the node) and lets them extend its PCRs or reset it
//! through the control channel. swtpm therefore listens only on unix sockets in a 0700
//! directory, and on no TCP port.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

use constellation_attestation::tpm::{AkKind, Swtpm, Tpm};

/// The unprivileged "nobody" user and group.
const OTHER_USER: &str = "65534";

/// Connects to a unix socket as [`OTHER_USER`]; returns the errno name of a failed connect
/// ("OK" when it connected).
fn connect_as_other_user(socket: &Path) -> String {
    const CONNECT: &str = "import errno, socket, sys\n\
        s = socket.socket(socket.AF_UNIX)\n\
        try:\n    s.connect(sys.argv[1]); print('OK')\n\
        except OSError as e:\n    print(errno.errorcode.get(e.errno, e.errno))\n";
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={OTHER_USER}"),
            &format!("--regid={OTHER_USER}"),
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            CONNECT,
        ])
        .arg(socket)
        .output()
        .expect("setpriv (util-linux) and python3 must be installed");
    assert!(
        out.status.success(),
        "running as uid {OTHER_USER} failed (these tests must run as root to act as another \
         user): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Socket inodes the process `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|target| {
            let t = target.to_string_lossy().into_owned();
            Some(t.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect()
}

/// Inodes of listening TCP sockets (state 0A) in this network namespace, IPv4 and IPv6.
fn tcp_listener_inodes() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                if let Some(inode) = fields.get(9) {
                    out.insert((*inode).to_owned());
                }
            }
        }
    }
    out
}

/// A state directory another user could otherwise reach: its parent and itself start out
/// world-searchable, as a user's cluster folder may be.
fn reachable_state_dir() -> (tempfile::TempDir, std::path::PathBuf) {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = root.path().join("tpm");
    std::fs::create_dir(&state).unwrap();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
    (root, state)
}

#[test]
fn other_local_user_cannot_connect_to_a_nodes_tpm() {
    let (_root, state) = reachable_state_dir();
    let swtpm = Swtpm::start(&state).unwrap();

    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700, "the TPM's directory is private");
    for socket in [swtpm.socket().to_owned(), swtpm.ctrl_socket()] {
        assert!(socket.starts_with(&state), "{}", socket.display());
        assert_eq!(
            connect_as_other_user(&socket),
            "EACCES",
            "uid {OTHER_USER} must be refused at {}",
            socket.display()
        );
    }

    // The owner still gets both channels.
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    tpm.attestation_key(AkKind::EcdsaP256).unwrap();
    drop(tpm);
    let ioctl = Command::new("swtpm_ioctl")
        .arg("--unix")
        .arg(swtpm.ctrl_socket())
        .arg("-g")
        .output()
        .expect("swtpm_ioctl (swtpm-tools) must be installed");
    assert!(
        ioctl.status.success(),
        "owner's control channel: {}",
        String::from_utf8_lossy(&ioctl.stderr)
    );
}

#[test]
fn tpm_listens_on_no_tcp_port() {
    let (_dir, swtpm) = {
        let dir = tempfile::tempdir().unwrap();
        let swtpm = Swtpm::start(dir.path()).unwrap();
        (dir, swtpm)
    };
    let held = socket_inodes(swtpm.pid());
    assert!(held.len() >= 2, "swtpm holds its two listening sockets");
    let tcp: BTreeSet<String> = tcp_listener_inodes().intersection(&held).cloned().collect();
    assert!(
        tcp.is_empty(),
        "swtpm listens on TCP (socket inodes {tcp:?})"
    );
    assert!(swtpm.tcti().starts_with("swtpm:path="), "{}", swtpm.tcti());
}

#[test]
fn detached_tpm_is_private_too_and_its_state_files_are_0600() {
    let (_root, state) = reachable_state_dir();
    let handle = Swtpm::spawn_detached(&state).unwrap();
    struct StopOnDrop(constellation_attestation::tpm::SwtpmHandle);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = self.0.stop();
        }
    }
    let guard = StopOnDrop(handle.clone());
    // Make the TPM write its state (seeds, persistent data).
    Tpm::open(&handle.tcti())
        .unwrap()
        .attestation_key(AkKind::EcdsaP256)
        .unwrap();
    assert_eq!(connect_as_other_user(&handle.socket), "EACCES");
    assert_eq!(connect_as_other_user(&handle.ctrl_socket()), "EACCES");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    let permall = state.join("tpm2-00.permall");
    assert!(permall.exists(), "TPM state written");
    assert_eq!(mode(&permall), 0o600, "TPM state (its seeds) is owner-only");
    drop(guard);
    assert!(!handle.socket.exists(), "sockets removed on stop");
}

#[test]
fn over_long_state_dir_gets_private_short_sockets() {
    // sun_path holds 107 bytes: a deep cluster folder must not make the TPM fall back to TCP.
    let root = tempfile::tempdir().unwrap();
    let deep = root.path().join("d".repeat(100)).join("tpm");
    let swtpm = Swtpm::start(&deep).unwrap();
    let socket = swtpm.socket().to_owned();
    let dir = socket.parent().unwrap().to_owned();
    assert!(!socket.starts_with(&deep));
    assert_eq!(
        std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
        0o700
    );
    assert_eq!(connect_as_other_user(&socket), "EACCES");
    Tpm::open(&swtpm.tcti())
        .unwrap()
        .attestation_key(AkKind::EcdsaP256)
        .unwrap();
    drop(swtpm);
    assert!(
        !dir.exists(),
        "the short socket directory is removed with the TPM"
    );
}
