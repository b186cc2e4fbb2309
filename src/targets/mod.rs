//! Targets: what can be backed up and restored, each one file behind the [`Target`] trait.
//!
//! A target streams its artifacts into an [`ArtifactSink`] and returns the facts that
//! go into the manifest; on restore it reads them back from an [`ArtifactSource`]. It
//! knows nothing about commands, brokers, hashes or storage keys.

pub mod consul;
pub mod documents;
mod guard;
mod http;
pub mod postgres;
pub(crate) mod process;
pub mod rabbitmq;
pub mod redis;

use std::collections::BTreeMap;
use std::path::PathBuf;

use async_trait::async_trait;
use serde::de::DeserializeOwned;

pub use self::guard::RestoreGuard;
use crate::config::Settings;
use crate::model::{BackupId, TargetKind};
use crate::pipeline::{
    ArtifactReader, ArtifactSpec, Codec, DecodedArtifact, Inspect, Keyring, PendingAborts,
    PendingArtifact, PipelineError, Streamed, open_artifact,
};
use crate::storage::Storage;
use crate::storage::layout::artifact_key;
use crate::storage::manifest::{ArtifactRecord, Facts, Manifest, Scope};

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
    /// Whether a backup with these options builds on the target's previous backup (an
    /// incremental): the job then hands it to the sink ([`ArtifactSink::previous`]).
    fn needs_previous(&self, _options: &serde_json::Value) -> bool {
        false
    }

    /// Checks a restore's options before anything runs: their domains (names, destinations,
    /// paths) and that nothing reaches the live source unless `in_place` says so. Returns
    /// whether the restore changes the live source (it then needs the in-place permission).
    fn check_restore(&self, _options: &serde_json::Value) -> Result<bool, TargetError>;

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
    previous: Option<Manifest>,
    parent: Option<BackupId>,
    scope: Scope,
}

impl ArtifactSink {
    /// A sink for backup `backup_id`; `previous` is the target's latest backup before it,
    /// when the target asked for it (see [`Target::needs_previous`]).
    pub fn new(
        storage: Storage,
        codec: Codec,
        backup_id: BackupId,
        previous: Option<Manifest>,
    ) -> Self {
        ArtifactSink {
            storage,
            codec,
            backup_id,
            pending: PendingAborts::default(),
            records: Vec::new(),
            previous,
            parent: None,
            scope: Scope::Full,
        }
    }

    pub fn backup_id(&self) -> &BackupId {
        &self.backup_id
    }

    /// The target's latest backup before this one (for incrementals).
    pub fn previous(&self) -> Option<&Manifest> {
        self.previous.as_ref()
    }

    /// An incremental backup names the backup it builds on.
    pub fn set_parent(&mut self, parent: BackupId) {
        self.parent = Some(parent);
    }

    pub fn parent(&self) -> Option<&BackupId> {
        self.parent.as_ref()
    }

    /// A backup of part of the source says so (retention does not count it as full).
    pub fn set_partial(&mut self) {
        self.scope = Scope::Partial;
    }

    pub fn scope(&self) -> Scope {
        self.scope
    }

    /// Streams `source` to its end into the artifact `name` (stored as `name.zst[.age]`;
    /// `format` names the raw bytes), showing every raw chunk to `inspector`. The artifact is
    /// uploaded but not committed: the target commits it with [`ArtifactSink::commit`] once
    /// it knows the source was whole, or drops it to abort the upload.
    pub async fn stream<R, I>(
        &self,
        name: &str,
        format: &str,
        source: R,
        inspector: I,
    ) -> Result<Streamed<R, I>, PipelineError>
    where
        R: std::io::Read + Send + 'static,
        I: Inspect,
    {
        crate::pipeline::stream(
            &self.storage,
            &self.codec,
            &self.pending,
            ArtifactSpec {
                key: artifact_key(&self.backup_id, &format!("{name}{}", self.codec.suffix())),
                name: name.to_string(),
                format: format.to_string(),
            },
            source,
            inspector,
        )
        .await
    }

    /// Completes an artifact's upload and records it for the manifest.
    pub async fn commit(&mut self, artifact: PendingArtifact) -> Result<(), TargetError> {
        self.records.push(artifact.commit().await?);
        Ok(())
    }

    /// Stores a small artifact held in memory (definitions, a KV export).
    pub async fn store(
        &mut self,
        name: &str,
        format: &str,
        body: Vec<u8>,
    ) -> Result<(), TargetError> {
        let streamed = self
            .stream(name, format, std::io::Cursor::new(body), ())
            .await?;
        self.commit(streamed.artifact).await
    }

