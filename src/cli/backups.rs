//! The commands that work on storage: run, list, show, restore, verify, drill, prune,
//! history.

use std::process::ExitCode;
use std::time::Instant;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::progress;
use super::trail::{self, Trail};
use super::{Failure, output, requester};
use crm_backup::audit::Outcome;
use crm_backup::jobs::JobContext;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::drill::{DrillRequest, run_drill};
use crm_backup::jobs::prune::{PruneRequest, run_prune};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::messaging::dispatch::StepOutcome;
use crm_backup::model::{Action, TargetKind, TargetSelector};
use crm_backup::storage::catalog::{self, BackupRef};
use crm_backup::storage::layout::manifest_key;
use crm_backup::storage::manifest::Manifest;

type Options = serde_json::Map<String, serde_json::Value>;

/// Backs up one target or every enabled one; a target that fails does not stop the others.
pub async fn run(
    ctx: &JobContext,
    trail: &Trail,
    target: TargetSelector,
    options: Options,
    reason: Option<String>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let (kinds, set_id) = match target {
        TargetSelector::All => (
            ctx.targets.enabled(),
            Some(uuid::Uuid::new_v4().to_string()),
        ),
        TargetSelector::One(kind) => (vec![kind], None),
    };
    let cancel = CancellationToken::new();
    let mut failed = Vec::new();
    for kind in kinds {
        let mut request = BackupRequest::new(kind, &requester());
        request.reason = reason.clone();
        request.set_id = set_id.clone();
        request.options = options_for(kind, &options, target == TargetSelector::All);
        let started = Instant::now();
        let record = trail
            .start(Action::Backup, kind.as_str())
            .await
            .with_options(&request.options);
        let expected = catalog::latest(&ctx.storage, kind)
            .await
            .ok()
            .flatten()
            .map(|previous| previous.raw_size());
        let backed_up = run_backup(ctx, &request, &cancel);
        match progress::watched(ctx, Action::Backup, kind, expected, backed_up).await {
            Ok(manifest) => {
                let mut record = record.with_backup(&manifest);
                if !manifest.warnings.is_empty() {
                    record.details = Some(json!({"warnings": manifest.warnings}));
                }
                let outcome = StepOutcome::of_manifest(ctx, &manifest);
                trail.write_backup(record, started, outcome).await;
                output::backup(&ctx.storage, &manifest, json);
            }
            Err(err) => {
                trail.write(trail::failed(record, &err), started).await;
                output::failure(kind, &err, json);
                failed.push(format!("{kind}: {err}"));
            }
        }
    }
    all_succeeded(failed, "targets failed")
}

/// The options of one target: all of them for a single target; with `all`, those prefixed
/// `<target>.`, without the prefix.
fn options_for(kind: TargetKind, options: &Options, all: bool) -> serde_json::Value {
    if !all {
        return serde_json::Value::Object(options.clone());
    }
    let prefix = format!("{kind}.");
    let own: Options = options
        .iter()
        .filter_map(|(key, value)| Some((key.strip_prefix(&prefix)?.to_string(), value.clone())))
        .collect();
    serde_json::Value::Object(own)
}

