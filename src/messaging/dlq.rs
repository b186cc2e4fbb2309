//! Dead letters: listing them, and replaying them into `backup.commands`.
//!
//! Both read with `basic.get` without acking; what is not replayed goes back to the queue
//! when the channel closes. A replayed dead letter is acked only after its republish is
//! confirmed, so a crash in between duplicates it rather than losing it.
//!
//! A replay keeps the letter's original sender (the worker recorded it in `x-crm-sender`)
//! and is checked against it before it is republished: letters refused as `unauthorized`
//! are never replayed, a letter its sender may not send is skipped, and a restore is
//! replayed only when asked for explicitly. The worker trusts `x-crm-sender` only on
//! messages published with its own broker user: run `dlq replay` with the worker's
//! credentials, or the replayed commands are checked as whoever replays them.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde::Serialize;

use super::MessagingError;
use super::command::Command;
use super::headers;
use super::publisher::{Outgoing, Publisher};
use crate::authorization::{Policy, Request};
use crate::config::MessagingSettings;
use crate::model::Action;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    /// The AMQP user the command came from (`None`: it had no `user_id`).
    pub sender: Option<String>,
    pub action: Option<String>,
    pub target: Option<String>,
    pub attempts: i64,
    pub error_kind: Option<String>,
    pub last_error: Option<String>,
    pub failed_at: Option<String>,
}

impl DeadLetter {
    /// `relays`: the broker users whose copies carry the original sender (see
    /// [`headers::sender`]).
    fn read(body: &[u8], properties: &BasicProperties, relays: &[String]) -> Self {
        let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
        let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(String::from);
        let id = field("id")
            .or_else(|| {
                properties
                    .message_id()
                    .as_ref()
                    .map(|id| id.as_str().to_string())
            })
            .unwrap_or_else(|| "-".to_string());
        let delivery_count = headers::int(properties, headers::DELIVERY_COUNT).map(|n| n + 1);
        let attempts = headers::int(properties, headers::ATTEMPT)
            .or(delivery_count)
            .unwrap_or(1);
        let broker_reason = (headers::death_count(properties) > 0
            && headers::text(properties, headers::LAST_ERROR).is_none())
        .then(|| "dead-lettered by the broker: delivery limit reached (the worker failed on it repeatedly)".to_string());
        DeadLetter {
            id,
            sender: headers::sender(properties, relays),
            action: field("action"),
            target: field("target"),
            attempts,
            error_kind: headers::text(properties, headers::ERROR_KIND)
                .or_else(|| broker_reason.as_ref().map(|_| "delivery_limit".to_string())),
            last_error: headers::text(properties, headers::LAST_ERROR).or(broker_reason),
            failed_at: headers::text(properties, headers::FAILED_AT),
        }
    }
}

/// Every dead letter, oldest first; none is removed. `relays`: the broker users whose copies
/// carry the original sender (see [`headers::sender`]).
pub async fn list(
    connection: &Connection,
    names: &MessagingSettings,
    relays: &[String],
) -> Result<Vec<DeadLetter>, MessagingError> {
    let channel = connection.create_channel().await?;
    let mut letters = Vec::new();
    while let Some(message) = channel
        .basic_get(names.dead_queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        letters.push(DeadLetter::read(
            &message.delivery.data,
            &message.delivery.properties,
            relays,
        ));
    }
    let _ = channel.close(200, "listed".into()).await;
    Ok(letters)
}

/// Which dead letters to replay.
#[derive(Debug, Clone)]
pub enum Selection {
    All,
    Ids(Vec<String>),
}

/// What a replay may republish, and who replays.
pub struct ReplayRules<'a> {
    pub permissions: &'a Policy,
    /// Restores are replayed only when asked for.
    pub include_restores: bool,
    /// Recorded in the letter (`x-replayed-by`): `cli:<user>`.
    pub replayed_by: &'a str,
}