    pub fn records(&self) -> &[ArtifactRecord] {
        &self.records
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
    /// The backups an incremental builds on, oldest first (resolved by the job).
    ancestors: Vec<Manifest>,
    storage: Storage,
    keyring: Keyring,
    chunk_size: usize,
    /// Where artifacts are staged and verified before use (`restore.verify_first`).
    staging: Option<PathBuf>,
    /// The command a restore runs for: the same on every delivery of that command.
    command_id: Option<String>,
}

impl ArtifactSource {
    pub fn new(
        manifest: Manifest,
        ancestors: Vec<Manifest>,
        storage: Storage,
        keyring: Keyring,
        chunk_size: usize,
    ) -> Self {
        ArtifactSource {
            manifest,
            ancestors,
            storage,
            keyring,
            chunk_size,
            staging: None,
            command_id: None,
        }
    }

    /// Artifacts opened from this source are verified in a staging file in `dir` first.
    pub fn staged_in(mut self, dir: Option<PathBuf>) -> Self {
        self.staging = dir;
        self
    }

    /// The restore runs for the command `id`: a target may mark what it restored with it, so
    /// that a redelivery of the command recognizes its own finished work.
    pub fn for_command(mut self, id: Option<String>) -> Self {
        self.command_id = id;
        self
    }

    pub fn command_id(&self) -> Option<&str> {
        self.command_id.as_deref()
    }

    /// The same storage and keys, for another backup (an ancestor of an incremental).
    pub fn for_manifest(&self, manifest: Manifest) -> ArtifactSource {
        ArtifactSource::new(
            manifest,
            Vec::new(),
            self.storage.clone(),
            self.keyring.clone(),
            self.chunk_size,
        )
        .staged_in(self.staging.clone())
    }

    /// The backups this one builds on, oldest first; empty for a full backup.
    pub fn ancestors(&self) -> &[Manifest] {
        &self.ancestors
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

    /// Whether artifacts are proven before their bytes are handed out (`restore.verify_first`).
    pub fn verifies_first(&self) -> bool {
        self.staging.is_some()
    }

    /// Opens an artifact: decoded bytes plus the pending hash verification. With staging
    /// (`restore.verify_first`), no decoded byte is handed out before the stored bytes are
    /// proven to be the manifest's.
    pub async fn open(&self, record: &ArtifactRecord) -> Result<DecodedArtifact, TargetError> {
        let staging = self.staging.as_deref();
        Ok(open_artifact(
            &self.storage,
            record,
            &self.keyring,
            self.chunk_size,
            staging,
        )
        .await?)
    }

    /// Opens an artifact streamed, its hashes checked at its end: for reads whose bytes are
    /// used only once verified (verification, small artifacts read whole).
    async fn open_streamed(&self, record: &ArtifactRecord) -> Result<DecodedArtifact, TargetError> {
        Ok(open_artifact(&self.storage, record, &self.keyring, self.chunk_size, None).await?)
    }

    /// Reads a small artifact (definitions, a KV export) whole, its hashes checked;
    /// more than `limit` bytes is refused rather than held in memory.
    pub async fn read_whole(
        &self,
        record: &ArtifactRecord,
        limit: u64,
    ) -> Result<Vec<u8>, TargetError> {
        let decoded = self.open_streamed(record).await?;
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
        } = self.open_streamed(record).await?;
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
        let guard = RestoreGuard::new(&settings.restore);
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
                Box::new(redis::Redis::new(&settings.redis, guard.clone())),
            );
        }
        if settings.rabbitmq_definitions.enabled {
            targets.insert(
                TargetKind::Rabbitmq,
                Box::new(rabbitmq::Rabbitmq::new(
                    &settings.rabbitmq_definitions,
                    guard.clone(),
                )),
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
                Box::new(documents::Documents::new(&settings.documents, guard)),
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

#[cfg(test)]
pub(crate) mod tests {
    use serde::de::DeserializeOwned;

    use crate::model::{Action, TargetKind};

    /// A target's options struct accepts every option `crate::options` lists for it.
    pub(crate) fn accepts_listed_options<T: DeserializeOwned + Default>(
        action: Action,
        target: TargetKind,
    ) {
        let sample = crate::options::sample_options(action, target);
        if let Err(err) = super::parse_options::<T>(target, &sample) {
            panic!("{action} {target}: {sample} is refused: {err}");
        }
    }
}
