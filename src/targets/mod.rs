//! Targets: what can be backed up and restored, each one file behind the [`Target`] trait.
//!
//! A target streams its artifacts into an [`ArtifactSink`] and returns the facts that
//! go into the manifest; on restore it reads them back from an [`ArtifactSource`]. It
//! knows nothing about commands, brokers, hashes or storage keys.

pub mod consul;
pub mod documents;
mod http;
pub mod postgres;
mod process;
pub mod rabbitmq;
pub mod redis;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

use crate::config::Settings;
use crate::pipeline::{
    ArtifactReader, ArtifactWriter, BlockingSink, Codec, DecodedArtifact, Keyring, PendingAborts,
    PipelineError, RawDigest, open_artifact,
};
use crate::storage::Storage;
use crate::storage::layout::{BackupId, TargetKind, artifact_key};
use crate::storage::manifest::{ArtifactRecord, Facts, Manifest};

#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("{target} is unreachable: {message}")]
    Unreachable { target: TargetKind, message: String },
    #[error("invalid options for {target}: {message}")]
    InvalidOptions { target: TargetKind, message: String },
    #[error("{tool} failed: {message}")]
    Tool {
        tool: String,
        message: String,
        retryable: bool,
    },
    #[error("refused: {0}")]
    Refused(String),
    #[error("the backup cannot be used: {0}")]
    Unusable(String),
    #[error("restored data differs from the backup: {0}")]
    Mismatch(String),
    #[error("target {0} is disabled in the configuration")]
    Disabled(TargetKind),
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
}

impl TargetError {
    pub fn retryable(&self) -> bool {
        match self {
            TargetError::Unreachable { .. } => true,
            TargetError::Tool { retryable, .. } => *retryable,
            TargetError::Pipeline(err) => err.retryable(),
            _ => false,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            TargetError::Unreachable { .. } => "unreachable",
            TargetError::InvalidOptions { .. } => "invalid_options",
            TargetError::Tool { .. } => "tool_failed",
            TargetError::Refused(_) => "refused",
            TargetError::Unusable(_) => "unusable_backup",
            TargetError::Mismatch(_) => "restore_mismatch",
            TargetError::Disabled(_) => "target_disabled",
            TargetError::Pipeline(PipelineError::Integrity { .. }) => "integrity",
            TargetError::Pipeline(PipelineError::Storage(_)) => "storage",
            TargetError::Pipeline(_) => "pipeline",
        }
    }
}

/// What a restore did, for the operator and the event.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    /// Where the data went, e.g. `postgres database crm_restore_20261126T031500`.
    pub destination: String,
    pub details: serde_json::Value,
}

#[async_trait]
pub trait Target: Send + Sync {
    fn kind(&self) -> TargetKind;

    /// Cheap reachability check of the source.
    async fn health(&self) -> Result<(), TargetError>;

    /// Streams the target's artifacts into `sink`; returns the source facts for the manifest.
    async fn backup(
        &self,
        options: &serde_json::Value,
        sink: &mut ArtifactSink,
    ) -> Result<Facts, TargetError>;

    /// Restores a backup. Beside the original unless `options` explicitly say in place.
    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &serde_json::Value,
    ) -> Result<RestoreReport, TargetError>;

    /// Restore drill: restores the backup into a private scratch place (never the
    /// original) — or, where the only place is the live service, decodes it as a restore
    /// would — compares what arrived with the manifest's facts, and removes the scratch
    /// copy again. A mismatch is [`TargetError::Mismatch`].
    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError>;

    /// Checks the structure of one decoded artifact (does the dump parse, …); returns a
    /// one-line summary. The default only reads it through, so its hashes get checked.
    async fn check_artifact(
        &self,
        _manifest: &Manifest,
        record: &ArtifactRecord,
        mut reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        let bytes = tokio::io::copy(&mut reader, &mut tokio::io::sink())
            .await
            .map_err(|err| TargetError::Unusable(format!("{}: {err}", record.name)))?;
        Ok(format!("{bytes} bytes read"))
    }
}

/// Parses a command's `options` object into a target's typed options (unknown keys rejected).
pub fn parse_options<T: DeserializeOwned + Default>(
    target: TargetKind,
    options: &serde_json::Value,
) -> Result<T, TargetError> {
    if options.is_null() {
        return Ok(T::default());
    }
    serde_json::from_value(options.clone()).map_err(|err| TargetError::InvalidOptions {
        target,
        message: err.to_string(),
    })
}

