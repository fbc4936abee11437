//! The join service's disk bindings on etcd: every control plane claims through the same
//! replicated compare-and-set ([`Store::claim_disk`]), so they agree on one owner per disk
//! whichever control plane a node asks, across restarts and leader failovers.

use constellation_joinservice::disk_bindings::{
    Claim, DiskBindingError, DiskBindings, DiskOwner, DiskUuid,
};

use crate::Store;

/// [`DiskBindings`] in etcd. Fails closed: a store without quorum answers an error (the join
/// service refuses with `Unavailable`, the joiner retries), never a guess.
#[derive(Debug, Clone)]
pub struct EtcdDiskBindings {
    store: Store,
}

impl EtcdDiskBindings {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

#[tonic::async_trait]
impl DiskBindings for EtcdDiskBindings {
    async fn claim(
        &self,
        disk: &DiskUuid,
        claimant: &DiskOwner,
    ) -> Result<Claim, DiskBindingError> {
        self.store
            .claim_disk(disk, claimant)
            .await
            .map_err(|e| DiskBindingError::Store(Box::new(e)))
    }
}
