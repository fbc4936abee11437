//! Floods against the key service (issue 14 §5): a request larger than the listener's message
//! cap is refused before it is decoded, and the service still answers afterwards.

mod common;

use common::{data_key, request, RunningKeyService};
use constellation_common::limits::DEFAULT_MAX_MESSAGE_BYTES;
use constellation_common::secret::SecretBytes;
use constellation_keyservice::{KeyService, MasterSecret};

#[tokio::test]
async fn oversized_request_is_refused_before_it_is_decoded() {
    let master = MasterSecret::new(
        SecretBytes::new(vec![0x11; 32]),
        SecretBytes::new(vec![0x22; 32]),
    )
    .unwrap();
    let running = RunningKeyService::start(KeyService::new(master)).await;
    let mut client = running.client().await;
    // tonic's own default would accept 4 MiB; the listener's cap is far lower.
    let oversized = "k".repeat(DEFAULT_MAX_MESSAGE_BYTES + 1);
    let refused = client
        .get_data_key(request(&oversized, 32))
        .await
        .expect_err("a request over the message cap is refused");
    assert_eq!(
        refused.code(),
        tonic::Code::OutOfRange,
        "refused by the decoder's size cap, not by the handler: {refused:?}"
    );
    assert!(
        refused.message().contains("message length too large"),
        "{refused:?}"
    );
    // An ordinary request on a fresh connection is still served.
    let mut client = running.client().await;
    assert_eq!(data_key(&mut client, "disk-1", 32).await.len(), 32);
    running.stop().await;
}
