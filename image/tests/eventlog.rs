//! The TCG2 event log parser on a real OVMF boot's log.

use std::collections::BTreeMap;

use constellation_attestation::measurements::Digest;
use constellation_image::eventlog::{EventLog, EV_EFI_ACTION, EV_EVENT_TAG};

const LOG: &[u8] = include_bytes!("data/ovmf-2022.11-6-1024mib.eventlog");
const PCRS: &str = include_str!("data/ovmf-2022.11-6-1024mib.pcrs");

fn live_pcrs() -> BTreeMap<u32, Digest> {
    PCRS.lines()
        .map(|l| {
            let (i, v) = l.split_once(' ').unwrap();
            let mut d = [0u8; 32];
            hex::decode_to_slice(v, &mut d).unwrap();
            (i.parse().unwrap(), d)
        })
        .collect()
}

#[test]
fn a_real_ovmf_log_replays_to_the_pcrs_the_guest_read() {
    let log = EventLog::parse(LOG).unwrap();
    let replayed = log.replay();
    let live = live_pcrs();
    for (pcr, value) in &live {
        let got = replayed.get(pcr).copied().unwrap_or([0; 32]);
        assert_eq!(hex::encode(got), hex::encode(value), "PCR {pcr}");
    }
    // The kernel's EFI stub logged the command line and the initrd into PCR 9.
    let tags: Vec<String> = log
        .events
        .iter()
        .filter(|e| e.pcr == 9 && e.event_type == EV_EVENT_TAG)
        .map(|e| e.describe())
        .collect();
    assert_eq!(
        tags,
        [
            "EV_EVENT_TAG \"LOADED_IMAGE::LoadOptions\"",
            "EV_EVENT_TAG \"Linux initrd\""
        ]
    );
    let last = log.events.last().unwrap();
    assert_eq!(last.event_type, EV_EFI_ACTION);
    assert!(
        last.to_string()
            .contains("Exit Boot Services Returned with Success"),
        "{last}"
    );
}
