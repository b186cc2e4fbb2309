//! Restore drill: proves a backup can really be restored, without touching the original.
//!
//! Verify first (both hashes and the target's structure check of every artifact), then the
//! target restores into a private scratch place, compares what arrived with the manifest's
//! facts and removes the scratch copy.

use serde::Serialize;

use super::verify::{VerifyReport, verify_backup};
use super::{JobContext, JobError};
use crate::model::TargetKind;
use crate::storage::catalog::BackupRef;
use crate::storage::manifest::Manifest;
use crate::targets::RestoreReport;

#[derive(Debug, Clone)]
pub struct DrillRequest {
    pub target: TargetKind,
    /// Default `latest`.
    pub backup: BackupRef,
}

#[derive(Debug, Serialize)]
pub struct DrillReport {
    pub backup_id: String,
    pub verify: VerifyReport,
    /// Where the scratch restore went and what it compared.
    pub scratch: String,
    pub details: serde_json::Value,
}

pub async fn run_drill(
    ctx: &JobContext,
    request: &DrillRequest,
) -> Result<(Manifest, DrillReport), JobError> {
    let target = ctx.targets.get(request.target)?;
    let (manifest, _) = ctx.resolve(request.target, &request.backup).await?;
    let verify = verify_backup(ctx, &manifest).await?;
    if let Some(failure) = verify.failure() {
        return Err(JobError::VerifyFailed(failure));
    }
    let source = ctx.source(&manifest, true).await?;
    let RestoreReport {
        destination,
        details,
    } = target.drill(&source).await?;
    tracing::info!(backup_id = %manifest.id, scratch = %destination, "restore drill passed");
    let report = DrillReport {
        backup_id: manifest.id.to_string(),
        verify,
        scratch: destination,
        details,
    };
    Ok((manifest, report))
}