/// Reads a decoded artifact whole; more than `limit` bytes is refused rather than held
/// in memory (or cut short).
pub async fn read_limited(
    reader: &mut ArtifactReader,
    name: &str,
    limit: u64,
) -> Result<Vec<u8>, TargetError> {
    use tokio::io::AsyncReadExt;
    let mut body = Vec::new();
    reader
        .take(limit + 1)
        .read_to_end(&mut body)
        .await
        .map_err(|err| TargetError::Unusable(format!("{name}: {err}")))?;
    if body.len() as u64 > limit {
        return Err(TargetError::Unusable(format!(
            "{name} is larger than {limit} bytes"
        )));
    }
    Ok(body)
}

/// Refuses two restore options that cannot go together (e.g. a destination and in_place).
pub fn exclusive_options(
    target: TargetKind,
    (first, first_set): (&str, bool),
    (second, second_set): (&str, bool),
) -> Result<(), TargetError> {
    if first_set && second_set {
        return Err(TargetError::InvalidOptions {
            target,
            message: format!("{first} and {second} exclude each other"),
        });
    }
    Ok(())
}

/// Where a target writes the artifacts of one backup.
pub struct ArtifactSink {
    storage: Storage,
    codec: Codec,
    backup_id: BackupId,
    pending: PendingAborts,
    records: Vec<ArtifactRecord>,
    parent: Option<BackupId>,
}

impl ArtifactSink {
    pub fn new(storage: Storage, codec: Codec, backup_id: BackupId) -> Self {
        ArtifactSink {
            storage,
            codec,
            backup_id,
            pending: PendingAborts::default(),
            records: Vec::new(),
            parent: None,
        }
    }

    pub fn backup_id(&self) -> &BackupId {
        &self.backup_id
    }

    /// The storage the backup goes to (to read earlier backups, for incrementals).
    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// An incremental backup names the backup it builds on.
    pub fn set_parent(&mut self, parent: BackupId) {
        self.parent = Some(parent);
    }

    pub fn parent(&self) -> Option<&BackupId> {
        self.parent.as_ref()
    }

    /// Starts an artifact called `name` (stored as `name.zst[.age]`); `format` names the raw bytes.
    pub async fn create(&self, name: &str, format: &str) -> Result<ArtifactWriter, TargetError> {
        Ok(ArtifactWriter::create(
            &self.storage,
            &self.codec,
            &self.pending,
            self.key_of(name),
            name.to_string(),
            format,
        )
        .await?)
    }

    /// [`ArtifactSink::create`] for a producer on a blocking thread, which writes (and hashes)
    /// the raw bytes through the returned sink: see [`ArtifactWriter::create_blocking`].
    pub async fn create_blocking(
        &self,
        name: &str,
        format: &str,
    ) -> Result<(ArtifactWriter, BlockingSink), TargetError> {
        Ok(ArtifactWriter::create_blocking(
            &self.storage,
            &self.codec,
            &self.pending,
            self.key_of(name),
            name.to_string(),
            format,
        )
        .await?)
    }

    /// Where artifact `name` is stored: `<backup dir>/name.zst[.age]`.
    fn key_of(&self, name: &str) -> String {
        artifact_key(&self.backup_id, &format!("{name}{}", self.codec.suffix()))
    }

    /// Completes an artifact and records it for the manifest.
    pub async fn finish(&mut self, writer: ArtifactWriter) -> Result<(), TargetError> {
        let record = writer.finish().await?;
        self.records.push(record);
        Ok(())
    }

    /// Completes an artifact made by [`ArtifactSink::create_blocking`], given its sink's digest.
    pub async fn finish_blocking(
        &mut self,
        writer: ArtifactWriter,
        raw: RawDigest,
    ) -> Result<(), TargetError> {
        let record = writer.finish_blocking(raw).await?;
        self.records.push(record);
        Ok(())
    }

    pub fn records(&self) -> &[ArtifactRecord] {
        &self.records
    }

    pub fn into_records(self) -> Vec<ArtifactRecord> {
        self.records
    }