/// What happened to one selected dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Replay {
    #[serde(flatten)]
    pub letter: DeadLetter,
    /// Why it was not replayed (it stays in the dead letters).
    pub skipped: Option<String>,
}

/// Republishes the selected dead letters with attempts reset, `x-replayed: true` and the
/// original sender, each checked by `rules` first. With `dry_run`, only reports.
pub async fn replay(
    connection: &Connection,
    publisher: &Publisher,
    selection: &Selection,
    rules: &ReplayRules<'_>,
    dry_run: bool,
) -> Result<Vec<Replay>, MessagingError> {
    let names = publisher.names();
    let relays = super::relays(publisher.user(), names);
    let channel = connection.create_channel().await?;
    let mut replayed = Vec::new();
    while let Some(message) = channel
        .basic_get(names.dead_queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let letter = DeadLetter::read(&delivery.data, &delivery.properties, &relays);
        let chosen = match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&letter.id),
        };
        if !chosen {
            continue;
        }
        let skipped = refusal(&letter, &delivery.data, rules);
        if skipped.is_none() && !dry_run {
            let mut table = reset_headers(&headers::copy(&delivery.properties));
            headers::set_bool(&mut table, headers::REPLAYED, true);
            headers::set_text(&mut table, headers::REPLAYED_BY, rules.replayed_by);
            headers::set_text(
                &mut table,
                headers::SENDER,
                letter.sender.as_deref().unwrap_or_default(),
            );
            let mut properties = BasicProperties::default()
                .with_headers(table)
                .with_user_id(publisher.user().into());
            if let Some(id) = delivery.properties.message_id() {
                properties = properties.with_message_id(id.clone());
            }
            if let Some(id) = delivery.properties.correlation_id() {
                properties = properties.with_correlation_id(id.clone());
            }
            publisher
                .publish(Outgoing {
                    exchange: &names.commands_exchange,
                    routing_key: &names.commands_queue,
                    body: &delivery.data,
                    properties,
                    must_route: true,
                })
                .await?;
            delivery.ack(BasicAckOptions::default()).await?;
            tracing::info!(
                audit = true,
                command_id = %letter.id,
                sender = letter.sender.as_deref().unwrap_or("-"),
                replayed_by = rules.replayed_by,
                "dead letter replayed"
            );
        }
        replayed.push(Replay { letter, skipped });
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(replayed)
}

/// Why `letter` must not be replayed, if it must not.
fn refusal(letter: &DeadLetter, body: &[u8], rules: &ReplayRules<'_>) -> Option<String> {
    if letter.error_kind.as_deref() == Some("unauthorized") {
        return Some("it was refused as unauthorized: replaying cannot make it allowed".into());
    }
    let command = match Command::parse(body) {
        Ok(command) => command,
        Err(err) => return Some(format!("it is not a valid command ({err})")),
    };
    if command.action == Action::Restore && !rules.include_restores {
        return Some("it is a restore: replay restores with --include-restores".into());
    }
    let options = command.options.as_object();
    let flag = |name: &str, value: serde_json::Value| {
        options.is_some_and(|options| options.get(name) == Some(&value))
    };
    // The worker checks again with the target's own rules; this errs on the side of asking.
    let in_place = command.action == Action::Restore
        && (flag("in_place", true.into())
            || flag("delete_absent", true.into())
            || flag("existing", "flush-first".into()));
    let request = Request {
        action: command.action,
        target: command.target,
        in_place,
        scoped: command.action == Action::Backup && command.changes_what_a_backup_is(),
    };
    rules
        .permissions
        .check(letter.sender.as_deref(), &request)
        .err()
        .map(|refusal| format!("its sender may not send it: {refusal}"))
}

/// Headers of a replayed command: no attempt count, no broker death history.
fn reset_headers(table: &FieldTable) -> FieldTable {
    [
        headers::ATTEMPT,
        headers::DEATH,
        headers::DELIVERY_COUNT,
        headers::COPY,
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    .into_iter()
    .fold(table.clone(), |table, name| headers::without(&table, name))
}
