//! Floods against a real node (issue 14 §5): anyone who completes server-only aTLS can send
//! Init, and every Init costs an Argon2 check of its init secret (19 MiB, tens of
//! milliseconds). A flood of wrong secrets must neither exhaust the node's memory nor starve
//! the one right Init. Real bootstrapper process with its own swtpm, default listener limits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use constellation_attestation::atls;
use constellation_common::limits::ListenerLimits;
use constellation_common::metadata::{ports, Role};
use constellation_platform::Cloud;
use constellation_proto::init::init_service_client::InitServiceClient;
use constellation_proto::init::InitRequest;
use constellation_proto::PROTOCOL_VERSION;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_init_secret_flood_does_not_starve_the_right_one() {
    const CONNECTIONS: usize = 8;
    const STREAMS: usize = 8;
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut c = TestCluster::new("flood");
    let cp = c
        .cloud()
        .create_nodes(Role::ControlPlane, 1)
        .unwrap()
        .remove(0);
    let validator = c.fresh_validator(&cp);
    let endpoint = cp.endpoint(ports::BOOTSTRAPPER);
    let peak_before = status_kib(cp.pid, "VmHWM");

    // 64 wrong-secret Inits in flight at any time for four seconds, over attested channels.
    let deadline = Instant::now() + Duration::from_secs(4);
    let mut flood = Vec::new();
    for _ in 0..CONNECTIONS {
        let config = atls::ClientConfig::server_only(validator.clone()).unwrap();
        let (channel, _) = atls::channel(&endpoint, config).await.unwrap_or_else(|e| {
            panic!(
                "attesting {endpoint}: {e}\n{}",
                std::fs::read_to_string(cp.log_path()).unwrap_or_default()
            )
        });
        for stream in 0..STREAMS {
            let mut client = InitServiceClient::new(channel.clone());
            flood.push(tokio::spawn(async move {
                let mut refused = 0usize;
                while Instant::now() < deadline {
                    match client.init(wrong_init(stream)).await {
                        Err(s) if s.code() == tonic::Code::Unauthenticated => refused += 1,
                        Err(s) if s.code() == tonic::Code::ResourceExhausted => {}
                        other => panic!("a wrong init secret was not refused: {other:?}"),
                    }
                }
                refused
            }));
        }
    }

    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    let success = init(Arc::clone(&validator), &cp).await;
    let waited = started.elapsed();
    assert!(!success.kubeconfig.is_empty());

    let mut refused = 0;
    for task in flood {
        refused += task.await.unwrap();
    }
    assert!(refused > 0, "the wrong secrets were checked and refused");
    // The right Init waits behind at most the checks already queued (64 × one Argon2 check
    // over two permits), far below the gate's bounded wait.
    let bound = ListenerLimits::default().expensive_work_wait;
    assert!(
        waited < bound,
        "the right Init took {waited:?} during the flood (bound {bound:?})"
    );
    // Two Argon2 checks at a time, not 64: the node's peak memory barely moves.
    let peak_after = status_kib(cp.pid, "VmHWM");
    let grown_mib = peak_after.saturating_sub(peak_before) / 1024;
    eprintln!(
        "right Init after {waited:?} during the flood ({refused} wrong secrets refused); node \
         peak RSS {peak_before} -> {peak_after} KiB"
    );
    assert!(
        grown_mib < 256,
        "the node's peak RSS grew by {grown_mib} MiB during the flood ({peak_before} -> \
         {peak_after} KiB)"
    );
}
