//! Parsing of the AMD SEV-SNP `ATTESTATION_REPORT` structure (SEV-SNP ABI, report versions 2
//! and 3). Every field is decoded; the signature is kept as received so verification runs
//! over exactly the bytes the firmware signed.

use serde::{Serialize, Serializer};

use super::SnpError;

/// Size of the report structure; longer input (Azure appends a header) is accepted and the
/// trailing bytes are ignored.
pub const REPORT_LEN: usize = 0x4A0;
/// The signature covers bytes `[0, SIGNED_LEN)`.
pub const SIGNED_LEN: usize = 0x2A0;
/// Report versions this parser understands.
pub const SUPPORTED_VERSIONS: [u32; 2] = [2, 3];
/// `SIGNATURE_ALGO` value for ECDSA P-384 with SHA-384, the only one AMD defines.
pub const SIG_ALGO_ECDSA_P384_SHA384: u32 = 1;
/// Policy bit 19: the guest may be debugged by the hypervisor.
pub const POLICY_DEBUG_BIT: u64 = 1 << 19;

/// Offset of R (72 bytes little-endian) and S (72 bytes little-endian) in the report.
pub(crate) const SIG_R_OFFSET: usize = SIGNED_LEN;
pub(crate) const SIG_S_OFFSET: usize = SIGNED_LEN + SIG_COMPONENT_LEN;
/// Each signature component field is 72 bytes; P-384 uses the low 48.
pub(crate) const SIG_COMPONENT_LEN: usize = 72;
pub(crate) const P384_SCALAR_LEN: usize = 48;

/// Which key signed the report (`KEY_INFO.SIGNING_KEY`, bits 2-4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SigningKey {
    /// Versioned Chip Endorsement Key: derived from the chip's unique secret and its TCB.
    Vcek,
    /// Versioned Loaded Endorsement Key: provisioned by the cloud provider (AWS).
    Vlek,
    /// The report is not signed (value 7).
    None,
    /// A value the ABI reserves.
    Reserved(u8),
}

impl SigningKey {
    fn from_key_info(key_info: u32) -> Self {
        match (key_info >> 2) & 0x7 {
            0 => SigningKey::Vcek,
            1 => SigningKey::Vlek,
            7 => SigningKey::None,
            // The mask leaves only 3 bits, so this cannot truncate.
            other => SigningKey::Reserved(other as u8),
        }
    }

    /// Lower-case name, as used in JSON and error messages.
    pub fn name(self) -> String {
        match self {
            SigningKey::Vcek => "vcek".into(),
            SigningKey::Vlek => "vlek".into(),
            SigningKey::None => "none".into(),
            SigningKey::Reserved(v) => format!("reserved({v})"),
        }
    }
}

impl std::fmt::Display for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

impl Serialize for SigningKey {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

/// The four security-relevant TCB components, as found in a TCB_VERSION or a VEK certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tcb {
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
}

impl Tcb {
    /// The first component (in bl, tee, snp, ucode order) where `self` is below `minimum`.
    pub fn first_below(&self, minimum: &Tcb) -> Option<(&'static str, u8, u8)> {
        [
            ("bootloader", minimum.bootloader, self.bootloader),
            ("tee", minimum.tee, self.tee),
            ("snp", minimum.snp, self.snp),
            ("microcode", minimum.microcode, self.microcode),
        ]
        .into_iter()
        .find(|(_, min, found)| found < min)
    }
}

impl std::fmt::Display for Tcb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bl={} tee={} snp={} ucode={}",
            self.bootloader, self.tee, self.snp, self.microcode
        )
    }
}

/// A TCB_VERSION (u64) with its components decoded for the report's CPU generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TcbVersion {
    /// The u64 exactly as in the report.
    pub raw: u64,
    pub bootloader: u8,
    pub tee: u8,
    pub snp: u8,
    pub microcode: u8,
    /// Firmware-measured-code SVN (Turin and later only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fmc: Option<u8>,
}

impl TcbVersion {
    fn decode(raw: u64, generation: Generation) -> Self {
        let b = raw.to_le_bytes();
        match generation {
            // Milan/Genoa: byte 0 bootloader, 1 tee, 6 snp, 7 microcode.
            Generation::MilanGenoa => Self {
                raw,
                bootloader: b[0],
                tee: b[1],
                snp: b[6],
                microcode: b[7],
                fmc: None,
            },
            // Turin: byte 0 fmc, 1 bootloader, 2 tee, 3 snp, 7 microcode.
            Generation::Turin => Self {
                raw,
                bootloader: b[1],
                tee: b[2],
                snp: b[3],
                microcode: b[7],
                fmc: Some(b[0]),
            },
        }
    }

    /// The four components compared against certificates and minimums.
    pub fn tcb(&self) -> Tcb {
        Tcb {
            bootloader: self.bootloader,
            tee: self.tee,
            snp: self.snp,
            microcode: self.microcode,
        }
    }
}

/// TCB layout family. v2 reports carry no CPUID, and every v2-era part is Milan or Genoa.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Generation {
    MilanGenoa,
    Turin,
}

