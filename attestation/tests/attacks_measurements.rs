//! Attacks that try to make a measurements policy meaningless: every entry warn-only, the
//! cluster-ID PCR left unenforced, two spellings of one index in one file, and an older (but
//! genuinely signed) measurements file served after a newer one was accepted.

use std::collections::BTreeMap;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use base64::Engine as _;
use constellation_attestation::measurements::{
    ClusterIdPcrState, Measurement, Measurements, MeasurementsError, CLUSTER_ID_PCR,
};
use constellation_attestation::signed_measurements::{
    CosignPublicKey, MeasurementsVersion, SignedMeasurementsError,
};

fn hex32(b: u8) -> String {
    hex::encode([b; 32])
}

fn entry(index: &str, b: u8, warn_only: bool) -> String {
    format!(
        r#""{index}": {{"expected": "{}", "warnOnly": {warn_only}}}"#,
        hex32(b)
    )
}

fn policy(entries: &[String]) -> Vec<u8> {
    format!("{{{}}}", entries.join(", ")).into_bytes()
}

#[test]
fn all_warn_only_policy_is_refused_at_parse() {
    let json = policy(&[entry("4", 4, true), entry("15", 0, true)]);
    match Measurements::from_json(&json) {
        Err(MeasurementsError::AllWarnOnly { warn_only }) => assert_eq!(warn_only, vec![4, 15]),
        other => panic!("expected AllWarnOnly, got {other:?}"),
    }
    let validated = Measurements(BTreeMap::from([
        (4, Measurement::warn_only([4; 32])),
        (9, Measurement::warn_only([9; 32])),
    ]))
    .validate();
    match validated {
        Err(MeasurementsError::AllWarnOnly { warn_only }) => assert_eq!(warn_only, vec![4, 9]),
        other => panic!("expected AllWarnOnly, got {other:?}"),
    }
}

#[test]
fn policy_leaving_cluster_id_pcr_unenforced_is_refused() {
    match Measurements::from_json(&policy(&[entry("4", 4, false)])) {
        Err(MeasurementsError::ClusterIdPcrNotEnforced { found }) => {
            assert_eq!(found, ClusterIdPcrState::Missing)
        }
        other => panic!("expected ClusterIdPcrNotEnforced(Missing), got {other:?}"),
    }
    match Measurements::from_json(&policy(&[entry("4", 4, false), entry("15", 0, true)])) {
        Err(MeasurementsError::ClusterIdPcrNotEnforced { found }) => {
            assert_eq!(found, ClusterIdPcrState::WarnOnly)
        }
        other => panic!("expected ClusterIdPcrNotEnforced(WarnOnly), got {other:?}"),
    }
    // The honest policy passes, and the explicit joiner view drops only PCR 15.
    let ok =
        Measurements::from_json(&policy(&[entry("4", 4, false), entry("15", 0, false)])).unwrap();
    let member = ok.clone().without_cluster_id().unwrap();
    assert_eq!(member.indices(), vec![4]);
    assert!(!member.0.contains_key(&CLUSTER_ID_PCR));
}

#[test]
fn joiner_view_is_only_derived_from_a_valid_policy() {
    // The PCR-15-less view cannot be had from a policy that fails validation...
    let json = policy(&[entry("4", 4, false), entry("15", 0, true)]);
    let unchecked = Measurements(BTreeMap::from([
        (4, Measurement::enforce([4; 32])),
        (CLUSTER_ID_PCR, Measurement::warn_only([0; 32])),
    ]));
    assert!(Measurements::from_json(&json).is_err());
    match unchecked.without_cluster_id() {
        Err(MeasurementsError::ClusterIdPcrNotEnforced { found }) => {
            assert_eq!(found, ClusterIdPcrState::WarnOnly)
        }
        other => panic!("expected ClusterIdPcrNotEnforced, got {other:?}"),
    }
    // ...and it cannot be written to a file and parsed back as a policy.
    let full =
        Measurements::from_json(&policy(&[entry("4", 4, false), entry("15", 0, false)])).unwrap();
    let view = full.without_cluster_id().unwrap();
    assert!(matches!(
        Measurements::from_json(view.to_json().as_bytes()),
        Err(MeasurementsError::ClusterIdPcrNotEnforced {
            found: ClusterIdPcrState::Missing
        })
    ));
}

#[test]
fn index_aliases_in_one_file_are_a_parse_error() {
    for alias in ["04", "+4", " 4", "4 ", "004"] {
        let json = policy(&[
            entry("4", 4, false),
            entry(alias, 9, true),
            entry("15", 0, false),
        ]);
        match Measurements::from_json(&json) {
            Err(MeasurementsError::NonCanonicalIndex { found, canonical }) => {
                assert_eq!((found.as_str(), canonical.as_str()), (alias, "4"))
            }
            other => panic!("alias {alias:?}: expected NonCanonicalIndex, got {other:?}"),
        }
        // Serde (stored state) applies the same rule.
        assert!(serde_json::from_slice::<Measurements>(&json).is_err());
    }
    // The same spelling twice: a JSON object a map would silently collapse.
    let twice = policy(&[
        entry("4", 4, false),
        entry("4", 5, true),
        entry("15", 0, false),
    ]);
    match Measurements::from_json(&twice) {
        Err(MeasurementsError::DuplicateIndex { index }) => assert_eq!(index, 4),
        other => panic!("expected DuplicateIndex, got {other:?}"),
    }
    assert!(serde_json::from_slice::<Measurements>(&twice).is_err());
}

