//! Quorum on a real 3-member etcd cluster, through the join service's `DiskBindings`: losing one
//! member keeps admitting, losing two stops admitting with a typed error (no split brain: no
//! claim is acknowledged without quorum, no disk ever answers two owners), and admitting resumes
//! when one member returns.

mod common;

use std::time::{Duration, Instant};

use common::{disk, node, store_error, TestCluster};
use constellation_joinservice::disk_bindings::{DiskBindingError, DiskBindings};
use constellation_joinservice::{Claim, DiskOwner, EtcdDiskBindings};
use constellation_store::StoreError;
use nix::sys::signal::Signal;

/// Claims succeed again within this long after a second member returns (its restart, a leader
/// election and the client reconnecting).
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

fn assert_unavailable(result: Result<Claim, DiskBindingError>) {
    match result {
        Err(e) => assert!(
            matches!(store_error(&e), Some(StoreError::Unavailable { .. })),
            "{e}"
        ),
        Ok(claim) => panic!("claim without quorum answered {claim:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_lost_member_keeps_admitting_two_stop_it_and_one_back_resumes() {
    let mut cluster = TestCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let join_a = EtcdDiskBindings::new(cluster.store(&endpoints).await);
    let reversed: Vec<String> = endpoints.iter().rev().cloned().collect();
    let join_b = EtcdDiskBindings::new(cluster.store(&reversed).await);
    let mut acked: Vec<(u64, DiskOwner)> = Vec::new();

    // 1 of 3 lost (the leader): nodes keep being admitted.
    let first = cluster.leader().await;
    cluster.stop(first, Signal::SIGKILL).await;
    for i in 1..=10 {
        let owner = node(&format!("worker-{i}"), i);
        let claim = join_a.claim(&disk(i), &owner).await.unwrap();
        assert_eq!(claim, Claim::BoundTo(owner.clone()));
        acked.push((i, owner));
    }
    let contested = disk(100);
    let (x, y) = (node("x", 100), node("y", 101));
    let (cx, cy) = tokio::join!(join_a.claim(&contested, &x), join_b.claim(&contested, &y));
    assert_eq!(cx.unwrap(), cy.unwrap(), "one disk, two owners");

    // 2 of 3 lost: every claim fails with a typed error and none is acknowledged.
    let second = (0..3).find(|i| *i != first).unwrap();
    cluster.stop(second, Signal::SIGKILL).await;
    let outage = disk(200);
    let (p, q) = (node("p", 200), node("q", 201));
    let started = Instant::now();
    let (cp, cq) = tokio::join!(join_a.claim(&outage, &p), join_b.claim(&outage, &q));
    let refused_after = started.elapsed();
    assert_unavailable(cp);
    assert_unavailable(cq);
    assert_unavailable(join_a.claim(&disk(201), &node("r", 202)).await);
    println!("without quorum a claim is refused (Unavailable) after {refused_after:?}");

    // One member back: claims resume; what was acknowledged is intact; the disks contested
    // during the outage end with one owner.
    let returned_at = Instant::now();
    cluster.launch(second);
    let resumed = loop {
        match join_a.claim(&disk(300), &node("late", 300)).await {
            Ok(claim) => {
                assert_eq!(claim, Claim::BoundTo(node("late", 300)));
                break returned_at.elapsed();
            }
            Err(e) => assert!(
                returned_at.elapsed() < RECOVERY_BOUND,
                "no claim within {RECOVERY_BOUND:?} of a member returning: {e}"
            ),
        }
    };
    println!("claims resumed {resumed:?} after the second member was restarted");
    let check = EtcdDiskBindings::new(cluster.store(&endpoints).await);
    for (i, owner) in &acked {
        assert_eq!(check.owner(&disk(*i)).await.unwrap().as_ref(), Some(owner));
    }
    let (cp, cq) = tokio::join!(join_a.claim(&outage, &p), join_b.claim(&outage, &q));
    let (cp, cq) = (cp.unwrap(), cq.unwrap());
    assert_eq!(cp, cq, "one disk, two owners after the outage");
    assert!(cp == Claim::BoundTo(p) || cp == Claim::BoundTo(q), "{cp:?}");
}
