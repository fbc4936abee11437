//! The VCEK/VLEK certificate chain: VEK <- ASK/ASVK <- ARK, with the ARK pinned to AMD's
//! published roots, validity checked at an injected time, and the VEK's AMD extensions
//! (TCB, product name, hwID) decoded. Verify once, then reuse [`VerifiedVek`] for every report.

use std::sync::OnceLock;
use std::time::SystemTime;

use aws_lc_rs::signature::{
    ParsedPublicKey, UnparsedPublicKey, ECDSA_P384_SHA384_FIXED, RSA_PSS_2048_8192_SHA384,
};
use const_oid::ObjectIdentifier;
use der::{Decode, Reader};
use sha2::{Digest as _, Sha256};
use x509_cert::Certificate;

use super::report::{SigningKey, Tcb};
use super::SnpError;
use crate::Clock;

const OID_RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const OID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const OID_SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const OID_COMMON_NAME: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.4.3");

/// AMD VEK extension OIDs (AMD "Versioned Chip Endorsement Key" specification).
pub const OID_PRODUCT_NAME: &str = "1.3.6.1.4.1.3704.1.2";
pub const OID_BOOTLOADER: &str = "1.3.6.1.4.1.3704.1.3.1";
pub const OID_TEE: &str = "1.3.6.1.4.1.3704.1.3.2";
pub const OID_SNP: &str = "1.3.6.1.4.1.3704.1.3.3";
pub const OID_MICROCODE: &str = "1.3.6.1.4.1.3704.1.3.8";
pub const OID_HWID: &str = "1.3.6.1.4.1.3704.1.4";

/// The AMD root keys this verifier trusts, byte for byte: (product, PEM).
const PINNED_ARKS: [(&str, &[u8]); 3] = [
    ("Milan", include_bytes!("roots/milan-ark.pem")),
    ("Genoa", include_bytes!("roots/genoa-ark.pem")),
    ("Turin", include_bytes!("roots/turin-ark.pem")),
];

/// Position of a certificate in the chain, for error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertRole {
    /// The VCEK or VLEK that signs reports.
    Vek,
    /// The ASK (for a VCEK) or ASVK (for a VLEK).
    Intermediate,
    /// The ARK.
    Root,
}

impl std::fmt::Display for CertRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CertRole::Vek => "VEK (VCEK/VLEK)",
            CertRole::Intermediate => "intermediate (ASK/ASVK)",
            CertRole::Root => "root (ARK)",
        })
    }
}

/// The AMD extensions of a VCEK/VLEK certificate.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VekExtensions {
    /// productName, e.g. `Milan-B0` (VCEK) or `Milan` (VLEK).
    pub product_name: String,
    /// The TCB the key was derived for (VCEK) or provisioned at (VLEK).
    pub tcb: Tcb,
    /// hwID: the chip's 64-byte CHIP_ID (VCEK only).
    #[serde(serialize_with = "opt_hex")]
    pub hw_id: Option<[u8; 64]>,
}

fn opt_hex<S: serde::Serializer>(v: &Option<[u8; 64]>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(b) => s.serialize_str(&hex::encode(b)),
        None => s.serialize_none(),
    }
}

/// A VCEK/VLEK whose chain to a pinned AMD root was verified at some instant: holds the parsed
/// P-384 public key and the decoded extensions, ready to verify any number of reports.
#[derive(Clone)]
pub struct VerifiedVek {
    kind: SigningKey,
    key: ParsedPublicKey,
    extensions: VekExtensions,
    root_product: &'static str,
    /// (role, notBefore, notAfter) of VEK, intermediate and root, for re-checks when cached.
    validity: [(CertRole, SystemTime, SystemTime); 3],
}

impl std::fmt::Debug for VerifiedVek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifiedVek")
            .field("kind", &self.kind)
            .field("extensions", &self.extensions)
            .field("root_product", &self.root_product)
            .finish_non_exhaustive()
    }
}

