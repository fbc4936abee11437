//! qemu-vtpm issue -> validate against real swtpm instances (one per test), and every way the
//! validator must refuse.

mod tpm_support;

use std::collections::BTreeMap;

use constellation_attestation::measurements::{
    cluster_id_pcr, pcr_extend, sha256, Digest, MeasurementsError,
};
use constellation_attestation::tpm::{AkKind, QuoteError, Swtpm, Tpm};
use constellation_attestation::variant::qemu_vtpm::{
    QemuVtpmEvidence, QemuVtpmIssuer, QemuVtpmValidator,
};
use constellation_attestation::{
    Issuer, Measurement, Measurements, ValidationError, Validator, Variant,
};

const QUOTED: [u32; 4] = [0, 1, 4, 15];
const CLUSTER_ID: &[u8] = b"cluster id of the test cluster";

/// A node: its swtpm, PCR 4 and 15 extended, an issuer over QUOTED, and the enforcing
/// measurements that match it (PCR 15 computed in software, not read back).
/// Fields drop in order: the TPM connection before the swtpm process, before its state dir.
struct Node {
    issuer: QemuVtpmIssuer,
    measurements: Measurements,
    _swtpm: Swtpm,
    _dir: tempfile::TempDir,
}

fn node(kind: AkKind) -> Node {
    let (dir, swtpm) = tpm_support::swtpm();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    tpm.pcr_extend(4, &sha256(b"kernel")).unwrap();
    tpm.pcr_extend(15, &sha256(CLUSTER_ID)).unwrap();
    let issuer = QemuVtpmIssuer::new(tpm, kind, QUOTED.to_vec()).unwrap();
    let mut measurements = Measurements::default();
    measurements.0.insert(0, Measurement::enforce([0; 32]));
    measurements.0.insert(1, Measurement::enforce([0; 32]));
    measurements.0.insert(
        4,
        Measurement::enforce(pcr_extend(&[0; 32], &sha256(b"kernel"))),
    );
    measurements
        .0
        .insert(15, Measurement::enforce(cluster_id_pcr(CLUSTER_ID)));
    Node {
        issuer,
        measurements,
        _swtpm: swtpm,
        _dir: dir,
    }
}

impl Node {
    fn validator(&self) -> QemuVtpmValidator {
        QemuVtpmValidator::new(
            vec![self.issuer.ak_public().unwrap()],
            self.measurements.clone(),
        )
    }
}

fn binding(label: &str) -> Digest {
    sha256(label.as_bytes())
}

fn tamper(evidence: &[u8], f: impl FnOnce(&mut QemuVtpmEvidence)) -> Vec<u8> {
    let mut ev = QemuVtpmEvidence::from_bytes(evidence).unwrap();
    f(&mut ev);
    ev.to_bytes()
}

fn quote_error(r: Result<constellation_attestation::Verdict, ValidationError>) -> QuoteError {
    match r {
        Err(ValidationError::Quote(e)) => e,
        other => panic!("expected a quote error, got {other:?}"),
    }
}

fn accepts(kind: AkKind) {
    let node = node(kind);
    let ak = node.issuer.ak_public().unwrap();
    assert_eq!(ak.kind(), kind);
    let nonce = binding("fresh nonce");
    let evidence = node.issuer.issue(&nonce).unwrap();
    let verdict = node.validator().validate(&evidence, &nonce).unwrap();
    assert_eq!(verdict.variant, Variant::QemuVtpm);
    assert_eq!(verdict.ak_fingerprint, ak.fingerprint());
    assert!(verdict.warnings.is_empty());
    assert_eq!(
        verdict.pcrs.keys().copied().collect::<Vec<_>>(),
        QUOTED.to_vec()
    );
    assert_eq!(verdict.pcrs[&15], cluster_id_pcr(CLUSTER_ID));

    // The signature is checked with the key's own algorithm: tampering must fail it.
    let flipped = tamper(&evidence, |ev| {
        let last = ev.signature.len() - 1;
        ev.signature[last] ^= 0x01;
    });
    assert!(matches!(
        quote_error(node.validator().validate(&flipped, &nonce)),
        QuoteError::BadSignature { .. }
    ));
}

#[test]
fn ecc_ak_issue_validate_accepts() {
    accepts(AkKind::EcdsaP256);
}

#[test]
fn rsa_ak_issue_validate_accepts() {
    accepts(AkKind::Rsa2048);
}

