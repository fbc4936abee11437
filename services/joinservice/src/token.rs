//! Kubernetes bootstrap tokens (`[a-z0-9]{6}.[a-z0-9]{16}`): the token ID is public, the secret
//! part authenticates a kubelet's TLS bootstrap. Tokens come from the OS CSPRNG and expire after a
//! TTL measured on an injected clock.
//!
//! The [`TokenRegistry`] is bounded: a node holds at most one live token (a new ticket replaces
//! its earlier token), expired tokens are purged whenever a token is issued, and past
//! [`DEFAULT_TOKEN_CAPACITY`] live tokens it refuses to issue rather than grow.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use constellation_attestation::Clock;
use rand::distributions::{Distribution, Uniform};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Length of the public token ID.
pub const TOKEN_ID_LEN: usize = 6;
/// Length of the token secret.
pub const TOKEN_SECRET_LEN: usize = 16;
/// Default lifetime, as kubeadm's default token TTL.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Live tokens a registry holds at most (one per node, so this is a cluster-size bound).
pub const DEFAULT_TOKEN_CAPACITY: usize = 10_000;

const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is not of the form [a-z0-9]{{6}}.[a-z0-9]{{16}}")]
    Malformed,
    #[error("token {id} is unknown")]
    Unknown { id: String },
    #[error("token {id} expired at unix {expired_at_unix}, now is unix {now_unix}")]
    Expired {
        id: String,
        expired_at_unix: i64,
        now_unix: i64,
    },
    #[error("token {id}: secret does not match")]
    WrongSecret { id: String },
    #[error("token registry holds {capacity} unexpired tokens, its limit; refusing to issue more")]
    RegistryFull { capacity: usize },
}

/// One bootstrap token. `Debug` shows the ID and expiry, never the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken {
    id: String,
    secret: zeroize::Zeroizing<String>,
    expires_at: SystemTime,
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .field("secret", &"<redacted>")
            .field("expires_at_unix", &unix_seconds(self.expires_at))
            .finish()
    }
}

impl BootstrapToken {
    /// A fresh random token that expires `ttl` after `clock`'s now.
    pub fn generate(ttl: Duration, clock: &dyn Clock) -> Self {
        let now = clock.now();
        Self {
            id: random_string(TOKEN_ID_LEN),
            secret: zeroize::Zeroizing::new(random_string(TOKEN_SECRET_LEN)),
            expires_at: now.checked_add(ttl).unwrap_or(now),
        }
    }

    /// A token received from the join service: `<id>.<secret>` expiring at `expires_at_unix`.
    pub fn from_parts(token: &str, expires_at_unix: i64) -> Result<Self, TokenError> {
        let (id, secret) = split_token(token).ok_or(TokenError::Malformed)?;
        let offset = Duration::from_secs(expires_at_unix.unsigned_abs());
        let expires_at = if expires_at_unix >= 0 {
            SystemTime::UNIX_EPOCH.checked_add(offset)
        } else {
            SystemTime::UNIX_EPOCH.checked_sub(offset)
        }
        .unwrap_or(SystemTime::UNIX_EPOCH);
        Ok(Self {
            id: id.to_owned(),
            secret: zeroize::Zeroizing::new(secret.to_owned()),
            expires_at,
        })
    }

    /// The public token ID (the Secret `bootstrap-token-<id>` in kube-system).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The secret half.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// The whole token, `<id>.<secret>`, as kubeadm and the kubelet take it.
    pub fn expose(&self) -> String {
        format!("{}.{}", self.id, self.secret.as_str())
    }

    pub fn expires_at(&self) -> SystemTime {
        self.expires_at
    }

    /// Expiry in seconds since the Unix epoch (negative before 1970).
    pub fn expires_at_unix(&self) -> i64 {
        unix_seconds(self.expires_at)
    }

    pub fn is_expired(&self, clock: &dyn Clock) -> bool {
        clock.now() >= self.expires_at
    }
}

/// True when `token` has the bootstrap-token form `[a-z0-9]{6}.[a-z0-9]{16}`.
pub fn is_valid_token_format(token: &str) -> bool {
    split_token(token).is_some()
}

fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |part: &str, len| {
        part.len() == len
            && part
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, TOKEN_ID_LEN) && ok(secret, TOKEN_SECRET_LEN)).then_some((id, secret))
}

struct Registered {
    secret_sha256: [u8; 32],
    expires_at: SystemTime,
    node: String,
}

#[derive(Default)]
struct Tokens {
    by_id: HashMap<String, Registered>,
    /// The live token ID of each node.
    by_node: HashMap<String, String>,
    /// (expiry, token ID), oldest first: purging pops from the front.
    by_expiry: BTreeSet<(SystemTime, String)>,
}

impl Tokens {
    fn remove(&mut self, id: &str) {
        if let Some(t) = self.by_id.remove(id) {
            self.by_expiry.remove(&(t.expires_at, id.to_owned()));
            if self.by_node.get(&t.node).is_some_and(|live| live == id) {
                self.by_node.remove(&t.node);
            }
        }
    }

    fn purge_expired(&mut self, now: SystemTime) -> usize {
        let mut purged = 0;
        while let Some((expires_at, id)) = self.by_expiry.first().cloned() {
            if now < expires_at {
                break;
            }
            self.remove(&id);
            purged += 1;
        }
        purged
    }
}

