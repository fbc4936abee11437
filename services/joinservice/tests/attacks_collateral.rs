//! Floods of unauthenticated SNP reports against the collateral cache: made-up CHIP_IDs,
//! one bad report repeated, VLEK reports varying CHIP_ID, malformed TCBs or CPU families,
//! many distinct fetches at once and many blocked synchronous callers. None may make the
//! cache grow, fetch or block without bound, and the honest entry must survive the flood.

mod snp_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::snp::{
    AttestationReport, CollateralError, CpuId, SigningKey, VekRequest, VekSource,
};
use constellation_joinservice::collateral_cache::{CollateralCache, CollateralLimits};
use snp_support::{azure_collateral, azure_report, LocalFetcher, ManualClock, AZURE_VALID_AT};

const TTL: Duration = Duration::from_secs(600);

fn honest() -> VekRequest {
    VekRequest::for_report(&AttestationReport::parse(&azure_report()).unwrap()).unwrap()
}

/// A request for a made-up chip `n` (same TCB and product as the honest one).
fn forged_chip(n: u32) -> VekRequest {
    let mut r = honest();
    r.chip_id = [0x5A; 64];
    r.chip_id[..4].copy_from_slice(&n.to_le_bytes());
    r
}

fn cache(
    fetcher: &Arc<LocalFetcher>,
    limits: CollateralLimits,
) -> (CollateralCache, Arc<ManualClock>) {
    let clock = ManualClock::at(AZURE_VALID_AT);
    let cache = CollateralCache::new(fetcher.clone(), clock.clone(), TTL).with_limits(limits);
    (cache, clock)
}

#[tokio::test]
async fn flood_of_made_up_chip_ids_stays_within_the_bound_and_keeps_the_honest_entry() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let limits = CollateralLimits {
        max_entries: 64,
        ..CollateralLimits::default()
    };
    let (cache, _clock) = cache(&fetcher, limits);
    cache.get(&honest()).await.unwrap();
    for n in 0..2_000 {
        // The real VCEK is for another chip: each forged request is refused.
        match cache.get(&forged_chip(n)).await {
            Err(CollateralError::Refused { chip_id, .. }) => {
                assert_eq!(chip_id, forged_chip(n).chip_id.to_vec())
            }
            other => panic!("forged chip {n}: expected Refused, got {other:?}"),
        }
        assert!(cache.len() <= 64, "cache grew to {} keys", cache.len());
    }
    assert_eq!(cache.len(), 64);
    // Failures are evicted before good entries: the honest chip is still a hit.
    let fetches = fetcher.fetch_count();
    cache.get(&honest()).await.unwrap();
    cache.vek_for(&honest()).unwrap();
    assert_eq!(fetcher.fetch_count(), fetches, "honest entry was evicted");
}

#[tokio::test]
async fn repeating_one_bad_report_fetches_once_per_negative_ttl() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let limits = CollateralLimits {
        negative_ttl: Duration::from_secs(30),
        ..CollateralLimits::default()
    };
    let (cache, clock) = cache(&fetcher, limits);
    for _ in 0..500 {
        assert!(matches!(
            cache.get(&forged_chip(7)).await,
            Err(CollateralError::Refused { .. })
        ));
    }
    assert_eq!(fetcher.fetch_count(), 1);
    clock.advance(Duration::from_secs(29));
    assert!(cache.get(&forged_chip(7)).await.is_err());
    assert_eq!(fetcher.fetch_count(), 1);
    clock.advance(Duration::from_secs(1));
    assert!(cache.get(&forged_chip(7)).await.is_err());
    assert_eq!(
        fetcher.fetch_count(),
        2,
        "retried once the negative TTL passed"
    );
}

#[tokio::test]
async fn vlek_reports_varying_chip_id_share_one_key() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, _clock) = cache(&fetcher, CollateralLimits::default());
    for n in 0..200 {
        let mut r = forged_chip(n);
        r.signing_key = SigningKey::Vlek;
        // Azure's VCEK is no VLEK: refused, but all 200 are one key, one fetch.
        assert!(cache.get(&r).await.is_err());
    }
    assert_eq!(fetcher.fetch_count(), 1);
    assert_eq!(cache.len(), 1);
}

