//! Bootstrap tokens: format, randomness, expiry on an injected clock.

use std::collections::HashSet;
use std::time::Duration;

use constellation_attestation::FixedClock;
use constellation_joinservice::token::{
    is_valid_token_format, BootstrapToken, TokenError, TokenRegistry,
};

const T0: u64 = 1_750_000_000;
const TTL: Duration = Duration::from_secs(3600);

/// `[a-z0-9]{6}\.[a-z0-9]{16}` checked character by character, independent of the crate's check.
fn matches_token_pattern(s: &str) -> bool {
    let b = s.as_bytes();
    let class = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    b.len() == 23 && b[6] == b'.' && b[..6].iter().all(class) && b[7..].iter().all(class)
}

#[test]
fn generated_tokens_have_the_kubernetes_form_and_differ() {
    let clock = FixedClock::at_unix(T0);
    let mut seen = HashSet::new();
    let mut symbols = HashSet::new();
    for _ in 0..1000 {
        let t = BootstrapToken::generate(TTL, &clock);
        let s = t.expose();
        assert!(matches_token_pattern(&s), "{s}");
        assert!(is_valid_token_format(&s));
        assert_eq!(s, format!("{}.{}", t.id(), t.expose_secret()));
        symbols.extend(s.bytes().filter(|b| *b != b'.'));
        assert!(seen.insert(s), "duplicate token");
    }
    // 22000 uniform draws over 36 symbols: every symbol shows up.
    assert_eq!(symbols.len(), 36);
}

#[test]
fn expiry_is_ttl_after_the_injected_now() {
    let t = BootstrapToken::generate(TTL, &FixedClock::at_unix(T0));
    assert_eq!(t.expires_at_unix(), (T0 + 3600) as i64);
    assert!(!t.is_expired(&FixedClock::at_unix(T0 + 3599)));
    assert!(t.is_expired(&FixedClock::at_unix(T0 + 3600)));
}

#[test]
fn registry_accepts_until_expiry_then_refuses_and_purges() {
    let registry = TokenRegistry::new();
    let token = registry
        .issue("worker-0", TTL, &FixedClock::at_unix(T0))
        .unwrap();
    let s = token.expose();
    registry.validate(&s, &FixedClock::at_unix(T0)).unwrap();
    registry
        .validate(&s, &FixedClock::at_unix(T0 + 3599))
        .unwrap();
    assert_eq!(
        registry
            .validate(&s, &FixedClock::at_unix(T0 + 3600))
            .unwrap_err(),
        TokenError::Expired {
            id: token.id().into(),
            expired_at_unix: (T0 + 3600) as i64,
            now_unix: (T0 + 3600) as i64,
        }
    );

    let later = registry
        .issue("worker-1", TTL, &FixedClock::at_unix(T0 + 1800))
        .unwrap();
    assert_eq!(registry.len(), 2);
    assert_eq!(registry.purge_expired(&FixedClock::at_unix(T0 + 3600)), 1);
    assert_eq!(
        registry
            .validate(&s, &FixedClock::at_unix(T0 + 3600))
            .unwrap_err(),
        TokenError::Unknown {
            id: token.id().into()
        }
    );
    registry
        .validate(&later.expose(), &FixedClock::at_unix(T0 + 3600))
        .unwrap();
}

#[test]
fn registry_refuses_wrong_secret_unknown_id_and_malformed() {
    let registry = TokenRegistry::new();
    let clock = FixedClock::at_unix(T0);
    let token = registry.issue("worker-0", TTL, &clock).unwrap();
    let mut wrong = token.expose_secret().to_owned();
    let flipped = if wrong.ends_with('a') { "b" } else { "a" };
    wrong.replace_range(15.., flipped);
    assert_eq!(
        registry
            .validate(&format!("{}.{wrong}", token.id()), &clock)
            .unwrap_err(),
        TokenError::WrongSecret {
            id: token.id().into()
        }
    );
    let unknown_id = if token.id() == "zzzzzz" {
        "yyyyyy"
    } else {
        "zzzzzz"
    };
    assert_eq!(
        registry
            .validate(&format!("{unknown_id}.{}", token.expose_secret()), &clock)
            .unwrap_err(),
        TokenError::Unknown {
            id: unknown_id.into()
        }
    );
    assert_eq!(
        registry
            .validate(&token.expose().to_uppercase(), &clock)
            .unwrap_err(),
        TokenError::Malformed
    );
}

#[test]
fn expired_tokens_are_purged_when_a_token_is_issued() {
    let registry = TokenRegistry::new();
    for i in 0..100 {
        registry
            .issue(&format!("node-{i}"), TTL, &FixedClock::at_unix(T0 + i))
            .unwrap();
    }
    assert_eq!(registry.len(), 100);
    // At T0 + TTL + 49 the tokens issued at T0..=T0+49 have expired; the next issue drops them.
    let fresh = registry
        .issue("late-node", TTL, &FixedClock::at_unix(T0 + 3600 + 49))
        .unwrap();
    assert_eq!(registry.len(), 51);
    registry
        .validate(&fresh.expose(), &FixedClock::at_unix(T0 + 3600 + 49))
        .unwrap();
    // Periodic purging needs no issue.
    assert_eq!(
        registry.purge_expired(&FixedClock::at_unix(T0 + 3600 + 99)),
        50
    );
    assert_eq!(registry.len(), 1);
}

#[test]
fn a_rejoining_node_replaces_its_token_instead_of_adding_one() {
    let registry = TokenRegistry::new();
    let clock = FixedClock::at_unix(T0);
    let first = registry.issue("worker-0", TTL, &clock).unwrap();
    for _ in 0..1000 {
        registry.issue("worker-0", TTL, &clock).unwrap();
    }
    let last = registry.issue("worker-0", TTL, &clock).unwrap();
    assert_eq!(registry.len(), 1);
    assert_eq!(
        registry.validate(&first.expose(), &clock).unwrap_err(),
        TokenError::Unknown {
            id: first.id().into()
        }
    );
    registry.validate(&last.expose(), &clock).unwrap();
}

#[test]
fn a_join_flood_cannot_grow_the_token_registry_past_its_capacity() {
    let registry = TokenRegistry::with_capacity(3);
    let clock = FixedClock::at_unix(T0);
    for node in ["a", "b", "c"] {
        registry.issue(node, TTL, &clock).unwrap();
    }
    assert_eq!(
        registry.issue("d", TTL, &clock).unwrap_err(),
        TokenError::RegistryFull { capacity: 3 }
    );
    assert_eq!(registry.len(), 3);
    // A node already holding a token can still rejoin (its old token makes room).
    registry.issue("a", TTL, &clock).unwrap();
    // Once the tokens expire, they make room too.
    registry
        .issue("d", TTL, &FixedClock::at_unix(T0 + 3600))
        .unwrap();
    assert_eq!(registry.len(), 1);
}
