//! What one command does, independent of where it came from (CLI, worker, scheduler):
//! backup, restore, verify, drill, prune.
//!
//! Each job is a plain `async fn` over a [`JobContext`]; it returns a typed result or a
//! [`JobError`] that says whether trying again can help.

pub mod backup;
pub mod drill;
pub mod prune;
pub mod restore;
pub mod verify;

use std::sync::Arc;

use crate::config::Settings;
use crate::model::TargetKind;
use crate::pipeline::{Codec, Keyring, PipelineError};
use crate::storage::catalog::CatalogError;
use crate::storage::catalog::{self, BackupRef};
use crate::storage::manifest::Manifest;
use crate::storage::signing::{Signer, Trust, Verifier};
use crate::storage::{Storage, StorageError};
use crate::targets::{ArtifactSource, TargetError, Targets};

/// Most backups an incremental chain may have: a longer one (or a loop) is refused.
const MAX_CHAIN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum JobError {
    #[error(transparent)]
    Target(#[from] TargetError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("cancelled before it finished")]
    Cancelled,
    #[error("verify failed: {0}")]
    VerifyFailed(String),
}

impl JobError {
    /// Whether the same command may succeed if tried again later.
    pub fn retryable(&self) -> bool {
        match self {
            JobError::Target(err) => err.retryable(),
            JobError::Catalog(err) => err.retryable(),
            JobError::Storage(err) => err.retryable(),
            JobError::Pipeline(err) => err.retryable(),
            JobError::Invalid(_) | JobError::VerifyFailed(_) => false,
            JobError::Cancelled => true,
        }
    }

    /// A short, stable name of the error class (for events and metrics).
    pub fn kind(&self) -> &'static str {
        match self {
            JobError::Target(err) => err.kind(),
            JobError::Catalog(CatalogError::NotFound(_) | CatalogError::NoBackups(_)) => {
                "backup_not_found"
            }
            JobError::Catalog(CatalogError::Corrupt { .. }) => "corrupt_manifest",
            JobError::Catalog(CatalogError::Untrusted(_)) => "untrusted_manifest",
            JobError::Catalog(CatalogError::Storage(_)) | JobError::Storage(_) => "storage",
            JobError::Pipeline(PipelineError::Integrity { .. }) | JobError::VerifyFailed(_) => {
                "integrity"
            }
            JobError::Pipeline(_) => "pipeline",
            JobError::Invalid(_) => "invalid_request",
            JobError::Cancelled => "cancelled",
        }
    }
}

/// Everything a job needs: settings, storage, codec, the configured targets, and the keys
/// manifests are signed and checked with.
#[derive(Clone)]
pub struct JobContext {
    pub settings: Arc<Settings>,
    pub storage: Storage,
    pub codec: Codec,
    pub targets: Arc<Targets>,
    pub signer: Option<Arc<Signer>>,
    pub verifier: Arc<Verifier>,
}

impl JobContext {
    pub fn new(settings: Settings) -> Result<Self, JobError> {
        let storage = Storage::open(&settings.storage)?;
        let codec = Codec::from_settings(&settings.pipeline);
        let targets = Arc::new(Targets::from_settings(&settings));
        let signing = &settings.signing;
        let signer = (!signing.secret_key_file.as_os_str().is_empty())
            .then(|| Signer::load(&signing.secret_key_file).map(Arc::new))
            .transpose()
            .map_err(|err| JobError::Invalid(err.to_string()))?;
        // What this worker signs, it can check: its own public key is always trusted.
        let mut public_keys = signing.public_keys.clone();
        public_keys.extend(signer.iter().map(|signer| signer.public_key().to_string()));
        if public_keys.is_empty() && !signing.allow_unsigned {
            return Err(JobError::Invalid(
                "signing.allow_unsigned is off and no signing key is configured: set \
                 BACKUP_SIGNING_KEY_FILE (this worker signs and checks its backups) or \
                 BACKUP_SIGNING_PUBLIC_KEYS (it checks backups others signed)"
                    .into(),
            ));
        }
        let verifier = Verifier::new(&public_keys, signing.allow_unsigned)
            .map_err(|err| JobError::Invalid(err.to_string()))?;
        Ok(JobContext {
            settings: Arc::new(settings),
            storage,
            codec,
            targets,
            signer,
            verifier: Arc::new(verifier),
        })
    }

    /// The manifest of `backup` for `target`, its signature checked and its encryption what
    /// this installation writes.
    pub async fn resolve(
        &self,
        target: TargetKind,
        backup: &BackupRef,
    ) -> Result<(Manifest, Trust), JobError> {
        let (manifest, trust) =
            catalog::resolve_trusted(&self.storage, target, backup, &self.verifier).await?;
        self.check_encryption(&manifest)?;
        Ok((manifest, trust))
    }

    /// A manifest that says an artifact is not encrypted, or encrypted to other keys, while
    /// this installation encrypts: refused (a downgrade), unless
    /// `pipeline.accepted_recipients` names those keys.
    pub fn check_encryption(&self, manifest: &Manifest) -> Result<(), JobError> {
        if !self.codec.encrypts() {
            return Ok(());
        }
        let mut accepted = self.codec.recipient_fingerprints();
        accepted.extend(self.settings.pipeline.accepted_recipients.iter().cloned());
        for artifact in &manifest.artifacts {
            let refused = match &artifact.encryption {
                None => Some("is not encrypted".to_string()),
                Some(encryption) => encryption
                    .recipients
                    .iter()
                    .find(|recipient| !accepted.contains(recipient))
                    .map(|recipient| {
                        format!(
                            "is encrypted to a key this installation does not use ({recipient})"
                        )
                    }),
            };
            if let Some(why) = refused {
                return Err(JobError::Invalid(format!(
                    "the manifest of {} says artifact `{}` {why}, but this installation encrypts \
                     every backup to its own keys: refusing a possible downgrade \
                     (pipeline.accepted_recipients lists keys to accept)",
                    manifest.id, artifact.name
                )));
            }
        }
        Ok(())
    }

    /// Where a target reads `manifest`'s artifacts from; with `ancestors`, the backups an
    /// incremental builds on are resolved too (following `parent`, oldest first).
    pub async fn source(
        &self,
        manifest: &Manifest,
        ancestors: bool,
    ) -> Result<ArtifactSource, JobError> {
        let mut chain = Vec::new();
        let mut parent = manifest.parent.clone().filter(|_| ancestors);
        while let Some(id) = parent {
            if chain.len() >= MAX_CHAIN || chain.iter().any(|m: &Manifest| m.id == id) {
                return Err(JobError::Invalid(format!(
                    "the parents of {} do not end within {MAX_CHAIN} backups",
                    manifest.id
                )));
            }
            let (ancestor, _) = catalog::get_trusted(&self.storage, &id, &self.verifier).await?;
            self.check_encryption(&ancestor)?;
            parent = ancestor.parent.clone();
            chain.push(ancestor);
        }
        chain.reverse();
        Ok(ArtifactSource::new(
            manifest.clone(),
            chain,
            self.storage.clone(),
            self.keyring()?,
            self.codec.chunk_size,
        )
        .staged_in(self.settings.restore.staging()))
    }

    /// The age identities for decrypting, when an identity file is configured.
    pub fn keyring(&self) -> Result<Keyring, JobError> {
        match self.settings.identity_file() {
            Some(path) => Ok(Keyring::load(path)?),
            None => Ok(Keyring::empty()),
        }
    }
}