/// The tokens this join service handed out, with their expiry and node. Only digests of the
/// secrets are kept. Bounded (see the module documentation).
pub struct TokenRegistry {
    tokens: Mutex<Tokens>,
    capacity: usize,
}

impl Default for TokenRegistry {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_TOKEN_CAPACITY)
    }
}

impl fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("tokens", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl TokenRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry that holds at most `capacity` unexpired tokens.
    pub fn with_capacity(capacity: usize) -> Self {
        Self {
            tokens: Mutex::default(),
            capacity,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Tokens> {
        // The maps stay consistent even if a holder panicked: no update can panic halfway.
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Generates and registers a token for `node`, valid for `ttl` from `clock`'s now. Purges
    /// expired tokens and `node`'s earlier token first; refuses when the registry is full.
    pub fn issue(
        &self,
        node: &str,
        ttl: Duration,
        clock: &dyn Clock,
    ) -> Result<BootstrapToken, TokenError> {
        let mut tokens = self.lock();
        let purged = tokens.purge_expired(clock.now());
        if purged > 0 {
            tracing::debug!(purged, "expired bootstrap tokens purged");
        }
        if let Some(earlier) = tokens.by_node.get(node).cloned() {
            tokens.remove(&earlier);
        }
        if tokens.by_id.len() >= self.capacity {
            return Err(TokenError::RegistryFull {
                capacity: self.capacity,
            });
        }
        loop {
            let token = BootstrapToken::generate(ttl, clock);
            // IDs are public and must be unique; a collision (1 in 36^6) just draws again.
            if tokens.by_id.contains_key(&token.id) {
                continue;
            }
            tokens.by_id.insert(
                token.id.clone(),
                Registered {
                    secret_sha256: Sha256::digest(token.secret.as_bytes()).into(),
                    expires_at: token.expires_at,
                    node: node.to_owned(),
                },
            );
            tokens
                .by_expiry
                .insert((token.expires_at, token.id.clone()));
            tokens.by_node.insert(node.to_owned(), token.id.clone());
            tracing::debug!(token_id = %token.id, node, expires_at_unix = token.expires_at_unix(),
                "bootstrap token issued");
            return Ok(token);
        }
    }

    /// Accepts `token` if it is well-formed, registered, unexpired at `clock`'s now and its
    /// secret matches.
    pub fn validate(&self, token: &str, clock: &dyn Clock) -> Result<(), TokenError> {
        let (id, secret) = split_token(token).ok_or(TokenError::Malformed)?;
        let tokens = self.lock();
        let entry = tokens
            .by_id
            .get(id)
            .ok_or_else(|| TokenError::Unknown { id: id.into() })?;
        let now = clock.now();
        if now >= entry.expires_at {
            return Err(TokenError::Expired {
                id: id.into(),
                expired_at_unix: unix_seconds(entry.expires_at),
                now_unix: unix_seconds(now),
            });
        }
        let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
        if !bool::from(digest.ct_eq(&entry.secret_sha256)) {
            return Err(TokenError::WrongSecret { id: id.into() });
        }
        Ok(())
    }

    /// Drops every token expired at `clock`'s now; returns how many went. [`Self::issue`] does
    /// this too; call it periodically to free memory between joins.
    pub fn purge_expired(&self, clock: &dyn Clock) -> usize {
        self.lock().purge_expired(clock.now())
    }

    /// Number of registered tokens (expired ones included until purged).
    pub fn len(&self) -> usize {
        self.lock().by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most tokens this registry holds.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

fn random_string(len: usize) -> String {
    // Uniform sampling: no modulo bias over the 36 symbols.
    let pick = Uniform::from(0..ALPHABET.len());
    let mut rng = rand::rngs::OsRng;
    (0..len)
        .map(|_| char::from(ALPHABET.get(pick.sample(&mut rng)).copied().unwrap_or(b'a')))
        .collect()
}

/// Seconds since the Unix epoch, negative before it.
pub(crate) fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_attestation::FixedClock;

    #[test]
    fn debug_hides_the_secret() {
        let t = BootstrapToken::generate(DEFAULT_TOKEN_TTL, &FixedClock::at_unix(0));
        let printed = format!("{t:?}");
        assert!(printed.contains(t.id()));
        assert!(!printed.contains(t.expose_secret()));
    }

    #[test]
    fn format_check_rejects_near_misses() {
        assert!(is_valid_token_format("abcdef.0123456789abcdef"));
        for bad in [
            "abcde.0123456789abcdef",
            "abcdefg.0123456789abcdef",
            "abcdef.0123456789abcde",
            "Abcdef.0123456789abcdef",
            "abcdef-0123456789abcdef",
            "abcdef.0123456789abcdeF",
            "abcdef.0123456789abcd.f",
            "",
        ] {
            assert!(!is_valid_token_format(bad), "{bad}");
        }
    }

    #[test]
    fn unix_seconds_handles_pre_epoch() {
        assert_eq!(
            unix_seconds(SystemTime::UNIX_EPOCH - Duration::from_secs(5)),
            -5
        );
    }
}
