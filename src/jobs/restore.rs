//! Restore job: resolve the backup (its manifest's signature checked), then let its target
//! restore it (beside the original by default).

use super::{JobContext, JobError};
use crate::model::TargetKind;
use crate::storage::catalog::BackupRef;
use crate::storage::manifest::Manifest;
use crate::storage::signing::Trust;
use crate::targets::RestoreReport;

#[derive(Debug, Clone)]
pub struct RestoreRequest {
    pub target: TargetKind,
    pub backup: BackupRef,
    pub options: serde_json::Value,
    /// The command this restore runs for (none from the CLI).
    pub command_id: Option<String>,
}

pub async fn run_restore(
    ctx: &JobContext,
    request: &RestoreRequest,
) -> Result<(Manifest, Trust, RestoreReport), JobError> {
    let target = ctx.targets.get(request.target)?;
    let (manifest, trust) = ctx.resolve(request.target, &request.backup).await?;
    let source = ctx
        .source(&manifest, true)
        .await?
        .for_command(request.command_id.clone());
    let report = target.restore(&source, &request.options).await?;
    Ok((manifest, trust, report))
}
