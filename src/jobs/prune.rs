//! Prune: applies the retention plan to storage, and removes the debris of crashed runs.
//!
//! The plan is [`crate::retention::plan`]'s; this job only reads the catalog and deletes.
//! A backup goes manifest first (the commit point: from then on it no longer exists), then
//! its artifacts; a prune that stops half-way leaves debris, which the next one removes.
//! Debris is a backup directory without a manifest whose newest object is older than
//! `retention.debris_grace`, so a backup still being written is never touched. A manifest
//! that cannot be read is never deleted, nor anything beside it. Audit records older than
//! `retention.audit_days` go too, and so do the staging files of command markers and audit
//! records that a killed process left in the local directory, past the same grace.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use super::{JobContext, JobError};
use crate::model::TargetKind;
use crate::retention::{self, Candidate, Decision, Policy};
use crate::storage::catalog;
use crate::storage::layout::{COMMANDS_DIR, MANIFEST_NAME};
use crate::storage::manifest::Scope;
use crate::storage::{ObjectInfo, Storage};

#[derive(Debug, Clone)]
pub struct PruneRequest {
    pub targets: Vec<TargetKind>,
    /// Plan and report, delete nothing.
    pub dry_run: bool,
}

/// What prune decided and did.
#[derive(Debug, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    /// Every backup with its fate and reasons, newest first per target.
    pub decisions: Vec<Decision>,
    /// Backups deleted (or, in a dry run, that would be).
    pub deleted: Vec<String>,
    /// Directories of unfinished backups removed (or that would be).
    pub debris: Vec<Debris>,
    /// Manifests that could not be read: kept, with everything beside them.
    pub unreadable: Vec<String>,
    /// Audit records deleted, past `retention.audit_days` (none in a dry run).
    pub audit_records_deleted: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Debris {
    pub dir: String,
    pub objects: usize,
    pub bytes: u64,
    pub last_written: DateTime<Utc>,
}

impl PruneReport {
    pub fn kept(&self) -> usize {
        self.decisions.iter().filter(|d| d.keep).count()
    }

    /// A short summary for events.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "dry_run": self.dry_run,
            "kept": self.kept(),
            "deleted": self.deleted,
            "debris": self.debris.iter().map(|d| &d.dir).collect::<Vec<_>>(),
            "unreadable": self.unreadable,
            "audit_records_deleted": self.audit_records_deleted,
        })
    }
}

/// The configured policy (DESIGN §4).
pub fn policy_of(ctx: &JobContext) -> Policy {
    let r = &ctx.settings.retention;
    Policy {
        daily: r.daily,
        weekly: r.weekly,
        monthly: r.monthly,
        yearly: r.yearly,
        within_days: r.days,
        partial_days: r.partial_days,
    }
}

/// Plans and (unless a dry run) applies retention for the requested targets.
pub async fn run_prune(
    ctx: &JobContext,
    request: &PruneRequest,
    now: DateTime<Utc>,
) -> Result<PruneReport, JobError> {
    let policy = policy_of(ctx);
    let grace = Duration::from_std(ctx.settings.retention.debris_grace.0)
        .map_err(|err| JobError::Invalid(format!("retention.debris_grace: {err}")))?;
    let mut report = PruneReport {
        dry_run: request.dry_run,
        ..PruneReport::default()
    };
    for &target in &request.targets {
        prune_target(
            ctx,
            target,
            &policy,
            now,
            grace,
            request.dry_run,
            &mut report,
        )
        .await?;
    }
    for dir in [COMMANDS_DIR, crate::audit::DIR] {
        remove_stale_staging(&ctx.storage, dir, now, grace, request.dry_run, &mut report).await?;
    }
    if !request.dry_run {
        report.audit_records_deleted = crate::audit::prune(
            &ctx.storage,
            ctx.settings.retention.audit_days,
            now.date_naive(),
        )
        .await?;
    }
    Ok(report)
}

/// Staging files under `dir` (outside the backup directories) older than the grace.
async fn remove_stale_staging(
    storage: &Storage,
    dir: &str,
    now: DateTime<Utc>,
    grace: Duration,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), JobError> {
    let stale: Vec<_> = storage
        .list_staging(dir)
        .await?
        .into_iter()
        .filter(|object| now - object.last_modified >= grace)
        .collect();
    let Some(last_written) = stale.iter().map(|o| o.last_modified).max() else {
        return Ok(());
    };
    clear_debris(storage, dir, &stale, last_written, dry_run, report).await
}