impl VerifiedVek {
    /// Verifies `vek` (DER or PEM) against `chain_pem` (ASK/ASVK and ARK, in either order) at
    /// `clock.now()`: the ARK must be byte-identical to an embedded AMD root, each certificate
    /// must be signed (RSA-PSS SHA-384) by the next and be within its validity period, and the
    /// VEK must be a P-384 key with well-formed AMD extensions.
    pub fn new(vek: &[u8], chain_pem: &[u8], clock: &dyn Clock) -> Result<Self, SnpError> {
        let vek_der = single_cert_der(vek)?;
        let vek_cert = parse_cert(&vek_der, CertRole::Vek)?;

        let chain_ders = decode_pem_certs(chain_pem, CertRole::Intermediate)?;
        if chain_ders.len() != 2 {
            return Err(SnpError::ChainLength {
                expected: 2,
                found: chain_ders.len(),
            });
        }
        let mut chain = Vec::with_capacity(2);
        for der in &chain_ders {
            chain.push((der.as_slice(), parse_cert(der, CertRole::Intermediate)?));
        }
        // AMD serves ASK then ARK; accept the reverse too. The root is the self-issued one.
        if is_self_issued(&chain[0].1) && !is_self_issued(&chain[1].1) {
            chain.swap(0, 1);
        }
        let [(int_der, int_cert), (root_der, root_cert)]: [(&[u8], Certificate); 2] =
            chain.try_into().map_err(|_| SnpError::ChainLength {
                expected: 2,
                found: chain_ders.len(),
            })?;
        Self::verify_parsed(
            (&vek_der, vek_cert),
            (int_der, int_cert),
            (root_der, root_cert),
            clock,
        )
    }

    /// [`VerifiedVek::new`] for collateral as a KDS or cloud cache hands it out: the VEK, the
    /// intermediate (ASK/ASVK) and the root (ARK), each one DER certificate in its own role.
    /// The same checks run: root pinned byte for byte, RSA-PSS signatures, validity at
    /// `clock.now()`, VEK key type, extensions and product against the root's product.
    pub fn from_der(
        vek_der: &[u8],
        intermediate_der: &[u8],
        root_der: &[u8],
        clock: &dyn Clock,
    ) -> Result<Self, SnpError> {
        let vek_cert = parse_cert(vek_der, CertRole::Vek)?;
        let int_cert = parse_cert(intermediate_der, CertRole::Intermediate)?;
        let root_cert = parse_cert(root_der, CertRole::Root)?;
        Self::verify_parsed(
            (vek_der, vek_cert),
            (intermediate_der, int_cert),
            (root_der, root_cert),
            clock,
        )
    }

    fn verify_parsed(
        (vek_der, vek_cert): (&[u8], Certificate),
        (int_der, int_cert): (&[u8], Certificate),
        (root_der, root_cert): (&[u8], Certificate),
        clock: &dyn Clock,
    ) -> Result<Self, SnpError> {
        // Root pin first: nothing else matters if the root is not AMD's.
        let root_product = pinned_root_product(root_der)?;

        check_issued_by(&int_cert, &root_cert, CertRole::Intermediate)?;
        verify_cert_signature(int_der, &int_cert, &root_cert, CertRole::Intermediate)?;
        check_issued_by(&vek_cert, &int_cert, CertRole::Vek)?;
        verify_cert_signature(vek_der, &vek_cert, &int_cert, CertRole::Vek)?;

        let validity = [
            (&root_cert, CertRole::Root),
            (&int_cert, CertRole::Intermediate),
            (&vek_cert, CertRole::Vek),
        ]
        .map(|(cert, role)| {
            let v = &cert.tbs_certificate.validity;
            (
                role,
                v.not_before.to_system_time(),
                v.not_after.to_system_time(),
            )
        });
        check_validity(&validity, clock.now())?;

        let kind = vek_kind(&vek_cert)?;
        let key = vek_public_key(&vek_cert)?;
        let extensions = parse_vek_extensions(&vek_cert, kind)?;
        let vek_product = extensions
            .product_name
            .split('-')
            .next()
            .unwrap_or_default();
        if vek_product != root_product {
            return Err(SnpError::ProductMismatch {
                expected: root_product.to_owned(),
                found: extensions.product_name.clone(),
            });
        }
        tracing::debug!(%kind, product = %extensions.product_name, tcb = %extensions.tcb, "SEV-SNP VEK chain verified");
        Ok(Self {
            kind,
            key,
            extensions,
            root_product,
            validity,
        })
    }

