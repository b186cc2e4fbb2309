//! Verify job: every artifact's stored and raw SHA-256, plus the target's structural check.

use serde::Serialize;

use super::{JobContext, JobError};
use crate::model::BackupId;
use crate::storage::manifest::Manifest;

#[derive(Debug, Clone, Serialize)]
pub struct ArtifactCheck {
    pub name: String,
    pub key: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    pub backup_id: BackupId,
    pub artifacts: Vec<ArtifactCheck>,
}

impl VerifyReport {
    pub fn ok(&self) -> bool {
        self.artifacts.iter().all(|a| a.ok)
    }

    /// The first failure, as one line.
    pub fn failure(&self) -> Option<String> {
        self.artifacts
            .iter()
            .find(|a| !a.ok)
            .map(|a| format!("{}: {}", a.key, a.detail))
    }
}

/// Checks one backup. A damaged artifact is reported in the result, not as an error;
/// errors mean the check itself could not run (storage unreachable, no key).
pub async fn verify_backup(
    ctx: &JobContext,
    manifest: &Manifest,
) -> Result<VerifyReport, JobError> {
    let target = ctx.targets.get(manifest.target)?;
    let source = ctx.source(manifest, false).await?;
    let mut artifacts = Vec::new();
    for record in &manifest.artifacts {
        let decoded = match source.open(record).await {
            Ok(decoded) => decoded,
            Err(err) if err.retryable() => return Err(err.into()),
            Err(err) => {
                artifacts.push(ArtifactCheck {
                    name: record.name.clone(),
                    key: record.key.clone(),
                    ok: false,
                    detail: err.to_string(),
                });
                continue;
            }
        };
        let structure = target
            .check_artifact(manifest, record, decoded.reader)
            .await;
        let hashes = decoded.verification.result().await;
        let (ok, detail) = match (hashes, structure) {
            (Err(err), _) if err.retryable() => return Err(err.into()),
            (Err(err), _) => (false, err.to_string()),
            (Ok(()), Err(err)) => (false, err.to_string()),
            (Ok(()), Ok(summary)) => (true, format!("hashes match; {summary}")),
        };
        artifacts.push(ArtifactCheck {
            name: record.name.clone(),
            key: record.key.clone(),
            ok,
            detail,
        });
    }
    Ok(VerifyReport {
        backup_id: manifest.id.clone(),
        artifacts,
    })
}
