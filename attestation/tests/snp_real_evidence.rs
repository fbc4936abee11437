//! SEV-SNP verification against real evidence from Azure and AWS hardware (see the READMEs in
//! attestation/test_data/ for what a correct verifier concludes on each file).

mod snp_common;

use constellation_attestation::snp::{
    self, fingerprint, AttestationReport, CertRole, SigningKey, SnpError, SnpPolicy, Tcb,
    VerifiedVek, POLICY_DEBUG_BIT, REPORT_LEN,
};
use sha2::{Digest as _, Sha256};
use snp_common::*;

const AZURE_MEASUREMENT: &str = "5677f1de87289e7ad2c7e99c805d0468b1a9ccd83f0d245afa5242d405da4d5725852f8c6550564870e5f3206dfb1841";
const AZURE_ID_KEY_DIGEST: &str = "57e229e0ffe5fa92d0faddff6cae0e61c926fc9ef9afd20a8b8cfcf7129db9338cbe5bf3f6987733a2bf65d06dc38fc1";
const AZURE_TCB: Tcb = Tcb {
    bootloader: 2,
    tee: 0,
    snp: 6,
    microcode: 93,
};
const AWS_MEASUREMENT: &str = "5a5cdbad8f540ce4abca0120faec86f62ef7128a4ac711add34d468b5957c82aa2f24e8f111dadc3689b787b88ed0715";

fn arr<const N: usize>(hex_str: &str) -> [u8; N] {
    hex::decode(hex_str)
        .expect("hex")
        .try_into()
        .expect("length")
}

fn azure_report_data() -> [u8; 64] {
    let mut data = [0u8; 64];
    data[..32].copy_from_slice(&Sha256::digest(read(AZURE_RUNTIME_DATA)));
    data
}

/// A policy that pins every value the Azure report is documented to have.
fn azure_policy() -> SnpPolicy {
    SnpPolicy {
        allow_debug: false,
        vmpl: 0,
        minimum_tcb: AZURE_TCB,
        allowed_measurements: Some(vec![arr(AZURE_MEASUREMENT)]),
        allowed_id_key_digests: Some(vec![arr(AZURE_ID_KEY_DIGEST)]),
        report_data: Some(azure_report_data()),
        ..SnpPolicy::default()
    }
}

#[test]
fn azure_report_parses_with_documented_fields() {
    let bytes = azure_report();
    assert_eq!(bytes.len(), 1204, "Azure appends a 20-byte header");
    let r = AttestationReport::parse(&bytes).unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(r.vmpl, 0);
    assert_eq!(r.guest_svn, 2);
    assert_eq!(r.policy.raw, 0x3001f);
    assert!(!r.policy.debug_allowed);
    assert!(r.policy.smt_allowed);
    assert_eq!(r.signature_algo, 1);
    assert_eq!(r.signing_key, SigningKey::Vcek);
    assert_eq!(r.platform_info.raw, 1);
    assert_eq!(r.reported_tcb.tcb(), AZURE_TCB);
    assert_eq!(r.reported_tcb.raw, 0x5d06_0000_0000_0002);
    assert_eq!(r.current_tcb.tcb(), AZURE_TCB);
    assert_eq!(r.committed_tcb.tcb(), AZURE_TCB);
    assert_eq!(r.launch_tcb.tcb(), AZURE_TCB);
    assert_eq!(r.cpuid, None, "v2 reports carry no CPUID");
    assert_eq!(hex::encode(r.measurement), AZURE_MEASUREMENT);
    assert_eq!(hex::encode(r.id_key_digest), AZURE_ID_KEY_DIGEST);
    assert_eq!(r.report_data, azure_report_data());
    assert!(!r.chip_id_masked());
    // Trailing bytes are ignored: the first 1184 bytes parse to the same report.
    assert_eq!(AttestationReport::parse(&bytes[..REPORT_LEN]).unwrap(), r);

    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["version"], 2);
    assert_eq!(json["measurement"], AZURE_MEASUREMENT);
    assert_eq!(json["signing_key"], "vcek");
    assert_eq!(json["reported_tcb"]["microcode"], 93);
    assert_eq!(json["policy"]["raw"], 0x3001f);
}

#[test]
fn azure_report_verifies_with_vcek_chain() {
    let vek = azure_vek();
    assert_eq!(vek.kind(), SigningKey::Vcek);
    assert_eq!(vek.root_product(), "Milan");
    assert_eq!(vek.extensions().product_name, "Milan-B0");
    assert_eq!(vek.extensions().tcb, AZURE_TCB);
    let report = snp::verify_report(&azure_report(), &vek, &azure_policy()).unwrap();
    assert_eq!(
        vek.extensions().hw_id,
        Some(report.chip_id),
        "VCEK hwID is the report's CHIP_ID"
    );
}

