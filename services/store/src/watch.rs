//! [`JoinStateCache`]: what the join service serves from (the accepted measurements and the node
//! directory), read once and then kept current by an etcd watch, so a change written through any
//! member reaches every control plane's join service without a restart.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use constellation_attestation::measurements::AcceptedMeasurements as AcceptedSets;
use etcd_client::{EventType, WatchOptions};

use crate::client::DEFAULT_REQUEST_TIMEOUT;
use crate::keys::{self, AcceptedMeasurements, NodeRecord, Value};
use crate::{Store, StoreError};

/// The join service's view of the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JoinState {
    /// `None` until measurements are written, or while the stored ones are malformed: nothing
    /// is accepted then (fails closed).
    pub measurements: Option<AcceptedSets>,
    pub nodes: HashMap<String, NodeRecord>,
    /// The store revision this view reflects.
    pub revision: i64,
}

impl JoinState {
    /// Applies a put (`Some(value)`) or delete (`None`) of `key`; keys outside the join prefix
    /// are ignored. A malformed value removes the entry (logged), so nothing stale is served.
    fn apply(&mut self, key: &str, value: Option<&[u8]>) {
        if key == keys::MEASUREMENTS {
            self.measurements = value.and_then(|v| match AcceptedMeasurements::decode(key, v) {
                Ok(m) => Some(m.0),
                Err(e) => {
                    tracing::warn!(error = %e, "stored measurements refused; accepting none");
                    None
                }
            });
        } else if let Some(name) = key.strip_prefix(keys::NODES_PREFIX) {
            match value.map(|v| NodeRecord::decode(key, v)) {
                Some(Ok(record)) if record.name == name => {
                    self.nodes.insert(name.to_owned(), record);
                }
                Some(Ok(record)) => {
                    tracing::warn!(key, listed = %record.name, "node record under another name; ignored");
                    self.nodes.remove(name);
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "node record refused");
                    self.nodes.remove(name);
                }
                None => {
                    self.nodes.remove(name);
                }
            }
        }
    }
}

/// A live, watched [`JoinState`]. Clones share one watch; the watch stops when the last clone is
/// dropped.
#[derive(Clone)]
pub struct JoinStateCache {
    state: Arc<RwLock<JoinState>>,
    revisions: tokio::sync::watch::Receiver<i64>,
    _task: Arc<AbortOnDrop>,
}

impl std::fmt::Debug for JoinStateCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinStateCache")
            .field("revision", &*self.revisions.borrow())
            .finish_non_exhaustive()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Wait after a broken watch before reading the state anew.
const RESYNC_DELAY: Duration = Duration::from_millis(500);

impl JoinStateCache {
    /// Reads the join state (this must succeed: no view, no join service), then follows it.
    pub async fn start(store: Store) -> Result<Self, StoreError> {
        let (state, revision) = read_state(&store).await?;
        let state = Arc::new(RwLock::new(state));
        let (tx, revisions) = tokio::sync::watch::channel(revision);
        let task = tokio::spawn(follow(store, state.clone(), tx, revision));
        Ok(Self {
            state,
            revisions,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    /// The accepted measurements now.
    pub fn measurements(&self) -> Option<AcceptedSets> {
        self.read().measurements.clone()
    }

    /// The whole view now.
    pub fn snapshot(&self) -> JoinState {
        self.read().clone()
    }

    /// Waits until the view reflects at least store revision `revision`.
    pub async fn wait_for_revision(&self, revision: i64) {
        let mut rx = self.revisions.clone();
        // The sender lives as long as the task, which lives as long as `self`.
        let _ = rx.wait_for(|r| *r >= revision).await;
    }

    /// The revision the view reflects, changing whenever the view does (and after a resync):
    /// a follower of the view waits on `changed()` and takes a [`snapshot`](Self::snapshot).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<i64> {
        self.revisions.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, JoinState> {
        // A writer never panics while holding the lock (apply only inserts and removes).
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl JoinStateCache {
    /// The node directory's entry for `name` now.
    pub fn node(&self, name: &str) -> Option<NodeRecord> {
        self.read().nodes.get(name).cloned()
    }
}

async fn read_state(store: &Store) -> Result<(JoinState, i64), StoreError> {
    // Retried in short attempts like every repeatable read: a request the balancing channel
    // sends towards a member that is down would otherwise wait for it.
    let resp = store
        .retrying("list", keys::JOIN_PREFIX, |mut c| async move {
            c.get(
                keys::JOIN_PREFIX,
                Some(etcd_client::GetOptions::new().with_prefix()),
            )
            .await
        })
        .await?;
    let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
    let mut state = JoinState {
        revision,
        ..JoinState::default()
    };
    for kv in resp.kvs() {
        state.apply(&String::from_utf8_lossy(kv.key()), Some(kv.value()));
    }
    Ok((state, revision))
}

/// Watches the join prefix from `revision + 1`; on any break (member lost, compaction) reads the
/// state anew and watches from there.
async fn follow(
    store: Store,
    state: Arc<RwLock<JoinState>>,
    revisions: tokio::sync::watch::Sender<i64>,
    mut revision: i64,
) {
    loop {
        if let Err(e) = watch_from(&store, &state, &revisions, &mut revision).await {
            tracing::warn!(error = %e, revision, "join-state watch broken; reading anew");
        }
        tokio::time::sleep(RESYNC_DELAY).await;
        match read_state(&store).await {
            Ok((fresh, at)) => {
                *state.write().unwrap_or_else(|p| p.into_inner()) = fresh;
                revision = at;
                revisions.send_replace(at);
            }
            Err(e) => tracing::warn!(error = %e, "join state unreadable; retrying"),
        }
    }
}

async fn watch_from(
    store: &Store,
    state: &RwLock<JoinState>,
    revisions: &tokio::sync::watch::Sender<i64>,
    revision: &mut i64,
) -> Result<(), StoreError> {
    let mut client = store.raw();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(*revision + 1);
    // A watch opened towards a member that is down gets no answer: given up after the request
    // timeout, the state is read anew and the watch opened again.
    let mut stream = tokio::time::timeout(
        DEFAULT_REQUEST_TIMEOUT,
        client.watch(keys::JOIN_PREFIX, Some(options)),
    )
    .await
    .map_err(|_| StoreError::Unavailable {
        operation: "watch",
        key: keys::JOIN_PREFIX.to_owned(),
        reason: format!("no answer within {DEFAULT_REQUEST_TIMEOUT:?}"),
    })?
    .map_err(|e| StoreError::from_etcd("watch", keys::JOIN_PREFIX, e))?;
    while let Some(resp) = stream
        .message()
        .await
        .map_err(|e| StoreError::from_etcd("watch", keys::JOIN_PREFIX, e))?
    {
        if resp.canceled() {
            return Err(StoreError::Unavailable {
                operation: "watch",
                key: keys::JOIN_PREFIX.to_owned(),
                reason: format!("canceled by etcd: {}", resp.cancel_reason()),
            });
        }
        let at = resp.header().map(|h| h.revision()).unwrap_or(*revision);
        {
            let mut view = state.write().unwrap_or_else(|p| p.into_inner());
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key());
                let value = (event.event_type() == EventType::Put).then(|| kv.value());
                view.apply(&key, value);
            }
            view.revision = at;
        }
        *revision = at;
        revisions.send_replace(at);
    }
    Err(StoreError::Unavailable {
        operation: "watch",
        key: keys::JOIN_PREFIX.to_owned(),
        reason: "stream ended".into(),
    })
}
