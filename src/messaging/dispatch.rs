//! Turns one command (for one target) into the job it asks for, and the job's result into
//! what the completed event reports. The jobs themselves know nothing about messages.

use tokio_util::sync::CancellationToken;

use super::command::Command;
use crate::jobs::backup::{BackupRequest, run_backup};
use crate::jobs::drill::{DrillRequest, run_drill};
use crate::jobs::prune::{PruneRequest, run_prune};
use crate::jobs::restore::{RestoreRequest, run_restore};
use crate::jobs::verify::verify_backup;
use crate::jobs::{JobContext, JobError};
use crate::model::TargetKind;
use crate::model::{Action, TargetSelector};
use crate::storage::catalog::{self, BackupRef};
use crate::storage::manifest::Manifest;

/// What a finished step reports in its `backup.completed` event.
#[derive(Debug, Clone, Default)]
pub struct StepOutcome {
    pub backup_id: Option<String>,
    pub set_id: Option<String>,
    pub size_bytes: Option<u64>,
    pub raw_size_bytes: Option<u64>,
    pub sha256: Option<String>,
    pub location: Option<String>,
    pub details: Option<serde_json::Value>,
    /// A backup's size-check warnings.
    pub warnings: Vec<String>,
}

impl StepOutcome {
    pub fn of_manifest(ctx: &JobContext, manifest: &Manifest) -> Self {
        StepOutcome {
            backup_id: Some(manifest.id.to_string()),
            set_id: manifest.set_id.clone(),
            size_bytes: Some(manifest.stored_size()),
            raw_size_bytes: Some(manifest.raw_size()),
            sha256: manifest.artifacts.first().map(|a| a.stored_sha256.clone()),
            location: Some(
                ctx.storage
                    .location_of(&format!("{}/{}/", manifest.target, manifest.id)),
            ),
            details: None,
            warnings: manifest.warnings.clone(),
        }
    }
}

/// Runs the step of `command` for `target`. Only backups stop on `cancel` (their uploads
/// are aborted); restores and verifies run to their end so nothing is left half-done.
pub async fn run_step(
    ctx: &JobContext,
    command: &Command,
    target: TargetKind,
    cancel: &CancellationToken,
) -> Result<StepOutcome, JobError> {
    debug_assert_eq!(command.target, TargetSelector::One(target));
    match command.action {
        Action::Backup => {
            let request = BackupRequest {
                target,
                options: command.options.clone(),
                command_id: Some(command.id.clone()),
                requested_by: command.requested_by.clone(),
                reason: command.reason.clone(),
                set_id: command.set_id.clone(),
                retain_until: command.retain_until,
            };
            let manifest = run_backup(ctx, &request, cancel).await?;
            Ok(StepOutcome::of_manifest(ctx, &manifest))
        }
        Action::Restore => {
            let request = RestoreRequest {
                target,
                backup: backup_ref(command)?,
                options: command.options.clone(),
                command_id: Some(command.id.clone()),
            };
            let (manifest, trust, report) = run_restore(ctx, &request).await?;
            Ok(StepOutcome {
                details: Some(serde_json::json!({
                    "destination": report.destination,
                    "manifest": trust.to_string(),
                    "restore": report.details,
                })),
                ..StepOutcome::of_manifest(ctx, &manifest)
            })
        }
        Action::Verify => {
            let manifest = catalog::resolve(&ctx.storage, target, &backup_ref(command)?).await?;
            let report = verify_backup(ctx, &manifest).await?;
            if let Some(failure) = report.failure() {
                return Err(JobError::VerifyFailed(failure));
            }
            Ok(StepOutcome {
                details: Some(serde_json::to_value(&report.artifacts).unwrap_or_default()),
                ..StepOutcome::of_manifest(ctx, &manifest)
            })
        }
        Action::Prune => prune_step(ctx, command, vec![target]).await,
        Action::Drill => {
            let request = DrillRequest {
                target,
                backup: backup_ref(command)?,
            };
            let (manifest, report) = run_drill(ctx, &request).await?;
            Ok(StepOutcome {
                details: Some(serde_json::json!({
                    "scratch": report.scratch,
                    "drill": report.details,
                    "verify": report.verify.artifacts,
                })),
                ..StepOutcome::of_manifest(ctx, &manifest)
            })
        }
    }
}

/// Prune options in a command.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneOptions {
    #[serde(default)]
    dry_run: bool,
}

/// Applies retention to `targets` (one target, or every kind for `target: all`).
pub async fn prune_step(
    ctx: &JobContext,
    command: &Command,
    targets: Vec<TargetKind>,
) -> Result<StepOutcome, JobError> {
    let options: PruneOptions = if command.options.is_null() {
        PruneOptions::default()
    } else {
        serde_json::from_value(command.options.clone())
            .map_err(|err| JobError::Invalid(format!("prune options: {err}")))?
    };
    let request = PruneRequest {
        targets,
        dry_run: options.dry_run,
    };
    let report = run_prune(ctx, &request, chrono::Utc::now()).await?;
    Ok(StepOutcome {
        details: Some(report.summary()),
        ..StepOutcome::default()
    })
}

fn backup_ref(command: &Command) -> Result<BackupRef, JobError> {
    command
        .backup_id
        .as_deref()
        .unwrap_or("latest")
        .parse()
        .map_err(|err| JobError::Invalid(format!("{err}")))
}
