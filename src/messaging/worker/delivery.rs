//! One delivery, from its bytes to an outcome: parse, authorize, check the command's marker
//! (a command already done is re-announced, not run again), fan `all` out into steps, and
//! run a step under its target's lease with progress, metrics and its audit record.

use std::time::{Duration, Instant};

use chrono::Utc;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::authorization::Request;
use crate::jobs::JobError;
use crate::messaging::command::Command;
use crate::messaging::dispatch::{StepOutcome, prune_step, run_step};
use crate::messaging::event::{self, Event};
use crate::messaging::keyed::{self, HandOverError};
use crate::messaging::{MessagingError, headers};
use crate::metrics::BackupFacts;
use crate::model::{Action, TargetKind, TargetSelector};
use crate::progress;
use crate::storage::catalog;

use super::outcome::{
    Marker, busy, complete, dead_letter, fail, fail_as, read_marker, relayed_headers,
};
use super::record::{audit_refusal, step_record};
use super::waiting::{HeldLease, held_lease, take_lease};
use super::{Settle, StepEnv};

/// Facts about the delivery every outcome needs.
pub(super) struct Received<'a> {
    pub(super) delivery: &'a Delivery,
    pub(super) attempt: u32,
    pub(super) correlation_id: Option<String>,
    /// Who the command is checked as (see [`headers::sender`]).
    pub(super) sender: Option<String>,
}

impl Received<'_> {
    pub(super) fn event(&self, name: &str, command_id: &str, command: Option<&Command>) -> Event {
        let mut event = Event::new(name, command_id, self.attempt);
        event.correlation_id = self.correlation_id.clone();
        if let Some(command) = command {
            event.action = Some(command.action.to_string());
            event.target = Some(command.target.to_string());
            event.set_id = command.set_id.clone();
            event.requested_by = Some(command.requested_by.clone());
        }
        event
    }
}

pub(super) async fn process(
    env: &StepEnv,
    delivery: &Delivery,
    cancel: &CancellationToken,
    held: &HeldLease,
) -> Result<Settle, MessagingError> {
    let received = Received {
        delivery,
        attempt: headers::attempt(&delivery.properties),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_string()),
        sender: headers::sender(&delivery.properties, &env.relays),
    };
    let command = match Command::parse(&delivery.data) {
        Ok(command) => command,
        Err(err) => {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map_or("unknown".to_string(), |id| id.as_str().to_string());
            let mut failed = received.event(event::FAILED, &id, None);
            (failed.action, failed.target) = loose_action_target(&delivery.data);
            audit_refusal(env, &received, &failed, None, err.kind(), &err.to_string()).await;
            return dead_letter(env, &received, failed, err.kind(), &err.to_string(), false).await;
        }
    };
    if let Err((kind, message)) = authorize(env, &received, &command) {
        let failed = received.event(event::FAILED, &command.id, Some(&command));
        audit_refusal(env, &received, &failed, Some(&command), kind, &message).await;
        return dead_letter(env, &received, failed, kind, &message, false).await;
    }
    if let Some(settle) = announce_if_done(env, &received, &command).await? {
        return Ok(settle);
    }
    if let Some(message) = past_delivery_limit(
        &delivery.properties,
        env.ctx.settings.messaging.delivery_limit,
    ) {
        let failed = received.event(event::FAILED, &command.id, Some(&command));
        return dead_letter(env, &received, failed, "delivery_limit", &message, false).await;
    }
    match command.target {
        TargetSelector::All if command.action != Action::Prune => {
            fan_out(env, &received, &command).await
        }
        TargetSelector::All => step(env, &received, &command, None, cancel, held).await,
        TargetSelector::One(target) => {
            step(env, &received, &command, Some(target), cancel, held).await
        }
    }
}

/// The quorum queue dead-letters a delivery returned more than `limit` times (each worker
/// running it died or lost the broker) without a word to the requester. The last delivery it
/// allows is therefore dead-lettered here, with its `backup.failed` event: the reason, when
/// this delivery is that one.
fn past_delivery_limit(properties: &lapin::BasicProperties, limit: u32) -> Option<String> {
    let returned = headers::int(properties, headers::DELIVERY_COUNT).unwrap_or(0);
    (returned >= i64::from(limit)).then(|| {
        format!(
            "delivered {} times without finishing: each worker running it died or lost the \
             broker (messaging.delivery_limit is {limit})",
            returned + 1
        )
    })
}

