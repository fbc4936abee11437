//! The measurements policy: expected SHA-256 values per PCR index, each enforced or warn-only.
//!
//! JSON form: `{"<index>": {"expected": "<hex>", "warnOnly": bool}}`, each index written in
//! canonical decimal (`"4"`, never `"04"`, `"+4"` or `" 4"`) and at most once, so one file
//! cannot hold two entries for the same PCR of which a reader would pick either.
//!
//! A policy must mean something: [`Measurements::validate`] refuses one that is empty, whose
//! every entry is warn-only, or that does not enforce [`CLUSTER_ID_PCR`].
//! [`Measurements::from_json`] applies it, so every policy read from a file or metadata has
//! passed it. The one verifier that cannot know PCR 15 (a joiner checking the join service,
//! which carries the cluster ID the joiner has not learnt yet) says so explicitly with
//! [`Measurements::without_cluster_id`] instead of a warn-only PCR 15.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A SHA-256 PCR value.
pub type Digest = [u8; 32];

/// Highest PCR index of a TPM 2.0 PCR bank.
pub const MAX_PCR_INDEX: u32 = 23;

/// One expected value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Measurement {
    #[serde(with = "hex_digest")]
    pub expected: Digest,
    #[serde(rename = "warnOnly", default)]
    pub warn_only: bool,
}

impl Measurement {
    pub fn enforce(expected: Digest) -> Self {
        Self {
            expected,
            warn_only: false,
        }
    }
    pub fn warn_only(expected: Digest) -> Self {
        Self {
            expected,
            warn_only: true,
        }
    }
}

/// Expected values by PCR index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Measurements(pub BTreeMap<u32, Measurement>);

/// Why a measurements document was refused.
#[derive(Debug, thiserror::Error)]
pub enum MeasurementsError {
    #[error("measurements JSON is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("PCR index {index} is out of range (0..={MAX_PCR_INDEX})")]
    IndexOutOfRange { index: u32 },
    #[error("PCR index {0:?} is not a decimal number")]
    BadIndex(String),
    #[error("PCR index {found:?} is not canonical: expected {canonical:?} (no leading zeros, signs or spaces)")]
    NonCanonicalIndex { found: String, canonical: String },
    #[error("PCR index {index} is given twice")]
    DuplicateIndex { index: u32 },
    #[error("no measurements given: a policy with nothing to check would accept anything")]
    Empty,
    #[error(
        "every measurement is warn-only (PCRs {warn_only:?}): such a policy would accept anything"
    )]
    AllWarnOnly { warn_only: Vec<u32> },
    #[error("PCR[{CLUSTER_ID_PCR}] (cluster ID) must be enforced: expected an enforced entry, found {found}")]
    ClusterIdPcrNotEnforced { found: ClusterIdPcrState },
    #[error("{} enforced PCR(s) differ: {}", .0.len(), MismatchList(.0))]
    Mismatch(Vec<MeasurementMismatch>),
}

/// What a refused policy had at [`CLUSTER_ID_PCR`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterIdPcrState {
    Missing,
    WarnOnly,
}

impl fmt::Display for ClusterIdPcrState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClusterIdPcrState::Missing => "no entry",
            ClusterIdPcrState::WarnOnly => "a warn-only entry",
        })
    }
}

/// One PCR whose value differed from (or was missing against) the policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurementMismatch {
    pub index: u32,
    pub expected: Digest,
    /// `None` when the evidence did not contain this PCR at all.
    pub found: Option<Digest>,
    pub warn_only: bool,
}

impl fmt::Display for MeasurementMismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.found {
            Some(found) => write!(
                f,
                "PCR[{}]: expected {}, found {}",
                self.index,
                hex::encode(self.expected),
                hex::encode(found)
            ),
            None => write!(
                f,
                "PCR[{}]: expected {}, not present in evidence",
                self.index,
                hex::encode(self.expected)
            ),
        }
    }
}

