//! [`Store`]: the typed etcd client every control-plane daemon uses.

use std::future::Future;
use std::time::{Duration, Instant};

use constellation_common::secret::SecretBytes;
use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity,
    MemberAddOptions, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};

use crate::keys::{self, DiskBindingRecord, Key, Value};
use crate::StoreError;

/// Requests that get no answer in this long fail as [`StoreError::Unavailable`]: longer than an
/// election (etcd's default election timeout is 1 s), so a leader failover is waited out, short
/// enough that a joiner hears "unavailable" and retries instead of hanging without quorum.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// Budget of one attempt of a repeatable request: a healthy cluster answers in milliseconds, while
/// a request caught in a failover hangs until the member it went through learns of the new leader.
/// A slow commit that outlives the budget is harmless: the repeat finds it done.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a member change waits for etcd to consider the cluster healthy (every member
/// connected for etcd's health interval, 5 s).
const RECONFIGURE_WITHIN: Duration = Duration::from_secs(30);
/// Pause between attempts (a member without a leader answers at once).
const RETRY_PAUSE: Duration = Duration::from_millis(50);

/// PEM material for etcd and its clients (issued by the cluster PKI's etcd CA): what
/// `--cert-file`/`--key-file`/`--trusted-ca-file` point at, and what a client's TLS identity is
/// built from.
#[derive(Clone)]
pub struct EtcdCredentials {
    /// The etcd CA certificate: the only trust anchor on both sides.
    pub ca_cert_pem: String,
    /// The leaf certificate.
    pub cert_pem: String,
    /// The leaf's PKCS#8 private key (PEM).
    pub key_pem: SecretBytes,
}

impl std::fmt::Debug for EtcdCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCredentials")
            .field("key", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What a disk claim found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskClaim {
    /// The disk is bound to this record's node after the call: the claimant (now or from
    /// before) or another node.
    BoundTo(DiskBindingRecord),
    /// The disk is unbound but the claimant holds its limit of disks (their UUIDs).
    ClaimantAtLimit { held: Vec<String> },
}

/// The client's mutual-TLS material: the etcd CA and a client certificate it issued.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub credentials: EtcdCredentials,
}

/// Where and how to reach the cluster.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `https://ip:port` client URLs of the members.
    pub endpoints: Vec<String>,
    pub tls: ClientTls,
    pub request_timeout: Duration,
}

/// An etcd member as the member API reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberInfo {
    pub id: u64,
    /// Empty while an added member has not started.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// A typed etcd client. Cheap to clone (one shared channel).
