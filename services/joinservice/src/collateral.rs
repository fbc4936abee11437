//! SEV-SNP collateral cache for the cloud variants: the VCEK (or VLEK) for a (signer, chip ID,
//! reported TCB) and the AMD chain above it, fetched through a [`CollateralFetcher`] (AMD's key
//! distribution service, a cloud's certificate cache, or files in tests), verified once, and
//! handed to the SNP validators as a [`VekSource`].
//!
//! - The key is what the report says: signer kind, CHIP_ID and REPORTED_TCB
//!   ([`VekRequest::key`]), so one validator checks reports from any chip at any TCB.
//! - A fetched chain is verified before it is cached: the ARK must be a pinned AMD root (by
//!   content; another product's root or ASK is refused), the RSA-PSS signatures and validity
//!   must hold at the injected clock, and the VEK must be the one asked for (kind, TCB, and a
//!   VCEK's hwID = CHIP_ID). The cache holds the resulting [`VerifiedVek`], so the ASK/ARK
//!   check runs once per fetch, not per report; validators re-check validity per report.
//! - Entries are fresh for a TTL measured on the injected clock.
//! - Concurrent misses for one key share ONE fetch (a per-key `tokio::sync::OnceCell`).
//! - When a refresh fails (vendor error, refused chain, or no answer in time), the last good
//!   entry is served as stale: a VCEK for a given chip and TCB never changes, so an old copy is
//!   still correct, and a KDS outage must not stop joins. With nothing cached the error is a
//!   typed [`CollateralError`] naming the chip and TCB.
//!
//! Sync/async bridge: [`Validator::validate`](constellation_attestation::Validator::validate)
//! is synchronous and aTLS runs it in `spawn_blocking`. A hit is a map lookup under a mutex; a
//! miss spawns the coalesced async [`CollateralCache::get`] on the tokio runtime and blocks the
//! calling (blocking-pool) thread on a channel for at most a bounded wait. That never panics
//! (unlike `Handle::block_on` inside an async context) and never hangs: called from an async
//! worker of a current-thread runtime the fetch cannot run, the wait ends with an error (or the
//! stale entry), and the fetch still completes into the cache afterwards.

use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use constellation_attestation::snp::{
    CollateralError, SigningKey, SnpError, VekRef, VekRequest, VekSource, VerifiedVek,
};
use constellation_attestation::Clock;
use tokio::runtime::Handle;
use tokio::sync::OnceCell;

/// Default freshness of a cache entry.
pub const DEFAULT_COLLATERAL_TTL: Duration = Duration::from_secs(24 * 3600);

/// Default bound on how long a synchronous caller waits for a fetch.
pub const DEFAULT_BLOCKING_WAIT: Duration = Duration::from_secs(30);

/// The certificates needed to check one SNP report: the VEK (VCEK or VLEK), then the
/// intermediate (ASK or ASVK) and the ARK, all DER.
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

/// Where collateral comes from (AMD KDS, a cloud's certificate cache, ...). `request` names
/// the signer kind, chip, reported TCB and (report v3+) the CPUID, i.e. the product.
#[tonic::async_trait]
pub trait CollateralFetcher: Send + Sync {
    async fn fetch(&self, request: &VekRequest) -> Result<Collateral, FetchError>;
}

/// Whether a returned entry is within its TTL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    Fresh,
    /// The refresh failed; this is the last good entry.
    Stale,
}

/// What [`CollateralCache::get`] returns.
#[derive(Debug, Clone)]
pub struct CachedCollateral {
    /// The VEK, its chain verified when it was fetched.
    pub vek: Arc<VerifiedVek>,
    /// The certificates exactly as fetched.
    pub collateral: Arc<Collateral>,
    pub freshness: Freshness,
}

type Key = (SigningKey, [u8; 64], u64);

#[derive(Debug, Clone)]
struct Entry {
    vek: Arc<VerifiedVek>,
    collateral: Arc<Collateral>,
    fetched_at: SystemTime,
}

impl Entry {
    fn cached(&self, freshness: Freshness) -> CachedCollateral {
        CachedCollateral {
            vek: Arc::clone(&self.vek),
            collateral: Arc::clone(&self.collateral),
            freshness,
        }
    }
}

/// Why one fetch produced nothing usable.
#[derive(Debug, Clone)]
enum Failure {
    Fetch(FetchError),
    Refused(SnpError),
}

type FetchOutcome = Result<Entry, Failure>;

#[derive(Default)]
struct Slot {
    last_good: Option<Entry>,
    in_flight: Option<Arc<OnceCell<FetchOutcome>>>,
}

struct Inner {
    fetcher: Arc<dyn CollateralFetcher>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
}

/// The cache. Cheap to clone (clones share the entries) and usable as an
/// `Arc<dyn VekSource>` for [`AzureSevSnpValidator::with_collateral`] /
/// [`AwsSevSnpValidator::with_collateral`].
///
/// [`AzureSevSnpValidator::with_collateral`]: constellation_attestation::variant::azure_sev_snp::AzureSevSnpValidator::with_collateral
/// [`AwsSevSnpValidator::with_collateral`]: constellation_attestation::variant::aws_sev_snp::AwsSevSnpValidator::with_collateral
#[derive(Clone)]
pub struct CollateralCache {
    inner: Arc<Inner>,
    /// The runtime synchronous callers run fetches on when they are not in one themselves.
    runtime: Option<Handle>,
    blocking_wait: Duration,
}

