//! The key derivation must match the Go implementation's known answers exactly.

use constellation_common::kdf::derive_key;
use serde::Deserialize;

#[derive(Deserialize)]
struct Vectors {
    vectors: Vec<Vector>,
}

#[derive(Deserialize)]
struct Vector {
    name: String,
    ikm: String,
    salt: String,
    info_text: String,
    okm: String,
}

#[test]
fn matches_constellation_go_known_answers() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/test_data/kdf/hkdf-sha256.json"
    );
    let v: Vectors =
        serde_json::from_slice(&std::fs::read(path).expect("known answers present")).unwrap();
    assert!(!v.vectors.is_empty());
    for vec in v.vectors {
        let key_id = vec
            .info_text
            .strip_prefix("key-")
            .expect("info starts with key-");
        let okm = hex::decode(&vec.okm).unwrap();
        let got = derive_key(
            &hex::decode(&vec.ikm).unwrap(),
            &hex::decode(&vec.salt).unwrap(),
            key_id,
            okm.len(),
        )
        .unwrap();
        assert_eq!(hex::encode(got.expose()), vec.okm, "vector {}", vec.name);
    }
}