/// Deletes `objects` (unless a dry run) and reports them as the debris of `dir`.
async fn clear_debris(
    storage: &Storage,
    dir: &str,
    objects: &[ObjectInfo],
    last_written: DateTime<Utc>,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), JobError> {
    if !dry_run {
        for object in objects {
            storage.delete_object(object).await?;
        }
        tracing::info!(dir, objects = objects.len(), "removed debris");
    }
    report.debris.push(Debris {
        dir: dir.to_string(),
        objects: objects.len(),
        bytes: objects.iter().map(|o| o.size).sum(),
        last_written,
    });
    Ok(())
}

async fn prune_target(
    ctx: &JobContext,
    target: TargetKind,
    policy: &Policy,
    now: DateTime<Utc>,
    grace: Duration,
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<(), JobError> {
    let storage = &ctx.storage;
    let listing = catalog::list(storage, target).await?;
    let candidates: Vec<Candidate> = listing
        .manifests
        .iter()
        .map(|m| Candidate {
            id: m.id.to_string(),
            target,
            time: m.started_at,
            retain_until: m.retain_until,
            parent: m.parent.as_ref().map(|p| p.to_string()),
            partial: m.scope == Scope::Partial,
        })
        .collect();
    let decisions = retention::plan(&candidates, policy, now);

    // Every object of the target, by backup directory.
    let mut dirs: BTreeMap<String, Vec<ObjectInfo>> = BTreeMap::new();
    let prefix = format!("{target}/");
    let mut objects = storage.list(&prefix).await?;
    objects.extend(storage.list_staging(&prefix).await?);
    for object in objects {
        if let Some(dir) = backup_dir_of(&object.key) {
            dirs.entry(dir).or_default().push(object);
        }
    }
    let committed: BTreeSet<String> = listing
        .manifests
        .iter()
        .map(|m| format!("{target}/{}/", m.id))
        .collect();
    let unreadable: BTreeSet<String> = listing
        .unreadable
        .iter()
        .filter_map(|(key, _)| backup_dir_of(key))
        .collect();

    for decision in decisions.iter().filter(|d| !d.keep) {
        let dir = format!("{target}/{}/", decision.id);
        if !dry_run {
            // The manifest first: from here on the backup no longer exists.
            storage.delete(&format!("{dir}{MANIFEST_NAME}")).await?;
            for object in dirs.get(&dir).into_iter().flatten() {
                storage.delete_object(object).await?;
            }
            tracing::info!(backup_id = %decision.id, "pruned");
        }
        report.deleted.push(decision.id.clone());
    }
    for (dir, objects) in &dirs {
        if committed.contains(dir) || unreadable.contains(dir) {
            continue;
        }
        let Some(last_written) = objects.iter().map(|o| o.last_modified).max() else {
            continue;
        };
        if now - last_written < grace {
            continue; // possibly a backup still being written
        }
        clear_debris(storage, dir, objects, last_written, dry_run, report).await?;
    }
    report.unreadable.extend(
        listing
            .unreadable
            .into_iter()
            .map(|(key, reason)| format!("{key}: {reason}")),
    );
    report.decisions.extend(decisions);
    Ok(())
}

/// `<target>/<backup_id>/` of an object key inside a backup directory.
fn backup_dir_of(key: &str) -> Option<String> {
    let mut parts = key.splitn(3, '/');
    let target = parts.next()?;
    let id = parts.next()?;
    parts.next()?;
    Some(format!("{target}/{id}/"))
}

#[cfg(test)]
mod tests {
    use super::backup_dir_of;

    #[test]
    fn objects_are_grouped_by_backup_directory() {
        assert_eq!(
            backup_dir_of("postgres/20261126T023000Z-postgres-k3f9/crm.dump.zst").as_deref(),
            Some("postgres/20261126T023000Z-postgres-k3f9/")
        );
        assert_eq!(
            backup_dir_of("documents/x/nested/file").as_deref(),
            Some("documents/x/")
        );
        assert_eq!(backup_dir_of("postgres/stray-object"), None);
    }
}
