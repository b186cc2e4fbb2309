//! Making a step's outcome durable before its delivery is acked: the marker
//! `commands/<id>.json` and then the confirmed `backup.completed`; a copy in the next retry
//! tier, the target's waiting queue or the dead letters, and then `backup.failed`.

use std::time::Duration;

use chrono::Utc;
use lapin::types::FieldTable;

use crate::jobs::JobError;
use crate::messaging::command::Command;
use crate::messaging::dispatch::StepOutcome;
use crate::messaging::event::{self, Event, EventError};
use crate::messaging::keyed;
use crate::messaging::retry::Decision;
use crate::messaging::{MessagingError, headers, topology};
use crate::model::{Action, TargetKind};
use crate::storage::layout::command_marker_key;

use super::delivery::Received;
use super::{Settle, StepEnv};

/// `x-last-error` is cut to this many characters.
const MAX_ERROR_HEADER: usize = 1000;

/// Marker first, then the confirmed event: a redelivery then finds the marker.
pub(super) async fn complete(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    outcome: StepOutcome,
    elapsed: Duration,
) -> Result<Settle, MessagingError> {
    let mut done = received.event(event::COMPLETED, &command.id, Some(command));
    done.backup_id = outcome.backup_id;
    done.set_id = outcome.set_id.or(done.set_id);
    done.size_bytes = outcome.size_bytes;
    done.raw_size_bytes = outcome.raw_size_bytes;
    done.sha256 = outcome.sha256;
    done.location = outcome.location;
    done.details = outcome.details;
    done.warnings = (command.action == Action::Backup && !outcome.warnings.is_empty())
        .then_some(outcome.warnings);
    done.duration_ms = Some(elapsed.as_millis() as u64);
    let marker = command_marker_key(&command.id);
    let body = Marker {
        event: done.clone(),
        command_digest: Some(command.digest(received.sender.as_deref())),
    };
    if let Err(err) = env
        .ctx
        .storage
        .put_bytes(
            &marker,
            bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        )
        .await
    {
        return Err(MessagingError::Broker(format!(
            "writing the command marker {marker} failed: {err}"
        )));
    }
    env.publisher.event(&done).await?;
    Ok(Settle::Ack)
}

/// A failed step: retry tier or dead letter, by the error's class and the attempt count.
pub(super) async fn fail(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    err: &JobError,
) -> Result<Settle, MessagingError> {
    fail_as(
        env,
        received,
        command,
        err.kind(),
        &err.to_string(),
        err.retryable(),
    )
    .await
}

pub(super) async fn fail_as(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    kind: &str,
    message: &str,
    retryable: bool,
) -> Result<Settle, MessagingError> {
    let failed = received.event(event::FAILED, &command.id, Some(command));
    match env
        .policy
        .after_failure(received.attempt, retryable, rand::random::<f64>())
    {
        Decision::DeadLetter => dead_letter(env, received, failed, kind, message, retryable).await,
        Decision::Retry {
            tier,
            next_attempt,
            expiration,
        } => {
            let headers = failure_headers(received, next_attempt, kind, message);
            let queue = to_tier(env, received, tier, expiration, headers).await?;
            announce_failure(env, failed, kind, message, true, true).await;
            tracing::info!(command_id = %command.id, attempt = received.attempt, %queue, "will retry");
            Ok(Settle::Ack)
        }
    }
}

/// Copies the delivery into retry tier `tier`; returns the queue's name.
async fn to_tier(
    env: &StepEnv,
    received: &Received<'_>,
    tier: usize,
    expiration: Duration,
    headers: FieldTable,
) -> Result<String, MessagingError> {
    let queue = env
        .policy
        .queue_name(&env.publisher.names().retry_queue_prefix, tier);
    env.publisher
        .to_retry_queue(
            &queue,
            &received.delivery.data,
            &received.delivery.properties,
            headers,
            expiration.as_millis(),
        )
        .await?;
    Ok(queue)
}

