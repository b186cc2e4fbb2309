//! Dead letters: listing them, and replaying them into `backup.commands`.
//!
//! Both read with `basic.get` without acking; what is not replayed goes back to the queue
//! when the channel closes. A replayed dead letter is acked only after its republish is
//! confirmed, so a crash in between duplicates it rather than losing it.

use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde::Serialize;

use super::MessagingError;
use super::headers;
use super::publisher::{Outgoing, Publisher};
use crate::config::MessagingSettings;

#[derive(Debug, Clone, Serialize)]
pub struct DeadLetter {
    pub id: String,
    pub action: Option<String>,
    pub target: Option<String>,
    pub attempts: i64,
    pub error_kind: Option<String>,
    pub last_error: Option<String>,
    pub failed_at: Option<String>,
}

impl DeadLetter {
    fn read(body: &[u8], properties: &BasicProperties) -> Self {
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
        let delivery_count = headers::int(properties, "x-delivery-count").map(|n| n + 1);
        let attempts = headers::int(properties, headers::ATTEMPT)
            .or(delivery_count)
            .unwrap_or(1);
        let broker_reason = (headers::death_count(properties) > 0
            && headers::text(properties, headers::LAST_ERROR).is_none())
        .then(|| "dead-lettered by the broker: delivery limit reached (the worker failed on it repeatedly)".to_string());
        DeadLetter {
            id,
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

/// Every dead letter, oldest first; none is removed.
pub async fn list(
    connection: &Connection,
    names: &MessagingSettings,
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

/// Republishes the selected dead letters with attempts reset and `x-replayed: true`.
/// With `dry_run`, only reports what it would replay.
pub async fn replay(
    connection: &Connection,
    publisher: &Publisher,
    selection: &Selection,
    dry_run: bool,
) -> Result<Vec<DeadLetter>, MessagingError> {
    let names = publisher.names();
    let channel = connection.create_channel().await?;
    let mut replayed = Vec::new();
    while let Some(message) = channel
        .basic_get(names.dead_queue.as_str().into(), BasicGetOptions::default())
        .await?
    {
        let delivery = message.delivery;
        let letter = DeadLetter::read(&delivery.data, &delivery.properties);
        let chosen = match selection {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&letter.id),
        };
        if !chosen {
            continue;
        }
        if !dry_run {
            let mut table = reset_headers(&headers::copy(&delivery.properties));
            headers::set_bool(&mut table, headers::REPLAYED, true);
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
        }
        replayed.push(letter);
    }
    let _ = channel.close(200, "replayed".into()).await;
    Ok(replayed)
}

/// Headers of a replayed command: no attempt count, no broker death history.
fn reset_headers(table: &FieldTable) -> FieldTable {
    [
        headers::ATTEMPT,
        headers::DEATH,
        "x-delivery-count",
        "x-first-death-exchange",
        "x-first-death-queue",
        "x-first-death-reason",
    ]
    .into_iter()
    .fold(table.clone(), |table, name| headers::without(&table, name))
}