    /// VCEK or VLEK, from the certificate's subject.
    pub fn kind(&self) -> SigningKey {
        self.kind
    }

    /// The decoded AMD extensions.
    pub fn extensions(&self) -> &VekExtensions {
        &self.extensions
    }

    /// The product of the pinned root the chain ends in (`Milan`, `Genoa` or `Turin`).
    pub fn root_product(&self) -> &'static str {
        self.root_product
    }

    /// Re-checks the validity period of every certificate in the chain at `clock.now()`:
    /// call this before reusing a cached `VerifiedVek` at a later time.
    pub fn check_valid_at(&self, clock: &dyn Clock) -> Result<(), SnpError> {
        check_validity(&self.validity, clock.now())
    }

    /// The earliest notAfter in the chain: a cached `VerifiedVek` must not be used past it.
    pub fn valid_until(&self) -> SystemTime {
        self.validity
            .iter()
            .map(|(_, _, not_after)| *not_after)
            .min()
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }

    /// The parsed P-384 public key.
    pub fn public_key(&self) -> &ParsedPublicKey {
        &self.key
    }
}

/// Test hook (cargo feature `testing`, never in production builds): a VEK no chain vouches
/// for, so tests can sign crafted reports with their own P-384 key and reach the checks that
/// sit behind the signature (TCB consistency, guest policy, VMPL, allow-lists).
#[cfg(feature = "testing")]
impl VerifiedVek {
    /// `point` is the uncompressed SEC1 P-384 public key; every certificate of the pretend
    /// chain is valid from `not_before` to `not_after`.
    pub fn for_testing(
        kind: SigningKey,
        point: &[u8],
        extensions: VekExtensions,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> Result<Self, SnpError> {
        let key = UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point)
            .parse()
            .map_err(|e| cert_parse(CertRole::Vek, format!("P-384 public key: {e}")))?;
        Ok(Self {
            kind,
            key,
            root_product: "Milan",
            extensions,
            validity: [CertRole::Root, CertRole::Intermediate, CertRole::Vek]
                .map(|role| (role, not_before, not_after)),
        })
    }
}

fn cert_parse(role: CertRole, reason: impl Into<String>) -> SnpError {
    SnpError::CertificateParse {
        role,
        reason: reason.into(),
    }
}

/// The DER of a single VEK certificate given as DER or PEM (the first PEM block).
fn single_cert_der(data: &[u8]) -> Result<Vec<u8>, SnpError> {
    if !looks_like_pem(data) {
        return Ok(data.to_vec());
    }
    decode_pem_certs(data, CertRole::Vek)?
        .into_iter()
        .next()
        .ok_or_else(|| cert_parse(CertRole::Vek, "no CERTIFICATE block in PEM"))
}

fn looks_like_pem(data: &[u8]) -> bool {
    data.trim_ascii_start().starts_with(b"-----BEGIN")
}

/// Decodes every `CERTIFICATE` PEM block, keeping the exact DER bytes (no re-encoding).
fn decode_pem_certs(pem: &[u8], role: CertRole) -> Result<Vec<Vec<u8>>, SnpError> {
    const BEGIN: &[u8] = b"-----BEGIN CERTIFICATE-----";
    const END: &[u8] = b"-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = find(rest, BEGIN) {
        let from_begin = rest.get(start..).unwrap_or_default();
        let end =
            find(from_begin, END).ok_or_else(|| cert_parse(role, "PEM block without END line"))?;
        let block_len = end + END.len();
        let block = from_begin.get(..block_len).unwrap_or_default();
        let (label, der) =
            der::pem::decode_vec(block).map_err(|e| cert_parse(role, format!("PEM: {e}")))?;
        if label != "CERTIFICATE" {
            return Err(cert_parse(role, format!("PEM label {label:?}")));
        }
        out.push(der);
        rest = from_begin.get(block_len..).unwrap_or_default();
    }
    Ok(out)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn parse_cert(der: &[u8], role: CertRole) -> Result<Certificate, SnpError> {
    Certificate::from_der(der).map_err(|e| cert_parse(role, format!("DER: {e}")))
}

