//! The variant factory on real parts: `issuer_for` on a real swtpm and `validator_for` under a
//! pinned-key policy (qemu-vtpm), and an azure-sev-snp validator from the factory running the
//! SNP checks on the real Azure evidence (test_data/snp-azure).

mod snp_common;
mod tpm_support;

use std::sync::Arc;

use constellation_attestation::measurements::{sha256, Measurement, Measurements};
use constellation_attestation::snp::{SnpError, REPORT_LEN};
use constellation_attestation::tpm::AkKind;
use constellation_attestation::variant::azure_sev_snp::{
    hcl_ak_from_runtime_data, AzureSevSnpEvidence,
};
use constellation_attestation::variant::qemu_vtpm::QemuVtpmEvidence;
use constellation_attestation::variant::{AkAnchor, FactoryError, SnpAnchor};
use constellation_attestation::{
    issuer_for, pcr, validator_for, Issuer, ValidationError, ValidatorPolicy, Variant,
};

const BINDING: [u8; 32] = [0x5a; 32];

/// A fresh swtpm's policy: every enforced PCR of the layout still zero.
fn zero_policy() -> Measurements {
    Measurements(
        pcr::ENFORCED
            .iter()
            .map(|&i| (i, Measurement::enforce([0; 32])))
            .collect(),
    )
}

#[test]
fn qemu_vtpm_from_the_factory_quotes_the_layout_and_accepts_only_its_pinned_key() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let issuer = issuer_for(Variant::QemuVtpm, &swtpm.tcti()).unwrap();
    assert_eq!(issuer.variant(), Variant::QemuVtpm);
    let ak = issuer.ak_public().unwrap();
    assert_eq!(ak.kind(), Variant::QemuVtpm.facts().ak_kind);
    let evidence = issuer.issue(&BINDING).unwrap();
    // Every PCR of the variant's facts is quoted.
    let parsed = QemuVtpmEvidence::from_bytes(&evidence).unwrap();
    let quoted: Vec<u32> = parsed.pcrs.keys().copied().collect();
    assert_eq!(quoted, pcr::QUOTED.collect::<Vec<_>>());

    let pinned = validator_for(
        Variant::QemuVtpm,
        ValidatorPolicy::pinned(vec![ak.clone()], zero_policy()),
    )
    .unwrap();
    let verdict = pinned.validate(&evidence, &BINDING).unwrap();
    assert_eq!(verdict.ak_fingerprint, ak.fingerprint());

    // The same evidence under a policy pinning no key: refused, naming the key.
    let nobody = validator_for(
        Variant::QemuVtpm,
        ValidatorPolicy::pinned(vec![], zero_policy()),
    )
    .unwrap();
    match nobody.validate(&evidence, &BINDING) {
        Err(ValidationError::UnpinnedKey {
            fingerprint,
            pinned: 0,
        }) => assert_eq!(fingerprint, hex::encode(ak.fingerprint())),
        other => panic!("expected UnpinnedKey, got {other:?}"),
    }

    // After PCR 15 is extended through the issuer's TPM, the zero policy refuses.
    issuer
        .with_tpm(|tpm| tpm.pcr_extend(pcr::CLUSTER_ID, &sha256(b"cluster")))
        .unwrap();
    let bound = issuer.issue(&BINDING).unwrap();
    assert!(matches!(
        pinned.validate(&bound, &BINDING),
        Err(ValidationError::Measurements(_))
    ));
}

#[test]
fn a_pinned_key_policy_cannot_make_an_snp_validator() {
    // An SNP variant's key is vouched for by its report: a pinned key would be silently
    // ignored, so the factory refuses the policy instead.
    for v in [Variant::AzureSevSnp, Variant::AwsSevSnp] {
        match validator_for(v, ValidatorPolicy::pinned(vec![], zero_policy())) {
            Err(FactoryError::AnchorMismatch { variant, .. }) => assert_eq!(variant, v),
            other => panic!("{v}: expected AnchorMismatch, got {:?}", other.err()),
        }
    }
}

fn azure_evidence(report: Vec<u8>) -> Vec<u8> {
    // A TPM half is needed for the evidence to parse; an unsigned one suffices because the
    // SNP half is checked first.
    AzureSevSnpEvidence {
        variant: Variant::AzureSevSnp,
        report,
        runtime_data: snp_common::read(snp_common::AZURE_RUNTIME_DATA),
        tpm: QemuVtpmEvidence {
            variant: Variant::QemuVtpm,
            attest: vec![],
            signature: vec![],
            pcrs: Default::default(),
            ak: vec![],
            event_log: None,
        },
    }
    .to_bytes()
}

#[test]
fn azure_from_the_factory_checks_the_real_report_then_the_quote_by_the_vouched_key() {
    let anchor = SnpAnchor {
        vek: Arc::new(snp_common::azure_vek()),
        policy: snp_common::azure_tcb_and_measurement_policy(),
        clock: Arc::new(snp_common::clock(snp_common::AZURE_VALID_AT)),
    };
    let policy = ValidatorPolicy::snp(anchor, zero_policy());
    assert!(matches!(policy.anchor, AkAnchor::Snp(_)));
    let validator = validator_for(Variant::AzureSevSnp, policy).unwrap();
    assert_eq!(validator.variant(), Variant::AzureSevSnp);
    let report = snp_common::read(snp_common::AZURE_REPORT)[..REPORT_LEN].to_vec();

    // The real report passes the SNP half; the (empty) quote is then checked against the HCL
    // AK the report vouches for.
    let err = validator
        .validate(&azure_evidence(report.clone()), &BINDING)
        .unwrap_err();
    let hcl_ak =
        hcl_ak_from_runtime_data(&snp_common::read(snp_common::AZURE_RUNTIME_DATA)).unwrap();
    assert_eq!(hcl_ak.kind(), AkKind::Rsa2048);
    assert!(matches!(err, ValidationError::Quote(_)), "{err:?}");

    // A flipped byte inside the signed report: the SNP half refuses.
    let mut tampered = report;
    tampered[0x90] ^= 1;
    let err = validator
        .validate(&azure_evidence(tampered), &BINDING)
        .unwrap_err();
    assert!(
        matches!(err, ValidationError::Snp(SnpError::SignatureInvalid)),
        "{err:?}"
    );
}
