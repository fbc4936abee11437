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
//! Unauthenticated input (any peer can send any report) must not make the cache grow or fetch
//! without bound:
//! - Reports are checked before any lookup ([`VekRequest::check_structure`] and the policy,
//!   in `verify_report_from`); a VLEK's key ignores CHIP_ID.
//! - The map holds at most [`CollateralLimits::max_entries`] keys. When full, a key that only
//!   remembers a failure is evicted first, then the least recently used good entry; keys with
//!   a fetch in flight are never evicted.
//! - A failed fetch (vendor error or refused chain) is remembered for
//!   [`CollateralLimits::negative_ttl`]: repeating the same report costs no fetch until then.
//! - At most [`CollateralLimits::max_in_flight`] distinct fetches run at once, and at most
//!   [`CollateralLimits::max_blocking_waiters`] synchronous callers block on the bridge below;
//!   beyond either, a caller gets [`CollateralError::Busy`] (or the stale entry) at once.
//!
//! Sync/async bridge: [`Validator::validate`](constellation_attestation::Validator::validate)
//! is synchronous and aTLS runs it in `spawn_blocking`. A hit is a map lookup under a mutex; a
//! miss spawns the coalesced async [`CollateralCache::get`] on the tokio runtime and blocks the
//! calling (blocking-pool) thread on a channel for at most a bounded wait. That never panics
//! (unlike `Handle::block_on` inside an async context) and never hangs: called from an async
//! worker of a current-thread runtime the fetch cannot run, the wait ends with an error (or the
//! stale entry), and the fetch still completes into the cache afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// Bounds on what unauthenticated reports can make the cache hold, fetch and block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateralLimits {
    /// Keys held (good entries, remembered failures and fetches in flight together).
    pub max_entries: usize,
    /// How long a failed fetch for a key is remembered (no new fetch for it meanwhile).
    pub negative_ttl: Duration,
    /// Distinct fetches running at once.
    pub max_in_flight: usize,
    /// Synchronous callers ([`VekSource::vek_for`]) blocked waiting for a fetch at once.
    pub max_blocking_waiters: usize,
}

impl Default for CollateralLimits {
    fn default() -> Self {
        Self {
            max_entries: 4096,
            negative_ttl: Duration::from_secs(60),
            max_in_flight: 16,
            max_blocking_waiters: 16,
        }
    }
}

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
    /// The last failed fetch: when, and the error every caller gets until `negative_ttl`.
    failure: Option<(SystemTime, CollateralError)>,
    /// Recency stamp for eviction (a counter, not the clock: ties must not happen).
    used: u64,
}

impl Slot {
    fn in_flight(&self) -> bool {
        self.in_flight.as_ref().is_some_and(|c| !c.initialized())
    }
}

#[derive(Default)]
struct Slots {
    map: HashMap<Key, Slot>,
    tick: u64,
}

impl Slots {
    fn touch(&mut self, key: &Key) -> Option<&mut Slot> {
        self.tick += 1;
        let tick = self.tick;
        let slot = self.map.get_mut(key)?;
        slot.used = tick;
        Some(slot)
    }

    /// The slot for `key`, made room for if new: evicts a failure-only slot first, then the
    /// least recently used good one; never one with a fetch in flight. `None` when every
    /// slot is in flight (cannot happen while `max_in_flight < max_entries`).
    fn slot_for(&mut self, key: Key, max_entries: usize) -> Option<&mut Slot> {
        if !self.map.contains_key(&key) {
            while self.map.len() >= max_entries.max(1) {
                let victim = self
                    .map
                    .iter()
                    .filter(|(_, slot)| !slot.in_flight())
                    .min_by_key(|(_, slot)| (slot.last_good.is_some(), slot.used))
                    .map(|(k, _)| *k)?;
                self.map.remove(&victim);
            }
            self.map.insert(key, Slot::default());
        }
        self.touch(&key)
    }

    fn in_flight(&self) -> usize {
        self.map.values().filter(|slot| slot.in_flight()).count()
    }
}

struct Inner {
    fetcher: Arc<dyn CollateralFetcher>,
    clock: Arc<dyn Clock>,
    ttl: Duration,
    limits: CollateralLimits,
    slots: Mutex<Slots>,
    /// Synchronous callers currently blocked on the bridge.
    blocking_waiters: AtomicUsize,
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
            .field("entries", &self.len())
            .field("limits", &self.inner.limits)
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
                limits: CollateralLimits::default(),
                slots: Mutex::new(Slots::default()),
                blocking_waiters: AtomicUsize::new(0),
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