fn is_self_issued(cert: &Certificate) -> bool {
    cert.tbs_certificate.issuer == cert.tbs_certificate.subject
}

/// SHA-256 fingerprint in the colon-separated upper-case form `openssl x509 -fingerprint` prints.
pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pinned_arks() -> &'static [(&'static str, Vec<u8>)] {
    static ARKS: OnceLock<Vec<(&'static str, Vec<u8>)>> = OnceLock::new();
    ARKS.get_or_init(|| {
        PINNED_ARKS
            .iter()
            .filter_map(|(product, pem)| {
                // The embedded files are fixed at build time; a bad one simply pins nothing.
                let (_, der) = der::pem::decode_vec(pem).ok()?;
                Some((*product, der))
            })
            .collect()
    })
}

/// The product whose pinned ARK is byte-identical to `root_der`.
fn pinned_root_product(root_der: &[u8]) -> Result<&'static str, SnpError> {
    pinned_arks()
        .iter()
        .find(|(_, der)| der.as_slice() == root_der)
        .map(|(product, _)| *product)
        .ok_or_else(|| SnpError::UnpinnedRoot {
            fingerprint: fingerprint(root_der),
        })
}

fn common_name(name: &x509_cert::name::Name) -> String {
    name.0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|atv| atv.oid == OID_COMMON_NAME)
        .and_then(|atv| {
            der::asn1::PrintableStringRef::try_from(&atv.value)
                .map(|s| s.to_string())
                .or_else(|_| der::asn1::Utf8StringRef::try_from(&atv.value).map(|s| s.to_string()))
                .or_else(|_| der::asn1::Ia5StringRef::try_from(&atv.value).map(|s| s.to_string()))
                .ok()
        })
        .unwrap_or_default()
}

fn check_issued_by(
    cert: &Certificate,
    issuer: &Certificate,
    role: CertRole,
) -> Result<(), SnpError> {
    if cert.tbs_certificate.issuer != issuer.tbs_certificate.subject {
        return Err(SnpError::IssuerMismatch {
            role,
            expected: common_name(&issuer.tbs_certificate.subject),
            found: common_name(&cert.tbs_certificate.issuer),
        });
    }
    Ok(())
}

/// The exact tbsCertificate bytes inside a certificate's DER (what the issuer signed).
fn tbs_bytes(cert_der: &[u8]) -> Result<&[u8], der::Error> {
    let mut reader = der::SliceReader::new(cert_der)?;
    let _outer = der::Header::decode(&mut reader)?;
    reader.tlv_bytes()
}

fn verify_cert_signature(
    cert_der: &[u8],
    cert: &Certificate,
    issuer: &Certificate,
    role: CertRole,
) -> Result<(), SnpError> {
    if cert.signature_algorithm.oid != OID_RSASSA_PSS {
        return Err(SnpError::CertificateSignatureAlgorithm {
            role,
            expected: OID_RSASSA_PSS.to_string(),
            found: cert.signature_algorithm.oid.to_string(),
        });
    }
    let tbs = tbs_bytes(cert_der).map_err(|e| cert_parse(role, format!("tbsCertificate: {e}")))?;
    let signature = cert
        .signature
        .as_bytes()
        .ok_or_else(|| cert_parse(role, "signature BIT STRING has unused bits"))?;
    // For RSA the SPKI BIT STRING holds the PKCS#1 RSAPublicKey aws-lc-rs expects.
    let issuer_key = issuer
        .tbs_certificate
        .subject_public_key_info
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| cert_parse(role, "issuer key BIT STRING has unused bits"))?;
    UnparsedPublicKey::new(&RSA_PSS_2048_8192_SHA384, issuer_key)
        .verify(tbs, signature)
        .map_err(|_| SnpError::CertificateSignatureInvalid { role })
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}

