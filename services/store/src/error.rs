//! What the store's callers see when etcd does not answer or answers something unexpected.

/// Why a store operation failed. Never carries a value read from or written to the store (a
/// value may hold key material); keys are paths and safe to print.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The client could not be built (bad endpoint, bad TLS material).
    #[error("connecting to etcd at {endpoints:?}: {reason}")]
    Connect {
        endpoints: Vec<String>,
        reason: String,
    },
    /// No answer within the request timeout, no reachable member, or no quorum (etcd without a
    /// leader). Nothing may have been written; the caller may retry. A join service answers
    /// `Unavailable` and the joiner retries.
    #[error("etcd unavailable during {operation} of {key:?}: {reason}")]
    Unavailable {
        operation: &'static str,
        key: String,
        reason: String,
    },
    /// etcd refused the request (a member-API precondition, a bad argument).
    #[error("etcd refused {operation} of {key:?}: {reason}")]
    Refused {
        operation: &'static str,
        key: String,
        reason: String,
    },
    /// A value under one of our keys is not what we store there.
    #[error("etcd value at {key:?} is malformed: {reason}")]
    Malformed { key: String, reason: String },
    /// A compare-and-set lost its race more often than can happen honestly.
    #[error("compare-and-set on {key:?} kept losing after {attempts} attempts")]
    Contended { key: String, attempts: usize },
}

impl StoreError {
    /// Classifies an `etcd-client` error: transport failures, deadlines, cancellations and
    /// "no leader" become [`StoreError::Unavailable`], the rest [`StoreError::Refused`].
    pub(crate) fn from_etcd(operation: &'static str, key: &str, e: etcd_client::Error) -> Self {
        let unavailable = match &e {
            etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
            etcd_client::Error::GRpcStatus(status) => {
                use tonic::Code;
                matches!(
                    status.code(),
                    Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Aborted
                ) || (status.code() == Code::Unknown
                    && ["deadline", "leader", "timed out", "timeout", "transport"]
                        .iter()
                        .any(|s| status.message().contains(s)))
            }
            _ => false,
        };
        let reason = e.to_string();
        let key = key.to_owned();
        if unavailable {
            Self::Unavailable {
                operation,
                key,
                reason,
            }
        } else {
            Self::Refused {
                operation,
                key,
                reason,
            }
        }
    }

    /// True when retrying later may succeed.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::Unavailable { .. } | Self::Contended { .. })
    }
}
