//! SEV-SNP collateral cache for the cloud variants: the VCEK for a (chip ID, reported TCB) and
//! the AMD chain above it, fetched from AMD's key distribution service or the cloud's cache.
//!
//! - Entries are fresh for a TTL measured on an injected clock.
//! - Concurrent misses for one key share ONE fetch (a per-key `tokio::sync::OnceCell`).
//! - When a refresh fails, the last good entry is served as stale: a VCEK for a given chip and TCB
//!   never changes, so an old copy is still correct, and a KDS outage must not stop joins.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use constellation_attestation::Clock;
use tokio::sync::OnceCell;

/// Default freshness of a cache entry.
pub const DEFAULT_COLLATERAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// The certificates needed to check one SNP report: VCEK, then ASK and ARK (all DER).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Collateral {
    pub vcek_der: Vec<u8>,
    pub ask_der: Vec<u8>,
    pub ark_der: Vec<u8>,
}

/// A fetcher's failure, shared by every caller that waited on the same fetch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct FetchError {
    pub reason: String,
}

/// Where collateral comes from (AMD KDS, a cloud's certificate cache, ...).
#[tonic::async_trait]
pub trait CollateralFetcher: Send + Sync {
    async fn fetch(&self, chip_id: &[u8; 64], tcb: u64) -> Result<Collateral, FetchError>;
}

/// No collateral: the fetch failed and nothing was cached for this chip and TCB.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no SNP collateral for chip {chip_id_prefix}… TCB {tcb:#018x}: fetch failed and nothing is cached: {source}")]
pub struct CollateralError {
    /// First 8 bytes of the chip ID, hex.
    pub chip_id_prefix: String,
    pub tcb: u64,
    #[source]
    pub source: FetchError,
}

/// Whether a returned entry is within its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// The refresh failed; this is the last good entry.
    Stale,
}

/// What [`CollateralCache::get`] returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedCollateral {
    pub collateral: Arc<Collateral>,
    pub freshness: Freshness,
}

type Key = ([u8; 64], u64);
type FetchOutcome = Result<(Arc<Collateral>, SystemTime), FetchError>;

#[derive(Default)]
struct Slot {
    last_good: Option<(Arc<Collateral>, SystemTime)>,
    in_flight: Option<Arc<OnceCell<FetchOutcome>>>,
}

/// The cache. Cheap to share behind an `Arc`.
pub struct CollateralCache {
    fetcher: Arc<dyn CollateralFetcher>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
}

impl std::fmt::Debug for CollateralCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollateralCache")
            .field("ttl", &self.ttl)
            .field("entries", &self.lock().len())
            .finish_non_exhaustive()
    }
}

impl CollateralCache {
    pub fn new(fetcher: Arc<dyn CollateralFetcher>, clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        Self {
            fetcher,
            clock,
            ttl,
            slots: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        // Each update is a single field assignment, so a poisoned map is still consistent.
        self.slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_fresh(&self, fetched_at: SystemTime, now: SystemTime) -> bool {
        fetched_at
            .checked_add(self.ttl)
            .is_some_and(|end| now < end)
    }

    /// The collateral for `chip_id` at `tcb`: cached if fresh, else fetched (one fetch for all
    /// concurrent callers), else the stale last good entry, else an error.
    pub async fn get(
        &self,
        chip_id: &[u8; 64],
        tcb: u64,
    ) -> Result<CachedCollateral, CollateralError> {
        let key: Key = (*chip_id, tcb);
        let cell = {
            let mut slots = self.lock();
            let slot = slots.entry(key).or_default();
            if let Some((collateral, fetched_at)) = &slot.last_good {
                if self.is_fresh(*fetched_at, self.clock.now()) {
                    return Ok(CachedCollateral {
                        collateral: Arc::clone(collateral),
                        freshness: Freshness::Fresh,
                    });
                }
            }
            match &slot.in_flight {
                // A finished cell left behind (its callers were cancelled) is not reused.
                Some(cell) if !cell.initialized() => Arc::clone(cell),
                _ => {
                    let cell = Arc::new(OnceCell::new());
                    slot.in_flight = Some(Arc::clone(&cell));
                    cell
                }
            }
        };

        let outcome = cell
            .get_or_init(|| async {
                tracing::debug!(chip = %hex::encode(&chip_id[..8]), tcb, "fetching SNP collateral");
                self.fetcher
                    .fetch(chip_id, tcb)
                    .await
                    .map(|c| (Arc::new(c), self.clock.now()))
            })
            .await
            .clone();

        let mut slots = self.lock();
        let slot = slots.entry(key).or_default();
        if slot
            .in_flight
            .as_ref()
            .is_some_and(|current| Arc::ptr_eq(current, &cell))
        {
            slot.in_flight = None;
        }
        match outcome {
            Ok((collateral, fetched_at)) => {
                let newer = slot
                    .last_good
                    .as_ref()
                    .is_none_or(|(_, previous)| *previous <= fetched_at);
                if newer {
                    slot.last_good = Some((Arc::clone(&collateral), fetched_at));
                }
                Ok(CachedCollateral {
                    collateral,
                    freshness: Freshness::Fresh,
                })
            }
            Err(source) => match &slot.last_good {
                Some((collateral, _)) => {
                    tracing::warn!(chip = %hex::encode(&chip_id[..8]), tcb, error = %source,
                        "SNP collateral refresh failed; serving the last good entry");
                    Ok(CachedCollateral {
                        collateral: Arc::clone(collateral),
                        freshness: Freshness::Stale,
                    })
                }
                None => Err(CollateralError {
                    chip_id_prefix: hex::encode(&chip_id[..8]),
                    tcb,
                    source,
                }),
            },
        }
    }
}