/// Every certificate must be within its validity period at `now` (checked root first).
fn check_validity(
    validity: &[(CertRole, SystemTime, SystemTime)],
    now: SystemTime,
) -> Result<(), SnpError> {
    for &(role, not_before, not_after) in validity {
        if now < not_before {
            return Err(SnpError::CertificateNotYetValid {
                role,
                not_before: rfc3339(not_before),
                now: rfc3339(now),
            });
        }
        if now > not_after {
            return Err(SnpError::CertificateExpired {
                role,
                not_after: rfc3339(not_after),
                now: rfc3339(now),
            });
        }
    }
    Ok(())
}

/// VCEK or VLEK, from the subject common name AMD's KDS puts in each.
fn vek_kind(cert: &Certificate) -> Result<SigningKey, SnpError> {
    match common_name(&cert.tbs_certificate.subject).as_str() {
        "SEV-VCEK" => Ok(SigningKey::Vcek),
        "SEV-VLEK" => Ok(SigningKey::Vlek),
        other => Err(SnpError::UnknownVekKind {
            subject_cn: other.to_owned(),
        }),
    }
}

fn vek_public_key(cert: &Certificate) -> Result<ParsedPublicKey, SnpError> {
    let spki = &cert.tbs_certificate.subject_public_key_info;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as::<ObjectIdentifier>().ok());
    if spki.algorithm.oid != OID_EC_PUBLIC_KEY || curve != Some(OID_SECP384R1) {
        return Err(SnpError::VekKeyType {
            expected: format!("{OID_EC_PUBLIC_KEY} / {OID_SECP384R1}"),
            found: format!(
                "{} / {}",
                spki.algorithm.oid,
                curve
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "none".into())
            ),
        });
    }
    let point = spki
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| cert_parse(CertRole::Vek, "public key BIT STRING has unused bits"))?;
    UnparsedPublicKey::new(&ECDSA_P384_SHA384_FIXED, point)
        .parse()
        .map_err(|e| cert_parse(CertRole::Vek, format!("P-384 public key: {e}")))
}

fn malformed_ext(oid: &'static str, reason: impl Into<String>) -> SnpError {
    SnpError::MalformedExtension {
        oid,
        reason: reason.into(),
    }
}

/// Decodes the AMD extensions of a VEK certificate. hwID is required for a VCEK.
pub fn parse_vek_extensions(
    cert: &Certificate,
    kind: SigningKey,
) -> Result<VekExtensions, SnpError> {
    let extensions = cert
        .tbs_certificate
        .extensions
        .as_deref()
        .unwrap_or_default();
    let value = |oid: &'static str| {
        extensions
            .iter()
            .find(|e| e.extn_id.to_string() == oid)
            .map(|e| e.extn_value.as_bytes())
    };
    let required = |oid: &'static str| value(oid).ok_or(SnpError::MissingExtension { oid });
    let tcb_component = |oid: &'static str| -> Result<u8, SnpError> {
        u8::from_der(required(oid)?)
            .map_err(|e| malformed_ext(oid, format!("INTEGER 0..=255: {e}")))
    };
    let product_name = der::asn1::Ia5StringRef::from_der(required(OID_PRODUCT_NAME)?)
        .map_err(|e| malformed_ext(OID_PRODUCT_NAME, format!("IA5String: {e}")))?
        .to_string();
    let tcb = Tcb {
        bootloader: tcb_component(OID_BOOTLOADER)?,
        tee: tcb_component(OID_TEE)?,
        snp: tcb_component(OID_SNP)?,
        microcode: tcb_component(OID_MICROCODE)?,
    };
    let hw_id = match value(OID_HWID) {
        Some(raw) => Some(hw_id_bytes(raw)?),
        None if kind == SigningKey::Vcek => {
            return Err(SnpError::MissingExtension { oid: OID_HWID });
        }
        None => None,
    };
    Ok(VekExtensions {
        product_name,
        tcb,
        hw_id,
    })
}