struct MismatchList<'a>(&'a [MeasurementMismatch]);
impl fmt::Display for MismatchList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{m}")?;
        }
        Ok(())
    }
}

/// The result of a comparison that did not fail: warn-only mismatches, if any.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PolicyOutcome {
    pub warnings: Vec<MeasurementMismatch>,
}

impl Measurements {
    /// Parses the JSON form (canonical, unique, in-range indices) and [`validate`]s the policy.
    ///
    /// [`validate`]: Measurements::validate
    pub fn from_json(bytes: &[u8]) -> Result<Self, MeasurementsError> {
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let entries = (&mut de).deserialize_map(EntriesVisitor)?;
        de.end()?;
        let out = Self::from_entries(entries)?;
        out.validate()?;
        Ok(out)
    }

    /// Builds the map from (index text, entry) pairs in file order: each index canonical
    /// decimal, in range and not seen before.
    fn from_entries(entries: Vec<(String, Measurement)>) -> Result<Self, MeasurementsError> {
        let mut out = BTreeMap::new();
        for (k, v) in entries {
            let index = parse_index(&k)?;
            if out.insert(index, v).is_some() {
                return Err(MeasurementsError::DuplicateIndex { index });
            }
        }
        Ok(Self(out))
    }

    /// Refuses a policy that would accept anything, or any cluster's node: empty, every entry
    /// warn-only, or [`CLUSTER_ID_PCR`] missing or warn-only.
    pub fn validate(&self) -> Result<(), MeasurementsError> {
        self.validate_enforces_something()?;
        match self.0.get(&CLUSTER_ID_PCR) {
            Some(m) if !m.warn_only => Ok(()),
            Some(_) => Err(MeasurementsError::ClusterIdPcrNotEnforced {
                found: ClusterIdPcrState::WarnOnly,
            }),
            None => Err(MeasurementsError::ClusterIdPcrNotEnforced {
                found: ClusterIdPcrState::Missing,
            }),
        }
    }

    /// Non-empty and at least one entry enforced.
    fn validate_enforces_something(&self) -> Result<(), MeasurementsError> {
        if self.0.is_empty() {
            return Err(MeasurementsError::Empty);
        }
        if self.0.values().all(|m| m.warn_only) {
            return Err(MeasurementsError::AllWarnOnly {
                warn_only: self.indices(),
            });
        }
        Ok(())
    }

    /// This (validated) policy for a verifier that cannot know the cluster ID, i.e. a joiner
    /// checking a member of the cluster it is joining: [`CLUSTER_ID_PCR`] is dropped
    /// deliberately. What remains may be all warn-only (an operator who relaxed the image
    /// PCRs): such a verifier then rests on the pinned control-plane keys, which is why this
    /// view exists only through this call and is never parsed from a file.
    pub fn without_cluster_id(mut self) -> Result<Self, MeasurementsError> {
        self.validate()?;
        self.0.remove(&CLUSTER_ID_PCR);
        Ok(self)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("measurements always serialize")
    }

    /// Compares actual PCR values to the policy. Enforced mismatches (or enforced PCRs absent
    /// from `actual`) fail; warn-only mismatches are returned as warnings. An empty policy is
    /// rejected: it would accept any evidence. (All-warn-only policies are refused where
    /// policies come from outside, [`Measurements::from_json`]; the one derived view that may
    /// be all warn-only is [`Measurements::without_cluster_id`].)
    pub fn check(
        &self,
        actual: &BTreeMap<u32, Digest>,
    ) -> Result<PolicyOutcome, MeasurementsError> {
        if self.0.is_empty() {
            return Err(MeasurementsError::Empty);
        }
        let mut failures = Vec::new();
        let mut warnings = Vec::new();
        for (&index, m) in &self.0 {
            let found = actual.get(&index).copied();
            if found == Some(m.expected) {
                continue;
            }
            let mismatch = MeasurementMismatch {
                index,
                expected: m.expected,
                found,
                warn_only: m.warn_only,
            };
            if m.warn_only {
                warnings.push(mismatch);
            } else {
                failures.push(mismatch);
            }
        }
        if failures.is_empty() {
            Ok(PolicyOutcome { warnings })
        } else {
            Err(MeasurementsError::Mismatch(failures))
        }
    }

