//! The SNP validators over the collateral cache, against the real evidence in
//! attestation/test_data: a validator with an empty cache and a local fetcher (serving the real
//! VCEK/VLEK and AMD chain from the testdata files) checks reports from whatever chip they
//! come from. Time is pinned with the injected clock (the evidence is old).

mod snp_support;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use constellation_attestation::snp::{
    CertRole, CollateralError, SigningKey, SnpError, SnpPolicy, VekRef, VekRequest, VekSource,
};
use constellation_attestation::variant::aws_sev_snp::AwsSevSnpValidator;
use constellation_attestation::variant::azure_sev_snp::{
    hcl_ak_from_runtime_data, AzureSevSnpEvidence, AzureSevSnpValidator,
};
use constellation_attestation::variant::qemu_vtpm::QemuVtpmEvidence;
use constellation_attestation::{Measurements, ValidationError, Validator, Variant};
use constellation_joinservice::collateral_cache::{Collateral, CollateralCache, CollateralLimits};
use snp_support::*;

const TTL: Duration = Duration::from_secs(3600);

fn azure_policy() -> SnpPolicy {
    azure_tcb_and_measurement_policy()
}

struct Setup {
    validator: Arc<AzureSevSnpValidator<Arc<dyn VekSource>>>,
    fetcher: Arc<LocalFetcher>,
    clock: Arc<ManualClock>,
}

/// An Azure validator over an empty cache over `fetcher`; cache and validator share one clock.
fn azure_setup(fetcher: Arc<LocalFetcher>) -> Setup {
    let clock = ManualClock::at(AZURE_VALID_AT);
    let cache = CollateralCache::new(fetcher.clone(), clock.clone(), TTL);
    Setup {
        validator: Arc::new(AzureSevSnpValidator::with_collateral(
            Arc::new(cache),
            azure_policy(),
            Measurements::default(),
            clock.clone(),
        )),
        fetcher,
        clock,
    }
}

/// The SNP half of azure-sev-snp on the real report, run the way aTLS runs validators: on
/// the blocking pool.
async fn check_azure(
    validator: &Arc<AzureSevSnpValidator<Arc<dyn VekSource>>>,
    report: Vec<u8>,
) -> Result<(), ValidationError> {
    let validator = validator.clone();
    tokio::task::spawn_blocking(move || {
        let ak = validator.verify_report_and_runtime_data(&report, &azure_runtime_data())?;
        let expected = hcl_ak_from_runtime_data(&azure_runtime_data()).unwrap();
        assert_eq!(ak.to_spki_der(), expected.to_spki_der());
        Ok(())
    })
    .await
    .unwrap()
}

fn refused(err: ValidationError) -> SnpError {
    match err {
        ValidationError::Collateral(CollateralError::Refused { source, .. }) => source,
        other => panic!("expected refused collateral, got {other:?}"),
    }
}

#[tokio::test]
async fn empty_cache_and_local_fetcher_accept_the_real_azure_report() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    check_azure(&s.validator, azure_report()).await.unwrap();
    assert_eq!(s.fetcher.fetch_count(), 1);
    let asked = s.fetcher.requests.lock().unwrap()[0];
    assert_eq!(
        (asked.signing_key, asked.chip_id, asked.reported_tcb.raw),
        (SigningKey::Vcek, azure_chip_id(), AZURE_TCB)
    );
    // The verified chain is cached: the next report needs no fetch (and no chain check).
    check_azure(&s.validator, azure_report()).await.unwrap();
    assert_eq!(s.fetcher.fetch_count(), 1);
}

/// The report names chip X (one CHIP_ID byte changed), the fetcher hands out chip Y's VCEK
/// (the real one): refused before any signature work, naming both chip IDs.
#[tokio::test]
async fn a_fetcher_serving_another_chips_vcek_is_refused_with_both_chip_ids() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    let mut report = azure_report();
    report[CHIP_ID_OFFSET + 5] ^= 0x01;
    let claimed = report[CHIP_ID_OFFSET..CHIP_ID_OFFSET + 64].to_vec();
    let err = check_azure(&s.validator, report.clone()).await.unwrap_err();
    let msg = err.to_string();
    match refused(err) {
        SnpError::ChipIdMismatch { expected, found } => {
            assert_eq!(expected, azure_chip_id().to_vec(), "the VCEK's hwID");
            assert_eq!(found, claimed, "the chip the report names");
        }
        other => panic!("expected ChipIdMismatch, got {other:?}"),
    }
    assert!(msg.contains(&hex::encode(&claimed)), "{msg}");
    // Not cached as good under the wrong key: the refusal is remembered for the negative TTL
    // (no new fetch), after it the next try fetches again.
    check_azure(&s.validator, report.clone()).await.unwrap_err();
    assert_eq!(s.fetcher.fetch_count(), 1);
    s.clock.advance(CollateralLimits::default().negative_ttl);
    check_azure(&s.validator, report).await.unwrap_err();
    assert_eq!(s.fetcher.fetch_count(), 2);
}

