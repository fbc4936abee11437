//! The node side: a TPM 2.0 reached through a TCTI (swtpm, /dev/tpmrm0), with a deterministic
//! attestation key, quotes, and PCR read/extend.

use std::collections::BTreeMap;
use std::str::FromStr;

use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::{KeyHandle, PcrHandle};
use tss_esapi::interface_types::algorithm::{
    HashingAlgorithm, PublicAlgorithm, RsaSchemeAlgorithm,
};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::interface_types::session_handles::AuthSession;
use tss_esapi::structures::{
    Data, Digest as TpmDigest, DigestValues, EccPoint, EccScheme, HashScheme,
    KeyDerivationFunctionScheme, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Public,
    PublicBuilder, PublicEccParametersBuilder, PublicKeyRsa, PublicRsaParametersBuilder,
    RsaExponent, RsaScheme, SignatureScheme, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

use super::ak::{AkKind, AkPublicKey};
use super::TpmError;
use crate::measurements::{Digest, MAX_PCR_INDEX};

/// What a quote produced: everything a verifier needs besides the pinned AK and the nonce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteEvidence {
    /// Marshalled TPMS_ATTEST (the signed bytes).
    pub attest: Vec<u8>,
    /// Marshalled TPMT_SIGNATURE.
    pub signature: Vec<u8>,
    /// The quoted SHA-256 PCR values.
    pub pcrs: BTreeMap<u32, Digest>,
    /// The boot event log, when the platform exposes one.
    pub event_log: Option<Vec<u8>>,
}

struct LoadedAk {
    kind: AkKind,
    handle: KeyHandle,
    public: AkPublicKey,
}

/// An open TPM with at most one loaded attestation key (swtpm has few transient slots).
pub struct Tpm {
    context: Context,
    ak: Option<LoadedAk>,
}

impl std::fmt::Debug for Tpm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tpm")
            .field("ak", &self.ak.as_ref().map(|ak| &ak.public))
            .finish_non_exhaustive()
    }
}

/// tss-esapi reads at most 8 PCRs per TPM2_PCR_Read.
const PCRS_PER_READ: usize = 8;

impl Tpm {
    /// Opens a TPM from a TCTI string such as `swtpm:path=/node/tpm/swtpm.sock` or
    /// `device:/dev/tpmrm0`.
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(|e| TpmError::Operation {
            operation: "parse TCTI",
            message: format!("{tcti:?}: {e}"),
        })?;
        let context = Context::new(conf).map_err(|e| TpmError::Operation {
            operation: "open TPM",
            message: format!("{tcti}: {e}"),
        })?;
        tracing::debug!(tcti, "opened TPM");
        Ok(Self { context, ak: None })
    }

    /// Creates (or reuses) the attestation key of `kind` and makes it the key quotes use. The
    /// key is a primary derived from the hierarchy seed and a fixed template, so the same TPM
    /// always yields the same public key: that is how the platform pins it.
    pub fn attestation_key(&mut self, kind: AkKind) -> Result<AkPublicKey, TpmError> {
        if let Some(ak) = &self.ak {
            if ak.kind == kind {
                return Ok(ak.public.clone());
            }
        }
        self.flush_ak();
        let (hierarchy, template) = ak_template(kind)?;
        let created = self
            .context
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(hierarchy, template, None, None, None, None)
            })
            .map_err(|e| TpmError::tss("create attestation key", e))?;
        let public = match AkPublicKey::from_tpm_public(&created.out_public) {
            Ok(public) => public,
            Err(e) => {
                // Do not leak the transient slot on a key we cannot use.
                let _ = self.context.flush_context(created.key_handle.into());
                return Err(e.into());
            }
        };
        tracing::debug!(kind = kind.as_str(), fingerprint = %hex::encode(public.fingerprint()), "attestation key ready");
        self.ak = Some(LoadedAk {
            kind,
            handle: created.key_handle,
            public: public.clone(),
        });
        Ok(public)
    }

    /// The public key of the loaded attestation key.
    pub fn ak_public(&self) -> Result<AkPublicKey, TpmError> {
        self.ak
            .as_ref()
            .map(|ak| ak.public.clone())
            .ok_or(TpmError::NoAttestationKey)
    }

    /// Quotes the SHA-256 PCRs `pcrs` with the loaded AK, carrying `extra_data` (at most 64
    /// bytes, normally a 32-byte binding), and reads the quoted values.
    pub fn quote(&mut self, extra_data: &[u8], pcrs: &[u32]) -> Result<QuoteEvidence, TpmError> {
        let handle = self.ak.as_ref().ok_or(TpmError::NoAttestationKey)?.handle;
        let selection = sha256_selection(pcrs)?;
        let qualifying = Data::try_from(extra_data.to_vec())
            .map_err(|e| TpmError::tss("quote qualifying data (max 64 bytes)", e))?;
        // A password session with the AK's empty auth: an unsalted, unbound HMAC session
        // (what `execute_with_nullauth_session` starts) has no secret either, so it protects
        // nothing more, and costs two more TPM round trips and ESYS key derivations per quote.
        // The quote itself is signed by the AK and checked by the verifier.
        let (attest, signature) = self
            .context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.quote(handle, qualifying, SignatureScheme::Null, selection)
            })
            .map_err(|e| TpmError::tss("quote", e))?;
        let attest = attest
            .marshall()
            .map_err(|e| TpmError::tss("marshal TPMS_ATTEST", e))?;
        let signature = signature
            .marshall()
            .map_err(|e| TpmError::tss("marshal TPMT_SIGNATURE", e))?;
        let pcrs = self.pcr_read(pcrs)?;
        Ok(QuoteEvidence {
            attest,
            signature,
            pcrs,
            event_log: None,
        })
    }

    /// Extends SHA-256 PCR `index` with `digest`.
    pub fn pcr_extend(&mut self, index: u32, digest: &Digest) -> Result<(), TpmError> {
        check_index(index)?;
        let handle = PcrHandle::try_from(index).map_err(|e| TpmError::tss("PCR handle", e))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            TpmDigest::try_from(digest.to_vec()).map_err(|e| TpmError::tss("PCR digest", e))?,
        );
        // Empty-auth PCR: a password session, as for quotes.
        self.context
            .execute_with_session(Some(AuthSession::Password), |ctx| {
                ctx.pcr_extend(handle, values)
            })
            .map_err(|e| TpmError::tss("PCR extend", e))
    }

    /// Reads SHA-256 PCRs (in chunks: the TPM returns at most 8 per call).
    pub fn pcr_read(&mut self, pcrs: &[u32]) -> Result<BTreeMap<u32, Digest>, TpmError> {
        let mut wanted: Vec<u32> = pcrs.to_vec();
        wanted.sort_unstable();
        wanted.dedup();
        let mut out = BTreeMap::new();
        for chunk in wanted.chunks(PCRS_PER_READ) {
            let (_, read_selection, digests) = self
                .context
                .pcr_read(sha256_selection(chunk)?)
                .map_err(|e| TpmError::tss("PCR read", e))?;
            let read: Vec<u32> = read_selection
                .get_selections()
                .iter()
                .flat_map(|s| s.selected())
                .map(slot_index)
                .collect();
            if read != chunk || digests.len() != chunk.len() {
                return Err(TpmError::Unexpected {
                    what: "PCR read",
                    message: format!(
                        "asked for PCRs {chunk:?}, got {read:?} with {} value(s)",
                        digests.len()
                    ),
                });
            }
            for (&index, value) in chunk.iter().zip(digests.value()) {
                let value: Digest = value.value().try_into().map_err(|_| TpmError::Unexpected {
                    what: "PCR value",
                    message: format!("PCR[{index}] is {} bytes, expected 32", value.len()),
                })?;
                out.insert(index, value);
            }
        }
        Ok(out)
    }

    fn flush_ak(&mut self) {
        if let Some(ak) = self.ak.take() {
            if let Err(e) = self.context.flush_context(ak.handle.into()) {
                tracing::warn!(error = %e, "could not flush attestation key");
            }
        }
    }
}

