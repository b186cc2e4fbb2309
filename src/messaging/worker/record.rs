//! The audit records the worker writes: one per step that ran, one per command it refused.

use std::time::Duration;

use crate::audit::{self, AuditRecord, Origin, Outcome};
use crate::jobs::JobError;
use crate::messaging::command::Command;
use crate::messaging::dispatch::StepOutcome;
use crate::messaging::event::Event;
use crate::model::Action;

use super::StepEnv;
use super::delivery::Received;

/// The audit record of a step that ran.
pub(super) fn step_record(
    received: &Received<'_>,
    command: &Command,
    result: &Result<StepOutcome, JobError>,
    elapsed: Duration,
) -> AuditRecord {
    let mut record = command_record(received, command);
    record.duration_ms = elapsed.as_millis() as u64;
    match result {
        Ok(outcome) => {
            record.backup_id = outcome.backup_id.clone().or(record.backup_id);
            record.stored_bytes = outcome.size_bytes;
            record.raw_bytes = outcome.raw_size_bytes;
            // Where a restore went is what its record is for; reports too large are left
            // to the event.
            record.details = outcome.details.clone().filter(|details| {
                command.action == Action::Restore && details.to_string().len() <= 16 * 1024
            });
            if !outcome.warnings.is_empty() {
                record.details = Some(serde_json::json!({"warnings": outcome.warnings}));
            }
            record
        }
        Err(JobError::Cancelled) => record.failed(
            Outcome::Cancelled,
            "cancelled",
            "cancelled before it finished: it runs again",
        ),
        Err(err) => record.failed(Outcome::Failed, err.kind(), &err.to_string()),
    }
}

/// A record of `command` as received: who sent it, what it asks for.
fn command_record(received: &Received<'_>, command: &Command) -> AuditRecord {
    let mut record = AuditRecord::new(
        Origin::Worker,
        received.sender.as_deref().unwrap_or_default(),
        &command.requested_by,
        command.action.as_str(),
    )
    .with_options(&command.options);
    record.target = Some(command.target.to_string());
    record.command_id = Some(command.id.clone());
    record.backup_id = command.backup_id.clone();
    record.attempt = Some(received.attempt);
    record
}

/// The audit record of a command that was not run: not valid, not authorized, or its id
/// taken by another command.
pub(super) async fn audit_refusal(
    env: &StepEnv,
    received: &Received<'_>,
    failed: &Event,
    command: Option<&Command>,
    kind: &str,
    message: &str,
) {
    let record = match command {
        Some(command) => command_record(received, command),
        None => {
            let mut record = AuditRecord::new(
                Origin::Worker,
                received.sender.as_deref().unwrap_or_default(),
                "",
                &failed
                    .action
                    .as_deref()
                    .unwrap_or("unknown")
                    .chars()
                    .take(64)
                    .collect::<String>(),
            );
            // As the message said them: cut to a sane length.
            record.target = failed.target.as_ref().map(|t| t.chars().take(64).collect());
            record.command_id = Some(failed.command_id.clone()).filter(|id| !id.is_empty());
            record.attempt = Some(received.attempt);
            record
        }
    };
    audit::write(
        &env.ctx.storage,
        &record.failed(Outcome::Refused, kind, message),
    )
    .await;
}
