//! Hostile or damaged event logs: each is refused with an error naming where, never a panic or
//! an allocation sized by the attacker.

use constellation_image::eventlog::{EventLog, EventLogError};

const LOG: &[u8] = include_bytes!("data/ovmf-2022.11-6-1024mib.eventlog");

/// Offset of the first event after the Spec ID header.
fn first_event() -> usize {
    let size = u32::from_le_bytes(LOG[28..32].try_into().unwrap()) as usize;
    32 + size
}

#[test]
fn truncated_log_is_refused_at_every_length() {
    for cut in 0..LOG.len() {
        match EventLog::parse(&LOG[..cut]) {
            Err(_) => {}
            // A cut exactly between two events leaves a shorter, valid log.
            Ok(log) => assert!(
                log.events.len() < EventLog::parse(LOG).unwrap().events.len()
                    && cut >= first_event(),
                "cut at {cut} parsed as a complete log"
            ),
        }
    }
}

#[test]
fn huge_event_size_is_refused_without_allocating_it() {
    let mut log = LOG.to_vec();
    let e = first_event();
    // First event: PCR, type, count=n, then n digests; set its event size to u32::MAX.
    let log_parsed = EventLog::parse(LOG).unwrap();
    let first = &log_parsed.events[0];
    let size_at = e + 12 + digests_len(&log, e);
    assert_eq!(
        u32::from_le_bytes(log[size_at..size_at + 4].try_into().unwrap()) as usize,
        first.data.len()
    );
    log[size_at..size_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        EventLog::parse(&log),
        Err(EventLogError::Truncated {
            what: "event data",
            ..
        })
    ));
}

/// Bytes of the digest list of the event at `e` (algorithm id + digest, per the log's sizes).
fn digests_len(log: &[u8], e: usize) -> usize {
    let count = u32::from_le_bytes(log[e + 8..e + 12].try_into().unwrap());
    let mut off = e + 12;
    for _ in 0..count {
        let alg = u16::from_le_bytes(log[off..off + 2].try_into().unwrap());
        off += 2 + match alg {
            0x4 => 20,
            0xb => 32,
            0xc => 48,
            0xd => 64,
            other => panic!("fixture uses algorithm {other:#x}"),
        };
    }
    off - (e + 12)
}

#[test]
fn undeclared_digest_algorithm_is_refused() {
    let mut log = LOG.to_vec();
    let e = first_event();
    log[e + 12..e + 14].copy_from_slice(&0x0099u16.to_le_bytes());
    assert!(matches!(
        EventLog::parse(&log),
        Err(EventLogError::UnknownAlgorithm { alg: 0x99, .. })
    ));
}

#[test]
fn out_of_range_pcr_index_is_refused() {
    let mut log = LOG.to_vec();
    let e = first_event();
    log[e..e + 4].copy_from_slice(&24u32.to_le_bytes());
    assert!(matches!(
        EventLog::parse(&log),
        Err(EventLogError::BadPcr { pcr: 24, .. })
    ));
}

#[test]
fn log_without_a_spec_id_header_is_refused() {
    let mut log = LOG.to_vec();
    log[32] ^= 0xff;
    assert_eq!(EventLog::parse(&log), Err(EventLogError::NotCryptoAgile));
    assert!(EventLog::parse(&[0u8; 64]).is_err());
}

#[test]
fn huge_digest_count_is_refused_without_allocating() {
    let mut log = LOG.to_vec();
    let e = first_event();
    log[e + 8..e + 12].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(EventLog::parse(&log).is_err());
}
