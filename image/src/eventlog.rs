//! A parser for the TCG2 "crypto agile" event log that UEFI firmware hands to Linux
//! (`/sys/kernel/security/tpm0/binary_bios_measurements`), and its replay into PCR values.
//!
//! Every length and count is checked against the remaining input: a truncated or hostile log
//! is an error naming the byte offset, never a panic or an out-of-bounds read.

use std::collections::BTreeMap;
use std::fmt;

use constellation_attestation::measurements::{pcr_extend, Digest, MAX_PCR_INDEX};

/// TPM_ALG_SHA256.
const TPM_ALG_SHA256: u16 = 0x000b;
/// Events of this type are logged but never extended.
pub const EV_NO_ACTION: u32 = 0x3;
pub const EV_SEPARATOR: u32 = 0x4;
pub const EV_EFI_ACTION: u32 = 0x8000_0007;
pub const EV_EVENT_TAG: u32 = 0x6;
pub const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;

/// Why an event log was refused.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum EventLogError {
    #[error("event log truncated at byte {offset}: {what} needs {need} bytes, {left} left")]
    Truncated {
        offset: usize,
        what: &'static str,
        need: usize,
        left: usize,
    },
    #[error("event log header is not a TCG2 Spec ID event (\"Spec ID Event03\")")]
    NotCryptoAgile,
    #[error("event {index} at byte {offset} uses algorithm {alg:#06x}, which the Spec ID event did not declare")]
    UnknownAlgorithm {
        index: usize,
        offset: usize,
        alg: u16,
    },
    #[error("event {index} at byte {offset} extends PCR {pcr}, beyond {MAX_PCR_INDEX}")]
    BadPcr {
        index: usize,
        offset: usize,
        pcr: u32,
    },
    #[error("event {index} at byte {offset} has no SHA-256 digest")]
    NoSha256 { index: usize, offset: usize },
}

/// One logged measurement (SHA-256 bank).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Position in the log, counting the header event as 0.
    pub index: usize,
    pub pcr: u32,
    pub event_type: u32,
    pub sha256: Digest,
    pub data: Vec<u8>,
}

impl Event {
    /// A short human description: the type name and, where the data is text, the text.
    pub fn describe(&self) -> String {
        let name = event_type_name(self.event_type);
        match self.event_type {
            EV_EFI_ACTION => format!("{name} {:?}", String::from_utf8_lossy(&self.data)),
            EV_EVENT_TAG if self.data.len() > 8 => {
                let text = &self.data[8..];
                let text = text.strip_suffix(b"\0").unwrap_or(text);
                format!("{name} {:?}", String::from_utf8_lossy(text))
            }
            _ => name.to_owned(),
        }
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "event #{} (PCR {}, {}, sha256 {})",
            self.index,
            self.pcr,
            self.describe(),
            hex::encode(self.sha256)
        )
    }
}

