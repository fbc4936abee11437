//! Guests that present an authentic SEV-SNP report but must still be refused: launched with a
//! migration agent, with reserved policy bits set, below the minimum ABI, with an unaccepted
//! report version, from the wrong VMPL, at a TCB below the minimum (or a VEK for another TCB),
//! or with a launch measurement / ID-key digest outside the allow-lists.
//!
//! Each report is crafted and signed with a fresh P-384 test key, behind a test VEK
//! (`VerifiedVek::for_testing`) carrying the extensions under test
//! (`constellation_attestation::testing::snp_reports`, shared with other crates' tests), so the
//! signature, signer and consistency checks pass and the check named in each test is what
//! refuses. A baseline
//! report passes every check first, so a refusal is caused by the one field changed.

use constellation_attestation::snp::{
    self, AbiVersion, SigningKey, SnpError, SnpPolicy, Tcb, VerifiedVek,
};
use constellation_attestation::testing::snp_reports::*;
use constellation_attestation::FixedClock;

/// The settings a deployment would configure for the baseline report.
fn strict() -> SnpPolicy {
    SnpPolicy {
        minimum_tcb: TCB,
        minimum_abi: AbiVersion {
            major: 1,
            minor: 55,
        },
        allowed_measurements: Some(vec![MEASUREMENT]),
        allowed_id_key_digests: Some(vec![ID_KEY_DIGEST]),
        ..SnpPolicy::default()
    }
}

/// Verifies a crafted report with `fields` against `policy` (VEK for the report's signer and
/// the baseline TCB); asserts the baseline passes first.
fn verify(fields: &Fields, policy: &SnpPolicy) -> Result<(), SnpError> {
    let chip = TestChip::new();
    let vek = chip.vek(fields.signer, TCB);
    let baseline = Fields {
        signer: fields.signer,
        ..Fields::default()
    };
    snp::verify_report(&chip.report(&baseline), &vek, &strict())
        .expect("the baseline report passes every check");
    snp::verify_report(&chip.report(fields), &vek, policy).map(|_| ())
}

#[test]
fn guest_launched_with_a_migration_agent_is_refused() {
    let policy = GOOD_POLICY | (1 << 18);
    let f = Fields {
        policy,
        ..Fields::default()
    };
    let err = verify(&f, &strict()).unwrap_err();
    assert_eq!(err, SnpError::MigrationAgentAllowed { policy });
    assert_eq!(err.check(), "migrate-ma");
    // No setting lets it through: the most lenient policy refuses it too.
    assert_eq!(
        verify(&f, &SnpPolicy::default()).unwrap_err(),
        SnpError::MigrationAgentAllowed { policy }
    );
}

