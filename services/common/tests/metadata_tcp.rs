//! `TcpMetadata`: the QEMU guests' metadata source, against a real TCP endpoint that sends the
//! JSON and closes (as the platform's `guestfwd cat` does).

use std::io::Write;
use std::net::TcpListener;

use constellation_common::metadata::{
    ClusterMetadata, Metadata, MetadataError, NodeInfo, Role, TcpMetadata,
};

fn serve_once(bytes: Vec<u8>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = listener.accept() {
            let _ = s.write_all(&bytes);
        }
    });
    addr
}

fn cluster() -> ClusterMetadata {
    ClusterMetadata {
        cluster_name: "c".into(),
        init_secret_hash: "$argon2id$x".into(),
        attestation_variant: "qemu-vtpm".into(),
        measurements_json: "{}".into(),
        snp_settings_json: String::new(),
        nodes: vec![NodeInfo {
            name: "c-worker-1".into(),
            role: Role::Worker,
            ip: "10.42.0.17".parse().unwrap(),
            ak_spki_hex: "00".into(),
        }],
    }
}

#[test]
fn reads_the_metadata_the_endpoint_sends_and_finds_itself() {
    let addr = serve_once(serde_json::to_vec(&cluster()).unwrap());
    let m = TcpMetadata::new(addr, "c-worker-1");
    let me = m.self_info().unwrap();
    assert_eq!(me.ip.to_string(), "10.42.0.17");
    assert_eq!(me.role, Role::Worker);
}

#[test]
fn malformed_and_oversized_answers_are_refused_naming_the_endpoint() {
    let addr = serve_once(b"{not json".to_vec());
    let err = TcpMetadata::new(addr, "x").cluster().unwrap_err();
    assert!(
        matches!(err, MetadataError::MalformedEndpoint { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&addr.to_string()), "{err}");

    let addr = serve_once(vec![b' '; TcpMetadata::MAX_BYTES as usize + 10]);
    let err = TcpMetadata::new(addr, "x").cluster().unwrap_err();
    assert!(matches!(err, MetadataError::TooLarge { .. }), "{err}");
}

#[test]
fn a_closed_endpoint_is_an_error_not_a_hang() {
    let addr = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let err = TcpMetadata::new(addr, "x").cluster().unwrap_err();
    assert!(matches!(err, MetadataError::Endpoint { .. }), "{err}");
}
