//! Kubernetes bootstrap tokens (`[a-z0-9]{6}.[a-z0-9]{16}`): the token ID is public, the secret
//! part authenticates a kubelet's TLS bootstrap. Tokens come from the OS CSPRNG and expire after a
//! TTL measured on an injected clock.

use std::collections::HashMap;
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
}

/// The tokens this join service handed out, with their expiry. Only digests of the secrets are
/// kept.
#[derive(Default)]
pub struct TokenRegistry {
    tokens: Mutex<HashMap<String, Registered>>,
}

impl fmt::Debug for TokenRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenRegistry")
            .field("tokens", &self.lock().len())
            .finish()
    }
}

impl TokenRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Registered>> {
        // The map stays consistent even if a holder panicked: every update is one insert/remove.
        self.tokens
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Generates and registers a token valid for `ttl` from `clock`'s now.
    pub fn issue(&self, ttl: Duration, clock: &dyn Clock) -> BootstrapToken {
        let mut tokens = self.lock();
        loop {
            let token = BootstrapToken::generate(ttl, clock);
            // IDs are public and must be unique; a collision (1 in 36^6) just draws again.
            if tokens.contains_key(&token.id) {
                continue;
            }
            tokens.insert(
                token.id.clone(),
                Registered {
                    secret_sha256: Sha256::digest(token.secret.as_bytes()).into(),
                    expires_at: token.expires_at,
                },
            );
            tracing::debug!(token_id = %token.id, expires_at_unix = token.expires_at_unix(),
                "bootstrap token issued");
            return token;
        }
    }

    /// Accepts `token` if it is well-formed, registered, unexpired at `clock`'s now and its
    /// secret matches.
    pub fn validate(&self, token: &str, clock: &dyn Clock) -> Result<(), TokenError> {
        let (id, secret) = split_token(token).ok_or(TokenError::Malformed)?;
        let tokens = self.lock();
        let entry = tokens
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

    /// Drops every token expired at `clock`'s now; returns how many went.
    pub fn purge_expired(&self, clock: &dyn Clock) -> usize {
        let now = clock.now();
        let mut tokens = self.lock();
        let before = tokens.len();
        tokens.retain(|_, t| now < t.expires_at);
        before - tokens.len()
    }

    /// Number of registered tokens (expired ones included until purged).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