/// Chains that must not vouch for the real VCEK, each refused with its reason.
#[tokio::test]
async fn a_fetcher_serving_a_wrong_chain_is_refused_with_the_reason() {
    let genoa_ask = first_der(GENOA_ASK);
    let genoa_ark = first_der(GENOA_ARK);
    let mut asvk_chain = pem_ders(ASVK_ARK);
    let asvk = asvk_chain.remove(0);
    let real = azure_collateral();
    type Expect = fn(&SnpError) -> bool;
    let cases: Vec<(&str, Collateral, Expect)> = vec![
        (
            "ARK replaced by the ASK: root not pinned",
            Collateral {
                ark_der: real.ask_der.clone(),
                ..real.clone()
            },
            |e| matches!(e, SnpError::UnpinnedRoot { fingerprint } if fingerprint.len() == 95),
        ),
        (
            "ASVK (VLEK signer) instead of the ASK",
            Collateral {
                ask_der: asvk,
                ..real.clone()
            },
            |e| {
                matches!(e, SnpError::IssuerMismatch { role: CertRole::Vek, expected, found }
                    if expected == "SEV-VLEK-Milan" && found == "SEV-Milan")
            },
        ),
        (
            "Genoa ASK and ARK under a Milan VCEK (cross-product)",
            Collateral {
                ask_der: genoa_ask.clone(),
                ark_der: genoa_ark.clone(),
                ..real.clone()
            },
            |e| {
                matches!(e, SnpError::IssuerMismatch { role: CertRole::Vek, expected, found }
                    if expected == "SEV-Genoa" && found == "SEV-Milan")
            },
        ),
        (
            "Milan ASK under the Genoa ARK (cross-product root)",
            Collateral {
                ark_der: genoa_ark,
                ..real.clone()
            },
            |e| {
                matches!(e, SnpError::IssuerMismatch { role: CertRole::Intermediate, expected, found }
                    if expected == "ARK-Genoa" && found == "ARK-Milan")
            },
        ),
    ];
    for (name, collateral, expected) in cases {
        let s = azure_setup(LocalFetcher::serving(collateral));
        let err = refused(check_azure(&s.validator, azure_report()).await.unwrap_err());
        assert!(expected(&err), "{name}: got {err:?} ({err})");
    }
}

#[tokio::test]
async fn fetcher_down_with_a_stale_entry_still_accepts() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    check_azure(&s.validator, azure_report()).await.unwrap();
    s.clock.advance(TTL * 5);
    s.fetcher.set_down(true);
    check_azure(&s.validator, azure_report()).await.unwrap();
    assert_eq!(s.fetcher.fetch_count(), 2, "the refresh was tried");
}

#[tokio::test]
async fn fetcher_down_and_nothing_cached_is_a_typed_error_through_validate() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    s.fetcher.set_down(true);
    // The full Validator::validate path (the TPM half is never reached).
    let evidence = AzureSevSnpEvidence {
        variant: Variant::AzureSevSnp,
        report: azure_report(),
        runtime_data: azure_runtime_data(),
        tpm: QemuVtpmEvidence {
            variant: Variant::QemuVtpm,
            attest: vec![1],
            signature: vec![2],
            pcrs: BTreeMap::new(),
            ak: vec![3],
            event_log: None,
        },
    }
    .to_bytes();
    let validator = s.validator.clone();
    let err = tokio::task::spawn_blocking(move || validator.validate(&evidence, &[0; 32]))
        .await
        .unwrap()
        .unwrap_err();
    let msg = err.to_string();
    match err {
        ValidationError::Collateral(CollateralError::Unavailable {
            signer,
            chip_id,
            tcb,
            reason,
        }) => {
            assert_eq!(signer, SigningKey::Vcek);
            assert_eq!(chip_id, azure_chip_id());
            assert_eq!(tcb, AZURE_TCB);
            assert!(reason.contains("503"), "{reason}");
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(
        msg.contains("0x5d06000000000002") && msg.contains("503"),
        "{msg}"
    );
}

/// A cached VCEK is re-checked at the validator's clock on every report: once it expires the
/// report is refused, although the cache entry itself is still fresh.
#[tokio::test]
async fn a_cached_vcek_that_expired_is_refused_at_validation_time() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    check_azure(&s.validator, azure_report()).await.unwrap();
    s.clock.set(AZURE_VCEK_EXPIRED_AT);
    s.fetcher.set_down(true); // the refresh fails; the stale entry is what gets checked
    let err = check_azure(&s.validator, azure_report()).await.unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Snp(SnpError::CertificateExpired {
                role: CertRole::Vek,
                ..
            })
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn a_vcek_signed_report_with_chip_id_masked_is_refused_without_a_fetch() {
    let s = azure_setup(LocalFetcher::serving(azure_collateral()));
    let mut report = azure_report();
    report[CHIP_ID_OFFSET..CHIP_ID_OFFSET + 64].fill(0);
    let err = check_azure(&s.validator, report).await.unwrap_err();
    assert!(
        matches!(
            err,
            ValidationError::Collateral(CollateralError::ChipIdMasked { tcb: AZURE_TCB })
        ),
        "{err:?}"
    );
    assert_eq!(s.fetcher.fetch_count(), 0);
}

/// Counts how many validations asked the source, to know when all of them are waiting.
#[derive(Debug)]
struct Entered {
    inner: CollateralCache,
    calls: AtomicUsize,
}

impl VekSource for Entered {
    fn vek_for(&self, request: &VekRequest) -> Result<VekRef<'_>, CollateralError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.inner.vek_for(request)
    }
}