pub async fn list(
    ctx: &JobContext,
    target: Option<TargetSelector>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let listing = match target {
        Some(TargetSelector::One(kind)) => catalog::list(&ctx.storage, kind).await?,
        None | Some(TargetSelector::All) => catalog::list_all(&ctx.storage).await?,
    };
    for (key, reason) in &listing.unreadable {
        tracing::warn!(%key, %reason, "skipping an unreadable manifest");
    }
    if json {
        let rows: Vec<_> = listing
            .manifests
            .iter()
            .map(|m| {
                json!({
                    "backup_id": m.id, "target": m.target, "set_id": m.set_id,
                    "started_at": m.started_at, "finished_at": m.finished_at,
                    "size_bytes": m.stored_size(), "raw_size_bytes": m.raw_size(),
                    "requested_by": m.requested_by, "reason": m.reason,
                    "retain_until": m.retain_until,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else if listing.manifests.is_empty() {
        println!("no backups in {}", ctx.storage.location_of(""));
    } else {
        for manifest in &listing.manifests {
            println!("{}", output::listed(manifest));
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn show(
    ctx: &JobContext,
    target: Option<TargetSelector>,
    backup: &str,
    json: bool,
) -> Result<ExitCode, Failure> {
    let (kind, backup) = one_backup(target, backup)?;
    let manifest = catalog::resolve(&ctx.storage, kind, &backup).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else {
        println!("{}", output::manifest(&manifest));
        match catalog::get_trusted(&ctx.storage, &manifest.id, &ctx.verifier).await {
            Ok((_, trust)) => println!("manifest   {trust}"),
            Err(err) => println!("manifest   NOT TRUSTED: {err}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A restore; one that changes the live source (by `--in-place` or by options that reach it)
/// needs `yes`.
pub async fn restore(
    ctx: &JobContext,
    trail: &Trail,
    target: Option<TargetSelector>,
    backup: &str,
    options: Options,
    yes: bool,
    json: bool,
) -> Result<ExitCode, Failure> {
    let started = Instant::now();
    let (target, backup_ref) = one_backup(target, backup)?;
    let options = serde_json::Value::Object(options);
    let mut record = trail
        .start(Action::Restore, target.as_str())
        .await
        .with_options(&options);
    record.backup_id = Some(backup.to_string());
    if ctx.targets.get(target)?.check_restore(&options)? && !yes {
        let message = "this restore changes the live source (in place); add --yes to confirm";
        trail
            .write(
                record.failed(Outcome::Refused, "unconfirmed", message),
                started,
            )
            .await;
        return Err(Failure(message.into()));
    }
    let request = RestoreRequest {
        target,
        backup: backup_ref,
        options,
        command_id: record.command_id.clone(),
    };
    let restored = progress::watched(
        ctx,
        Action::Restore,
        target,
        None,
        run_restore(ctx, &request),
    )
    .await;
    let (manifest, trust, report) = match restored {
        Ok(restored) => restored,
        Err(err) => {
            trail.write(trail::failed(record, &err), started).await;
            return Err(err.into());
        }
    };
    let mut record = record.with_backup(&manifest);
    record.details =
        Some(json!({"destination": report.destination, "manifest": trust.to_string()}));
    trail.write(record, started).await;
    if json {
        println!(
            "{}",
            json!({"backup_id": manifest.id, "target": manifest.target, "manifest": trust.to_string(),
                   "destination": report.destination, "details": report.details})
        );
    } else {
        println!("manifest: {trust}");
        println!("restored {} into {}", manifest.id, report.destination);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(
    ctx: &JobContext,
    trail: &Trail,
    target: Option<TargetSelector>,
    backup: &str,
    json: bool,
) -> Result<ExitCode, Failure> {
    let manifests = chosen_backups(ctx, target, backup).await?;
    let mut failures = Vec::new();
    for manifest in &manifests {
        let started = Instant::now();
        let record = trail
            .start(Action::Verify, manifest.target.as_str())
            .await
            .with_backup(manifest);
        let expected = Some(manifest.stored_size());
        let checked = verify_backup(ctx, manifest);
        let verified =
            progress::watched(ctx, Action::Verify, manifest.target, expected, checked).await;
        let report = match verified {
            Ok(report) => report,
            Err(err) => {
                trail.write(trail::failed(record, &err), started).await;
                return Err(err.into());
            }
        };
        let record = match report.failure() {
            Some(failure) => record.failed(Outcome::Failed, "verify_failed", &failure),
            None => record,
        };
        trail.write(record, started).await;
        if json {
            println!(
                "{}",
                json!({"backup_id": report.backup_id, "ok": report.ok(), "manifest": report.manifest, "artifacts": report.artifacts})
            );
        } else {
            if let Some(trust) = &report.manifest {
                println!("ok   {}: {trust}", manifest_key(&report.backup_id));
            }
            for check in &report.artifacts {
                println!(
                    "{} {}: {}",
                    if check.ok { "ok  " } else { "FAIL" },
                    check.key,
                    check.detail
                );
            }
        }
        if let Some(failure) = report.failure() {
            failures.push(failure);
        }
    }
    match failures.as_slice() {
        [] => Ok(ExitCode::SUCCESS),
        [one] => Err(Failure(format!("verify failed: {one}"))),
        [first, ..] => Err(Failure(format!(
            "verify failed for {} artifacts; first: {first}",
            failures.len()
        ))),
    }
}

pub async fn drill(
    ctx: &JobContext,
    trail: &Trail,
    target: Option<TargetSelector>,
    backup: &str,
    json: bool,
) -> Result<ExitCode, Failure> {
    let targets = match (target, backup) {
        (None | Some(TargetSelector::All), "latest") => ctx.targets.enabled(),
        _ => vec![one_backup(target, backup)?.0],
    };
    let mut failed = Vec::new();
    for kind in targets {
        let request = DrillRequest {
            target: kind,
            backup: backup.parse()?,
        };
        let started = Instant::now();
        let mut record = trail.start(Action::Drill, kind.as_str()).await;
        record.backup_id = Some(backup.to_string());
        let drilled = run_drill(ctx, &request);
        match progress::watched(ctx, Action::Drill, kind, None, drilled).await {
            Ok((manifest, report)) => {
                trail.write(record.with_backup(&manifest), started).await;
                if json {
                    println!("{}", serde_json::to_string(&report)?);
                } else {
                    println!(
                        "drill passed: {} verified ({} artifacts) and restored into {}",
                        report.backup_id,
                        report.verify.artifacts.len(),
                        report.scratch
                    );
                }
            }
            Err(err) => {
                trail.write(trail::failed(record, &err), started).await;
                output::failure(kind, &err, json);
                failed.push(format!("{kind}: {err}"));
            }
        }
    }
    all_succeeded(failed, "drills failed")
}

pub async fn prune(
    ctx: &JobContext,
    trail: &Trail,
    target: Option<TargetSelector>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode, Failure> {
    let started = Instant::now();
    let targets = match target {
        Some(TargetSelector::One(kind)) => vec![kind],
        None | Some(TargetSelector::All) => TargetKind::ALL.to_vec(),
    };
    let selector = target.unwrap_or(TargetSelector::All).to_string();
    let mut record = trail
        .start(Action::Prune, &selector)
        .await
        .with_options(&json!({"dry_run": dry_run}));
    let request = PruneRequest { targets, dry_run };
    let report = match run_prune(ctx, &request, chrono::Utc::now()).await {
        Ok(report) => report,
        Err(err) => {
            trail.write(trail::failed(record, &err), started).await;
            return Err(err.into());
        }
    };
    record.details = Some(report.summary());
    trail.write(record, started).await;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let deleted = if dry_run { "would delete" } else { "deleted" };
    for decision in &report.decisions {
        let why = if decision.keep {
            decision
                .reasons
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            "no rule keeps it".to_string()
        };
        println!(
            "{:<12} {:<9} {}  {}",
            if decision.keep { "keep" } else { deleted },
            decision.target,
            decision.id,
            why
        );
    }
    for debris in &report.debris {
        println!(
            "{:<12} {:<9} {}  unfinished backup: {} objects, {}, last written {}",
            deleted,
            "debris",
            debris.dir,
            debris.objects,
            output::human_bytes(debris.bytes),
            debris.last_written.format("%Y-%m-%d %H:%M:%SZ")
        );
    }
    for unreadable in &report.unreadable {
        println!("{:<12} {:<9} {}", "keep", "unreadable", unreadable);
    }
    println!(
        "{} kept, {} {}, {} debris director{} {}",
        report.kept(),
        report.deleted.len(),
        deleted,
        report.debris.len(),
        if report.debris.len() == 1 { "y" } else { "ies" },
        if dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// One backup: an id (its target from the id, which `target` must not contradict) or
/// `latest` of one target.
fn one_backup(
    target: Option<TargetSelector>,
    backup: &str,
) -> Result<(TargetKind, BackupRef), Failure> {
    let backup: BackupRef = backup
        .parse()
        .map_err(|err| Failure(format!("{err}, `latest` or (for verify) `all`")))?;
    match (&backup, target) {
        (BackupRef::Id(id), Some(TargetSelector::One(kind))) if id.target() != kind => {
            Err(Failure(format!(
                "backup {id} is a {} backup, not {kind}",
                id.target()
            )))
        }
        (BackupRef::Id(id), _) => Ok((id.target(), backup)),
        (BackupRef::Latest, Some(TargetSelector::One(kind))) => Ok((kind, backup)),
        (BackupRef::Latest, _) => Err(Failure("`latest` of which target? name one".into())),
    }
}

/// The backups `verify` checks: every backup (`--backup all`) or the latest of each target
/// with `all`, or one.
async fn chosen_backups(
    ctx: &JobContext,
    target: Option<TargetSelector>,
    backup: &str,
) -> Result<Vec<Manifest>, Failure> {
    Ok(match (target, backup) {
        (Some(TargetSelector::One(kind)), "all") => {
            catalog::list(&ctx.storage, kind).await?.manifests
        }
        (None | Some(TargetSelector::All), "all") => {
            catalog::list_all(&ctx.storage).await?.manifests
        }
        (Some(TargetSelector::All), "latest") => {
            let mut latest = Vec::new();
            for kind in ctx.targets.enabled() {
                latest.extend(catalog::latest(&ctx.storage, kind).await?);
            }
            latest
        }
        _ => {
            let (kind, backup) = one_backup(target, backup)?;
            vec![catalog::resolve(&ctx.storage, kind, &backup).await?]
        }
    })
}

/// Exit 0 when nothing failed; else one line naming the first failure.
fn all_succeeded(mut failures: Vec<String>, what: &str) -> Result<ExitCode, Failure> {
    match failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 => Err(Failure(failures.remove(0))),
        n => Err(Failure(format!("{n} {what}: {}", failures.join("; ")))),
    }
}

/// The audit records since `since`, newest first.
pub async fn history(
    storage: &crm_backup::storage::Storage,
    target: Option<TargetSelector>,
    since: std::time::Duration,
    limit: usize,
    json: bool,
) -> Result<ExitCode, Failure> {
    let since = chrono::Utc::now()
        - chrono::Duration::from_std(since).map_err(|_| Failure("--since is too long".into()))?;
    let target = target.map(|t| t.to_string());
    let history = crm_backup::audit::read(storage, since, target.as_deref(), limit).await?;
    for (key, reason) in &history.unreadable {
        tracing::warn!(%key, %reason, "skipping an unreadable audit record");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&history.records)?);
    } else if history.records.is_empty() {
        println!(
            "nothing recorded since {} in {}",
            since.format("%Y-%m-%d %H:%M:%SZ"),
            storage.location_of(crm_backup::audit::DIR)
        );
    } else {
        println!("{}", output::HISTORY_HEADER);
        for record in &history.records {
            println!("{}", output::history(record));
        }
    }
    Ok(ExitCode::SUCCESS)
}
