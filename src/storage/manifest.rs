//! The manifest: a small JSON file that describes one finished backup and points at its artifacts.
//!
//! It is written last; a backup exists only once its manifest does. Its shape is
//! described by `schemas/manifest.schema.json`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{BackupId, TargetKind};

pub const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub id: BackupId,
    pub set_id: Option<String>,
    pub target: TargetKind,
    pub command_id: Option<String>,
    pub requested_by: String,
    pub reason: Option<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    /// Retention keeps the backup at least until then.
    pub retain_until: Option<DateTime<Utc>>,
    /// For incremental backups: the backup this one builds on.
    pub parent: Option<BackupId>,
    /// The whole source, or part of it; retention counts only full backups towards its
    /// slots. Manifests without it are full.
    #[serde(default)]
    pub scope: Scope,
    pub tool: ToolInfo,
    /// The key id (minisign's) of the key that signed this manifest; none: unsigned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// What the size check says of this backup (`size_drop`, `size_jump`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Facts about the source, recorded by the target (versions, counts, …).
    pub source: Facts,
    pub artifacts: Vec<ArtifactRecord>,
}

/// Whether a backup covers its whole source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    #[default]
    Full,
    /// Part of the source: a PostgreSQL schema filter.
    Partial,
}

/// A target's facts, kept as the JSON text they were written as: a documents backup's
/// per-file index holds tens of thousands of entries, and a `serde_json::Value` tree of
/// them would cost several times the memory of the text.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Facts(Box<serde_json::value::RawValue>);

impl Facts {
    /// Serializes a target's facts.
    pub fn of<T: Serialize>(facts: &T) -> Self {
        let text = serde_json::to_string(facts).expect("facts always serialize");
        Facts(serde_json::value::RawValue::from_string(text).expect("serde_json wrote valid JSON"))
    }

    /// Reads the facts back as the target's type.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }

    /// The facts as a JSON value (for display and tests; costs memory on large facts).
    pub fn to_value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl PartialEq for Facts {
    fn eq(&self, other: &Self) -> bool {
        self.0.get() == other.0.get()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolInfo {
    pub name: String,
    pub version: String,
}

impl ToolInfo {
    pub fn current() -> Self {
        ToolInfo {
            name: env!("CARGO_PKG_NAME").to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// One stored object of a backup and everything needed to check and decode it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    /// Logical name, e.g. `crm.dump`.
    pub name: String,
    /// Storage key relative to the storage prefix.
    pub key: String,
    /// What the raw bytes are, e.g. `pg_dump-custom`, `sql`, `rdb`, `tar`, `json`.
    pub format: String,
    pub raw_size: u64,
    pub raw_sha256: String,
    pub stored_size: u64,
    pub stored_sha256: String,
    pub compression: Compression,
    pub encryption: Option<Encryption>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Compression {
    pub algorithm: String,
    pub level: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Encryption {
    pub algorithm: String,
    /// `sha256:<16 hex>` of each recipient's public key.
    pub recipients: Vec<String>,
}

impl Manifest {
    pub fn stored_size(&self) -> u64 {
        self.artifacts.iter().map(|a| a.stored_size).sum()
    }

    pub fn raw_size(&self) -> u64 {
        self.artifacts.iter().map(|a| a.raw_size).sum()
    }

    pub fn duration(&self) -> std::time::Duration {
        (self.finished_at - self.started_at)
            .to_std()
            .unwrap_or_default()
    }

    pub fn artifact(&self, name: &str) -> Option<&ArtifactRecord> {
        self.artifacts.iter().find(|a| a.name == name)
    }
}
