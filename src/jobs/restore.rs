//! Restore job: resolve the backup, then let its target restore it (beside the original by default).

use super::{JobContext, JobError};
use crate::model::TargetKind;
use crate::storage::catalog::{self, BackupRef};
use crate::storage::manifest::Manifest;
use crate::targets::RestoreReport;

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub target: TargetKind,
    pub backup: BackupRef,
    pub options: serde_json::Value,
}

pub async fn run_restore(
    ctx: &JobContext,
    request: &RestoreRequest,
) -> Result<(Manifest, RestoreReport), JobError> {
    let target = ctx.targets.get(request.target)?;
    let manifest = catalog::resolve(&ctx.storage, request.target, &request.backup).await?;
    let source = ctx.source(&manifest, true).await?;
    let report = target.restore(&source, &request.options).await?;
    Ok((manifest, report))
}
