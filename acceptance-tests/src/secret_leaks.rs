//! Looking for a secret where it must not be: every form it could take in a file, in every
//! file of a folder tree.

use std::path::{Path, PathBuf};

/// A fresh random 32-byte secret, so no other value in any file can equal it by accident.
pub fn random_secret() -> [u8; 32] {
    use std::io::Read as _;
    let mut secret = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut secret))
        .expect("random bytes");
    secret
}

/// Lower-case hex of `bytes`.
pub fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Which form of `secret` `bytes` contain, if any: raw bytes, lower- or upper-case hex.
pub fn leaks(bytes: &[u8], secret: &[u8]) -> Option<&'static str> {
    let lower = hex_lower(secret);
    let upper = lower.to_uppercase();
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    if contains(secret) {
        Some("raw bytes")
    } else if contains(lower.as_bytes()) {
        Some("hex")
    } else if contains(upper.as_bytes()) {
        Some("upper-case hex")
    } else {
        None
    }
}

/// Every regular file under `dir`, recursively (symbolic links and sockets are not followed
/// or read).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out
}
