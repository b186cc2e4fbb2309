//! The streaming pipeline every artifact goes through, and back.
//!
//! ```text
//! backup:  source → SHA-256(raw) → zstd → (age) → SHA-256(stored) → multipart upload
//! restore: download → SHA-256(stored) → (age -d) → zstd -d → SHA-256(raw) → consumer
//! ```
//! Reading, compression, encryption and hashing run on blocking threads of the pipeline,
//! connected to storage by small bounded channels: memory is bounded by the chunk size, the
//! channel depth and the multipart part size, never by the size of the artifact.
//!
//! Files: `encode` (the backup direction: [`stream`] a blocking source with an [`Inspect`]or
//! into a [`PendingArtifact`]), `channel_source` (a source fed by async code), `compress` (zstd, age and the stored digest, writing into
//! chunks), `decode` (the restore direction), `chunk` (chunks between stages),
//! `zstd_context` (the compression context and its settings).
//! [`sha256`] is SHA-256 that can hash the same bytes into two digests at once (an inspector
//! that hashes part of the stream, such as the documents' per-file digests, shares the work
//! with the stream's own digest).

mod channel_source;
mod chunk;
mod compress;
mod decode;
mod encode;
pub mod sha256;
mod zstd_context;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub use channel_source::ChannelSource;
pub use decode::{ArtifactReader, DecodedArtifact, Verification, open_artifact};
pub use encode::{ArtifactSpec, Inspect, PendingAborts, PendingArtifact, Streamed, stream};

use crate::config::PipelineSettings;
use crate::model::TargetKind;
use crate::storage::StorageError;

/// Chunks that may wait in each channel between stages.
const CHANNEL_DEPTH: usize = 4;

/// Idle chunk buffers a pool keeps: enough for a channel's worth of chunks, the one being
/// filled and the one being consumed (chunks beyond that are freed when dropped).
const POOLED_CHUNKS: usize = CHANNEL_DEPTH + 4;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("reading the source failed: {0}")]
    Source(#[source] std::io::Error),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("compression or encryption failed: {0}")]
    Encode(#[source] std::io::Error),
    #[error("artifact `{artifact}` cannot be decoded: {reason}")]
    Decode { artifact: String, reason: String },
    #[error(
        "artifact `{artifact}` is corrupt: {layer} SHA-256 {actual} ({actual_size} bytes) \
         does not match the manifest's {expected} ({expected_size} bytes)"
    )]
    Integrity {
        artifact: String,
        layer: &'static str,
        expected: String,
        actual: String,
        expected_size: u64,
        actual_size: u64,
    },
    #[error(
        "artifact `{0}` is encrypted and no age identity is configured (BACKUP_AGE_IDENTITY_FILE)"
    )]
    NoIdentity(String),
    #[error("age identity file {path}: {reason}")]
    Identity { path: String, reason: String },
    #[error("staging directory {dir} (restore.staging_dir): {reason}")]
    Staging { dir: String, reason: String },
    #[error("the upload was aborted")]
    Aborted,
    #[error("the upload stopped taking data")]
    UploadStopped,
    #[error("pipeline task failed: {0}")]
    Internal(String),
}

impl PipelineError {
    /// Network and storage hiccups can pass; corrupt data and missing keys cannot.
    pub fn retryable(&self) -> bool {
        match self {
            PipelineError::Storage(err) => err.retryable(),
            PipelineError::Source(_) => true,
            _ => false,
        }
    }
}

/// How artifacts are compressed and encrypted when written.
#[derive(Clone)]
pub struct Codec {
    pub zstd_level: i32,
    levels_by_target: Arc<BTreeMap<TargetKind, i32>>,
    pub zstd_workers: u32,
    pub chunk_size: usize,
    recipients: Arc<Vec<age::x25519::Recipient>>,
}