#[test]
fn vcek_in_der_form_and_chain_in_reverse_order_verify_too() {
    let chain = String::from_utf8(read(ASK_ARK)).unwrap();
    let split = chain.find("-----END CERTIFICATE-----").unwrap() + 25;
    let reversed = format!("{}\n{}", &chain[split..].trim(), &chain[..split]);
    let vek = VerifiedVek::new(
        &read(AZURE_VCEK_DER),
        reversed.as_bytes(),
        &clock(AZURE_VALID_AT),
    )
    .unwrap();
    snp::verify_report(&azure_report(), &vek, &azure_policy()).unwrap();
}

#[test]
fn aws_v3_report_verifies_before_vlek_expiry() {
    let bytes = aws_report();
    let r = AttestationReport::parse(&bytes).unwrap();
    assert_eq!(r.version, 3);
    assert_eq!(r.signing_key, SigningKey::Vlek);
    assert_eq!(r.policy.raw, 0x30000);
    assert_eq!(r.platform_info.raw, 0x27);
    let cpuid = r.cpuid.unwrap();
    assert_eq!((cpuid.family, cpuid.model, cpuid.stepping), (0x19, 1, 1));
    assert_eq!(
        r.reported_tcb.tcb(),
        Tcb {
            bootloader: 4,
            tee: 0,
            snp: 24,
            microcode: 217
        }
    );
    assert_eq!(r.current_tcb.microcode, 220);
    assert_eq!(r.committed_tcb.microcode, 219);
    assert_eq!(r.launch_tcb.microcode, 219);
    assert!(r.chip_id_masked());

    let vek = aws_vek();
    assert_eq!(vek.kind(), SigningKey::Vlek);
    assert_eq!(vek.extensions().product_name, "Milan");
    assert_eq!(vek.extensions().hw_id, None);
    let policy = SnpPolicy {
        allowed_measurements: Some(vec![arr(AWS_MEASUREMENT)]),
        report_data: Some(arr(AWS_REPORT_DATA)),
        minimum_tcb: r.reported_tcb.tcb(),
        ..SnpPolicy::default()
    };
    let verified = snp::verify_report(&bytes, &vek, &policy).unwrap();
    assert_eq!(hex::encode(verified.report_data), AWS_REPORT_DATA);
}

#[test]
fn aws_vlek_is_rejected_after_expiry() {
    let err =
        VerifiedVek::new(&read(AWS_VLEK), &read(ASVK_ARK), &clock(AWS_EXPIRED_AT)).unwrap_err();
    match &err {
        SnpError::CertificateExpired {
            role: CertRole::Vek,
            not_after,
            now,
        } => {
            assert!(not_after.starts_with("2025-12-10"), "{not_after}");
            assert!(now.starts_with("2026-11-23"), "{now}");
        }
        other => panic!("expected VEK expiry, got {other:?}"),
    }
    assert_eq!(err.check(), "validity");

    // A VerifiedVek cached before expiry refuses to be reused after it.
    let cached = aws_vek();
    assert!(cached.check_valid_at(&clock(AWS_VALID_AT)).is_ok());
    assert!(matches!(
        cached.check_valid_at(&clock(AWS_EXPIRED_AT)),
        Err(SnpError::CertificateExpired {
            role: CertRole::Vek,
            ..
        })
    ));
}

#[test]
fn certificates_not_yet_valid_are_rejected() {
    // ARK and ASK are valid in 2023-01, the VCEK only from 2023-08-30.
    let err = VerifiedVek::new(
        &read(AZURE_VCEK_PEM),
        &read(ASK_ARK),
        &clock("2023-01-01T00:00:00Z"),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            SnpError::CertificateNotYetValid {
                role: CertRole::Vek,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn aws_report_with_zeroed_report_data_is_rejected() {
    let mut bytes = aws_report();
    bytes[0x50..0x90].fill(0);
    let err = snp::verify_report(&bytes, &aws_vek(), &SnpPolicy::default()).unwrap_err();
    assert_eq!(err, SnpError::SignatureInvalid);
}

#[test]
fn bad_signature_sample_parses_but_is_rejected() {
    let bytes = read(BADSIG_REPORT);
    let r = AttestationReport::parse(&bytes).unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(r.signing_key, SigningKey::Vlek);
    let vek = VerifiedVek::new(
        &read(VLEK_2023),
        &read(ASVK_ARK),
        &clock(VLEK_2023_VALID_AT),
    )
    .expect("the 2023 VLEK chains to the ASVK");
    let err = snp::verify_report(&bytes, &vek, &SnpPolicy::default()).unwrap_err();
    assert_eq!(err, SnpError::SignatureInvalid);
    assert_eq!(err.check(), "signature");
}

fn foreign_root_pem() -> (String, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Same subject as AMD's root: only the pin can tell them apart.
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "ARK-Milan");
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), cert.der().to_vec())
}

