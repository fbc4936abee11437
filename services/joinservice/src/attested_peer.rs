//! From an attested aTLS connection to the [`AttestedPeer`] the join service checks requests
//! against.
//!
//! `constellation_attestation::atls::incoming` puts an [`atls::ConnectInfo`] into every request's
//! extensions; in mutual mode it carries the client's accepted [`Verdict`]. [`AttestedPeerInterceptor`]
//! turns that verdict into an [`AttestedPeer`], naming the node through a lookup of the verdict's
//! attestation-key fingerprint (in the bootstrapper: the validator's pinned node AKs from
//! metadata). A connection without a client verdict gets no `AttestedPeer`, so
//! [`JoinTicketIssuer`](crate::JoinTicketIssuer) refuses it as not attested.
//!
//! ```text
//! let interceptor = AttestedPeerInterceptor::new(move |ak| validator.node_for(ak));
//! let service = JoinServiceServer::with_interceptor(issuer, interceptor);
//! ```

use std::fmt;
use std::sync::Arc;

use constellation_attestation::atls;
use constellation_attestation::measurements::Digest;
use constellation_attestation::Verdict;
use tonic::{Request, Status};

use crate::ticket::AttestedPeer;

type NodeLookup = dyn Fn(&Digest) -> Option<String> + Send + Sync;

/// The [`AttestedPeer`] for a connection: `None` unless the client attested (mutual aTLS).
pub fn attested_peer(info: &atls::ConnectInfo, node_for: &NodeLookup) -> Option<AttestedPeer> {
    info.peer
        .as_ref()
        .map(|verdict| peer_from_verdict(verdict, node_for))
}

/// The [`AttestedPeer`] for an accepted client verdict.
pub fn peer_from_verdict(verdict: &Verdict, node_for: &NodeLookup) -> AttestedPeer {
    AttestedPeer {
        ak_fingerprint: verdict.ak_fingerprint,
        node_name: node_for(&verdict.ak_fingerprint),
    }
}

/// A tonic interceptor for the join service: inserts the [`AttestedPeer`] of the connection
/// into each request's extensions (see the module documentation).
#[derive(Clone)]
pub struct AttestedPeerInterceptor {
    node_for: Arc<NodeLookup>,
}

impl fmt::Debug for AttestedPeerInterceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttestedPeerInterceptor")
            .finish_non_exhaustive()
    }
}

impl AttestedPeerInterceptor {
    /// `node_for` names the node an attestation-key fingerprint belongs to (`None`: no node;
    /// the join service then refuses the request).
    pub fn new(node_for: impl Fn(&Digest) -> Option<String> + Send + Sync + 'static) -> Self {
        Self {
            node_for: Arc::new(node_for),
        }
    }
}

impl tonic::service::Interceptor for AttestedPeerInterceptor {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        // Only the aTLS layer may vouch for a peer.
        req.extensions_mut().remove::<AttestedPeer>();
        let peer = req
            .extensions()
            .get::<atls::ConnectInfo>()
            .and_then(|info| attested_peer(info, self.node_for.as_ref()));
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        Ok(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use constellation_attestation::Variant;
    use tonic::service::Interceptor;

    fn verdict(ak: u8) -> Verdict {
        Verdict {
            variant: Variant::QemuVtpm,
            pcrs: Default::default(),
            warnings: Vec::new(),
            ak_fingerprint: [ak; 32],
        }
    }

    fn interceptor() -> AttestedPeerInterceptor {
        AttestedPeerInterceptor::new(|ak| (ak == &[1u8; 32]).then(|| "worker-0".to_owned()))
    }

    fn run(info: Option<atls::ConnectInfo>) -> Option<AttestedPeer> {
        let mut req = Request::new(());
        if let Some(info) = info {
            req.extensions_mut().insert(info);
        }
        interceptor()
            .call(req)
            .unwrap()
            .extensions()
            .get::<AttestedPeer>()
            .cloned()
    }

    #[test]
    fn attested_client_is_named_by_its_key() {
        let peer = run(Some(atls::ConnectInfo {
            remote_addr: None,
            peer: Some(verdict(1)),
        }));
        assert_eq!(
            peer,
            Some(AttestedPeer {
                ak_fingerprint: [1; 32],
                node_name: Some("worker-0".into()),
            })
        );
        let stranger = run(Some(atls::ConnectInfo {
            remote_addr: None,
            peer: Some(verdict(2)),
        }));
        assert_eq!(stranger.unwrap().node_name, None);
    }

    #[test]
    fn no_client_verdict_means_no_peer() {
        assert_eq!(run(None), None);
        assert_eq!(
            run(Some(atls::ConnectInfo {
                remote_addr: None,
                peer: None,
            })),
            None
        );
        // A peer put there by anything but the aTLS layer is dropped.
        let mut req = Request::new(());
        req.extensions_mut().insert(AttestedPeer {
            ak_fingerprint: [1; 32],
            node_name: Some("worker-0".into()),
        });
        let req = interceptor().call(req).unwrap();
        assert!(req.extensions().get::<AttestedPeer>().is_none());
    }
}
