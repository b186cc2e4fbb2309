//! Backup job: run one target into storage, then commit the manifest (or leave nothing).

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::{JobContext, JobError};
use crate::model::{BackupId, TargetKind};
use crate::size_check;
use crate::storage::catalog;
use crate::storage::manifest::{MANIFEST_FORMAT, Manifest, Scope, ToolInfo};
use crate::targets::ArtifactSink;

/// What to back up, and on whose behalf.
#[derive(Debug, Clone)]
pub struct BackupRequest {
    pub target: TargetKind,
    pub options: serde_json::Value,
    pub command_id: Option<String>,
    pub requested_by: String,
    pub reason: Option<String>,
    pub set_id: Option<String>,
    pub retain_until: Option<DateTime<Utc>>,
}

impl BackupRequest {
    pub fn new(target: TargetKind, requested_by: &str) -> Self {
        BackupRequest {
            target,
            options: serde_json::Value::Null,
            command_id: None,
            requested_by: requested_by.to_string(),
            reason: None,
            set_id: None,
            retain_until: None,
        }
    }
}

/// What the size check says of `manifest` against the previous full backup of its target.
/// Only full, non-incremental backups are compared (an incremental holds only what changed);
/// a catalog that cannot be read skips the check rather than the backup.
async fn size_warnings(ctx: &JobContext, manifest: &Manifest) -> Vec<String> {
    if manifest.scope != Scope::Full || manifest.parent.is_some() {
        return Vec::new();
    }
    let comparable = |m: &Manifest| m.scope == Scope::Full && m.parent.is_none();
    let previous = match catalog::latest_where(&ctx.storage, manifest.target, comparable).await {
        Ok(Some(previous)) => previous,
        Ok(None) => return Vec::new(),
        Err(err) => {
            tracing::warn!(error = %err, "size check skipped: cannot read the catalog");
            return Vec::new();
        }
    };
    let check = &ctx.settings.size_check;
    let warning = size_check::size_warning(
        previous.raw_size(),
        manifest.raw_size(),
        check.drop_ratio,
        check.jump_ratio,
    );
    if let Some(warning) = warning {
        tracing::warn!(
            backup_id = %manifest.id,
            previous = %previous.id,
            raw = manifest.raw_size(),
            previous_raw = previous.raw_size(),
            warning,
            "the backup's size differs from the previous one's"
        );
    }
    warning.into_iter().map(String::from).collect()
}

/// Backs up one target. On success the manifest is in storage; on failure or
/// cancellation, uploads are aborted, finished artifacts deleted, and no manifest exists.
pub async fn run_backup(
    ctx: &JobContext,
    request: &BackupRequest,
    cancel: &CancellationToken,
) -> Result<Manifest, JobError> {
    let target = ctx.targets.get(request.target)?;
    let started_at = Utc::now();
    let max_retain = ctx.settings.retention.max_retain;
    if let Some(until) = request.retain_until
        && until > started_at + chrono::Duration::from_std(max_retain.0).unwrap_or_default()
    {
        return Err(JobError::Invalid(format!(
            "retain_until {} is further than retention.max_retain ({max_retain}) from now",
            until.to_rfc3339()
        )));
    }
    let id = BackupId::generate(request.target, started_at);
    let codec = ctx.codec.for_target(request.target);
    let previous = if target.needs_previous(&request.options) {
        catalog::latest(&ctx.storage, request.target).await?
    } else {
        None
    };
    let mut sink = ArtifactSink::new(ctx.storage.clone(), codec, id.clone(), previous);
    tracing::info!(backup_id = %id, target = %request.target, "backup started");
    let facts = tokio::select! {
        facts = target.backup(&request.options, &mut sink) => facts.map_err(JobError::from),
        _ = cancel.cancelled() => Err(JobError::Cancelled),
    };
    let facts = match facts {
        Ok(facts) => facts,
        Err(err) => {
            sink.discard().await;
            return Err(err);
        }
    };
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        id,
        set_id: request.set_id.clone(),
        target: request.target,
        command_id: request.command_id.clone(),
        requested_by: request.requested_by.clone(),
        reason: request.reason.clone(),
        started_at,
        finished_at: Utc::now(),
        retain_until: request.retain_until,
        parent: sink.parent().cloned(),
        scope: sink.scope(),
        tool: ToolInfo::current(),
        signing_key: ctx
            .signer
            .as_ref()
            .map(|signer| signer.key_id().to_string()),
        warnings: Vec::new(),
        source: facts,
        artifacts: sink.records().to_vec(),
    };
    let manifest = Manifest {
        warnings: size_warnings(ctx, &manifest).await,
        ..manifest
    };
    if let Err(err) = catalog::commit(&ctx.storage, &manifest, ctx.signer.as_deref()).await {
        sink.discard().await;
        return Err(err.into());
    }
    Ok(manifest)
}