/// The target is busy with another step: wait for it in its waiting queue, attempt
/// unchanged. A command that needs the age identity, where backups are encrypted, waits in
/// the first retry tier instead: a worker without the identity may be the one holding the
/// target, and could only hand it back.
pub(super) async fn busy(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: TargetKind,
) -> Result<Settle, MessagingError> {
    let encrypts = !env.ctx.settings.pipeline.age_recipients.is_empty();
    if !keyed::hands_over(command.action, encrypts, false) {
        let queue = topology::waiting_queue(&env.ctx.settings.messaging, target);
        env.publisher
            .to_queue(
                &queue,
                &received.delivery.data,
                &received.delivery.properties,
                relayed_headers(received),
            )
            .await?;
        tracing::info!(command_id = %command.id, %queue, "target busy: waiting");
        return Ok(Settle::Ack);
    }
    let Decision::Retry {
        tier,
        next_attempt,
        expiration,
    } = env
        .policy
        .when_busy(received.attempt, rand::random::<f64>())
    else {
        unreachable!("when_busy always retries");
    };
    let mut headers = relayed_headers(received);
    headers::set_int(&mut headers, headers::ATTEMPT, i64::from(next_attempt));
    let queue = to_tier(env, received, tier, expiration, headers).await?;
    tracing::info!(command_id = %command.id, %queue, "target busy: delayed");
    Ok(Settle::Ack)
}

pub(super) async fn dead_letter(
    env: &StepEnv,
    received: &Received<'_>,
    failed: Event,
    kind: &str,
    message: &str,
    retryable: bool,
) -> Result<Settle, MessagingError> {
    let headers = failure_headers(received, received.attempt, kind, message);
    env.publisher
        .to_dead_letters(
            &received.delivery.data,
            &received.delivery.properties,
            headers,
        )
        .await?;
    announce_failure(env, failed, kind, message, retryable, false).await;
    env.metrics.dead_lettered(kind);
    tracing::warn!(command_id = %failed_id(received), kind, message, "dead-lettered");
    Ok(Settle::Ack)
}

fn failed_id(received: &Received<'_>) -> String {
    received
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(String::new, |id| id.as_str().to_string())
}

/// The failed event is published after the copy is safe; losing it loses no command.
async fn announce_failure(
    env: &StepEnv,
    mut failed: Event,
    kind: &str,
    message: &str,
    retryable: bool,
    will_retry: bool,
) {
    failed.error = Some(EventError {
        kind: kind.to_string(),
        message: message.to_string(),
        retryable,
    });
    failed.will_retry = Some(will_retry);
    if let Err(err) = env.publisher.event(&failed).await {
        tracing::warn!(error = %err, command_id = %failed.command_id, "could not publish backup.failed");
    }
}

/// The headers of a copy the worker publishes: the delivery's, with the sender it was
/// checked as (whatever a sender header from outside said).
pub(super) fn relayed_headers(received: &Received<'_>) -> FieldTable {
    // The count is of the queue the delivery came from; the copy starts its own.
    let mut table = headers::without(
        &headers::copy(&received.delivery.properties),
        headers::DELIVERY_COUNT,
    );
    headers::set_text(
        &mut table,
        headers::SENDER,
        received.sender.as_deref().unwrap_or_default(),
    );
    headers::set_bool(&mut table, headers::COPY, true);
    table
}

fn failure_headers(received: &Received<'_>, attempt: u32, kind: &str, message: &str) -> FieldTable {
    let mut table = relayed_headers(received);
    let message: String = message.chars().take(MAX_ERROR_HEADER).collect();
    headers::set_int(&mut table, headers::ATTEMPT, i64::from(attempt));
    headers::set_text(&mut table, headers::LAST_ERROR, &message);
    headers::set_text(&mut table, headers::ERROR_KIND, kind);
    headers::set_text(&mut table, headers::FAILED_AT, &Utc::now().to_rfc3339());
    headers::set_text(
        &mut table,
        headers::ORIGINAL_ROUTING_KEY,
        received.delivery.routing_key.as_str(),
    );
    table
}

/// What `commands/<id>.json` holds: the completed event, and the digest of the command that
/// completed (absent in markers written before digests were).
#[derive(serde::Serialize, serde::Deserialize)]
pub(super) struct Marker {
    pub(super) event: Event,
    pub(super) command_digest: Option<String>,
}

pub(super) async fn read_marker(
    env: &StepEnv,
    command_id: &str,
) -> Result<Option<Marker>, JobError> {
    match env
        .ctx
        .storage
        .get_bytes(
            &command_marker_key(command_id),
            crate::storage::layout::MAX_SMALL_OBJECT_BYTES,
        )
        .await
    {
        Ok(bytes) => Ok(serde_json::from_slice::<Marker>(&bytes).ok().or_else(|| {
            let event = serde_json::from_slice::<Event>(&bytes).ok()?;
            Some(Marker {
                event,
                command_digest: None,
            })
        })),
        Err(crate::storage::StorageError::NotFound { .. }) => Ok(None),
        Err(err) => Err(err.into()),
    }
}