/// Name of a TCG PC Client event type.
pub fn event_type_name(t: u32) -> &'static str {
    match t {
        0x1 => "EV_POST_CODE",
        0x3 => "EV_NO_ACTION",
        0x4 => "EV_SEPARATOR",
        0x5 => "EV_ACTION",
        0x6 => "EV_EVENT_TAG",
        0x7 => "EV_S_CRTM_CONTENTS",
        0x8 => "EV_S_CRTM_VERSION",
        0xd => "EV_IPL",
        0x80000001 => "EV_EFI_VARIABLE_DRIVER_CONFIG",
        0x80000002 => "EV_EFI_VARIABLE_BOOT",
        0x80000003 => "EV_EFI_BOOT_SERVICES_APPLICATION",
        0x80000004 => "EV_EFI_BOOT_SERVICES_DRIVER",
        0x80000005 => "EV_EFI_RUNTIME_SERVICES_DRIVER",
        0x80000006 => "EV_EFI_GPT_EVENT",
        0x80000007 => "EV_EFI_ACTION",
        0x80000008 => "EV_EFI_PLATFORM_FIRMWARE_BLOB",
        0x80000009 => "EV_EFI_HANDOFF_TABLES",
        0x8000000a => "EV_EFI_PLATFORM_FIRMWARE_BLOB2",
        0x8000000b => "EV_EFI_HANDOFF_TABLES2",
        0x800000e0 => "EV_EFI_VARIABLE_AUTHORITY",
        _ => "unknown event type",
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EventLogError> {
        let left = self.buf.len() - self.pos;
        if n > left {
            return Err(EventLogError::Truncated {
                offset: self.pos,
                what,
                need: n,
                left,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, EventLogError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, EventLogError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// A parsed log: the events after the Spec ID header, and the locality the firmware started
/// PCR 0 from (a `StartupLocality` EV_NO_ACTION event; 0 without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    pub events: Vec<Event>,
    pub startup_locality: u8,
}

impl EventLog {
    /// Parses a TCG2 crypto-agile event log.
    pub fn parse(log: &[u8]) -> Result<Self, EventLogError> {
        let mut r = Reader { buf: log, pos: 0 };
        // Header: a TCG_PCR_EVENT (SHA-1 format) carrying the Spec ID event.
        r.u32("header PCR index")?;
        r.u32("header event type")?;
        r.take(20, "header digest")?;
        let size = r.u32("header event size")? as usize;
        let spec = r.take(size, "Spec ID event")?;
        if spec.get(..16) != Some(b"Spec ID Event03\0") {
            return Err(EventLogError::NotCryptoAgile);
        }
        let mut s = Reader { buf: spec, pos: 16 };
        s.take(8, "Spec ID platform class and version")?;
        let n = s.u32("Spec ID algorithm count")?;
        let mut sizes = BTreeMap::new();
        for _ in 0..n {
            let alg = s.u16("Spec ID algorithm id")?;
            let size = s.u16("Spec ID digest size")?;
            sizes.insert(alg, usize::from(size));
        }
        let mut events = Vec::new();
        let mut startup_locality = 0;
        let mut index = 0;
        while r.pos < log.len() {
            index += 1;
            let offset = r.pos;
            let pcr = r.u32("PCR index")?;
            let event_type = r.u32("event type")?;
            let count = r.u32("digest count")?;
            let mut sha256 = None;
            for _ in 0..count {
                let alg = r.u16("digest algorithm")?;
                let size = *sizes.get(&alg).ok_or(EventLogError::UnknownAlgorithm {
                    index,
                    offset,
                    alg,
                })?;
                let d = r.take(size, "digest")?;
                if alg == TPM_ALG_SHA256 && size == 32 {
                    let mut out = [0u8; 32];
                    out.copy_from_slice(d);
                    sha256 = Some(out);
                }
            }
            let size = r.u32("event size")? as usize;
            let data = r.take(size, "event data")?.to_vec();
            if event_type == EV_NO_ACTION {
                if let Some(rest) = data.strip_prefix(b"StartupLocality\0") {
                    startup_locality = rest.first().copied().unwrap_or(0);
                }
                continue;
            }
            if pcr > MAX_PCR_INDEX {
                return Err(EventLogError::BadPcr { index, offset, pcr });
            }
            let sha256 = sha256.ok_or(EventLogError::NoSha256 { index, offset })?;
            events.push(Event {
                index,
                pcr,
                event_type,
                sha256,
                data,
            });
        }
        Ok(Self {
            events,
            startup_locality,
        })
    }

    /// The SHA-256 PCR values these events produce.
    pub fn replay(&self) -> BTreeMap<u32, Digest> {
        replay(&self.events, self.startup_locality)
    }
}

/// Extends each event's digest into its PCR, starting from zero (PCR 0 from the startup
/// locality, as a TPM started at locality 3 or 4 does).
pub fn replay(events: &[Event], startup_locality: u8) -> BTreeMap<u32, Digest> {
    let mut pcrs = BTreeMap::new();
    for e in events {
        let pcr = pcrs.entry(e.pcr).or_insert_with(|| {
            let mut init = [0u8; 32];
            if e.pcr == 0 {
                init[31] = startup_locality;
            }
            init
        });
        *pcr = pcr_extend(pcr, &e.sha256);
    }
    pcrs
}