#[derive(Clone)]
pub struct Store {
    client: Client,
    config: StoreConfig,
    timeout: Duration,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("endpoints", &self.config.endpoints)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Connects to `config.endpoints` with mutual TLS. Requests need a leader
    /// (`require_leader`), so a member cut off from quorum answers at once instead of serving a
    /// stale view.
    pub async fn connect(config: &StoreConfig) -> Result<Self, StoreError> {
        let creds = &config.tls.credentials;
        let key_pem = SecretBytes::new(creds.key_pem.expose().to_vec());
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(creds.ca_cert_pem.as_bytes()))
            .identity(Identity::from_pem(
                creds.cert_pem.as_bytes(),
                key_pem.expose(),
            ));
        let options = ConnectOptions::new()
            .with_tls(tls)
            .with_require_leader(true)
            .with_connect_timeout(config.request_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let client = Client::connect(&config.endpoints, Some(options))
            .await
            .map_err(|e| StoreError::Connect {
                endpoints: config.endpoints.clone(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            client,
            config: config.clone(),
            timeout: config.request_timeout,
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.config.endpoints
    }

    pub(crate) fn raw(&self) -> Client {
        self.client.clone()
    }

    /// Runs one request (not safe to repeat: member changes) with the request timeout.
    async fn call<T, F>(
        &self,
        operation: &'static str,
        key: &str,
        request: F,
    ) -> Result<T, StoreError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(|e| StoreError::from_etcd(operation, key, e)),
            Err(_) => Err(StoreError::Unavailable {
                operation,
                key: key.to_owned(),
                reason: format!("no answer within {:?}", self.timeout),
            }),
        }
    }

    /// Runs a request that is safe to repeat (reads, puts of one value, compare-and-set
    /// transactions) until it succeeds, fails for a reason other than unavailability, or the
    /// request timeout is spent. A request caught in a leader failover (sent to a member that
    /// died, or forwarded to a leader that died) gets no answer; each attempt gets a short budget,
    /// so the request is sent again soon after a new leader can answer instead of waiting out the
    /// whole timeout.
    pub(crate) async fn retrying<T, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.timeout;
        loop {
            let this_budget =
                ATTEMPT_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
            let error = match tokio::time::timeout(this_budget, attempt(self.raw())).await {
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) => StoreError::from_etcd(operation, key, e),
                Err(_) => StoreError::Unavailable {
                    operation,
                    key: key.to_owned(),
                    reason: format!("no answer within {this_budget:?}"),
                },
            };
            if !error.is_unavailable() || Instant::now() + RETRY_PAUSE >= deadline {
                return Err(error);
            }
            tracing::debug!(error = %error, "etcd request retried");
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Runs a member change. etcd refuses one ("unhealthy cluster") until every member has
    /// been connected for its health interval (5 s) and while the change would leave too few
    /// active members, and a second learner while one is still catching up ("too many learner
    /// members": control planes joining at once); nothing changed then, so it is asked again.
    /// Any other failure is not retried: the change might have been made.
    async fn reconfigure<T, F, Fut>(
        &self,
        operation: &'static str,
        key: &str,
        mut attempt: F,
    ) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + RECONFIGURE_WITHIN;
        loop {
            match self.call(operation, key, attempt(self.raw())).await {
                Err(e)
                    if ["unhealthy cluster", "too many learner"]
                        .iter()
                        .any(|m| e.to_string().contains(m))
                        && Instant::now() < deadline =>
                {
                    tracing::debug!(error = %e, "member change refused until the cluster is healthy");
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
                other => return other,
            }
        }
    }

    /// The value at `key`, if any.
    pub async fn get<V: Value>(&self, key: &Key<V>) -> Result<Option<V>, StoreError> {
        let resp = self
            .retrying("get", key.path(), |mut c| {
                let path = key.path().to_owned();
                async move { c.get(path, None).await }
            })
            .await?;
        resp.kvs()
            .first()
            .map(|kv| V::decode(key.path(), kv.value()))
            .transpose()
    }

    /// Writes `value` at `key` (last write wins).
    pub async fn put<V: Value>(&self, key: &Key<V>, value: &V) -> Result<(), StoreError> {
        let bytes = value.encode();
        self.retrying("put", key.path(), |mut c| {
            let (path, bytes) = (key.path().to_owned(), bytes.clone());
            async move { c.put(path, bytes, None).await }
        })
        .await
        .map(drop)
    }

    /// Deletes `key`; true if it existed.
    pub async fn delete<V>(&self, key: &Key<V>) -> Result<bool, StoreError> {
        let resp = self
            .retrying("delete", key.path(), |mut c| {
                let path = key.path().to_owned();
                async move { c.delete(path, None).await }
            })
            .await?;
        Ok(resp.deleted() > 0)
    }

    /// Writes `value` at `key` attached to a lease of `ttl`: etcd deletes it at expiry, on every
    /// member, without a sweeper.
    pub async fn put_expiring<V: Value>(
        &self,
        key: &Key<V>,
        value: &V,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        // A repeated grant leaves an unused lease behind, which expires on its own.
        let lease = self
            .retrying("lease grant", key.path(), |mut c| async move {
                c.lease_grant(seconds, None).await
            })
            .await?
            .id();
        let bytes = value.encode();
        self.retrying("put", key.path(), |mut c| {
            let (path, bytes) = (key.path().to_owned(), bytes.clone());
            let options = PutOptions::new().with_lease(lease);
            async move { c.put(path, bytes, Some(options)).await }
        })
        .await
        .map(drop)
    }

    /// Every value under `prefix` with its key, and the store revision they were read at (a
    /// watch from the next revision misses nothing).
    pub async fn list<V: Value>(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, V)>, i64), StoreError> {
        let resp = self
            .retrying("list", prefix, |mut c| {
                let prefix = prefix.to_owned();
                async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or_default();
        let values = resp
            .kvs()
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                V::decode(&key, kv.value()).map(|v| (key, v))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((values, revision))
    }

    /// Writes the accepted measurements (one set, or the sets of a rolling upgrade).
    pub async fn put_measurements(
        &self,
        measurements: &constellation_attestation::measurements::AcceptedMeasurements,
    ) -> Result<(), StoreError> {
        self.put(
            &keys::measurements(),
            &keys::AcceptedMeasurements(measurements.clone()),
        )
        .await
    }

    /// Adds or replaces a node of the node directory.
    pub async fn put_node(&self, node: &keys::NodeRecord) -> Result<(), StoreError> {
        keys::check_segment("put node", &node.name)?;
        self.put(&keys::node(&node.name), node).await
    }

    /// Removes a node from the node directory; true if it was listed.
    pub async fn remove_node(&self, name: &str) -> Result<bool, StoreError> {
        keys::check_segment("remove node", name)?;
        self.delete(&keys::node(name)).await
    }

    /// The binding of disk `disk`, if any (checked to name that disk: a record copied over
    /// another disk's key is refused).
    pub async fn disk_binding(&self, disk: &str) -> Result<Option<DiskBindingRecord>, StoreError> {
        keys::check_segment("disk binding", disk)?;
        let key = keys::disk(disk);
        self.get(&key)
            .await?
            .map(|record| checked_disk(&key, disk, record))
            .transpose()
    }

    /// Compare-and-set: binds disk `claim.disk_uuid` to the node in `claim` (whose attestation
    /// key has SHA-256 `ak_fingerprint`) unless a node holds it already or the claimant holds
    /// `max_disks` disks. One transaction creates both the disk's key and one free slot of the
    /// node, each only if absent, so of concurrent claims through any members exactly one wins,
    /// and a node never holds more slots than exist.
    pub async fn claim_disk(
        &self,
        claim: &DiskBindingRecord,
        ak_fingerprint: &[u8; 32],
        max_disks: usize,
    ) -> Result<DiskClaim, StoreError> {
        let disk = claim.disk_uuid.as_str();
        keys::check_segment("claim", disk)?;
        let disk_key = keys::disk(disk);
        // Every lost race means another claim of this disk or of this node's slots committed; a
        // node has `max_disks` slots, so honest races end well within this many rounds.
        let attempts = 4 * max_disks + 4;
        for _ in 0..attempts {
            if let Some(bound) = self.disk_binding(disk).await? {
                return Ok(DiskClaim::BoundTo(bound));
            }
            let slots = self.node_slots(ak_fingerprint, max_disks).await?;
            if slots.iter().flatten().any(|held| held == disk) {
                // This node's slot names the disk; the disk's own key is written in the same
                // transaction, so it is about to be seen (or was deleted by hand): read again.
                continue;
            }
            let Some(free) = slots.iter().position(Option::is_none) else {
                return Ok(DiskClaim::ClaimantAtLimit {
                    held: slots.into_iter().flatten().collect(),
                });
            };
            let slot_key = keys::node_disk_slot(ak_fingerprint, free);
            let value = claim.encode();
            let txn = Txn::new()
                .when([
                    Compare::create_revision(disk_key.path(), CompareOp::Equal, 0),
                    Compare::create_revision(slot_key.path(), CompareOp::Equal, 0),
                ])
                .and_then([
                    TxnOp::put(disk_key.path(), value.clone(), None),
                    TxnOp::put(slot_key.path(), value, None),
                ])
                .or_else([TxnOp::get(disk_key.path(), None)]);
            // Repeatable: if an attempt committed unseen, the next one finds the disk bound to
            // this claimant and answers that.
            let resp = self
                .retrying("claim", disk_key.path(), |mut c| {
                    let txn = txn.clone();
                    async move { c.txn(txn).await }
                })
                .await?;
            if resp.succeeded() {
                tracing::info!(disk, node = %claim.node_name, ak = %claim.ak_sha256,
                    "disk bound to node");
                return Ok(DiskClaim::BoundTo(claim.clone()));
            }
            let winner = resp.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
                _ => None,
            });
            if let Some(bytes) = winner {
                let won = DiskBindingRecord::decode(disk_key.path(), &bytes)?;
                return checked_disk(&disk_key, disk, won).map(DiskClaim::BoundTo);
            }
            // Only the slot was taken (this node claimed another disk concurrently): retry.
        }
        Err(StoreError::Contended {
            key: disk_key.path().to_owned(),
            attempts,
        })
    }