/// Whether the command's sender may make it (and its options are valid where it runs):
/// `Err((kind, message))` for the dead letter.
fn authorize(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<(), (&'static str, String)> {
    let in_place = match (command.action, command.target) {
        (Action::Restore, TargetSelector::One(kind)) => env
            .ctx
            .targets
            .get(kind)
            .and_then(|target| target.check_restore(&command.options))
            .map_err(|err| (err.kind(), err.to_string()))?,
        _ => false,
    };
    let request = Request {
        action: command.action,
        target: command.target,
        in_place,
        scoped: command.action == Action::Backup && command.changes_what_a_backup_is(),
    };
    env.permissions
        .check(received.sender.as_deref(), &request)
        .map_err(|refusal| ("unauthorized", refusal.to_string()))
}

/// A command whose marker exists is done: re-announce its result instead of running it. A
/// marker of a different command under the same id (another action, target, options, backup
/// or sender) refuses this one: an id cannot be claimed in advance by a cheaper command.
async fn announce_if_done(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Option<Settle>, MessagingError> {
    match read_marker(env, &command.id).await {
        Ok(Some(marker))
            if marker
                .command_digest
                .as_deref()
                .is_some_and(|digest| digest != command.digest(received.sender.as_deref())) =>
        {
            let failed = received.event(event::FAILED, &command.id, Some(command));
            let message = format!(
                "command id `{}` was already used by a different command (another action, \
                 target, options, backup or sender)",
                command.id
            );
            audit_refusal(
                env,
                received,
                &failed,
                Some(command),
                "id_conflict",
                &message,
            )
            .await;
            dead_letter(env, received, failed, "id_conflict", &message, false)
                .await
                .map(Some)
        }
        Ok(Some(_))
            if headers::flag(&received.delivery.properties, headers::COPY)
                && !received.delivery.redelivered =>
        {
            tracing::info!(command_id = %command.id, "a copy of a command already done: acked without announcing it again");
            Ok(Some(Settle::Ack))
        }
        Ok(Some(Marker {
            event: mut done, ..
        })) => {
            tracing::info!(command_id = %command.id, "command already done: re-announcing its result");
            done.correlation_id = received.correlation_id.clone().or(done.correlation_id);
            done.at = Utc::now();
            env.publisher.event(&done).await?;
            Ok(Some(Settle::Ack))
        }
        Ok(None) => Ok(None),
        Err(err) => fail(env, received, command, &err).await.map(Some),
    }
}

/// `all`: one step command per enabled target, sharing the parent's id as `set_id`.
/// The started event, naming the steps, goes out first: whoever follows the parent
/// then knows every step before any of them can report.
async fn fan_out(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Settle, MessagingError> {
    let steps: Vec<Command> = env
        .ctx
        .targets
        .enabled()
        .into_iter()
        .map(|target| command.step_for(target))
        .collect();
    let mut started = received.event(event::STARTED, &command.id, Some(command));
    started.set_id = Some(command.id.clone());
    started.details = Some(serde_json::json!({
        "steps": steps.iter().map(|step| step.id.clone()).collect::<Vec<_>>(),
    }));
    env.publisher.event(&started).await?;
    let mut sender = FieldTable::default();
    headers::set_text(
        &mut sender,
        headers::SENDER,
        received.sender.as_deref().unwrap_or_default(),
    );
    for step in &steps {
        env.publisher
            .command(step, received.correlation_id.as_deref(), sender.clone())
            .await?;
    }
    tracing::info!(command_id = %command.id, steps = steps.len(), "fanned out");
    Ok(Settle::Ack)
}

/// Runs one step under the target's lease: the one `held` for it, or a new one. The lease
/// stays in `held` afterwards, for the waiting commands.
async fn step(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: Option<TargetKind>,
    cancel: &CancellationToken,
    held: &HeldLease,
) -> Result<Settle, MessagingError> {
    let settings = &env.ctx.settings;
    if keyed::hands_over(
        command.action,
        !settings.pipeline.age_recipients.is_empty(),
        settings.identity_file().is_some(),
    ) {
        return hand_over(env, received, command).await;
    }
    let lease = match target {
        Some(target) => match take_lease(held, Some(target)) {
            Some(lease) => Some(lease),
            None => {
                // A step of this worker on the target: wait for it here, counted as waiting
                // for a slot so that it gives way after its current command.
                match env
                    .queued_while(env.leases.try_acquire(target, true))
                    .await?
                {
                    Some(lease) => Some(lease),
                    None => return busy(env, received, command, target).await,
                }
            }
        },
        None => None,
    };
    // The step stops if the worker shuts down or the lease's connection is lost.
    let step_cancel = cancel.child_token();
    if let Some(lease) = &lease {
        let lost = lease.lost().clone();
        let step_cancel = step_cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => step_cancel.cancel(),
                _ = step_cancel.cancelled() => {}
            }
        });
    }
    let settle = run_leased(env, received, command, target, &step_cancel).await;
    step_cancel.cancel();
    if let Some(lease) = lease {
        // Released once the delivery is settled: a worker that dies before its ack leaves
        // the target to nobody else while the outcome is not yet settled.
        *held_lease(held) = Some(lease);
    }
    settle
}