/// A cosign-style signer: P-256 key, DER signature, base64.
struct Signer {
    key: EcdsaKeyPair,
    public: CosignPublicKey,
}

impl Signer {
    fn new() -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref()).unwrap();
        let spki = key.public_key().as_der().unwrap();
        let pem =
            der::pem::encode_string("PUBLIC KEY", der::pem::LineEnding::LF, spki.as_ref()).unwrap();
        let public = CosignPublicKey::from_pem(pem.as_bytes()).unwrap();
        Self { key, public }
    }

    fn sign(&self, file: &[u8]) -> Vec<u8> {
        let sig = self.key.sign(&SystemRandom::new(), file).unwrap();
        base64::engine::general_purpose::STANDARD
            .encode(sig.as_ref())
            .into_bytes()
    }
}

fn signed_file(version: &str) -> Vec<u8> {
    format!(
        r#"{{"version":"{version}","ref":"-","stream":"stable","list":[{{"csp":"QEMU","attestationVariant":"qemu-vtpm","measurements":{{{}}}}}]}}"#,
        entry("15", 0, false)
    )
    .into_bytes()
}

#[test]
fn rollback_to_an_older_signed_measurements_file_is_refused() {
    let signer = Signer::new();
    let old = signed_file("v2.13.0");
    let new = signed_file("v2.14.0");
    let (old_sig, new_sig) = (signer.sign(&old), signer.sign(&new));

    let accepted = signer
        .public
        .verify_versioned(&new, &new_sig, None)
        .unwrap()
        .version;
    assert_eq!(accepted.as_str(), "v2.14.0");

    // The old file is genuinely signed: the signature alone would accept it.
    signer.public.verify(&old, &old_sig).unwrap();
    match signer
        .public
        .verify_versioned(&old, &old_sig, Some(&accepted))
    {
        Err(SignedMeasurementsError::Rollback {
            last_accepted,
            found,
        }) => {
            assert_eq!(last_accepted, "v2.14.0");
            assert_eq!(found, "v2.13.0");
        }
        other => panic!("expected Rollback, got {other:?}"),
    }
    // The same release again, and a newer one, are accepted and advance the state.
    let same = signer
        .public
        .verify_versioned(&new, &new_sig, Some(&accepted))
        .unwrap();
    assert_eq!(same.version, accepted);
    let newer = signed_file("v2.14.1");
    let got = signer
        .public
        .verify_versioned(&newer, &signer.sign(&newer), Some(&accepted))
        .unwrap();
    assert_eq!(got.version.as_str(), "v2.14.1");
    assert!(got.version > accepted);
}

#[test]
fn rollback_from_a_release_to_its_pre_release_is_refused() {
    let signer = Signer::new();
    let release = MeasurementsVersion::parse("v2.14.0").unwrap();
    let pre = signed_file("v2.14.0-rc.1");
    match signer
        .public
        .verify_versioned(&pre, &signer.sign(&pre), Some(&release))
    {
        Err(SignedMeasurementsError::Rollback { found, .. }) => assert_eq!(found, "v2.14.0-rc.1"),
        other => panic!("expected Rollback, got {other:?}"),
    }
    // Semantic-version precedence, not string order: 2.10 is after 2.9, rc.10 after rc.9.
    let v = |s| MeasurementsVersion::parse(s).unwrap();
    assert!(v("v2.10.0") > v("v2.9.0"));
    assert!(v("v1.0.0-rc.10") > v("v1.0.0-rc.9"));
    assert!(v("v1.0.0-rc.1") > v("v1.0.0-rc"));
    assert!(v("v1.0.0-alpha") > v("v1.0.0-1"));
}

#[test]
fn signed_file_without_a_usable_version_is_refused() {
    let signer = Signer::new();
    for file in [
        br#"{"list":[]}"#.to_vec(),
        br#"{"version":7}"#.to_vec(),
        signed_file("latest"),
        signed_file("v1.2"),
        signed_file("v01.2.3"),
        signed_file("v1.2.3+build"),
    ] {
        match signer
            .public
            .verify_versioned(&file, &signer.sign(&file), None)
        {
            Err(SignedMeasurementsError::Version(_)) => {}
            other => panic!(
                "{}: expected Version error, got {other:?}",
                String::from_utf8_lossy(&file)
            ),
        }
    }
}
