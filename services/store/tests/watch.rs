//! A measurement update or a node-directory change written through one member reaches a join
//! service's watched view connected to another member, without a restart.

mod common;

use std::time::{Duration, Instant};

use common::TestCluster;
use constellation_attestation::measurements::AcceptedMeasurements;
use constellation_attestation::{Measurement, Measurements};
use constellation_common::metadata::Role;
use constellation_store::keys::NodeRecord;
use constellation_store::JoinStateCache;

async fn eventually(what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{what} not seen within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    start.elapsed()
}

fn measurements(pcr4: u8) -> Measurements {
    Measurements(
        [
            (4, Measurement::enforce([pcr4; 32])),
            (9, Measurement::enforce([9; 32])),
            (15, Measurement::enforce([0; 32])),
        ]
        .into(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_written_on_one_member_reaches_a_watcher_on_another() {
    let cluster = TestCluster::start(3).await;
    let endpoints = cluster.endpoints();
    let writer = cluster.store(&endpoints[..1]).await;
    let cache = JoinStateCache::start(cluster.store(&endpoints[2..]).await)
        .await
        .unwrap();
    assert_eq!(cache.measurements(), None);
    assert_eq!(cache.node("worker-0"), None);

    let old = AcceptedMeasurements::one(measurements(1));
    writer.put_measurements(&old).await.unwrap();
    let first = eventually("measurements", || cache.measurements() == Some(old.clone())).await;
    // A rolling upgrade: the old and the new image's sets, what the join service validates with.
    let rolling = AcceptedMeasurements::during_upgrade(&[measurements(1)], measurements(2));
    writer.put_measurements(&rolling).await.unwrap();
    let update = eventually("measurement update", || {
        cache.measurements() == Some(rolling.clone())
    })
    .await;
    assert_eq!(cache.measurements().unwrap().sets().len(), 2);
    // The upgrade done: only the new image's set.
    let new = AcceptedMeasurements::one(measurements(2));
    writer.put_measurements(&new).await.unwrap();
    eventually("upgrade finished", || {
        cache.measurements() == Some(new.clone())
    })
    .await;
    println!("measurements reached the watcher on another member after {first:?}, the update after {update:?}");

    let worker = NodeRecord {
        name: "worker-0".into(),
        role: Role::Worker,
        ip: "10.0.0.7".parse().unwrap(),
        ak_spki_hex: "3059".into(),
    };
    writer.put_node(&worker).await.unwrap();
    eventually("node listed", || {
        cache.node("worker-0") == Some(worker.clone())
    })
    .await;
    assert!(writer.remove_node("worker-0").await.unwrap());
    eventually("node removed", || cache.node("worker-0").is_none()).await;

    // A value that is not measurements is refused: nothing is accepted (fails closed).
    let raw = cluster.store(&endpoints[1..2]).await;
    raw.put(
        &constellation_store::keys::measurements(),
        &constellation_store::keys::AcceptedMeasurements(AcceptedMeasurements::one(
            Measurements::default(),
        )),
    )
    .await
    .unwrap();
    eventually("refused measurements", || cache.measurements().is_none()).await;
    // A node name that would address another key is refused before it is written.
    let mut sneaky = worker.clone();
    sneaky.name = "../measurements".into();
    assert!(writer.put_node(&sneaky).await.is_err());
}