    /// Replaces the default [`CollateralLimits`]. Call before the cache is shared.
    pub fn with_limits(mut self, limits: CollateralLimits) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.limits = limits;
        } else {
            tracing::warn!("collateral limits not applied: the cache is already shared");
        }
        self
    }

    /// Keys held (good entries, remembered failures, fetches in flight).
    pub fn len(&self) -> usize {
        self.inner.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The verified collateral for `request`: cached if fresh, else fetched and verified (one
    /// fetch for all concurrent callers), else the stale last good entry, else an error (a
    /// remembered one within the negative TTL, without a new fetch).
    pub async fn get(&self, request: &VekRequest) -> Result<CachedCollateral, CollateralError> {
        self.inner.get(request).await
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Slots> {
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
            .touch(key)
            .and_then(|slot| slot.last_good.as_ref())
            .filter(|entry| self.is_fresh(entry.fetched_at, now))
            .cloned()
    }

    fn last_good(&self, key: &Key) -> Option<Entry> {
        self.lock()
            .map
            .get(key)
            .and_then(|slot| slot.last_good.clone())
    }

    /// The stale entry if there is one, else `error`.
    fn stale_or(&self, key: &Key, error: CollateralError) -> Result<Entry, CollateralError> {
        match self.last_good(key) {
            Some(entry) => {
                tracing::warn!(%error, "SNP collateral refresh failed; serving the last good entry");
                Ok(entry)
            }
            None => Err(error),
        }
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
        request.check_structure()?;
        let key = request.key();
        let cell = {
            let now = self.clock.now();
            let mut slots = self.lock();
            let in_flight = slots.in_flight();
            let Some(slot) = slots.slot_for(key, self.limits.max_entries) else {
                drop(slots);
                return self
                    .stale_or(
                        &key,
                        self.busy("collateral cache slots", self.limits.max_entries),
                    )
                    .map(|e| e.cached(Freshness::Stale));
            };
            if let Some(entry) = &slot.last_good {
                if self.is_fresh(entry.fetched_at, now) {
                    return Ok(entry.cached(Freshness::Fresh));
                }
            }
            let remembered = slot.failure.as_ref().filter(|(failed_at, _)| {
                failed_at
                    .checked_add(self.limits.negative_ttl)
                    .is_some_and(|end| now < end)
            });
            if let Some((_, error)) = remembered {
                return match &slot.last_good {
                    Some(entry) => Ok(entry.cached(Freshness::Stale)),
                    None => Err(error.clone()),
                };
            }
            match &slot.in_flight {
                // A finished cell left behind (its callers were cancelled) is not reused.
                Some(cell) if !cell.initialized() => Arc::clone(cell),
                _ if in_flight >= self.limits.max_in_flight => {
                    let error =
                        self.busy("collateral fetches in flight", self.limits.max_in_flight);
                    return match &slot.last_good {
                        Some(entry) => Ok(entry.cached(Freshness::Stale)),
                        None => Err(error),
                    };
                }
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

        let now = self.clock.now();
        let mut slots = self.lock();
        let Some(slot) = slots.slot_for(key, self.limits.max_entries) else {
            return outcome
                .map(|entry| entry.cached(Freshness::Fresh))
                .map_err(|failure| Self::failure_error(request, failure));
        };
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
                slot.failure = None;
                Ok(entry.cached(Freshness::Fresh))
            }
            Err(failure) => {
                let error = Self::failure_error(request, failure);
                slot.failure = Some((now, error.clone()));
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

    fn failure_error(request: &VekRequest, failure: Failure) -> CollateralError {
        match failure {
            Failure::Fetch(e) => CollateralError::unavailable(request, e.reason),
            Failure::Refused(e) => CollateralError::refused(request, e),
        }
    }

    fn busy(&self, what: &'static str, limit: usize) -> CollateralError {
        // Debug, not warn: under a flood a line per refusal would flood the log too.
        tracing::debug!(what, limit, "SNP collateral source at its limit");
        CollateralError::Busy { what, limit }
    }
}

/// A place among the synchronous callers blocked on the bridge, given back on drop.
struct WaiterPermit<'a>(&'a AtomicUsize);

impl<'a> WaiterPermit<'a> {
    fn try_acquire(count: &'a AtomicUsize, limit: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count))
    }
}

impl Drop for WaiterPermit<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The synchronous path for validators (see the module docs for why it blocks this way).
impl VekSource for CollateralCache {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        request.check_structure()?;
        let key = request.key();
        if let Some(entry) = self.inner.fresh(&key) {
            return Ok(VekRef::Shared(entry.vek));
        }
        let limit = self.inner.limits.max_blocking_waiters;
        let Some(_permit) = WaiterPermit::try_acquire(&self.inner.blocking_waiters, limit) else {
            let error = self.inner.busy("synchronous collateral waiters", limit);
            return self
                .inner
                .stale_or(&key, error)
                .map(|entry| VekRef::Shared(entry.vek));
        };
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
        self.inner
            .stale_or(&key, error)
            .map(|entry| VekRef::Shared(entry.vek))
    }
}