async fn run_leased(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: Option<TargetKind>,
    cancel: &CancellationToken,
) -> Result<Settle, MessagingError> {
    // A duplicate may have waited for the lease while its twin ran: check again.
    if let Some(settle) = announce_if_done(env, received, command).await? {
        return Ok(settle);
    }
    // A crash between the manifest and the marker must not make a second backup.
    if let (true, Some(target), Action::Backup) =
        (received.delivery.redelivered, target, command.action)
        && let Ok(listing) = catalog::list(&env.ctx.storage, target).await
        && let Some(manifest) = listing
            .manifests
            .iter()
            .find(|m| m.command_id.as_deref() == Some(command.id.as_str()))
    {
        tracing::info!(command_id = %command.id, backup_id = %manifest.id, "redelivered command already has its backup");
        let outcome = StepOutcome::of_manifest(&env.ctx, manifest);
        return complete(env, received, command, outcome, Duration::ZERO).await;
    }
    env.publisher
        .event(&received.event(event::STARTED, &command.id, Some(command)))
        .await?;
    let started = Instant::now();
    env.metrics.step_started();
    let result = match target {
        Some(target) => {
            let tracker = progress::Tracker::start(command.action, target, None);
            let metrics = env.metrics.clone();
            let report = move |tracker: &progress::Tracker| {
                progress::log(tracker);
                metrics.set_step_bytes(
                    tracker.action.as_str(),
                    tracker.target.as_str(),
                    tracker.done(),
                );
            };
            let ticker = progress::Ticker::start(
                tracker,
                env.ctx.settings.pipeline.progress_every.0,
                report,
            );
            let result = run_step(&env.ctx, command, target, cancel).await;
            // No report may land after the gauge is back at 0.
            ticker.stop().await;
            env.metrics
                .set_step_bytes(command.action.as_str(), target.as_str(), 0);
            result
        }
        // Only prune runs `all` as one step; every other action fans out per target.
        None => prune_step(&env.ctx, command, TargetKind::ALL.to_vec()).await,
    };
    crate::buffers::trim_heap();
    audit::write(
        &env.ctx.storage,
        &step_record(received, command, &result, started.elapsed()),
    )
    .await;
    let outcome = match &result {
        Ok(_) => "completed",
        Err(JobError::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    env.metrics.step_finished(
        command.action.as_str(),
        &command.target.to_string(),
        outcome,
        started.elapsed(),
        result
            .as_ref()
            .ok()
            .and_then(|outcome| {
                Some(BackupFacts {
                    raw_bytes: outcome.raw_size_bytes?,
                    stored_bytes: outcome.size_bytes?,
                    warnings: outcome.warnings.clone(),
                })
            })
            .as_ref(),
    );
    match result {
        Ok(outcome) => complete(env, received, command, outcome, started.elapsed()).await,
        Err(JobError::Cancelled) => Ok(Settle::Requeue),
        Err(err) => fail(env, received, command, &err).await,
    }
}

/// Passes a command this worker cannot decrypt for to the key-holding workers.
async fn hand_over(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Settle, MessagingError> {
    match keyed::hand_over(
        &env.connection,
        &env.publisher,
        command.action,
        &received.delivery.data,
        &received.delivery.properties,
        relayed_headers(received),
    )
    .await
    {
        Ok(()) => {
            tracing::info!(command_id = %command.id, action = %command.action, "handed over to the key-holding workers");
            Ok(Settle::Ack)
        }
        Err(HandOverError::Broker(err)) => Err(err),
        Err(err @ HandOverError::NoKeyholder { .. }) => {
            fail_as(
                env,
                received,
                command,
                "no_keyholder",
                &err.to_string(),
                true,
            )
            .await
        }
    }
}

/// `action` and `target` of a message that is not a valid command, when they can be read.
fn loose_action_target(body: &[u8]) -> (Option<String>, Option<String>) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(String::from);
    (field("action"), field("target"))
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    fn returned(times: Option<i64>) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(times) = times {
            headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(times));
        }
        lapin::BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_last_delivery_the_broker_allows_is_dead_lettered_by_the_worker() {
        assert_eq!(past_delivery_limit(&returned(None), 5), None);
        assert_eq!(past_delivery_limit(&returned(Some(4)), 5), None);
        let reason = past_delivery_limit(&returned(Some(5)), 5).unwrap();
        assert!(reason.contains("delivered 6 times"), "{reason}");
        assert!(past_delivery_limit(&returned(Some(9)), 5).is_some());
    }
}