    /// After a failure: waits for unfinished uploads to be aborted and deletes finished
    /// artifacts, so a failed backup leaves nothing behind (prune catches what this misses).
    pub async fn discard(self) {
        self.pending.wait().await;
        for record in &self.records {
            if let Err(err) = self.storage.delete(&record.key).await {
                tracing::warn!(key = %record.key, error = %err, "could not delete an artifact of a failed backup");
            }
        }
    }
}

/// Where a target reads the artifacts of one backup during restore or verify.
pub struct ArtifactSource {
    pub manifest: Manifest,
    storage: Storage,
    keyring: Keyring,
    chunk_size: usize,
}

impl ArtifactSource {
    pub fn new(manifest: Manifest, storage: Storage, keyring: Keyring, chunk_size: usize) -> Self {
        ArtifactSource {
            manifest,
            storage,
            keyring,
            chunk_size,
        }
    }

    /// The same storage and keys, for another backup (the ancestors of an incremental).
    pub fn for_manifest(&self, manifest: Manifest) -> ArtifactSource {
        ArtifactSource::new(
            manifest,
            self.storage.clone(),
            self.keyring.clone(),
            self.chunk_size,
        )
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// The manifest's facts as the target's type.
    pub fn facts<T: DeserializeOwned>(&self) -> Result<T, TargetError> {
        self.manifest.source.parse().map_err(|err| {
            TargetError::Unusable(format!("manifest facts of {}: {err}", self.manifest.id))
        })
    }

    pub fn record(&self, name: &str) -> Result<&ArtifactRecord, TargetError> {
        self.manifest.artifact(name).ok_or_else(|| {
            TargetError::Unusable(format!(
                "backup {} has no artifact `{name}`",
                self.manifest.id
            ))
        })
    }

    /// Opens an artifact: decoded bytes plus the pending hash verification.
    pub async fn open(&self, record: &ArtifactRecord) -> Result<DecodedArtifact, TargetError> {
        Ok(open_artifact(&self.storage, record, &self.keyring, self.chunk_size).await?)
    }

    /// Reads a small artifact (definitions, a KV export) whole, its hashes checked;
    /// more than `limit` bytes is refused rather than held in memory.
    pub async fn read_whole(
        &self,
        record: &ArtifactRecord,
        limit: u64,
    ) -> Result<Vec<u8>, TargetError> {
        let decoded = self.open(record).await?;
        let mut reader = decoded.reader;
        let body = read_limited(&mut reader, &record.name, limit).await;
        drop(reader);
        decoded.verification.result().await?;
        body
    }

    /// Reads an artifact through and checks both hashes, writing nothing anywhere.
    pub async fn verify(&self, record: &ArtifactRecord) -> Result<(), TargetError> {
        let DecodedArtifact {
            reader,
            verification,
        } = self.open(record).await?;
        drop(reader);
        Ok(verification.result().await?)
    }
}

/// The configured targets.
pub struct Targets {
    targets: BTreeMap<TargetKind, Box<dyn Target>>,
}

impl Targets {
    pub fn from_settings(settings: &Settings) -> Self {
        let mut targets: BTreeMap<TargetKind, Box<dyn Target>> = BTreeMap::new();
        if settings.postgres.enabled {
            targets.insert(
                TargetKind::Postgres,
                Box::new(postgres::Postgres::new(&settings.postgres)),
            );
        }
        if settings.redis.enabled {
            targets.insert(
                TargetKind::Redis,
                Box::new(redis::Redis::new(&settings.redis)),
            );
        }
        if settings.rabbitmq_definitions.enabled {
            targets.insert(
                TargetKind::Rabbitmq,
                Box::new(rabbitmq::Rabbitmq::new(&settings.rabbitmq_definitions)),
            );
        }
        if settings.consul.enabled {
            targets.insert(
                TargetKind::Consul,
                Box::new(consul::Consul::new(&settings.consul)),
            );
        }
        if settings.documents.enabled {
            targets.insert(
                TargetKind::Documents,
                Box::new(documents::Documents::new(&settings.documents)),
            );
        }
        Targets { targets }
    }

    pub fn get(&self, kind: TargetKind) -> Result<&dyn Target, TargetError> {
        self.targets
            .get(&kind)
            .map(|target| target.as_ref())
            .ok_or(TargetError::Disabled(kind))
    }

    /// Kinds enabled in the configuration, in a stable order.
    pub fn enabled(&self) -> Vec<TargetKind> {
        self.targets.keys().copied().collect()
    }
}
