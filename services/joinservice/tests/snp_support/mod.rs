//! Real SEV-SNP evidence and AMD certificates from ../shared/testdata for the collateral tests:
//! loaders, a local fetcher serving those files, and a clock the tests move by hand.
#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use constellation_attestation::snp::{VekRequest, REPORT_LEN};
use constellation_attestation::{Clock, FixedClock};
use constellation_joinservice::collateral::{Collateral, CollateralFetcher, FetchError};
use tokio::sync::watch;

pub const TESTDATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/testdata");

pub fn read(rel: &str) -> Vec<u8> {
    let p = format!("{TESTDATA}/{rel}");
    std::fs::read(&p).unwrap_or_else(|e| panic!("test data {p} missing: {e}"))
}

/// Every CERTIFICATE block of a PEM file, as the exact DER inside it.
pub fn pem_ders(rel: &str) -> Vec<Vec<u8>> {
    let text = String::from_utf8(read(rel)).expect("PEM is text");
    const END: &str = "-----END CERTIFICATE-----";
    text.split_inclusive(END)
        .filter(|block| block.contains("-----BEGIN CERTIFICATE-----"))
        .map(|block| {
            let (label, der) = der::pem::decode_vec(block.trim().as_bytes()).expect("PEM block");
            assert_eq!(label, "CERTIFICATE");
            der
        })
        .collect()
}

pub fn first_der(rel: &str) -> Vec<u8> {
    pem_ders(rel).remove(0)
}

/// Inside every Azure certificate's validity period (VCEK 2023-08-30..2030-08-30).
pub const AZURE_VALID_AT: &str = "2026-11-23T00:00:00Z";
/// After the Azure VCEK expired.
pub const AZURE_VCEK_EXPIRED_AT: &str = "2030-09-01T00:00:00Z";
/// Inside the AWS VLEK's validity period (2024-12-10..2025-12-10).
pub const AWS_VALID_AT: &str = "2025-06-01T00:00:00Z";

/// The Azure report's REPORTED_TCB as the raw u64: bl 2, tee 0, snp 6, ucode 93.
pub const AZURE_TCB: u64 = 0x5d06_0000_0000_0002;
pub const AZURE_MEASUREMENT: &str = "5677f1de87289e7ad2c7e99c805d0468b1a9ccd83f0d245afa5242d405da4d5725852f8c6550564870e5f3206dfb1841";
/// The AWS report's REPORT_DATA: SHA-512 of the AK's PKIX DER (testdata README).
pub const AWS_REPORT_DATA: &str = "87ab7caf510e1b3520dc3cceb64ee44128e10976fb0d3fc5e274699d8aaf506154af4c1de0a026b49fdf861e9ac75551551b3534d1c61369a3b08f5baed0db2f";

/// Offset of CHIP_ID in the report.
pub const CHIP_ID_OFFSET: usize = 0x1A0;

/// The Azure report alone (attestation.bin has a 20-byte HCL header after it).
pub fn azure_report() -> Vec<u8> {
    read("constellation-go/snp-azure/attestation.bin")[..REPORT_LEN].to_vec()
}

pub fn azure_runtime_data() -> Vec<u8> {
    read("constellation-go/snp-azure/runtimedata.bin")
}

pub fn azure_chip_id() -> [u8; 64] {
    azure_report()[CHIP_ID_OFFSET..CHIP_ID_OFFSET + 64]
        .try_into()
        .unwrap()
}

pub fn aws_report() -> Vec<u8> {
    let text: Vec<u8> = read("constellation-go/snp-aws/report.b64")
        .into_iter()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .expect("report.b64 is base64")
}

pub fn aws_report_data() -> [u8; 64] {
    let mut rd = [0u8; 64];
    hex::decode_to_slice(AWS_REPORT_DATA, &mut rd).unwrap();
    rd
}

/// The real Azure VCEK with the Milan ASK and ARK, as AMD's KDS serves them.
pub fn azure_collateral() -> Collateral {
    let mut chain = pem_ders("constellation-go/amd-certs/milan-ask-ark.pem");
    assert_eq!(chain.len(), 2);
    let ark_der = chain.remove(1);
    let ask_der = chain.remove(0);
    Collateral {
        vcek_der: read("constellation-go/snp-azure/vcek.der"),
        ask_der,
        ark_der,
    }
}

/// The real AWS VLEK with the Milan ASVK and ARK.
pub fn aws_collateral() -> Collateral {
    let mut chain = pem_ders("constellation-go/amd-certs/milan-asvk-ark.pem");
    let ark_der = chain.remove(1);
    let ask_der = chain.remove(0);
    Collateral {
        vcek_der: first_der("constellation-go/snp-aws/vlek.pem"),
        ask_der,
        ark_der,
    }
}

/// A clock the test moves by hand.
#[derive(Debug)]
pub struct ManualClock(Mutex<SystemTime>);

impl ManualClock {
    pub fn at(rfc3339: &str) -> Arc<Self> {
        Arc::new(Self(Mutex::new(
            FixedClock::at_rfc3339(rfc3339).expect("RFC 3339").0,
        )))
    }
    pub fn advance(&self, d: Duration) {
        *self.0.lock().unwrap() += d;
    }
    pub fn set(&self, rfc3339: &str) {
        *self.0.lock().unwrap() = FixedClock::at_rfc3339(rfc3339).expect("RFC 3339").0;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A local fetcher: serves fixed certificates (set per test), counts fetches, records what it
/// was asked for, can be "down", and can hold every fetch until a gate opens.
pub struct LocalFetcher {
    serving: Mutex<Collateral>,
    pub fetches: AtomicUsize,
    pub down: AtomicBool,
    pub requests: Mutex<Vec<VekRequest>>,
    gate: watch::Receiver<bool>,
    gate_tx: watch::Sender<bool>,
    /// Virtual delay per fetch (with paused time, lets concurrent callers pile up).
    delay: Duration,
}

impl LocalFetcher {
    pub fn serving(collateral: Collateral) -> Arc<Self> {
        Self::build(collateral, true, Duration::ZERO)
    }

    pub fn with_delay(collateral: Collateral, delay: Duration) -> Arc<Self> {
        Self::build(collateral, true, delay)
    }

    /// Holds every fetch until [`LocalFetcher::open`].
    pub fn gated(collateral: Collateral) -> Arc<Self> {
        Self::build(collateral, false, Duration::ZERO)
    }

    fn build(collateral: Collateral, open: bool, delay: Duration) -> Arc<Self> {
        let (gate_tx, gate) = watch::channel(open);
        Arc::new(Self {
            serving: Mutex::new(collateral),
            fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            requests: Mutex::new(Vec::new()),
            gate,
            gate_tx,
            delay,
        })
    }

    pub fn serve(&self, collateral: Collateral) {
        *self.serving.lock().unwrap() = collateral;
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.gate_tx.send_replace(true);
    }

    pub fn fetch_count(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

#[tonic::async_trait]
impl CollateralFetcher for LocalFetcher {
    async fn fetch(&self, request: &VekRequest) -> Result<Collateral, FetchError> {
        self.fetches.fetch_add(1, Ordering::SeqCst);
        self.requests.lock().unwrap().push(*request);
        let mut gate = self.gate.clone();
        gate.wait_for(|open| *open)
            .await
            .expect("gate sender alive");
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.down.load(Ordering::SeqCst) {
            return Err(FetchError {
                reason: "KDS returned 503 Service Unavailable".into(),
            });
        }
        Ok(self.serving.lock().unwrap().clone())
    }
}