impl std::fmt::Debug for CollateralCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollateralCache")
            .field("ttl", &self.inner.ttl)
            .field("entries", &self.inner.lock().len())
            .field("blocking_wait", &self.blocking_wait)
            .finish_non_exhaustive()
    }
}

impl CollateralCache {
    /// A cache over `fetcher`; `clock` times the TTL and is "now" for verifying fetched chains.
    /// Created inside a tokio runtime, it remembers that runtime for synchronous callers.
    pub fn new(fetcher: Arc<dyn CollateralFetcher>, clock: Arc<dyn Clock>, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                fetcher,
                clock,
                ttl,
                slots: Mutex::new(HashMap::new()),
            }),
            runtime: Handle::try_current().ok(),
            blocking_wait: DEFAULT_BLOCKING_WAIT,
        }
    }

    /// The runtime to run fetches on for synchronous callers outside any runtime.
    pub fn with_runtime(mut self, runtime: Handle) -> Self {
        self.runtime = Some(runtime);
        self
    }

    /// How long a synchronous caller waits for a fetch before it falls back to the stale
    /// entry or an error.
    pub fn with_blocking_wait(mut self, wait: Duration) -> Self {
        self.blocking_wait = wait;
        self
    }

    /// The verified collateral for `request`: cached if fresh, else fetched and verified (one
    /// fetch for all concurrent callers), else the stale last good entry, else an error.
    pub async fn get(&self, request: &VekRequest) -> Result<CachedCollateral, CollateralError> {
        self.inner.get(request).await
    }
}

impl Inner {
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

    fn fresh(&self, key: &Key) -> Option<Entry> {
        let now = self.clock.now();
        self.lock()
            .get(key)
            .and_then(|slot| slot.last_good.as_ref())
            .filter(|entry| self.is_fresh(entry.fetched_at, now))
            .cloned()
    }

    fn last_good(&self, key: &Key) -> Option<Entry> {
        self.lock().get(key).and_then(|slot| slot.last_good.clone())
    }

    /// Fetches and verifies: only collateral that chains to a pinned root and is the VEK
    /// `request` names becomes an entry.
    async fn fetch_verified(&self, request: &VekRequest) -> FetchOutcome {
        tracing::debug!(chip = %hex::encode(&request.chip_id[..8]), tcb = request.reported_tcb.raw,
            signer = %request.signing_key, "fetching SNP collateral");
        let collateral = self.fetcher.fetch(request).await.map_err(Failure::Fetch)?;
        let vek = VerifiedVek::from_der(
            &collateral.vcek_der,
            &collateral.ask_der,
            &collateral.ark_der,
            self.clock.as_ref(),
        )
        .and_then(|vek| request.check_vek(&vek).map(|()| vek))
        .map_err(Failure::Refused)?;
        Ok(Entry {
            vek: Arc::new(vek),
            collateral: Arc::new(collateral),
            fetched_at: self.clock.now(),
        })
    }

    async fn get(&self, request: &VekRequest) -> Result<CachedCollateral, CollateralError> {
        let key = request.key();
        let cell = {
            let mut slots = self.lock();
            let slot = slots.entry(key).or_default();
            if let Some(entry) = &slot.last_good {
                if self.is_fresh(entry.fetched_at, self.clock.now()) {
                    return Ok(entry.cached(Freshness::Fresh));
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
            .get_or_init(|| self.fetch_verified(request))
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
            Ok(entry) => {
                let newer = slot
                    .last_good
                    .as_ref()
                    .is_none_or(|previous| previous.fetched_at <= entry.fetched_at);
                if newer {
                    slot.last_good = Some(entry.clone());
                }
                Ok(entry.cached(Freshness::Fresh))
            }
            Err(failure) => {
                let error = match failure {
                    Failure::Fetch(e) => CollateralError::unavailable(request, e.reason),
                    Failure::Refused(e) => CollateralError::refused(request, e),
                };
                match &slot.last_good {
                    Some(entry) => {
                        tracing::warn!(%error, "SNP collateral refresh failed; serving the last good entry");
                        Ok(entry.cached(Freshness::Stale))
                    }
                    None => Err(error),
                }
            }
        }
    }
}

/// The synchronous path for validators (see the module docs for why it blocks this way).
impl VekSource for CollateralCache {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        let key = request.key();
        if let Some(entry) = self.inner.fresh(&key) {
            return Ok(VekRef::Shared(entry.vek));
        }
        let runtime = Handle::try_current()
            .ok()
            .or_else(|| self.runtime.clone())
            .ok_or_else(|| {
                CollateralError::unavailable(request, "no tokio runtime to run the fetch on")
            })?;
        let (tx, rx) = sync_channel(1);
        let inner = Arc::clone(&self.inner);
        let req = *request;
        runtime.spawn(async move {
            // The receiver may have given up waiting; the entry is cached either way.
            let _ = tx.send(inner.get(&req).await);
        });
        let waited = match rx.recv_timeout(self.blocking_wait) {
            Ok(result) => return result.map(|cached| VekRef::Shared(cached.vek)),
            Err(RecvTimeoutError::Timeout) => format!(
                "no answer within {:?} (the fetch continues in the background)",
                self.blocking_wait
            ),
            Err(RecvTimeoutError::Disconnected) => {
                "the fetch task was dropped (runtime shutting down)".to_owned()
            }
        };
        let error = CollateralError::unavailable(request, waited);
        match self.inner.last_good(&key) {
            Some(entry) => {
                tracing::warn!(%error, "SNP collateral refresh failed; serving the last good entry");
                Ok(VekRef::Shared(entry.vek))
            }
            None => Err(error),
        }
    }
}