#[test]
fn guest_policy_with_reserved_bits_wrong_is_refused() {
    // Bit 17 is reserved-must-be-one: clearing it breaks the ABI.
    let cleared = GOOD_POLICY & !(1 << 17);
    assert_eq!(
        verify(
            &Fields {
                policy: cleared,
                ..Fields::default()
            },
            &strict()
        )
        .unwrap_err(),
        SnpError::PolicyReservedBits {
            policy: cleared,
            bad: 1 << 17
        }
    );
    // Bits 26..=63 are reserved-must-be-zero (meaning unknown to this verifier).
    for bit in [26u32, 40, 63] {
        let policy = GOOD_POLICY | (1 << bit);
        let err = verify(
            &Fields {
                policy,
                ..Fields::default()
            },
            &strict(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SnpError::PolicyReservedBits {
                policy,
                bad: 1 << bit
            },
            "bit {bit}"
        );
        assert_eq!(err.check(), "policy-reserved");
    }
    // Defined bits (SINGLE_SOCKET 20 .. PAGE_SWAP_DISABLE 25) are not reserved.
    let defined = GOOD_POLICY | (0x3F << 20);
    verify(
        &Fields {
            policy: defined,
            ..Fields::default()
        },
        &strict(),
    )
    .unwrap();
}

#[test]
fn guest_allowing_an_abi_below_the_minimum_is_refused() {
    for (major, minor) in [(1u8, 54u8), (0, 99)] {
        let policy = (1 << 17) | (u64::from(major) << 8) | u64::from(minor);
        let err = verify(
            &Fields {
                policy,
                ..Fields::default()
            },
            &strict(),
        )
        .unwrap_err();
        assert_eq!(
            err,
            SnpError::AbiBelowMinimum {
                minimum: AbiVersion {
                    major: 1,
                    minor: 55
                },
                found: AbiVersion { major, minor }
            }
        );
    }
    // A higher major with a lower minor is above the minimum.
    let policy = (1 << 17) | (2 << 8);
    verify(
        &Fields {
            policy,
            ..Fields::default()
        },
        &strict(),
    )
    .unwrap();
}

#[test]
fn debuggable_guest_is_refused() {
    let policy = GOOD_POLICY | (1 << 19);
    assert_eq!(
        verify(
            &Fields {
                policy,
                ..Fields::default()
            },
            &strict()
        )
        .unwrap_err(),
        SnpError::DebugNotAllowed { policy }
    );
}

#[test]
fn report_version_outside_the_accepted_range_is_refused() {
    let v3_only = SnpPolicy {
        report_versions: 3..=3,
        ..strict()
    };
    let err = verify(
        &Fields {
            version: 2,
            ..Fields::default()
        },
        &v3_only,
    )
    .unwrap_err();
    assert_eq!(
        err,
        SnpError::ReportVersionNotAccepted {
            minimum: 3,
            maximum: 3,
            found: 2
        }
    );
    assert_eq!(err.check(), "report-version");
    // Versions the parser does not know are refused before any policy.
    assert_eq!(
        verify(
            &Fields {
                version: 4,
                ..Fields::default()
            },
            &strict()
        )
        .unwrap_err(),
        SnpError::UnsupportedVersion { found: 4 }
    );
}

#[test]
fn report_requested_from_another_vmpl_is_refused() {
    let f = Fields {
        vmpl: 1,
        ..Fields::default()
    };
    assert_eq!(
        verify(&f, &strict()).unwrap_err(),
        SnpError::VmplMismatch {
            expected: 0,
            found: 1
        }
    );
    // Configurable: a deployment whose guest runs at VMPL 1 (under an SVSM) sets 1.
    verify(
        &f,
        &SnpPolicy {
            vmpl: 1,
            ..strict()
        },
    )
    .unwrap();
}

#[test]
fn reported_tcb_below_the_minimum_is_refused_even_when_current_tcb_is_higher() {
    // The chip runs newer firmware (CURRENT_TCB) but reports, and is keyed for, an old TCB:
    // the minimum applies to what the report is signed for.
    let old = Tcb { snp: 8, ..TCB };
    let chip = TestChip::new();
    let vek = chip.vek(SigningKey::Vcek, old);
    let f = Fields {
        reported_tcb: old,
        current_tcb: Tcb {
            snp: 30,
            microcode: 255,
            ..TCB
        },
        ..Fields::default()
    };
    assert_eq!(
        snp::verify_report(&chip.report(&f), &vek, &strict()).unwrap_err(),
        SnpError::TcbBelowMinimum {
            component: "snp",
            minimum: TCB,
            found: old
        }
    );
}

#[test]
fn vek_for_another_tcb_than_reported_is_refused_for_vcek_and_vlek() {
    for signer in [SigningKey::Vcek, SigningKey::Vlek] {
        let chip = TestChip::new();
        // A VEK issued for an older TCB signs a report claiming the current one.
        let vek_tcb = Tcb {
            microcode: 200,
            ..TCB
        };
        let vek = chip.vek(signer, vek_tcb);
        let f = Fields {
            signer,
            ..Fields::default()
        };
        let err = snp::verify_report(&chip.report(&f), &vek, &strict()).unwrap_err();
        assert_eq!(
            err,
            SnpError::TcbMismatch {
                expected: vek_tcb,
                found: TCB
            },
            "{signer}"
        );
        assert_eq!(err.check(), "tcb-consistency");
    }
}

#[test]
fn launch_measurement_outside_the_allow_list_is_refused() {
    let f = Fields {
        measurement: [0xEE; 48],
        ..Fields::default()
    };
    let policy = SnpPolicy {
        allowed_measurements: Some(vec![MEASUREMENT, [0x4E; 48]]),
        ..strict()
    };
    assert_eq!(
        verify(&f, &policy).unwrap_err(),
        SnpError::MeasurementNotAllowed {
            allowed: vec![MEASUREMENT.to_vec(), vec![0x4E; 48]],
            found: vec![0xEE; 48]
        }
    );
    // Any listed value passes.
    verify(
        &Fields {
            measurement: [0x4E; 48],
            ..Fields::default()
        },
        &policy,
    )
    .unwrap();
}

#[test]
fn configured_but_empty_allow_lists_refuse_every_report() {
    let no_measurements = SnpPolicy {
        allowed_measurements: Some(vec![]),
        ..strict()
    };
    assert_eq!(
        verify(&Fields::default(), &no_measurements).unwrap_err(),
        SnpError::MeasurementNotAllowed {
            allowed: vec![],
            found: MEASUREMENT.to_vec()
        }
    );
    let no_id_keys = SnpPolicy {
        allowed_id_key_digests: Some(vec![]),
        ..strict()
    };
    assert_eq!(
        verify(&Fields::default(), &no_id_keys).unwrap_err(),
        SnpError::IdKeyDigestNotAllowed {
            allowed: vec![],
            found: ID_KEY_DIGEST.to_vec()
        }
    );
}

#[test]
fn id_key_digest_outside_the_allow_list_is_refused() {
    let f = Fields {
        id_key_digest: [0; 48],
        ..Fields::default()
    };
    let err = verify(&f, &strict()).unwrap_err();
    assert_eq!(
        err,
        SnpError::IdKeyDigestNotAllowed {
            allowed: vec![ID_KEY_DIGEST.to_vec()],
            found: vec![0; 48]
        }
    );
    assert_eq!(err.check(), "id-key-digest");
}

#[test]
fn crafted_report_for_another_chip_is_refused_through_a_vek_source() {
    // The same checks run on the collateral path (VekSource), with the validity re-check.
    let chip = TestChip::new();
    let vek = chip.vek(SigningKey::Vcek, TCB);
    let clock = FixedClock::at_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let good = chip.report(&Fields::default());
    snp::verify_report_from(&good, &vek, &strict(), &clock).unwrap();
    let other_chip = chip.report(&Fields {
        chip_id: [0xC2; 64],
        ..Fields::default()
    });
    match snp::verify_report_from(&other_chip, &vek, &strict(), &clock) {
        Err(snp::SourcedReportError::Snp(SnpError::ChipIdMismatch { expected, found })) => {
            assert_eq!((expected, found), (CHIP_ID.to_vec(), vec![0xC2; 64]))
        }
        other => panic!("expected ChipIdMismatch, got {other:?}"),
    }
    let ma = GOOD_POLICY | (1 << 18);
    let migrating = chip.report(&Fields {
        policy: ma,
        ..Fields::default()
    });
    assert_eq!(
        snp::verify_report_from(&migrating, &vek, &strict(), &clock).unwrap_err(),
        snp::SourcedReportError::Snp(SnpError::MigrationAgentAllowed { policy: ma })
    );
}

/// A VEK source that counts lookups (each would be a fetch for a caching source).
#[derive(Debug)]
struct CountingSource {
    vek: VerifiedVek,
    lookups: std::sync::atomic::AtomicUsize,
}

impl snp::VekSource for CountingSource {
    fn vek_for(&self, _: &snp::VekRequest) -> Result<snp::VekRef<'_>, snp::CollateralError> {
        self.lookups
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(snp::VekRef::Borrowed(&self.vek))
    }
}