    /// The disk UUID in each of the node's `max_disks` slots (`None`: free).
    async fn node_slots(
        &self,
        ak: &[u8; 32],
        max_disks: usize,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let prefix = keys::node_disks_prefix(ak);
        let (records, _) = self.list::<DiskBindingRecord>(&prefix).await?;
        let mut slots = vec![None; max_disks];
        for (key, record) in records {
            let slot = key[prefix.len()..]
                .parse::<usize>()
                .ok()
                .filter(|s| *s < max_disks)
                .ok_or_else(|| StoreError::Malformed {
                    key: key.clone(),
                    reason: format!("not a slot below {max_disks}"),
                })?;
            slots[slot] = Some(record.disk_uuid);
        }
        Ok(slots)
    }

    /// The members, learners included.
    pub async fn members(&self) -> Result<Vec<MemberInfo>, StoreError> {
        let resp = self
            .retrying("member list", "members", |mut c| async move {
                c.member_list().await
            })
            .await?;
        Ok(resp.members().iter().map(member_info).collect())
    }

    /// Adds a member at `peer_url` as a learner (it replicates but does not vote, so a member
    /// that never starts cannot cost the cluster its quorum). Returns the new member's ID and
    /// the members including it (for the new member's `--initial-cluster`).
    pub async fn add_learner(&self, peer_url: &str) -> Result<(u64, Vec<MemberInfo>), StoreError> {
        let resp = self
            .reconfigure("member add", peer_url, |mut c| {
                let url = peer_url.to_owned();
                async move {
                    c.member_add([url], Some(MemberAddOptions::new().with_is_learner()))
                        .await
                }
            })
            .await?;
        let id = resp
            .member()
            .map(|m| m.id())
            .ok_or_else(|| StoreError::Refused {
                operation: "member add",
                key: peer_url.to_owned(),
                reason: "the answer names no member".into(),
            })?;
        Ok((id, resp.member_list().iter().map(member_info).collect()))
    }

