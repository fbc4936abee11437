//! Real SEV-SNP evidence and AMD certificates from attestation/test_data for the collateral tests:
//! loaders, a local fetcher serving those files, and a clock the tests move by hand.
#![allow(dead_code, unused_imports)] // each test file uses a different subset

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use constellation_attestation::snp::{VekRequest, REPORT_LEN};
use constellation_attestation::{Clock, FixedClock};
use constellation_joinservice::collateral_cache::{Collateral, CollateralFetcher, FetchError};
use tokio::sync::watch;

pub use constellation_attestation::testing::real_evidence::{
    aws_report, aws_tcb_policy, azure_tcb_and_measurement_policy, first_der, pem_ders, read,
    ASK_ARK, ASVK_ARK, AWS_REPORT_DATA, AWS_VALID_AT, AWS_VLEK, AZURE_MEASUREMENT, AZURE_REPORT,
    AZURE_RUNTIME_DATA, AZURE_VALID_AT, AZURE_VCEK_DER, AZURE_VCEK_EXPIRED_AT, GENOA_ARK,
    GENOA_ASK,
};

/// The Azure report's REPORTED_TCB as the raw u64: bl 2, tee 0, snp 6, ucode 93.
pub const AZURE_TCB: u64 = 0x5d06_0000_0000_0002;

/// Offset of CHIP_ID in the report.
pub const CHIP_ID_OFFSET: usize = 0x1A0;

/// The Azure report alone (attestation.bin has a 20-byte HCL header after it).
pub fn azure_report() -> Vec<u8> {
    read(AZURE_REPORT)[..REPORT_LEN].to_vec()
}

pub fn azure_runtime_data() -> Vec<u8> {
    read(AZURE_RUNTIME_DATA)
}

pub fn azure_chip_id() -> [u8; 64] {
    azure_report()[CHIP_ID_OFFSET..CHIP_ID_OFFSET + 64]
        .try_into()
        .unwrap()
}

pub fn aws_report_data() -> [u8; 64] {
    let mut rd = [0u8; 64];
    hex::decode_to_slice(AWS_REPORT_DATA, &mut rd).unwrap();
    rd
}

/// The real Azure VCEK with the Milan ASK and ARK, as AMD's KDS serves them.
pub fn azure_collateral() -> Collateral {
    collateral(read(AZURE_VCEK_DER), ASK_ARK)
}

/// The real AWS VLEK with the Milan ASVK and ARK.
pub fn aws_collateral() -> Collateral {
    collateral(first_der(AWS_VLEK), ASVK_ARK)
}

/// `vek_der` with the signer and root of a two-certificate PEM chain file (signer first).
fn collateral(vek_der: Vec<u8>, chain_file: &str) -> Collateral {
    let mut chain = pem_ders(chain_file);
    assert_eq!(chain.len(), 2, "{chain_file}: signer and root");
    let ark_der = chain.remove(1);
    let ask_der = chain.remove(0);
    Collateral {
        vcek_der: vek_der,
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