#[tokio::test]
async fn malformed_requests_are_refused_before_any_fetch() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, _clock) = cache(&fetcher, CollateralLimits::default());

    // A TCB_VERSION with bits in the bytes Milan/Genoa reserve: same TCB, distinct key.
    let mut reserved = honest();
    reserved.reported_tcb.raw |= 0x0000_0100_0000_0000;
    match cache.get(&reserved).await {
        Err(CollateralError::MalformedRequest { field, found }) => {
            assert_eq!(field, "reported TCB reserved bytes");
            assert_eq!(found, format!("{:#018x}", reserved.reported_tcb.raw));
        }
        other => panic!("expected MalformedRequest, got {other:?}"),
    }
    // A CPU family no key distribution service serves.
    let mut family = honest();
    family.cpuid = Some(CpuId {
        family: 0x17,
        model: 0x31,
        stepping: 0,
    });
    match cache.vek_for(&family) {
        Err(CollateralError::MalformedRequest { field, found }) => {
            assert_eq!((field, found.as_str()), ("cpuid family", "0x17"))
        }
        other => panic!("expected MalformedRequest, got {other:?}"),
    }
    // A VCEK report with CHIP_ID masked names no chip.
    let mut masked = honest();
    masked.chip_id = [0; 64];
    assert!(matches!(
        cache.get(&masked).await,
        Err(CollateralError::ChipIdMasked { .. })
    ));
    assert_eq!(fetcher.fetch_count(), 0);
    assert_eq!(cache.len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn distinct_fetches_in_flight_are_capped() {
    // The vendor hangs: every started fetch stays in flight.
    let fetcher = LocalFetcher::gated(azure_collateral());
    let limits = CollateralLimits {
        max_in_flight: 4,
        ..CollateralLimits::default()
    };
    let (cache, _clock) = cache(&fetcher, limits);
    let cache = Arc::new(cache);
    let hung: Vec<_> = (0..4)
        .map(|n| {
            let cache = Arc::clone(&cache);
            tokio::spawn(async move { cache.get(&forged_chip(n)).await })
        })
        .collect();
    while fetcher.fetch_count() < 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    for n in 4..104 {
        match cache.get(&forged_chip(n)).await {
            Err(CollateralError::Busy { what, limit }) => {
                assert_eq!((what, limit), ("collateral fetches in flight", 4))
            }
            other => panic!("chip {n}: expected Busy, got {other:?}"),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals must not wait"
    );
    assert_eq!(fetcher.fetch_count(), 4, "no fetch beyond the cap started");
    fetcher.open();
    for task in hung {
        assert!(task.await.unwrap().is_err());
    }
}

#[test]
fn blocked_synchronous_callers_are_capped() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fetcher = LocalFetcher::gated(azure_collateral());
    let limits = CollateralLimits {
        max_blocking_waiters: 3,
        ..CollateralLimits::default()
    };
    let cache = CollateralCache::new(fetcher.clone(), ManualClock::at(AZURE_VALID_AT), TTL)
        .with_limits(limits)
        .with_runtime(runtime.handle().clone())
        .with_blocking_wait(Duration::from_secs(10));
    let cache = Arc::new(cache);
    // Three callers block on the hung vendor (one shared fetch for the honest key).
    let blocked: Vec<_> = (0..3)
        .map(|_| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || cache.vek_for(&honest()).map(|_| ()))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    while fetcher.fetch_count() < 1 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    // Every further synchronous caller is refused at once instead of taking another thread.
    let started = Instant::now();
    for n in 0..50 {
        match cache.vek_for(&forged_chip(n)) {
            Err(CollateralError::Busy { what, limit }) => {
                assert_eq!((what, limit), ("synchronous collateral waiters", 3))
            }
            other => panic!("caller {n}: expected Busy, got {:?}", other.map(|_| ())),
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "refusals must not block"
    );
    // The vendor answers: the blocked callers get the honest VEK, and the permits are back.
    fetcher.open();
    for t in blocked {
        t.join().unwrap().unwrap();
    }
    assert!(matches!(
        cache.vek_for(&forged_chip(0)),
        Err(CollateralError::Refused { .. })
    ));
}