#[test]
fn every_tampering_is_refused_with_its_own_error() {
    let node = node(AkKind::EcdsaP256);
    let validator = node.validator();
    let nonce = binding("nonce");
    let evidence = node.issuer.issue(&nonce).unwrap();
    assert!(validator.validate(&evidence, &nonce).is_ok());

    // Wrong nonce: the verifier expects a different binding.
    let other = binding("another session");
    assert_eq!(
        quote_error(validator.validate(&evidence, &other)),
        QuoteError::NonceMismatch {
            expected: hex::encode(other),
            found: hex::encode(nonce)
        }
    );

    // A flipped TPMS_ATTEST byte in clockInfo: structure intact, only the signature catches it.
    let flipped_attest = tamper(&evidence, |ev| {
        let at = constellation_attestation::tpm::QuoteAttest::parse(&ev.attest)
            .unwrap()
            .clock_info_offset();
        ev.attest[at + 3] ^= 0x40;
    });
    assert!(matches!(
        quote_error(validator.validate(&flipped_attest, &nonce)),
        QuoteError::BadSignature { .. }
    ));

    // A flipped signature byte (inside r).
    let flipped_sig = tamper(&evidence, |ev| ev.signature[10] ^= 0x01);
    assert!(matches!(
        quote_error(validator.validate(&flipped_sig, &nonce)),
        QuoteError::BadSignature { .. }
    ));

    // A claimed PCR value that is not what the TPM quoted.
    let wrong_pcr = tamper(&evidence, |ev| {
        ev.pcrs.insert(4, [0x44; 32]);
    });
    assert!(matches!(
        quote_error(validator.validate(&wrong_pcr, &nonce)),
        QuoteError::PcrDigestMismatch { .. }
    ));

    // A quoted PCR left out of the evidence.
    let missing = tamper(&evidence, |ev| {
        ev.pcrs.remove(&15);
    });
    assert_eq!(
        quote_error(validator.validate(&missing, &nonce)),
        QuoteError::PcrSelectionMismatch {
            expected: vec![0, 1, 4],
            found: QUOTED.to_vec()
        }
    );

    // Wrong variant name.
    let other_variant = tamper(&evidence, |ev| ev.variant = Variant::AzureSevSnp);
    assert!(matches!(
        validator.validate(&other_variant, &nonce),
        Err(ValidationError::VariantMismatch {
            expected: Variant::QemuVtpm,
            found: Variant::AzureSevSnp
        })
    ));

    // Not JSON at all.
    assert!(matches!(
        validator.validate(b"\x00garbage", &nonce),
        Err(ValidationError::Malformed(_))
    ));
}

#[test]
fn unpinned_or_swapped_attestation_key_is_refused() {
    let node = node(AkKind::EcdsaP256);
    let nonce = binding("nonce");
    let evidence = node.issuer.issue(&nonce).unwrap();
    let own = node.issuer.ak_public().unwrap();

    // A verifier that pinned another TPM's AK.
    let (_dir, other_swtpm) = tpm_support::swtpm();
    let mut other_tpm = Tpm::open(&other_swtpm.tcti()).unwrap();
    let foreign = other_tpm.attestation_key(AkKind::EcdsaP256).unwrap();
    assert_ne!(foreign, own, "two TPMs must have different AKs");
    let validator = QemuVtpmValidator::new(vec![foreign.clone()], node.measurements.clone());
    match validator.validate(&evidence, &nonce) {
        Err(ValidationError::UnpinnedKey {
            fingerprint,
            pinned,
        }) => {
            assert_eq!(fingerprint, hex::encode(own.fingerprint()));
            assert_eq!(pinned, 1);
        }
        other => panic!("expected UnpinnedKey, got {other:?}"),
    }

    // Evidence claiming a pinned AK it was not signed with.
    let both = QemuVtpmValidator::new(vec![own, foreign.clone()], node.measurements.clone());
    let swapped = tamper(&evidence, |ev| ev.ak = foreign.to_spki_der());
    assert!(matches!(
        quote_error(both.validate(&swapped, &nonce)),
        QuoteError::BadSignature { .. }
    ));
}

#[test]
fn measurements_enforced_fail_warn_only_warns_unquoted_fails() {
    let node = node(AkKind::EcdsaP256);
    let nonce = binding("nonce");
    let evidence = node.issuer.issue(&nonce).unwrap();
    let ak = node.issuer.ak_public().unwrap();
    let actual4 = pcr_extend(&[0; 32], &sha256(b"kernel"));

    let mut enforced = node.measurements.clone();
    enforced.0.insert(4, Measurement::enforce([0x99; 32]));
    let validator = QemuVtpmValidator::new(vec![ak.clone()], enforced);
    match validator.validate(&evidence, &nonce) {
        Err(ValidationError::Measurements(MeasurementsError::Mismatch(m))) => {
            assert_eq!(m.len(), 1);
            assert_eq!(
                (m[0].index, m[0].expected, m[0].found),
                (4, [0x99; 32], Some(actual4))
            );
        }
        other => panic!("expected an enforced mismatch, got {other:?}"),
    }

    let mut warn = node.measurements.clone();
    warn.0.insert(4, Measurement::warn_only([0x99; 32]));
    let verdict = QemuVtpmValidator::new(vec![ak.clone()], warn)
        .validate(&evidence, &nonce)
        .unwrap();
    assert_eq!(verdict.warnings.len(), 1);
    assert_eq!(verdict.warnings[0].index, 4);
    assert_eq!(verdict.warnings[0].found, Some(actual4));

    // PCR 7 is measured (even warn-only) but not quoted: refused.
    let mut unquoted = node.measurements.clone();
    unquoted.0.insert(7, Measurement::warn_only([0; 32]));
    match QemuVtpmValidator::new(vec![ak], unquoted).validate(&evidence, &nonce) {
        Err(ValidationError::Measurements(MeasurementsError::Mismatch(m))) => {
            assert_eq!((m[0].index, m[0].found), (7, None));
        }
        other => panic!("expected an unquoted-PCR failure, got {other:?}"),
    }
}

