//! What a requester does: publish a command and follow its events to the end.

use std::collections::BTreeSet;
use std::time::Duration;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::MessagingError;
use super::command::Command;
use super::event::{self, Event};
use crate::config::MessagingSettings;
use crate::model::TargetSelector;

/// A private, auto-deleted queue bound to every backup event.
pub struct EventSubscription {
    _channel: Channel,
    consumer: Consumer,
}

impl EventSubscription {
    /// Subscribe before publishing, so no event is missed.
    pub async fn open(
        connection: &Connection,
        names: &MessagingSettings,
    ) -> Result<Self, MessagingError> {
        let channel = connection.create_channel().await?;
        let queue = channel
            .queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        channel
            .queue_bind(
                queue.name().clone(),
                names.notifications_exchange.as_str().into(),
                "backup.#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                queue.name().clone(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(EventSubscription {
            _channel: channel,
            consumer,
        })
    }

    /// The next event, or `None` when `limit` passes first.
    pub async fn next(&mut self, limit: Duration) -> Result<Option<Event>, MessagingError> {
        loop {
            let delivery = match tokio::time::timeout(limit, self.consumer.next()).await {
                Err(_) => return Ok(None),
                Ok(None) => return Err(MessagingError::Broker("event subscription closed".into())),
                Ok(Some(delivery)) => delivery?,
            };
            let _ = delivery.ack(BasicAckOptions::default()).await;
            if let Ok(event) = serde_json::from_slice::<Event>(&delivery.data) {
                return Ok(Some(event));
            }
        }
    }

    /// Follows `command` until every step has ended: `backup.completed`, or
    /// `backup.failed` that will not be retried. `on_event` sees each relevant event.
    pub async fn wait_for(
        &mut self,
        command: &Command,
        timeout: Duration,
        mut on_event: impl FnMut(&Event),
    ) -> Result<Vec<Event>, MessagingError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut pending: BTreeSet<String> = BTreeSet::from([command.id.clone()]);
        let mut finals = Vec::new();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let Some(event) = self.next(left).await? else {
                return Err(MessagingError::Broker(format!(
                    "no result within {timeout:?} for {}",
                    pending.iter().cloned().collect::<Vec<_>>().join(", ")
                )));
            };
            let relevant = pending.contains(&event.command_id)
                || (command.target == TargetSelector::All
                    && event.set_id.as_deref() == Some(command.id.as_str()));
            if !relevant {
                continue;
            }
            on_event(&event);
            // The fan-out of `all` names its steps in its started event.
            if event.event == event::STARTED
                && event.command_id == command.id
                && let Some(steps) = event.details.as_ref().and_then(|d| d.get("steps"))
            {
                pending.remove(&command.id);
                pending.extend(
                    steps
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|s| s.as_str().map(String::from)),
                );
            }
            let terminal = event.event == event::COMPLETED
                || (event.event == event::FAILED && event.will_retry != Some(true));
            if terminal && pending.remove(&event.command_id) {
                finals.push(event);
            }
        }
        Ok(finals)
    }
}