#[test]
fn chain_with_foreign_root_is_rejected_as_unpinned() {
    let (root_pem, root_der) = foreign_root_pem();
    let chain = String::from_utf8(read(ASK_ARK)).unwrap();
    let ask = &chain[..chain.find("-----END CERTIFICATE-----").unwrap() + 25];
    let forged = format!("{ask}\n{root_pem}");
    let err = VerifiedVek::new(
        &read(AZURE_VCEK_PEM),
        forged.as_bytes(),
        &clock(AZURE_VALID_AT),
    )
    .unwrap_err();
    assert_eq!(
        err,
        SnpError::UnpinnedRoot {
            fingerprint: fingerprint(&root_der)
        }
    );
    assert_eq!(err.check(), "root-pin");
    assert!(err.to_string().contains(&fingerprint(&root_der)));
}

#[test]
fn vcek_with_vlek_chain_is_rejected() {
    let err = VerifiedVek::new(
        &read(AZURE_VCEK_PEM),
        &read(ASVK_ARK),
        &clock(AZURE_VALID_AT),
    )
    .unwrap_err();
    match err {
        SnpError::IssuerMismatch {
            role: CertRole::Vek,
            expected,
            found,
        } => {
            assert_eq!(expected, "SEV-VLEK-Milan");
            assert_eq!(found, "SEV-Milan");
        }
        other => panic!("expected issuer mismatch, got {other:?}"),
    }
}

#[test]
fn vcek_report_signed_by_vlek_certificate_is_rejected() {
    let err = snp::verify_report(&azure_report(), &aws_vek(), &SnpPolicy::default()).unwrap_err();
    assert_eq!(
        err,
        SnpError::SignerMismatch {
            expected: SigningKey::Vcek,
            found: SigningKey::Vlek
        }
    );
    let err = snp::verify_report(&aws_report(), &azure_vek(), &SnpPolicy::default()).unwrap_err();
    assert_eq!(
        err,
        SnpError::SignerMismatch {
            expected: SigningKey::Vlek,
            found: SigningKey::Vcek
        }
    );
}

#[test]
fn short_and_unknown_version_reports_are_rejected() {
    let bytes = azure_report();
    assert_eq!(
        AttestationReport::parse(&bytes[..REPORT_LEN - 1]).unwrap_err(),
        SnpError::ReportTooShort {
            expected: REPORT_LEN,
            found: REPORT_LEN - 1
        }
    );
    assert!(matches!(
        AttestationReport::parse(&[]),
        Err(SnpError::ReportTooShort { found: 0, .. })
    ));
    let mut v5 = bytes.clone();
    v5[0] = 5;
    assert_eq!(
        AttestationReport::parse(&v5).unwrap_err(),
        SnpError::UnsupportedVersion { found: 5 }
    );
    let mut algo = bytes;
    algo[0x34] = 2;
    assert_eq!(
        AttestationReport::parse(&algo).unwrap_err(),
        SnpError::UnsupportedSignatureAlgorithm {
            expected: 1,
            found: 2
        }
    );
}

#[test]
fn nonzero_signature_padding_is_rejected() {
    let vek = azure_vek();
    for (offset, component) in [(0x2A0 + 48, "r"), (0x2A0 + 72 + 71, "s")] {
        let mut bytes = azure_report();
        bytes[offset] = 1;
        assert_eq!(
            snp::verify_report(&bytes, &vek, &SnpPolicy::default()).unwrap_err(),
            SnpError::SignaturePadding { component }
        );
    }
}

#[test]
fn minimum_tcb_above_reported_is_rejected() {
    let policy = SnpPolicy {
        minimum_tcb: Tcb {
            microcode: 94,
            ..AZURE_TCB
        },
        ..azure_policy()
    };
    let err = snp::verify_report(&azure_report(), &azure_vek(), &policy).unwrap_err();
    assert_eq!(
        err,
        SnpError::TcbBelowMinimum {
            component: "microcode",
            minimum: policy.minimum_tcb,
            found: AZURE_TCB
        }
    );
    let policy = SnpPolicy {
        minimum_tcb: Tcb {
            snp: 7,
            ..Tcb::default()
        },
        ..azure_policy()
    };
    assert!(matches!(
        snp::verify_report(&azure_report(), &azure_vek(), &policy),
        Err(SnpError::TcbBelowMinimum {
            component: "snp",
            ..
        })
    ));
}

