//! Injected time: everything that checks an expiry takes a [`Clock`], so tests on old real
//! evidence can pin the time at which certificates were valid.

use std::time::{Duration, SystemTime};

/// A source of "now".
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock stopped at one instant.
#[derive(Debug, Clone, Copy)]
pub struct FixedClock(pub SystemTime);

impl FixedClock {
    /// A clock stopped at `secs` seconds after the Unix epoch.
    pub fn at_unix(secs: u64) -> Self {
        Self(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    }

    /// A clock stopped at an RFC 3339 instant such as `2025-01-01T00:00:00Z`.
    pub fn at_rfc3339(s: &str) -> Result<Self, time::error::Parse> {
        let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)?;
        Ok(Self(t.into()))
    }
}

impl Clock for FixedClock {
    fn now(&self) -> SystemTime {
        self.0
    }
}
