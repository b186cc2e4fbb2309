//! What storage says the metrics are, so that they do not live in one process's memory: the
//! last backup of each target from the catalog (when, how long, how large), the bytes stored
//! under each target, and the last success of every other action (verify, drill, prune,
//! restore, and backups by the CLI) from the audit records. The worker reads it at start and
//! then every `http.metrics_refresh`.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::{BackupFacts, Metrics};
use crate::audit::{self, Outcome};
use crate::model::{Action, TargetKind};
use crate::storage::Storage;
use crate::storage::catalog;

/// How far back the first read of the audit records goes: past the weekly drill.
pub const FIRST_LOOKBACK: chrono::Duration = chrono::Duration::days(35);

/// Reads what storage says into `metrics`: audit records that ended at or after `since`;
/// returns the time to read from next time. Failures are logged; the metrics keep what they
/// had.
pub async fn refresh(storage: &Storage, metrics: &Metrics, since: DateTime<Utc>) -> DateTime<Utc> {
    let started = Utc::now();
    let mut used = 0;
    for target in TargetKind::ALL {
        match catalog::latest(storage, target).await {
            Ok(Some(manifest)) => {
                metrics.seed_success(
                    "backup",
                    target.as_str(),
                    manifest.finished_at,
                    Some(manifest.duration()),
                );
                let facts = BackupFacts {
                    raw_bytes: manifest.raw_size(),
                    stored_bytes: manifest.stored_size(),
                    warnings: manifest.warnings.clone(),
                };
                metrics.seed_backup(target.as_str(), manifest.finished_at, &facts);
            }
            Ok(None) => {}
            Err(err) => tracing::warn!(%target, error = %err, "metrics: cannot read the catalog"),
        }
        match storage.list(&format!("{target}/")).await {
            Ok(objects) => {
                let bytes = objects.iter().map(|o| o.size).sum();
                used += bytes;
                metrics.set_storage_bytes(target.as_str(), bytes);
            }
            Err(err) => tracing::warn!(%target, error = %err, "metrics: cannot list storage"),
        }
    }
    if let Some(space) = storage.space(used) {
        metrics.set_storage_space(space.capacity, space.free);
    }
    match audit::read(storage, since, None, usize::MAX).await {
        Ok(history) => {
            // Oldest first: each seed only moves a gauge forward.
            for record in history.records.iter().rev() {
                if record.outcome != Outcome::Completed {
                    continue;
                }
                let (Some(target), Ok(_)) = (&record.target, record.action.parse::<Action>())
                else {
                    continue;
                };
                let took = Duration::from_millis(record.duration_ms);
                metrics.seed_success(&record.action, target, record.at, Some(took));
            }
        }
        Err(err) => tracing::warn!(error = %err, "metrics: cannot read the audit records"),
    }
    // Records are written when an operation ends, a moment after their `at`: read the last
    // minute again next time.
    started - chrono::Duration::minutes(1)
}