    /// The PCR indices this policy looks at, for building a quote selection.
    pub fn indices(&self) -> Vec<u32> {
        self.0.keys().copied().collect()
    }
}

impl Serialize for Measurements {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(&k.to_string(), v)?;
        }
        map.end()
    }
}

/// Deserialization applies the syntax rules of [`Measurements::from_json`] (canonical, unique,
/// in-range indices) but not [`Measurements::validate`]: stored state may hold any policy the
/// program built; policies from users go through `from_json`.
impl<'de> Deserialize<'de> for Measurements {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let entries = d.deserialize_map(EntriesVisitor)?;
        Self::from_entries(entries).map_err(serde::de::Error::custom)
    }
}

/// A PCR index in canonical decimal form, within the bank.
fn parse_index(text: &str) -> Result<u32, MeasurementsError> {
    // Surrounding spaces parse too, so " 4" is reported as an alias of 4, not as garbage.
    let index: u32 = text
        .trim()
        .parse()
        .map_err(|_| MeasurementsError::BadIndex(text.to_owned()))?;
    let canonical = index.to_string();
    if canonical != text {
        return Err(MeasurementsError::NonCanonicalIndex {
            found: text.to_owned(),
            canonical,
        });
    }
    if index > MAX_PCR_INDEX {
        return Err(MeasurementsError::IndexOutOfRange { index });
    }
    Ok(index)
}

/// Reads a JSON object's entries in order, keeping duplicates (a map would silently keep one).
struct EntriesVisitor;

impl<'de> serde::de::Visitor<'de> for EntriesVisitor {
    type Value = Vec<(String, Measurement)>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a map from PCR index to {expected, warnOnly}")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = Vec::new();
        while let Some(entry) = map.next_entry::<String, Measurement>()? {
            // More entries than PCRs cannot be a valid policy; stop before allocating more.
            if out.len() > MAX_PCR_INDEX as usize {
                return Err(serde::de::Error::custom(format!(
                    "more than {} PCR entries",
                    MAX_PCR_INDEX + 1
                )));
            }
            out.push(entry);
        }
        Ok(out)
    }
}

/// Serde helper: a 32-byte digest as lowercase hex.
pub mod hex_digest {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let s = String::deserialize(d)?;
        let v =
            hex::decode(&s).map_err(|e| serde::de::Error::custom(format!("bad hex {s:?}: {e}")))?;
        v.try_into().map_err(|v: Vec<u8>| {
            serde::de::Error::custom(format!("expected 32 bytes, got {}", v.len()))
        })
    }
}

/// A TPM PCR extend in the SHA-256 bank: `new = SHA-256(old || event_digest)`.
pub fn pcr_extend(old: &Digest, event_digest: &Digest) -> Digest {
    use sha2::{Digest as _, Sha256};
    let mut h = Sha256::new();
    h.update(old);
    h.update(event_digest);
    h.finalize().into()
}