    /// Promotes learner `id` to a voting member, retrying until `deadline` while etcd refuses
    /// because the learner has not caught up with the leader yet.
    pub async fn promote(&self, id: u64, deadline: Instant) -> Result<(), StoreError> {
        let key = format!("{id:x}");
        let mut delay = Duration::from_millis(100);
        loop {
            let mut client = self.raw();
            match self
                .call("member promote", &key, client.member_promote(id))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if Instant::now() + delay < deadline => {
                    tracing::debug!(member = %key, error = %e, "learner not promoted yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes member `id` (a deleted control plane).
    pub async fn remove_member(&self, id: u64) -> Result<(), StoreError> {
        self.reconfigure("member remove", &format!("{id:x}"), |mut c| async move {
            c.member_remove(id).await
        })
        .await
        .map(drop)
    }

    /// Hands the leadership to member `id`. etcd takes this only from the leader: send it
    /// through a client of the leader's endpoint alone.
    pub async fn move_leader(&self, id: u64) -> Result<(), StoreError> {
        let mut client = self.raw();
        self.call("move leader", &format!("{id:x}"), client.move_leader(id))
            .await
            .map(drop)
    }

    /// The member ID of the member at client URL `endpoint` and the leader's ID as that member
    /// sees it (0: none). Asked through a client of that one member: the shared channel would
    /// pick any.
    pub async fn status_of(&self, endpoint: &str) -> Result<(u64, u64), StoreError> {
        let single = Store::connect(&StoreConfig {
            endpoints: vec![endpoint.to_owned()],
            ..self.config.clone()
        })
        .await?;
        let mut client = single.raw();
        let resp = single.call("status", endpoint, client.status()).await?;
        let id = resp.header().map(|h| h.member_id()).unwrap_or_default();
        Ok((id, resp.leader()))
    }
}

fn member_info(m: &etcd_client::Member) -> MemberInfo {
    MemberInfo {
        id: m.id(),
        name: m.name().to_owned(),
        peer_urls: m.peer_urls().to_vec(),
        client_urls: m.client_urls().to_vec(),
        is_learner: m.is_learner(),
    }
}

/// `record`, read at `key`, unless it names another disk than `disk` (a record copied over
/// this disk's key).
fn checked_disk(
    key: &Key<DiskBindingRecord>,
    disk: &str,
    record: DiskBindingRecord,
) -> Result<DiskBindingRecord, StoreError> {
    if record.disk_uuid != disk {
        return Err(StoreError::Malformed {
            key: key.path().to_owned(),
            reason: format!("records disk {}, expected {disk}", record.disk_uuid),
        });
    }
    Ok(record)
}
