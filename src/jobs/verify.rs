//! Verify job: every artifact's stored and raw SHA-256, plus the target's structural check.

use serde::Serialize;

use super::{JobContext, JobError};
use crate::model::BackupId;
use crate::storage::catalog;
use crate::storage::layout::{MANIFEST_NAME, manifest_key};
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
    /// How the manifest's signature checked out (`None`: it did not, see `artifacts`).
    pub manifest: Option<String>,
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
    // Nothing the manifest says is used before its signature is checked (it is read again,
    // as stored) and its encryption is what this installation writes.
    let checked = catalog::get_trusted(&ctx.storage, &manifest.id, &ctx.verifier)
        .await
        .map_err(JobError::from)
        .and_then(|(manifest, trust)| {
            ctx.check_encryption(&manifest)?;
            Ok((manifest, trust))
        });
    let (manifest, trust) = match checked {
        Ok(checked) => checked,
        Err(err) if err.retryable() => return Err(err),
        Err(err) => {
            return Ok(VerifyReport {
                backup_id: manifest.id.clone(),
                manifest: None,
                artifacts: vec![ArtifactCheck {
                    name: MANIFEST_NAME.to_string(),
                    key: manifest_key(&manifest.id),
                    ok: false,
                    detail: err.to_string(),
                }],
            });
        }
    };
    let manifest = &manifest;
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
        manifest: Some(trust.to_string()),
        artifacts,
    })
}
