//! SNP collateral cache on its own: one fetch for concurrent misses, TTL on an injected clock,
//! stale on error, keyed by signer/chip/TCB, only verified chains cached, and the synchronous
//! bridge validators use. Real VCEK/ASK/ARK from attestation/test_data.

mod snp_support;

use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::snp::{
    AttestationReport, CollateralError, SigningKey, SnpError, VekRequest, VekSource,
};
use constellation_joinservice::collateral_cache::{CollateralCache, Freshness};
use snp_support::{azure_collateral, azure_report, LocalFetcher, ManualClock, AZURE_VALID_AT};

const TTL: Duration = Duration::from_secs(600);
/// The default negative TTL (`CollateralLimits::default().negative_ttl`).
const NEGATIVE_TTL: Duration = Duration::from_secs(60);

fn request() -> VekRequest {
    VekRequest::for_report(&AttestationReport::parse(&azure_report()).unwrap()).unwrap()
}

fn cache_over(fetcher: &Arc<LocalFetcher>) -> (Arc<CollateralCache>, Arc<ManualClock>) {
    let clock = ManualClock::at(AZURE_VALID_AT);
    let cache = Arc::new(CollateralCache::new(fetcher.clone(), clock.clone(), TTL));
    (cache, clock)
}

// Paused time: the fetcher's sleep only ends once every task is blocked, so all 100 callers are
// certainly waiting while the one fetch is in flight.
#[tokio::test(start_paused = true)]
async fn hundred_concurrent_misses_make_one_fetch_and_share_one_verified_vek() {
    let fetcher = LocalFetcher::with_delay(azure_collateral(), Duration::from_millis(100));
    let (cache, _clock) = cache_over(&fetcher);
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&request()).await })
        })
        .collect();
    let mut veks = Vec::new();
    for task in tasks {
        let got = task.await.unwrap().unwrap();
        assert_eq!(got.freshness, Freshness::Fresh);
        assert_eq!(*got.collateral, azure_collateral());
        veks.push(got.vek);
    }
    assert_eq!(fetcher.fetch_count(), 1);
    // One verification: every caller holds the same verified key.
    assert!(veks.iter().all(|v| Arc::ptr_eq(v, &veks[0])));
    // And it is cached: a hit neither fetches nor re-verifies.
    let again = cache.get(&request()).await.unwrap();
    assert!(Arc::ptr_eq(&again.vek, &veks[0]));
    assert_eq!(fetcher.fetch_count(), 1);
    // The fetcher was asked for exactly what the report names.
    let asked = fetcher.requests.lock().unwrap()[0];
    assert_eq!(asked, request());
    assert_eq!(asked.signing_key, SigningKey::Vcek);
    assert_eq!(asked.reported_tcb.raw, snp_support::AZURE_TCB);
    assert_eq!(asked.chip_id, snp_support::azure_chip_id());
}

#[tokio::test]
async fn entry_is_refetched_after_the_ttl_only() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, clock) = cache_over(&fetcher);
    let first = cache.get(&request()).await.unwrap();
    clock.advance(TTL - Duration::from_secs(1));
    let hit = cache.get(&request()).await.unwrap();
    assert!(Arc::ptr_eq(&hit.vek, &first.vek));
    assert_eq!(fetcher.fetch_count(), 1);
    clock.advance(Duration::from_secs(1));
    let refreshed = cache.get(&request()).await.unwrap();
    assert_eq!(refreshed.freshness, Freshness::Fresh);
    assert!(!Arc::ptr_eq(&refreshed.vek, &first.vek));
    assert_eq!(fetcher.fetch_count(), 2);
}

#[tokio::test]
async fn vendor_error_after_expiry_serves_the_stale_entry_until_it_recovers() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, clock) = cache_over(&fetcher);
    let first = cache.get(&request()).await.unwrap();
    clock.advance(TTL * 3);
    fetcher.set_down(true);
    let stale = cache.get(&request()).await.unwrap();
    assert_eq!(stale.freshness, Freshness::Stale);
    assert!(Arc::ptr_eq(&stale.vek, &first.vek));
    assert_eq!(fetcher.fetch_count(), 2);
    // Within the negative TTL the failure is remembered: stale value, no new fetch.
    assert_eq!(
        cache.get(&request()).await.unwrap().freshness,
        Freshness::Stale
    );
    assert_eq!(fetcher.fetch_count(), 2);
    // After it, a call retries (nothing fresh to serve), still falling back to the stale value.
    clock.advance(NEGATIVE_TTL);
    assert_eq!(
        cache.get(&request()).await.unwrap().freshness,
        Freshness::Stale
    );
    assert_eq!(fetcher.fetch_count(), 3);
    fetcher.set_down(false);
    clock.advance(NEGATIVE_TTL);
    assert_eq!(
        cache.get(&request()).await.unwrap().freshness,
        Freshness::Fresh
    );
}

/// A vendor that starts serving a bad chain is a vendor error too: the verified stale entry
/// stays in use, and the bad chain is never cached.
#[tokio::test]
async fn a_refused_refresh_serves_the_verified_stale_entry() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, clock) = cache_over(&fetcher);
    let first = cache.get(&request()).await.unwrap();
    clock.advance(TTL * 2);
    let mut bad = azure_collateral();
    bad.ark_der = bad.ask_der.clone();
    fetcher.serve(bad);
    let stale = cache.get(&request()).await.unwrap();
    assert_eq!(stale.freshness, Freshness::Stale);
    assert!(Arc::ptr_eq(&stale.vek, &first.vek));
    assert_eq!(*stale.collateral, azure_collateral());
}