/// SHA-256 of `data`.
pub fn sha256(data: &[u8]) -> Digest {
    // aws-lc-rs: SHA-NI / AVX2 code paths, which matter when hashing node images.
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// PCR 15 after one extend with the event "cluster ID": SHA-256(0^32 || SHA-256(cluster ID)).
pub fn cluster_id_pcr(cluster_id: &[u8]) -> Digest {
    pcr_extend(&[0u8; 32], &sha256(cluster_id))
}

/// The PCR that binds a node to its cluster (extended with the cluster ID at init/join).
pub const CLUSTER_ID_PCR: u32 = crate::pcr::CLUSTER_ID;

/// The measurement sets a cluster's join configuration accepts: normally one; during a rolling
/// image upgrade two (the old image's and the new image's), so nodes of either image attest
/// while nodes are replaced one by one. The target set is last. JSON: one measurements object,
/// or a list of them (only while an upgrade runs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcceptedMeasurements(Vec<Measurements>);

impl AcceptedMeasurements {
    /// Only `target`.
    pub fn one(target: Measurements) -> Self {
        Self(vec![target])
    }

    /// `others` (the images nodes still run) and `target`, each set once, `target` last.
    pub fn during_upgrade(others: &[Measurements], target: Measurements) -> Self {
        let mut sets: Vec<Measurements> = Vec::new();
        for m in others {
            if *m != target && !sets.contains(m) {
                sets.push(m.clone());
            }
        }
        sets.push(target);
        Self(sets)
    }

    /// Every accepted set, the target last.
    pub fn sets(&self) -> &[Measurements] {
        &self.0
    }

    /// The target (last) set.
    pub fn target(&self) -> &Measurements {
        self.0.last().expect("at least one set")
    }

    /// The first set `check` accepts, as `check` answered; when none does, the target set's
    /// error (a refused node learns how it differs from the image it should run).
    pub fn first_accepting<T, E>(
        &self,
        mut check: impl FnMut(&Measurements) -> Result<T, E>,
    ) -> Result<T, E> {
        let (target, others) = self.0.split_last().expect("at least one set");
        others
            .iter()
            .find_map(|m| check(m).ok())
            .map_or_else(|| check(target), Ok)
    }

    /// Parses one measurements object or a non-empty list of them; each is validated as
    /// [`Measurements::from_json`] validates.
    pub fn from_json(bytes: &[u8]) -> Result<Self, MeasurementsError> {
        let is_list = bytes
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            .is_some_and(|b| *b == b'[');
        if !is_list {
            return Measurements::from_json(bytes).map(Self::one);
        }
        // Deserialize checks each set's indices as `from_json` does; then each is validated.
        let sets: Vec<Measurements> = serde_json::from_slice(bytes)?;
        if sets.is_empty() {
            return Err(MeasurementsError::Empty);
        }
        sets.iter().try_for_each(Measurements::validate)?;
        Ok(Self(sets))
    }

    /// One set as a measurements object (what every reader of a single set understands);
    /// several as a list.
    pub fn to_json(&self) -> String {
        match self.0.as_slice() {
            [one] => one.to_json(),
            many => serde_json::to_string(many).expect("measurements always serialize"),
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn accepted_measurements_are_one_object_or_a_list_with_the_target_last() {
        let m = |v: u8| {
            Measurements(
                [
                    (4, Measurement::enforce([v; 32])),
                    (CLUSTER_ID_PCR, Measurement::enforce([0; 32])),
                ]
                .into(),
            )
        };
        let one = AcceptedMeasurements::one(m(1));
        assert_eq!(one.to_json(), m(1).to_json());
        assert_eq!(
            AcceptedMeasurements::from_json(one.to_json().as_bytes()).unwrap(),
            one
        );
        let both = AcceptedMeasurements::during_upgrade(&[m(1), m(2), m(1)], m(2));
        assert_eq!(both.sets(), [m(1), m(2)]);
        let back = AcceptedMeasurements::from_json(both.to_json().as_bytes()).unwrap();
        assert_eq!(back, both);
        // Every set is validated; an empty list accepts nothing.
        assert!(matches!(
            AcceptedMeasurements::from_json(b" []"),
            Err(MeasurementsError::Empty)
        ));
        let unbound = r#"[{"4":{"expected":"0101010101010101010101010101010101010101010101010101010101010101","warnOnly":false}}]"#;
        assert!(matches!(
            AcceptedMeasurements::from_json(unbound.as_bytes()),
            Err(MeasurementsError::ClusterIdPcrNotEnforced { .. })
        ));
    }
    use super::*;

    fn d(b: u8) -> Digest {
        [b; 32]
    }

    #[test]
    fn json_round_trip_and_index_checks() {
        let json = format!(
            r#"{{"4": {{"expected": "{}", "warnOnly": false}}, "9": {{"expected": "{}", "warnOnly": true}}, "15": {{"expected": "{}"}}}}"#,
            hex::encode(d(4)),
            hex::encode(d(9)),
            hex::encode(d(0))
        );
        let m = Measurements::from_json(json.as_bytes()).unwrap();
        assert_eq!(m.0[&4], Measurement::enforce(d(4)));
        assert_eq!(m.0[&9], Measurement::warn_only(d(9)));
        assert_eq!(Measurements::from_json(m.to_json().as_bytes()).unwrap(), m);

        let bad = format!(r#"{{"24": {{"expected": "{}"}}}}"#, hex::encode(d(1)));
        assert!(matches!(
            Measurements::from_json(bad.as_bytes()),
            Err(MeasurementsError::IndexOutOfRange { index: 24 })
        ));
        let bad = format!(r#"{{"x": {{"expected": "{}"}}}}"#, hex::encode(d(1)));
        assert!(matches!(
            Measurements::from_json(bad.as_bytes()),
            Err(MeasurementsError::BadIndex(_))
        ));
        let short = r#"{"1": {"expected": "abcd"}}"#;
        assert!(matches!(
            Measurements::from_json(short.as_bytes()),
            Err(MeasurementsError::Json(_))
        ));
    }

    #[test]
    fn enforced_mismatch_fails_warn_only_warns() {
        let mut m = Measurements::default();
        m.0.insert(4, Measurement::enforce(d(4)));
        m.0.insert(9, Measurement::warn_only(d(9)));
        let mut actual = BTreeMap::from([(4, d(4)), (9, d(9))]);
        assert_eq!(m.check(&actual).unwrap(), PolicyOutcome::default());

        actual.insert(9, d(0));
        let out = m.check(&actual).unwrap();
        assert_eq!(out.warnings.len(), 1);
        assert_eq!(out.warnings[0].index, 9);
        assert_eq!(out.warnings[0].found, Some(d(0)));

        actual.insert(4, d(1));
        match m.check(&actual) {
            Err(MeasurementsError::Mismatch(f)) => {
                assert_eq!(f.len(), 1);
                assert_eq!(
                    (f[0].index, f[0].expected, f[0].found),
                    (4, d(4), Some(d(1)))
                );
            }
            other => panic!("expected mismatch, got {other:?}"),
        }

        actual.remove(&4);
        match m.check(&actual) {
            Err(MeasurementsError::Mismatch(f)) => assert_eq!(f[0].found, None),
            other => panic!("expected missing PCR to fail, got {other:?}"),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let _ = Measurements::from_json(&bytes);
        }

        #[test]
        fn json_shaped_input_never_panics(index in ".{0,4}", hexs in "[0-9a-f]{0,70}", warn in proptest::prelude::any::<bool>()) {
            let json = format!(r#"{{"{index}": {{"expected": "{hexs}", "warnOnly": {warn}}}}}"#);
            if let Ok(m) = Measurements::from_json(json.as_bytes()) {
                proptest::prop_assert_eq!(Measurements::from_json(m.to_json().as_bytes()).unwrap(), m);
            }
        }
    }

    #[test]
    #[ignore = "long run: make fuzz"]
    fn proptest_long_measurements_json() {
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(
                &proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024),
                |bytes| {
                    let _ = Measurements::from_json(&bytes);
                    Ok(())
                },
            )
            .unwrap();
    }

    #[test]
    fn empty_policy_rejects() {
        assert!(matches!(
            Measurements::default().check(&BTreeMap::new()),
            Err(MeasurementsError::Empty)
        ));
    }
}
