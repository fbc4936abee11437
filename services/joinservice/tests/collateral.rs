//! SNP collateral cache: one fetch for concurrent misses, TTL on an injected clock, stale on error.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use constellation_attestation::Clock;
use constellation_joinservice::collateral::{
    Collateral, CollateralCache, CollateralFetcher, FetchError, Freshness,
};

const TTL: Duration = Duration::from_secs(600);
const CHIP: [u8; 64] = [0xc1; 64];
const TCB: u64 = 0x5d06_0000_0000_0002;

#[derive(Debug)]
struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    fn new() -> Arc<Self> {
        Arc::new(Self(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_750_000_000),
        )))
    }
    fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// Counts fetches; each takes 100 ms (virtual) so concurrent callers pile up behind it.
#[derive(Default)]
struct CountingFetcher {
    fetches: AtomicUsize,
    fail: AtomicBool,
}

fn collateral_number(n: usize) -> Collateral {
    Collateral {
        vcek_der: format!("vcek #{n}").into_bytes(),
        ask_der: b"ask".to_vec(),
        ark_der: b"ark".to_vec(),
    }
}

#[tonic::async_trait]
impl CollateralFetcher for CountingFetcher {
    async fn fetch(&self, chip_id: &[u8; 64], tcb: u64) -> Result<Collateral, FetchError> {
        let n = self.fetches.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!((chip_id, tcb), (&CHIP, TCB));
        if self.fail.load(Ordering::SeqCst) {
            return Err(FetchError {
                reason: "KDS returned 503".into(),
            });
        }
        Ok(collateral_number(n))
    }
}

fn cache() -> (Arc<CollateralCache>, Arc<CountingFetcher>, Arc<ManualClock>) {
    let fetcher = Arc::new(CountingFetcher::default());
    let clock = ManualClock::new();
    let cache = Arc::new(CollateralCache::new(fetcher.clone(), clock.clone(), TTL));
    (cache, fetcher, clock)
}

// Paused time: the fetcher's sleep only ends once every task is blocked, so all 100 callers are
// certainly waiting while the one fetch is in flight.
#[tokio::test(start_paused = true)]
async fn hundred_concurrent_misses_make_one_fetch() {
    let (cache, fetcher, _clock) = cache();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&CHIP, TCB).await })
        })
        .collect();
    for task in tasks {
        let got = task.await.unwrap().unwrap();
        assert_eq!(*got.collateral, collateral_number(1));
        assert_eq!(got.freshness, Freshness::Fresh);
    }
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    // And the result is cached.
    cache.get(&CHIP, TCB).await.unwrap();
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn entry_is_refetched_after_the_ttl_only() {
    let (cache, fetcher, clock) = cache();
    cache.get(&CHIP, TCB).await.unwrap();
    clock.advance(TTL - Duration::from_secs(1));
    assert_eq!(
        *cache.get(&CHIP, TCB).await.unwrap().collateral,
        collateral_number(1)
    );
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        *cache.get(&CHIP, TCB).await.unwrap().collateral,
        collateral_number(2)
    );
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn error_after_expiry_serves_the_stale_value() {
    let (cache, fetcher, clock) = cache();
    cache.get(&CHIP, TCB).await.unwrap();
    clock.advance(TTL * 3);
    fetcher.fail.store(true, Ordering::SeqCst);
    let got = cache.get(&CHIP, TCB).await.unwrap();
    assert_eq!(got.freshness, Freshness::Stale);
    assert_eq!(*got.collateral, collateral_number(1));
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 2);
    // Each later call retries (nothing fresh to serve), still falling back to the stale value.
    let again = cache.get(&CHIP, TCB).await.unwrap();
    assert_eq!(again.freshness, Freshness::Stale);
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 3);
    // Once the fetcher recovers, the entry is fresh again.
    fetcher.fail.store(false, Ordering::SeqCst);
    let fresh = cache.get(&CHIP, TCB).await.unwrap();
    assert_eq!(fresh.freshness, Freshness::Fresh);
    assert_eq!(*fresh.collateral, collateral_number(4));
}

#[tokio::test(start_paused = true)]
async fn error_with_nothing_cached_is_an_error_for_every_waiter() {
    let (cache, fetcher, _clock) = cache();
    fetcher.fail.store(true, Ordering::SeqCst);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&CHIP, TCB).await })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        assert_eq!(err.tcb, TCB);
        assert_eq!(err.source.reason, "KDS returned 503");
        assert!(err.to_string().contains("c1c1c1c1"), "{err}");
    }
    assert_eq!(fetcher.fetches.load(Ordering::SeqCst), 1);
    // The failure is not cached: the next call tries again.
    fetcher.fail.store(false, Ordering::SeqCst);
    assert_eq!(
        *cache.get(&CHIP, TCB).await.unwrap().collateral,
        collateral_number(2)
    );
}

#[tokio::test(start_paused = true)]
async fn keys_are_chip_and_tcb() {
    let fetcher = Arc::new(KeyEcho::default());
    let cache = CollateralCache::new(fetcher.clone(), ManualClock::new(), TTL);
    let other_chip = [0x22; 64];
    let a = cache.get(&CHIP, 1).await.unwrap();
    let b = cache.get(&CHIP, 2).await.unwrap();
    let c = cache.get(&other_chip, 1).await.unwrap();
    cache.get(&CHIP, 1).await.unwrap();
    assert_eq!(fetcher.0.load(Ordering::SeqCst), 3);
    assert_ne!(a, b);
    assert_ne!(a, c);
    assert_eq!(
        a.collateral.vcek_der,
        [&CHIP[..], &1u64.to_le_bytes()].concat()
    );
}

/// Returns the key it was asked for, so entries for different keys differ.
#[derive(Default)]
struct KeyEcho(AtomicUsize);

#[tonic::async_trait]
impl CollateralFetcher for KeyEcho {
    async fn fetch(&self, chip_id: &[u8; 64], tcb: u64) -> Result<Collateral, FetchError> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(Collateral {
            vcek_der: [&chip_id[..], &tcb.to_le_bytes()].concat(),
            ask_der: Vec::new(),
            ark_der: Vec::new(),
        })
    }
}