/// The guest policy the VM was launched with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestPolicy {
    pub raw: u64,
    pub abi_minor: u8,
    pub abi_major: u8,
    pub smt_allowed: bool,
    pub migrate_ma_allowed: bool,
    pub debug_allowed: bool,
    pub single_socket_required: bool,
}

impl GuestPolicy {
    fn decode(raw: u64) -> Self {
        let b = raw.to_le_bytes();
        Self {
            raw,
            abi_minor: b[0],
            abi_major: b[1],
            smt_allowed: raw & (1 << 16) != 0,
            migrate_ma_allowed: raw & (1 << 18) != 0,
            debug_allowed: raw & POLICY_DEBUG_BIT != 0,
            single_socket_required: raw & (1 << 20) != 0,
        }
    }
}

/// PLATFORM_INFO: platform features active when the report was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PlatformInfo {
    pub raw: u64,
    pub smt_enabled: bool,
    pub tsme_enabled: bool,
    pub ecc_enabled: bool,
    pub rapl_disabled: bool,
    pub ciphertext_hiding_enabled: bool,
}

impl PlatformInfo {
    fn decode(raw: u64) -> Self {
        Self {
            raw,
            smt_enabled: raw & 1 != 0,
            tsme_enabled: raw & (1 << 1) != 0,
            ecc_enabled: raw & (1 << 2) != 0,
            rapl_disabled: raw & (1 << 3) != 0,
            ciphertext_hiding_enabled: raw & (1 << 4) != 0,
        }
    }
}

/// CPUID family/model/stepping of the chip (report version 3 and later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct CpuId {
    pub family: u8,
    pub model: u8,
    pub stepping: u8,
}

/// A SEMVER-like firmware version (build, minor, major).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FirmwareVersion {
    pub build: u8,
    pub minor: u8,
    pub major: u8,
}

/// A parsed SEV-SNP attestation report. Byte fields serialize as lower-case hex strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AttestationReport {
    pub version: u32,
    pub guest_svn: u32,
    pub policy: GuestPolicy,
    #[serde(serialize_with = "as_hex")]
    pub family_id: [u8; 16],
    #[serde(serialize_with = "as_hex")]
    pub image_id: [u8; 16],
    pub vmpl: u32,
    pub signature_algo: u32,
    pub current_tcb: TcbVersion,
    pub platform_info: PlatformInfo,
    /// KEY_INFO bit 0: the author key digest is present.
    pub author_key_enabled: bool,
    /// KEY_INFO bit 1: CHIP_ID is masked (all zero).
    pub mask_chip_key: bool,
    pub signing_key: SigningKey,
    #[serde(serialize_with = "as_hex")]
    pub report_data: [u8; 64],
    #[serde(serialize_with = "as_hex")]
    pub measurement: [u8; 48],
    #[serde(serialize_with = "as_hex")]
    pub host_data: [u8; 32],
    #[serde(serialize_with = "as_hex")]
    pub id_key_digest: [u8; 48],
    #[serde(serialize_with = "as_hex")]
    pub author_key_digest: [u8; 48],
    #[serde(serialize_with = "as_hex")]
    pub report_id: [u8; 32],
    #[serde(serialize_with = "as_hex")]
    pub report_id_ma: [u8; 32],
    pub reported_tcb: TcbVersion,
    /// Present in version 3 and later.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpuid: Option<CpuId>,
    #[serde(serialize_with = "as_hex")]
    pub chip_id: [u8; 64],
    pub committed_tcb: TcbVersion,
    pub current_version: FirmwareVersion,
    pub committed_version: FirmwareVersion,
    pub launch_tcb: TcbVersion,
    /// R and S as big-endian P-384 scalars (the low 48 bytes of each little-endian field).
    pub signature: ReportSignature,
}

/// The report's ECDSA P-384 signature as big-endian scalars (informational; verification
/// reads the received bytes again and also requires the unused upper bytes to be zero).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportSignature {
    #[serde(serialize_with = "as_hex")]
    pub r: [u8; 48],
    #[serde(serialize_with = "as_hex")]
    pub s: [u8; 48],
}

fn as_hex<S: Serializer, const N: usize>(bytes: &[u8; N], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&hex::encode(bytes))
}

/// Bounds-checked little-endian reads over the (already length-checked) report.
struct Fields<'a>(&'a [u8; REPORT_LEN]);

impl Fields<'_> {
    fn bytes<const N: usize>(&self, offset: usize) -> [u8; N] {
        let mut out = [0u8; N];
        // Offsets are constants within REPORT_LEN; `get` keeps this panic-free regardless.
        if let Some(src) = self.0.get(offset..offset + N) {
            out.copy_from_slice(src);
        }
        out
    }
    fn u8(&self, offset: usize) -> u8 {
        self.bytes::<1>(offset)[0]
    }
    fn u32(&self, offset: usize) -> u32 {
        u32::from_le_bytes(self.bytes(offset))
    }
    fn u64(&self, offset: usize) -> u64 {
        u64::from_le_bytes(self.bytes(offset))
    }
}

