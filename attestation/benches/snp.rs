//! SEV-SNP verification cost against the floor, one aws-lc-rs ECDSA P-384 verification:
//! (a) the bare P-384 verify, (b) a report with the verified VEK cached, (c) chain + report.
//! Goal: b / a <= 1.25. Plain `Instant` loops; run with `cargo bench --bench snp`.

use std::hint::black_box;
use std::time::Instant;

use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P384_SHA384_FIXED};
use constellation_attestation::snp::{self, SnpPolicy, VerifiedVek, SIGNED_LEN};
use constellation_attestation::testing::real_evidence::{
    clock, read, ASK_ARK, AZURE_REPORT, AZURE_VALID_AT, AZURE_VCEK_PEM,
};

/// Mean ns per call of `f` over enough iterations to run about `budget_ms`.
fn measure(name: &str, budget_ms: u128, mut f: impl FnMut()) -> f64 {
    for _ in 0..20 {
        f();
    }
    let probe = Instant::now();
    f();
    let one = probe.elapsed().as_nanos().max(1);
    let iterations = ((budget_ms * 1_000_000) / one).clamp(50, 200_000) as u32;
    let start = Instant::now();
    for _ in 0..iterations {
        f();
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(iterations);
    println!("{name:<52} {ns:>12.0} ns/op  ({iterations} iterations)");
    ns
}

fn main() {
    let report = read(AZURE_REPORT);
    let vcek = read(AZURE_VCEK_PEM);
    let chain = read(ASK_ARK);
    let clock = clock(AZURE_VALID_AT);
    let vek = VerifiedVek::new(&vcek, &chain, &clock).expect("chain verifies");
    let policy = SnpPolicy::default();

    // The same signature in aws-lc-rs's fixed form, prepared outside the timed loop.
    let mut fixed = [0u8; 96];
    for (i, component) in [SIGNED_LEN, SIGNED_LEN + 72].into_iter().enumerate() {
        for j in 0..48 {
            fixed[i * 48 + j] = report[component + 47 - j];
        }
    }
    let signed = &report[..SIGNED_LEN];
    let key = vek.public_key();
    key.verify_sig(signed, &fixed).expect("signature verifies");
    let point = key.as_ref().to_vec();

    let a = measure("(a) aws-lc-rs P-384 verify, parsed key", 1500, || {
        black_box(key.verify_sig(black_box(signed), black_box(&fixed))).expect("ok");
    });
    let a_unparsed = measure(
        "(a') aws-lc-rs P-384 verify, UnparsedPublicKey",
        1500,
        || {
            black_box(
                UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, black_box(&point))
                    .verify(black_box(signed), black_box(&fixed)),
            )
            .expect("ok");
        },
    );
    let b = measure("(b) SNP report verify, VerifiedVek cached", 1500, || {
        black_box(snp::verify_report(black_box(&report), &vek, &policy)).expect("ok");
    });
    let c = measure("(c) SNP chain + report verify", 1500, || {
        let vek = VerifiedVek::new(black_box(&vcek), black_box(&chain), &clock).expect("ok");
        black_box(snp::verify_report(black_box(&report), &vek, &policy)).expect("ok");
    });
    println!();
    println!("ratio b/a  = {:.3}  (goal <= 1.25)", b / a);
    println!("ratio b/a' = {:.3}", b / a_unparsed);
    println!("ratio c/a  = {:.3}", c / a);
}