impl Codec {
    /// Builds the codec; settings were validated at load, so recipients parse.
    pub fn from_settings(settings: &PipelineSettings) -> Self {
        let recipients = settings
            .age_recipients
            .iter()
            .filter_map(|r| r.parse::<age::x25519::Recipient>().ok())
            .collect();
        // Validated at load: every key is a target.
        let levels_by_target = settings
            .zstd_level_by_target
            .iter()
            .filter_map(|(target, level)| Some((target.parse().ok()?, *level)))
            .collect();
        Codec {
            zstd_level: settings.zstd_level,
            levels_by_target: Arc::new(levels_by_target),
            zstd_workers: settings.zstd_workers,
            chunk_size: settings.chunk_kib as usize * 1024,
            recipients: Arc::new(recipients),
        }
    }

    /// This codec with the level configured for `target`, if it has one of its own.
    pub fn for_target(&self, target: TargetKind) -> Codec {
        let mut codec = self.clone();
        if let Some(level) = self.levels_by_target.get(&target) {
            codec.zstd_level = *level;
        }
        codec
    }

    pub fn encrypts(&self) -> bool {
        !self.recipients.is_empty()
    }

    /// `sha256:<16 hex>` of each recipient: names the keys without repeating them.
    pub fn recipient_fingerprints(&self) -> Vec<String> {
        self.recipients
            .iter()
            .map(|r| fingerprint(&r.to_string()))
            .collect()
    }

    /// File-name suffix of stored artifacts: `.zst` or `.zst.age`.
    pub fn suffix(&self) -> &'static str {
        if self.encrypts() { ".zst.age" } else { ".zst" }
    }
}

pub fn fingerprint(public_key: &str) -> String {
    let digest = Sha256::digest(public_key.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..16])
}

/// Private keys for decrypting artifacts, loaded from an age identity file.
#[derive(Clone)]
pub struct Keyring {
    identities: Arc<Vec<Box<dyn age::Identity + Send + Sync>>>,
}

impl Keyring {
    pub fn empty() -> Self {
        Keyring {
            identities: Arc::new(Vec::new()),
        }
    }

    pub fn load(path: &Path) -> Result<Self, PipelineError> {
        let identity_error = |reason: String| PipelineError::Identity {
            path: path.display().to_string(),
            reason,
        };
        let file = std::fs::File::open(path).map_err(|err| identity_error(err.to_string()))?;
        let metadata = file
            .metadata()
            .map_err(|err| identity_error(err.to_string()))?;
        crate::private_file::check_owner_only(&metadata).map_err(identity_error)?;
        let identities = age::IdentityFile::from_buffer(std::io::BufReader::new(file))
            .map_err(|err| identity_error(err.to_string()))?
            .into_identities()
            .map_err(|err| identity_error(err.to_string()))?;
        if identities.is_empty() {
            return Err(identity_error("contains no identities".into()));
        }
        Ok(Keyring {
            identities: Arc::new(identities),
        })
    }

    fn is_empty(&self) -> bool {
        self.identities.is_empty()
    }
}

/// SHA-256 and byte count of everything that passes one point of the pipeline.
#[derive(Default)]
struct Tally {
    hasher: sha256::Sha256,
    bytes: u64,
}

impl Tally {
    fn update(&mut self, data: &[u8]) {
        self.hasher.update(data);
        self.bytes += data.len() as u64;
    }

    fn finish(self) -> (String, u64) {
        (self.hasher.finish_hex(), self.bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::PathBuf;

    use super::*;

    /// A codec with 1 KiB chunks (stored bytes keep running into the end of a chunk).
    pub(crate) fn codec_with(workers: u32, recipients: Vec<String>) -> Codec {
        Codec::from_settings(&PipelineSettings {
            zstd_level: 3,
            zstd_level_by_target: Default::default(),
            zstd_workers: workers,
            chunk_kib: 1,
            progress_every: crate::config::HumanDuration(std::time::Duration::from_secs(30)),
            age_recipients: recipients,
            age_identity_file: PathBuf::new(),
            accepted_recipients: Vec::new(),
        })
    }

    pub(crate) fn codec(workers: u32) -> Codec {
        codec_with(workers, Vec::new())
    }
}