/// The first [`REPORT_LEN`] bytes of `bytes`, or [`SnpError::ReportTooShort`].
pub(crate) fn report_body(bytes: &[u8]) -> Result<&[u8; REPORT_LEN], SnpError> {
    bytes
        .get(..REPORT_LEN)
        .and_then(|b| <&[u8; REPORT_LEN]>::try_from(b).ok())
        .ok_or(SnpError::ReportTooShort {
            expected: REPORT_LEN,
            found: bytes.len(),
        })
}

/// Converts one 72-byte little-endian signature component to a 48-byte big-endian scalar.
/// Returns `None` when a byte above the low 48 is non-zero (not a P-384 scalar).
pub(crate) fn signature_component(raw: &[u8]) -> Option<[u8; P384_SCALAR_LEN]> {
    let (low, high) = raw.split_at_checked(P384_SCALAR_LEN)?;
    if high.len() != SIG_COMPONENT_LEN - P384_SCALAR_LEN || high.iter().any(|&b| b != 0) {
        return None;
    }
    let mut be = [0u8; P384_SCALAR_LEN];
    for (dst, src) in be.iter_mut().zip(low.iter().rev()) {
        *dst = *src;
    }
    Some(be)
}

/// The low 48 bytes of a 72-byte component, big-endian, ignoring the padding (for display).
fn scalar_for_display(raw: [u8; SIG_COMPONENT_LEN]) -> [u8; P384_SCALAR_LEN] {
    let mut be = [0u8; P384_SCALAR_LEN];
    for (dst, src) in be.iter_mut().zip(raw.iter().take(P384_SCALAR_LEN).rev()) {
        *dst = *src;
    }
    be
}

impl AttestationReport {
    /// Parses a report. Accepts input longer than [`REPORT_LEN`] (trailing bytes ignored);
    /// rejects shorter input, versions other than 2 and 3, signature algorithms other than
    /// ECDSA P-384/SHA-384. The signature is checked by [`super::verify_signature`].
    pub fn parse(bytes: &[u8]) -> Result<Self, SnpError> {
        let f = Fields(report_body(bytes)?);
        let version = f.u32(0x00);
        if !SUPPORTED_VERSIONS.contains(&version) {
            return Err(SnpError::UnsupportedVersion { found: version });
        }
        let signature_algo = f.u32(0x34);
        if signature_algo != SIG_ALGO_ECDSA_P384_SHA384 {
            return Err(SnpError::UnsupportedSignatureAlgorithm {
                expected: SIG_ALGO_ECDSA_P384_SHA384,
                found: signature_algo,
            });
        }
        let cpuid = (version >= 3).then(|| CpuId {
            family: f.u8(0x188),
            model: f.u8(0x189),
            stepping: f.u8(0x18A),
        });
        // Turin is family 0x1A; the TCB_VERSION layout changed with it.
        let generation = match cpuid {
            Some(c) if c.family >= 0x1A => Generation::Turin,
            _ => Generation::MilanGenoa,
        };
        let tcb = |offset| TcbVersion::decode(f.u64(offset), generation);
        let key_info = f.u32(0x48);
        Ok(Self {
            version,
            guest_svn: f.u32(0x04),
            policy: GuestPolicy::decode(f.u64(0x08)),
            family_id: f.bytes(0x10),
            image_id: f.bytes(0x20),
            vmpl: f.u32(0x30),
            signature_algo,
            current_tcb: tcb(0x38),
            platform_info: PlatformInfo::decode(f.u64(0x40)),
            author_key_enabled: key_info & 1 != 0,
            mask_chip_key: key_info & 2 != 0,
            signing_key: SigningKey::from_key_info(key_info),
            report_data: f.bytes(0x50),
            measurement: f.bytes(0x90),
            host_data: f.bytes(0xC0),
            id_key_digest: f.bytes(0xE0),
            author_key_digest: f.bytes(0x110),
            report_id: f.bytes(0x140),
            report_id_ma: f.bytes(0x160),
            reported_tcb: tcb(0x180),
            cpuid,
            chip_id: f.bytes(0x1A0),
            committed_tcb: tcb(0x1E0),
            current_version: FirmwareVersion {
                build: f.u8(0x1E8),
                minor: f.u8(0x1E9),
                major: f.u8(0x1EA),
            },
            committed_version: FirmwareVersion {
                build: f.u8(0x1EC),
                minor: f.u8(0x1ED),
                major: f.u8(0x1EE),
            },
            launch_tcb: tcb(0x1F0),
            signature: ReportSignature {
                r: scalar_for_display(f.bytes(SIG_R_OFFSET)),
                s: scalar_for_display(f.bytes(SIG_S_OFFSET)),
            },
        })
    }

    /// Whether CHIP_ID is masked (all zero), e.g. on AWS or with MASK_CHIP_ID set.
    pub fn chip_id_masked(&self) -> bool {
        self.chip_id.iter().all(|&b| b == 0)
    }
}
