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
use crate::pipeline::{Codec, Keyring, PipelineError};
use crate::storage::catalog;
use crate::storage::catalog::CatalogError;
use crate::storage::manifest::Manifest;
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

/// Everything a job needs: settings, storage, codec and the configured targets.
#[derive(Clone)]
pub struct JobContext {
    pub settings: Arc<Settings>,
    pub storage: Storage,
    pub codec: Codec,
    pub targets: Arc<Targets>,
}

impl JobContext {
    pub fn new(settings: Settings) -> Result<Self, JobError> {
        let storage = Storage::open(&settings.storage)?;
        let codec = Codec::from_settings(&settings.pipeline);
        let targets = Arc::new(Targets::from_settings(&settings));
        Ok(JobContext {
            settings: Arc::new(settings),
            storage,
            codec,
            targets,
        })
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
            let ancestor = catalog::get(&self.storage, &id).await?;
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
        ))
    }

    /// The age identities for decrypting, when an identity file is configured.
    pub fn keyring(&self) -> Result<Keyring, JobError> {
        match self.settings.identity_file() {
            Some(path) => Ok(Keyring::load(path)?),
            None => Ok(Keyring::empty()),
        }
    }
}