impl Drop for Tpm {
    fn drop(&mut self) {
        self.flush_ak();
    }
}

fn check_index(index: u32) -> Result<(), TpmError> {
    if index > MAX_PCR_INDEX {
        Err(TpmError::PcrIndexOutOfRange { index })
    } else {
        Ok(())
    }
}

fn slot_index(slot: PcrSlot) -> u32 {
    u32::from(slot).trailing_zeros()
}

fn sha256_selection(pcrs: &[u32]) -> Result<PcrSelectionList, TpmError> {
    let mut slots = Vec::with_capacity(pcrs.len());
    for &index in pcrs {
        check_index(index)?;
        slots.push(PcrSlot::try_from(1u32 << index).map_err(|e| TpmError::tss("PCR slot", e))?);
    }
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(|e| TpmError::tss("PCR selection", e))
}

/// The AK templates (as go-tpm-tools' AK templates): restricted signing keys with SHA-256;
/// ECC P-256 under the endorsement hierarchy, RSA-2048 under the owner hierarchy.
fn ak_template(kind: AkKind) -> Result<(Hierarchy, Public), TpmError> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_sign_encrypt(true)
        .with_decrypt(false)
        .build()
        .map_err(|e| TpmError::tss("AK attributes", e))?;
    let builder = PublicBuilder::new()
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes);
    let (hierarchy, builder) = match kind {
        AkKind::EcdsaP256 => {
            let params = PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_ecc_scheme(EccScheme::EcDsa(HashScheme::new(HashingAlgorithm::Sha256)))
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()
                .map_err(|e| TpmError::tss("AK ECC parameters", e))?;
            (
                Hierarchy::Endorsement,
                builder
                    .with_public_algorithm(PublicAlgorithm::Ecc)
                    .with_ecc_parameters(params)
                    .with_ecc_unique_identifier(EccPoint::default()),
            )
        }
        AkKind::Rsa2048 => {
            let scheme =
                RsaScheme::create(RsaSchemeAlgorithm::RsaSsa, Some(HashingAlgorithm::Sha256))
                    .map_err(|e| TpmError::tss("AK RSA scheme", e))?;
            let params = PublicRsaParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::Null)
                .with_scheme(scheme)
                .with_key_bits(RsaKeyBits::Rsa2048)
                .with_exponent(RsaExponent::default())
                .with_is_signing_key(true)
                .with_is_decryption_key(false)
                .with_restricted(true)
                .build()
                .map_err(|e| TpmError::tss("AK RSA parameters", e))?;
            (
                Hierarchy::Owner,
                builder
                    .with_public_algorithm(PublicAlgorithm::Rsa)
                    .with_rsa_parameters(params)
                    .with_rsa_unique_identifier(PublicKeyRsa::default()),
            )
        }
    };
    let public = builder
        .build()
        .map_err(|e| TpmError::tss("AK template", e))?;
    Ok((hierarchy, public))
}