#[test]
fn debug_policy_is_rejected_unless_allowed() {
    let mut bytes = azure_report();
    let policy_bytes: [u8; 8] = bytes[8..16].try_into().unwrap();
    let flipped = u64::from_le_bytes(policy_bytes) | POLICY_DEBUG_BIT;
    bytes[8..16].copy_from_slice(&flipped.to_le_bytes());

    // The flipped report is no longer what the firmware signed.
    assert_eq!(
        snp::verify_report(&bytes, &azure_vek(), &azure_policy()).unwrap_err(),
        SnpError::SignatureInvalid
    );
    // The policy check itself, on the parsed report.
    let report = AttestationReport::parse(&bytes).unwrap();
    assert!(report.policy.debug_allowed);
    assert_eq!(
        azure_policy().check(&report).unwrap_err(),
        SnpError::DebugNotAllowed { policy: flipped }
    );
    let lenient = SnpPolicy {
        allow_debug: true,
        ..azure_policy()
    };
    assert!(lenient.check(&report).is_ok());
}

#[test]
fn wrong_report_data_is_rejected() {
    let mut expected = azure_report_data();
    expected[0] ^= 1;
    let policy = SnpPolicy {
        report_data: Some(expected),
        ..azure_policy()
    };
    assert_eq!(
        snp::verify_report(&azure_report(), &azure_vek(), &policy).unwrap_err(),
        SnpError::ReportDataMismatch {
            expected: expected.to_vec(),
            found: azure_report_data().to_vec()
        }
    );
}

#[test]
fn wrong_measurement_is_rejected() {
    let policy = SnpPolicy {
        allowed_measurements: Some(vec![[0xAB; 48]]),
        ..azure_policy()
    };
    assert_eq!(
        snp::verify_report(&azure_report(), &azure_vek(), &policy).unwrap_err(),
        SnpError::MeasurementNotAllowed {
            allowed: vec![vec![0xAB; 48]],
            found: hex::decode(AZURE_MEASUREMENT).unwrap()
        }
    );
}

#[test]
fn id_key_digest_not_in_allow_list_is_rejected() {
    let policy = SnpPolicy {
        allowed_id_key_digests: Some(vec![[1; 48], [2; 48]]),
        ..azure_policy()
    };
    assert_eq!(
        snp::verify_report(&azure_report(), &azure_vek(), &policy).unwrap_err(),
        SnpError::IdKeyDigestNotAllowed {
            allowed: vec![vec![1; 48], vec![2; 48]],
            found: hex::decode(AZURE_ID_KEY_DIGEST).unwrap()
        }
    );
}

#[test]
fn vmpl_mismatch_is_rejected() {
    let policy = SnpPolicy {
        vmpl: 1,
        ..azure_policy()
    };
    assert_eq!(
        snp::verify_report(&azure_report(), &azure_vek(), &policy).unwrap_err(),
        SnpError::VmplMismatch {
            expected: 1,
            found: 0
        }
    );
}

#[test]
fn report_inconsistent_with_vcek_is_rejected() {
    let vek = azure_vek();
    let report = AttestationReport::parse(&azure_report()).unwrap();
    snp::check_consistency(&report, &vek).unwrap();

    let mut older = report.clone();
    older.reported_tcb.microcode = 92;
    assert_eq!(
        snp::check_consistency(&older, &vek).unwrap_err(),
        SnpError::TcbMismatch {
            expected: AZURE_TCB,
            found: Tcb {
                microcode: 92,
                ..AZURE_TCB
            }
        }
    );

    let mut other_chip = report.clone();
    other_chip.chip_id[0] ^= 0xFF;
    assert!(matches!(
        snp::check_consistency(&other_chip, &vek),
        Err(SnpError::ChipIdMismatch { .. })
    ));

    // A masked CHIP_ID cannot be compared and is not held against the report.
    let mut masked = report;
    masked.chip_id = [0; 64];
    snp::check_consistency(&masked, &vek).unwrap();
}

#[test]
fn every_error_names_a_known_check() {
    let errors = [
        SnpError::SignatureInvalid,
        SnpError::UnpinnedRoot {
            fingerprint: String::new(),
        },
        SnpError::VmplMismatch {
            expected: 0,
            found: 1,
        },
    ];
    for e in errors {
        assert!(snp::CHECKS.contains(&e.check()), "{}", e.check());
    }
}
