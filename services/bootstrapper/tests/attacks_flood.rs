//! Floods against a real node (issue 14 §5): anyone who completes server-only aTLS can send
//! Init, and every Init costs an Argon2 check of its init secret (19 MiB, tens of
//! milliseconds). A flood of wrong secrets must neither exhaust the node's memory nor starve
//! the one right Init. Recover is the same after a full restart: every wrong master secret
//! costs a LUKS unlock attempt of the state disk. Real bootstrapper processes with their own
//! swtpm, default listener limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls;
use constellation_attestation::variant::qemu_vtpm::QemuVtpmValidator;
use constellation_common::limits::ListenerLimits;
use constellation_common::metadata::{ports, Role};
use constellation_platform::local::NodeRecord;
use constellation_platform::Cloud;
use constellation_proto::init::init_service_client::InitServiceClient;
use constellation_proto::init::InitRequest;
use constellation_proto::recover::recover_service_client::RecoverServiceClient;
use constellation_proto::recover::RecoverRequest;
use constellation_proto::PROTOCOL_VERSION;
use tonic::transport::Channel;

mod common;
use common::*;

/// A field of /proc/<pid>/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| {
            v.trim_start_matches(':')
                .trim()
                .trim_end_matches(" kB")
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("{field} in /proc/{pid}/status"))
}

fn wrong_init(n: usize) -> InitRequest {
    InitRequest {
        version: PROTOCOL_VERSION,
        master_secret: vec![0x11; 32],
        master_salt: vec![0x22; 32],
        measurement_salt: vec![0x33; 32],
        init_secret: format!("wrong secret {n}").into_bytes(),
        cluster_name: "flood".into(),
        ..Default::default()
    }
}

/// Attested channels to the node at `endpoint`: `CONNECTIONS` of them, `STREAMS` request loops
/// on each.
const CONNECTIONS: usize = 8;
const STREAMS: usize = 8;

/// 64 wrong requests in flight at any time until `deadline`: each loop sends `send(channel, n)`
/// and counts the answers whose code is in `refused`; `ResourceExhausted` (the gate's bounded
/// wait) and codes in `tolerated` pass uncounted; anything else, an `Ok` above all, fails.
async fn flood<F, Fut>(
    validator: Arc<QemuVtpmValidator>,
    node: &NodeRecord,
    deadline: Instant,
    refused: &'static [tonic::Code],
    tolerated: &'static [tonic::Code],
    send: F,
) -> Vec<tokio::task::JoinHandle<usize>>
where
    F: Fn(Channel, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let endpoint = node.endpoint(ports::BOOTSTRAPPER);
    let mut loops = Vec::new();
    for _ in 0..CONNECTIONS {
        let config = atls::ClientConfig::server_only(validator.clone()).unwrap();
        let (channel, _) = atls::channel(&endpoint, config).await.unwrap_or_else(|e| {
            panic!(
                "attesting {endpoint}: {e}\n{}",
                std::fs::read_to_string(node.log_path()).unwrap_or_default()
            )
        });
        for stream in 0..STREAMS {
            let (channel, send) = (channel.clone(), send.clone());
            loops.push(tokio::spawn(async move {
                let mut counted = 0usize;
                while Instant::now() < deadline {
                    match send(channel.clone(), stream).await {
                        Err(s) if refused.contains(&s.code()) => counted += 1,
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
                        Err(s) if tolerated.contains(&s.code()) => {}
                        other => panic!("a wrong secret was not refused: {other:?}"),
                    }
                }
                counted
            }));
        }
    }
    loops
}

/// Waits for the flood's loops; what they refused in total.
async fn refusals(loops: Vec<tokio::task::JoinHandle<usize>>) -> usize {
    let mut refused = 0;
    for task in loops {
        refused += task.await.unwrap();
    }
    refused
}

/// The right request went through: the gate admitted it within its bounded wait (a request
/// that waits longer is answered ResourceExhausted, which fails the caller). Its whole time,
/// the expensive check plus starting and awaiting the control plane's daemons, stays under
/// twice that bound. The node's peak memory grew by less than 256 MiB (two expensive checks at
/// a time, not 64).
fn assert_not_starved(what: &str, node: &NodeRecord, waited: Duration, peak_before: u64) {
    let bound = 2 * ListenerLimits::default().expensive_work_wait;
    assert!(
        waited < bound,
        "the right {what} took {waited:?} during the flood (bound {bound:?})"
    );
    let peak_after = status_kib(node.pid, "VmHWM");
    let grown_mib = peak_after.saturating_sub(peak_before) / 1024;
    eprintln!(
        "right {what} after {waited:?} during the flood; node peak RSS {peak_before} -> \
         {peak_after} KiB"
    );
    assert!(
        grown_mib < 256,
        "the node's peak RSS grew by {grown_mib} MiB during the {what} flood ({peak_before} -> \
         {peak_after} KiB)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_init_secret_flood_does_not_starve_the_right_one() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("flood");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let validator = c.fresh_validator(&cp);
    let peak_before = status_kib(cp.pid, "VmHWM");

    // Wrong-secret Inits over attested channels for four seconds.
    let deadline = Instant::now() + Duration::from_secs(4);
    let loops = flood(
        validator.clone(),
        &cp,
        deadline,
        &[tonic::Code::Unauthenticated],
        &[],
        |channel, n| async move {
            InitServiceClient::new(channel)
                .init(wrong_init(n))
                .await
                .map(drop)
        },
    )
    .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let success = init(Arc::clone(&validator), &cp).await;
    let waited = started.elapsed();
    assert!(!success.kubeconfig.is_empty());
    let refused = refusals(loops).await;
    assert!(refused > 0, "the wrong secrets were checked and refused");
    eprintln!("{refused} wrong init secrets refused");
    assert_not_starved("Init", &cp, waited, peak_before);
}

/// After a full restart the control plane waits for Recover; every Recover with a wrong master
/// secret costs an unlock attempt of the state disk. The flood is refused (PermissionDenied)
/// and the right Recover still recovers the node within the gate's bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_master_secret_recover_flood_does_not_starve_the_right_one() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("recoverflood");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let ok = init(c.fresh_validator(&cp), &cp).await;
    let cp = full_restart(&mut c, &[&cp], &cp).await;
    let validator = c.fresh_validator(&cp);
    let peak_before = status_kib(cp.pid, "VmHWM");

    let deadline = Instant::now() + Duration::from_secs(4);
    let loops = flood(
        validator.clone(),
        &cp,
        deadline,
        &[tonic::Code::PermissionDenied],
        // Once the right Recover went through, the node no longer waits for one.
        &[tonic::Code::AlreadyExists],
        |channel, n| async move {
            RecoverServiceClient::new(channel)
                .recover(RecoverRequest {
                    version: PROTOCOL_VERSION,
                    master_secret: vec![0x40 + n as u8; 32],
                    master_salt: MASTER_SALT.to_vec(),
                    kmip: None,
                })
                .await
                .map(drop)
        },
    )
    .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let answer = recover(validator, &cp, &MASTER_SECRET, &MASTER_SALT)
        .await
        .unwrap_or_else(|s| panic!("the right Recover was refused during the flood: {s:?}"));
    let waited = started.elapsed();
    assert!(
        answer.message.contains(&hex::encode(&ok.cluster_id)),
        "{answer:?}"
    );
    assert!(serves(&cp, ports::JOIN), "recovered: the join service runs");
    let refused = refusals(loops).await;
    assert!(
        refused > 0,
        "the wrong master secrets were tried and refused"
    );
    eprintln!("{refused} wrong master secrets refused");
    assert_not_starved("Recover", &cp, waited, peak_before);
}