#[tokio::test(start_paused = true)]
async fn vendor_error_with_nothing_cached_is_a_typed_error_for_every_waiter() {
    let fetcher = LocalFetcher::with_delay(azure_collateral(), Duration::from_millis(100));
    fetcher.set_down(true);
    let (cache, clock) = cache_over(&fetcher);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let cache = cache.clone();
            tokio::spawn(async move { cache.get(&request()).await })
        })
        .collect();
    for task in tasks {
        let err = task.await.unwrap().unwrap_err();
        let CollateralError::Unavailable {
            signer,
            chip_id,
            tcb,
            reason,
        } = &err
        else {
            panic!("expected Unavailable, got {err:?}");
        };
        assert_eq!(*signer, SigningKey::Vcek);
        assert_eq!(*chip_id, snp_support::azure_chip_id());
        assert_eq!(*tcb, snp_support::AZURE_TCB);
        assert!(reason.contains("503"), "{reason}");
        let msg = err.to_string();
        assert!(
            msg.contains(&hex::encode(snp_support::azure_chip_id())),
            "{msg}"
        );
        assert!(msg.contains("0x5d06000000000002"), "{msg}");
    }
    assert_eq!(fetcher.fetch_count(), 1);
    // The failure is remembered for the negative TTL (same error, no fetch), then retried.
    fetcher.set_down(false);
    assert!(matches!(
        cache.get(&request()).await,
        Err(CollateralError::Unavailable { .. })
    ));
    assert_eq!(fetcher.fetch_count(), 1);
    clock.advance(NEGATIVE_TTL);
    cache.get(&request()).await.unwrap();
    assert_eq!(fetcher.fetch_count(), 2);
}

/// Signer, chip and TCB are each part of the key; the real VCEK only verifies for its own
/// chip and TCB, so the other keys get typed refusals naming what did not match.
#[tokio::test]
async fn keys_are_signer_chip_and_tcb_and_only_matching_collateral_is_cached() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let (cache, _clock) = cache_over(&fetcher);
    let real = request();
    cache.get(&real).await.unwrap();

    let mut other_chip = real;
    other_chip.chip_id[0] ^= 0xff;
    let err = cache.get(&other_chip).await.unwrap_err();
    assert!(
        matches!(&err, CollateralError::Refused { chip_id, source: SnpError::ChipIdMismatch { expected, found }, .. }
            if *chip_id == other_chip.chip_id
                && expected[..] == real.chip_id[..]
                && found[..] == other_chip.chip_id[..]),
        "{err:?}"
    );

    let mut other_tcb = real;
    other_tcb.reported_tcb.raw += 1; // a different raw key; decoded components as well:
    other_tcb.reported_tcb.snp += 1;
    let err = cache.get(&other_tcb).await.unwrap_err();
    assert!(
        matches!(&err, CollateralError::Refused { tcb, source: SnpError::TcbMismatch { .. }, .. }
            if *tcb == other_tcb.reported_tcb.raw),
        "{err:?}"
    );

    let mut vlek = real;
    vlek.signing_key = SigningKey::Vlek;
    let err = cache.get(&vlek).await.unwrap_err();
    assert!(
        matches!(
            &err,
            CollateralError::Refused {
                source: SnpError::SignerMismatch { .. },
                ..
            }
        ),
        "{err:?}"
    );

    cache.get(&real).await.unwrap();
    assert_eq!(
        fetcher.fetch_count(),
        4,
        "three other keys, the real one once"
    );
}

/// The synchronous bridge from a plain thread outside any runtime: it runs the fetch on the
/// runtime the cache remembered, and a hit afterwards needs no runtime at all.
#[test]
fn sync_lookup_from_a_plain_thread_runs_the_fetch_on_the_remembered_runtime() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let fetcher = LocalFetcher::serving(azure_collateral());
    let cache = CollateralCache::new(fetcher.clone(), ManualClock::at(AZURE_VALID_AT), TTL)
        .with_runtime(runtime.handle().clone());
    let vek = std::thread::scope(|s| {
        s.spawn(|| cache.vek_for(&request()).map(|v| v.extensions().clone()))
            .join()
            .unwrap()
    })
    .unwrap();
    assert_eq!(vek.hw_id, Some(snp_support::azure_chip_id()));
    assert_eq!(fetcher.fetch_count(), 1);
    drop(runtime);
    cache.vek_for(&request()).unwrap();
    assert_eq!(fetcher.fetch_count(), 1);
}

/// Misused from an async worker of a current-thread runtime, the blocking lookup cannot let
/// the fetch run: it must neither panic nor hang, but end with a typed error after the bounded
/// wait; the fetch then completes into the cache.
#[tokio::test]
async fn sync_lookup_on_an_async_worker_times_out_instead_of_hanging_or_panicking() {
    let fetcher = LocalFetcher::serving(azure_collateral());
    let cache = CollateralCache::new(fetcher.clone(), ManualClock::at(AZURE_VALID_AT), TTL)
        .with_blocking_wait(Duration::from_millis(50));
    let err = cache.vek_for(&request()).unwrap_err();
    assert!(
        matches!(&err, CollateralError::Unavailable { reason, .. } if reason.contains("no answer within")),
        "{err:?}"
    );
    // The fetch spawned for it goes on: an async caller now joins it or hits its result.
    cache.get(&request()).await.unwrap();
    assert_eq!(fetcher.fetch_count(), 1);
    cache.vek_for(&request()).unwrap();
    assert_eq!(fetcher.fetch_count(), 1);
}