#[test]
fn report_refused_on_its_lookup_fields_costs_no_vek_lookup() {
    let chip = TestChip::new();
    let old = Tcb { snp: 1, ..TCB };
    let source = CountingSource {
        vek: chip.vek(SigningKey::Vcek, old),
        lookups: Default::default(),
    };
    let clock = FixedClock::at_rfc3339("2026-01-01T00:00:00Z").unwrap();
    let lookups = || source.lookups.load(std::sync::atomic::Ordering::SeqCst);

    // Below the minimum TCB: refused before the source is asked.
    let below = chip.report(&Fields {
        reported_tcb: old,
        ..Fields::default()
    });
    assert_eq!(
        snp::verify_report_from(&below, &source, &strict(), &clock).unwrap_err(),
        snp::SourcedReportError::Snp(SnpError::TcbBelowMinimum {
            component: "snp",
            minimum: TCB,
            found: old
        })
    );
    // Reserved TCB_VERSION bytes set (a distinct lookup key for the same TCB): malformed.
    let mut reserved = chip.report(&Fields {
        reported_tcb: old,
        ..Fields::default()
    });
    reserved[0x180 + 3] = 1;
    assert!(matches!(
        snp::verify_report_from(&reserved, &source, &SnpPolicy::default(), &clock),
        Err(snp::SourcedReportError::Collateral(
            snp::CollateralError::MalformedRequest { .. }
        ))
    ));
    assert_eq!(lookups(), 0);
    // Within the policy, the lookup happens (and the report verifies).
    snp::verify_report_from(&below, &source, &SnpPolicy::default(), &clock).unwrap();
    assert_eq!(lookups(), 1);
}