impl fmt::Display for Entered {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} calls", self.calls.load(Ordering::SeqCst))
    }
}

/// N validations of a cold key at once, each on its own blocking thread as aTLS runs them:
/// the fetch is held until all N have asked, and exactly one fetch happens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_validations_of_a_cold_key_make_exactly_one_fetch() {
    const N: usize = 16;
    let fetcher = LocalFetcher::gated(azure_collateral());
    let clock = ManualClock::at(AZURE_VALID_AT);
    let source = Arc::new(Entered {
        inner: CollateralCache::new(fetcher.clone(), clock.clone(), TTL),
        calls: AtomicUsize::new(0),
    });
    let validator = Arc::new(AzureSevSnpValidator::with_collateral(
        source.clone(),
        azure_policy(),
        Measurements::default(),
        clock,
    ));
    let tasks: Vec<_> = (0..N)
        .map(|_| tokio::spawn(check_azure_owned(validator.clone())))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while source.calls.load(Ordering::SeqCst) < N {
        assert!(tokio::time::Instant::now() < deadline, "only {source}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Every validation is inside the source and the one fetch is held at the gate.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(fetcher.fetch_count(), 1);
    fetcher.open();
    for task in tasks {
        task.await.unwrap().unwrap();
    }
    assert_eq!(fetcher.fetch_count(), 1);
}

async fn check_azure_owned(
    validator: Arc<AzureSevSnpValidator<Arc<dyn VekSource>>>,
) -> Result<(), ValidationError> {
    check_azure(&validator, azure_report()).await
}

/// aws-sev-snp over the cache: the VLEK-signed v3 report (CHIP_ID masked) is looked up by
/// signer and TCB, and the real VLEK/ASVK/ARK verify it at a time before the VLEK expired.
#[tokio::test]
async fn aws_validator_over_the_cache_accepts_the_real_vlek_report() {
    let fetcher = LocalFetcher::serving(aws_collateral());
    let clock = ManualClock::at(AWS_VALID_AT);
    let cache = CollateralCache::new(fetcher.clone(), clock.clone(), TTL);
    let validator = Arc::new(AwsSevSnpValidator::with_collateral(
        Arc::new(cache),
        aws_tcb_policy(),
        Measurements::default(),
        clock,
    ));
    let v = validator.clone();
    let report = tokio::task::spawn_blocking(move || {
        v.verify_report_data(&aws_report(), &aws_report_data())
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(report.signing_key, SigningKey::Vlek);
    let asked = fetcher.requests.lock().unwrap()[0];
    assert_eq!(asked.signing_key, SigningKey::Vlek);
    assert_eq!(asked.chip_id, [0; 64]);
    assert_eq!(asked.reported_tcb.tcb(), report.reported_tcb.tcb());
    assert_eq!(asked.cpuid, report.cpuid);
    // The VCEK chain is no VLEK: a fetcher serving it for this report is refused.
    let fetcher = LocalFetcher::serving(azure_collateral());
    let clock = ManualClock::at(AWS_VALID_AT);
    let wrong = AwsSevSnpValidator::with_collateral(
        Arc::new(CollateralCache::new(fetcher, clock.clone(), TTL)),
        SnpPolicy::default(),
        Measurements::default(),
        clock,
    );
    let err = tokio::task::spawn_blocking(move || {
        wrong.verify_report_data(&aws_report(), &aws_report_data())
    })
    .await
    .unwrap()
    .unwrap_err();
    assert!(matches!(
        refused(err),
        SnpError::SignerMismatch {
            expected: SigningKey::Vlek,
            found: SigningKey::Vcek
        }
    ),);
}