#[test]
fn attestation_key_is_the_same_after_reopening_the_same_tpm_state() {
    let dir = tempfile::tempdir().unwrap();
    let (ecc, rsa) = {
        let swtpm = Swtpm::start(dir.path()).unwrap();
        let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
        let ecc = tpm.attestation_key(AkKind::EcdsaP256).unwrap();
        let rsa = tpm.attestation_key(AkKind::Rsa2048).unwrap();
        // Switching back recreates the primary: same key.
        assert_eq!(tpm.attestation_key(AkKind::EcdsaP256).unwrap(), ecc);
        (ecc, rsa)
    };
    let swtpm = Swtpm::start(dir.path()).unwrap();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    assert_eq!(tpm.attestation_key(AkKind::Rsa2048).unwrap(), rsa);
    assert_eq!(tpm.attestation_key(AkKind::EcdsaP256).unwrap(), ecc);
    assert_eq!(tpm.ak_public().unwrap(), ecc);

    // A different TPM (fresh state) has different seeds, so different keys.
    let (_other_dir, other) = tpm_support::swtpm();
    let mut other = Tpm::open(&other.tcti()).unwrap();
    assert_ne!(other.attestation_key(AkKind::EcdsaP256).unwrap(), ecc);
}

#[test]
fn pcr_read_and_extend_cover_all_24_pcrs() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let all: Vec<u32> = (0..24).collect();
    let before = tpm.pcr_read(&all).unwrap();
    assert_eq!(before.len(), 24);
    let mut expected = before.clone();
    for index in [3u32, 9, 15, 23] {
        let event = sha256(format!("event {index}").as_bytes());
        tpm.pcr_extend(index, &event).unwrap();
        expected.insert(index, pcr_extend(&before[&index], &event));
    }
    assert_eq!(tpm.pcr_read(&all).unwrap(), expected);
    assert!(tpm.pcr_extend(24, &[0; 32]).is_err());
    assert!(tpm.quote(&[0; 32], &[0]).is_err(), "no AK loaded yet");

    // A quote over all 24 PCRs carries all of them.
    tpm.attestation_key(AkKind::EcdsaP256).unwrap();
    let ev = tpm.quote(&[7; 32], &all).unwrap();
    assert_eq!(ev.pcrs, expected);
    let ak = tpm.ak_public().unwrap();
    let q = constellation_attestation::tpm::verify_quote(
        &ak,
        &ev.attest,
        &ev.signature,
        &[7; 32],
        &ev.pcrs,
    )
    .unwrap();
    assert_eq!(q.pcrs.len(), 24);
}

#[test]
fn detached_swtpm_outlives_its_launcher_and_stops() {
    let dir = tempfile::tempdir().unwrap();
    let handle = Swtpm::spawn_detached(dir.path()).unwrap();
    // Stops the daemon even if an assertion below fails (it is not our child).
    struct StopOnDrop(constellation_attestation::tpm::SwtpmHandle);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            let _ = self.0.stop();
        }
    }
    let _guard = StopOnDrop(handle.clone());
    assert!(handle.is_alive());
    let pid_file = std::fs::read_to_string(dir.path().join("swtpm.pid")).unwrap();
    assert_eq!(pid_file.trim(), handle.pid().to_string());
    {
        let mut tpm = Tpm::open(&handle.tcti()).unwrap();
        tpm.attestation_key(AkKind::EcdsaP256).unwrap();
    }
    // The handle survives a round trip through JSON (the platform keeps it on disk).
    let json = serde_json::to_string(&handle).unwrap();
    let again: constellation_attestation::tpm::SwtpmHandle = serde_json::from_str(&json).unwrap();
    assert_eq!(again, handle);
    again.stop().unwrap();
    assert!(!handle.is_alive());
    assert!(!handle.socket.exists(), "socket removed on stop");
    assert!(Tpm::open(&handle.tcti()).is_err());
    handle.stop().unwrap();
}

#[test]
fn dropping_swtpm_kills_it() {
    let (_dir, swtpm) = tpm_support::swtpm();
    let pid = swtpm.pid();
    let (socket, ctrl) = (swtpm.socket().to_owned(), swtpm.ctrl_socket());
    assert!(socket.exists() && ctrl.exists());
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    drop(swtpm);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!socket.exists() && !ctrl.exists(), "sockets removed");
}

#[test]
fn quote_pcrs_are_the_values_read() {
    // The evidence's PCR map is what pcr_read returns at quote time.
    let node = node(AkKind::EcdsaP256);
    let evidence =
        QemuVtpmEvidence::from_bytes(&node.issuer.issue(&binding("x")).unwrap()).unwrap();
    let read: BTreeMap<u32, Digest> = node.issuer.with_tpm(|tpm| tpm.pcr_read(&QUOTED)).unwrap();
    assert_eq!(evidence.pcrs, read);
}