/// hwID is the raw 64 bytes; some KDS versions wrap them in an OCTET STRING, accept both.
fn hw_id_bytes(raw: &[u8]) -> Result<[u8; 64], SnpError> {
    let inner = match raw {
        [0x04, 0x40, rest @ ..] if rest.len() == 64 => rest,
        _ => raw,
    };
    <[u8; 64]>::try_from(inner).map_err(|_| {
        malformed_ext(
            OID_HWID,
            format!("expected 64 bytes, found {}", inner.len()),
        )
    })
}

/// Parses a certificate (DER or PEM) and decodes its AMD VEK extensions, without any chain
/// or signature checks: for diagnostics and for fuzzing the extension parser.
pub fn parse_vek_certificate(data: &[u8]) -> Result<(SigningKey, VekExtensions), SnpError> {
    let cert = parse_cert(&single_cert_der(data)?, CertRole::Vek)?;
    let kind = vek_kind(&cert)?;
    Ok((kind, parse_vek_extensions(&cert, kind)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The embedded ARKs and, next to them, the ASKs they sign (see roots/README.md).
    const AMD_ROOTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/src/snp/roots");

    /// Each embedded ARK is pinned under its product, is the one AMD publishes (fingerprint
    /// prefix and suffix from roots/README.md), and really signs that product's ASK: a
    /// broken embedded file would otherwise just pin nothing, silently.
    #[test]
    fn milan_genoa_and_turin_roots_are_pinned_and_sign_their_ask() {
        let expected = [
            ("Milan", "69:D0:63:B4", "9A:54:0B:CD"),
            ("Genoa", "4C:65:98:D1", "0D:10:3D:B2:F1"),
            ("Turin", "1F:08:41:61", "9C:73:DD:3F:6A"),
        ];
        assert_eq!(pinned_arks().len(), expected.len());
        for (product, prefix, suffix) in expected {
            let lower = product.to_lowercase();
            let ark_pem = std::fs::read(format!("{AMD_ROOTS}/{lower}-ark.pem")).unwrap();
            let ark_der = decode_pem_certs(&ark_pem, CertRole::Root)
                .unwrap()
                .remove(0);
            assert_eq!(pinned_root_product(&ark_der).unwrap(), product);
            let fp = fingerprint(&ark_der);
            assert!(
                fp.starts_with(prefix) && fp.ends_with(suffix),
                "{product}: {fp}"
            );

            let ark = parse_cert(&ark_der, CertRole::Root).unwrap();
            assert!(is_self_issued(&ark), "{product} ARK is self-issued");
            verify_cert_signature(&ark_der, &ark, &ark, CertRole::Root).unwrap();
            let ask_pem = std::fs::read(format!("{AMD_ROOTS}/{lower}-ask.pem")).unwrap();
            let ask_der = decode_pem_certs(&ask_pem, CertRole::Intermediate)
                .unwrap()
                .remove(0);
            let ask = parse_cert(&ask_der, CertRole::Intermediate).unwrap();
            check_issued_by(&ask, &ark, CertRole::Intermediate).unwrap();
            verify_cert_signature(&ask_der, &ask, &ark, CertRole::Intermediate)
                .unwrap_or_else(|e| panic!("{product} ASK <- ARK: {e}"));
        }
    }

    /// Another product's ARK does not vouch for this product's ASK.
    #[test]
    fn an_ask_does_not_verify_under_another_products_root() {
        let read = |name: &str| {
            let pem = std::fs::read(format!("{AMD_ROOTS}/{name}.pem")).unwrap();
            decode_pem_certs(&pem, CertRole::Intermediate)
                .unwrap()
                .remove(0)
        };
        let (genoa_ask_der, milan_ark_der) = (read("genoa-ask"), read("milan-ark"));
        let genoa_ask = parse_cert(&genoa_ask_der, CertRole::Intermediate).unwrap();
        let milan_ark = parse_cert(&milan_ark_der, CertRole::Root).unwrap();
        assert!(
            verify_cert_signature(
                &genoa_ask_der,
                &genoa_ask,
                &milan_ark,
                CertRole::Intermediate
            )
            .is_err(),
            "the signature itself must not verify under the wrong root"
        );
    }
}
