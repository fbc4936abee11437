//! Secret bytes: zeroized on drop, never printed by `Debug`.

use std::fmt;

use zeroize::Zeroizing;

/// Secret material (keys, master secrets). `Debug` prints only the length; `==` takes time
/// that depends on the lengths only, never on where the contents differ.
#[derive(Clone)]
pub struct SecretBytes(Zeroizing<Vec<u8>>);

impl PartialEq for SecretBytes {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        self.0.as_slice().ct_eq(other.0.as_slice()).into()
    }
}

impl Eq for SecretBytes {}

impl SecretBytes {
    pub fn new(bytes: Vec<u8>) -> Self {
        Self(Zeroizing::new(bytes))
    }
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for SecretBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretBytes(<{} bytes redacted>)", self.0.len())
    }
}

impl From<Vec<u8>> for SecretBytes {
    fn from(v: Vec<u8>) -> Self {
        Self::new(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let s = SecretBytes::new(b"hunter2hunter2".to_vec());
        let printed = format!("{s:?}");
        assert!(!printed.contains("hunter2"));
        assert!(printed.contains("14 bytes"));
    }

    #[test]
    fn equality_compares_every_byte_and_the_length() {
        let a = SecretBytes::new(vec![1, 2, 3, 4]);
        assert_eq!(a, SecretBytes::new(vec![1, 2, 3, 4]));
        assert_ne!(a, SecretBytes::new(vec![1, 2, 3, 5]));
        assert_ne!(a, SecretBytes::new(vec![0, 2, 3, 4]));
        assert_ne!(a, SecretBytes::new(vec![1, 2, 3]));
        assert_ne!(a, SecretBytes::new(vec![1, 2, 3, 4, 0]));
        assert_eq!(SecretBytes::new(vec![]), SecretBytes::new(vec![]));
    }
}
