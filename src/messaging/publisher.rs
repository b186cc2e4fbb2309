//! Publishing with confirms: events, commands, retry and dead-letter copies.
//!
//! Every publish is persistent and waits for the broker's confirm. A nack is an error; so is
//! an unroutable command or copy (published mandatory), so nothing is acked upstream on a
//! hope. An event nobody subscribed to is dropped by the broker, not an error of the backup.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection};

use super::MessagingError;
use super::command::Command;
use super::event::Event;
use crate::config::MessagingSettings;

const PERSISTENT: u8 = 2;

#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    names: MessagingSettings,
    /// The connection's AMQP user: copies of commands carry it as `user_id`, which the
    /// broker verifies, so a republished restore keeps an authenticated sender.
    user: String,
}

/// One outgoing message.
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub body: &'a [u8],
    pub properties: BasicProperties,
    /// Whether a message no queue receives is an error (else it is dropped: an event nobody
    /// subscribed to).
    pub must_route: bool,
}

impl Publisher {
    /// A confirm-mode channel on `connection`.
    pub async fn open(
        connection: &Connection,
        names: &MessagingSettings,
        user: &str,
    ) -> Result<Self, MessagingError> {
        let channel = connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            names: names.clone(),
            user: user.to_string(),
        })
    }

    pub fn user(&self) -> &str {
        &self.user
    }

    pub fn names(&self) -> &MessagingSettings {
        &self.names
    }

    /// Publishes and waits for the confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), MessagingError> {
        let target = format!("{}/{}", message.exchange, message.routing_key);
        let confirm = self
            .channel
            .basic_publish(
                message.exchange.into(),
                message.routing_key.into(),
                BasicPublishOptions {
                    mandatory: message.must_route,
                    ..BasicPublishOptions::default()
                },
                message.body,
                message
                    .properties
                    .with_content_type("application/json".into())
                    .with_delivery_mode(PERSISTENT),
            )
            .await?
            .await?;
        if !confirm.is_ack() {
            return Err(MessagingError::NotConfirmed(target));
        }
        if confirm.take_message().is_some() {
            return Err(MessagingError::NotConfirmed(format!(
                "{target} (unroutable)"
            )));
        }
        Ok(())
    }

    /// Publishes an event on the notifications exchange.
    pub async fn event(&self, event: &Event) -> Result<(), MessagingError> {
        let mut properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_timestamp(event.at.timestamp() as u64);
        if let Some(correlation_id) = &event.correlation_id {
            properties = properties.with_correlation_id(correlation_id.as_str().into());
        }
        self.publish(Outgoing {
            exchange: &self.names.notifications_exchange,
            routing_key: event.routing_key(),
            body: &event.to_json(),
            properties,
            must_route: false,
        })
        .await
    }

    /// Publishes a command to the commands exchange (mandatory: it must reach the queue),
    /// signed with this connection's user.
    pub async fn command(
        &self,
        command: &Command,
        correlation_id: Option<&str>,
        headers: FieldTable,
    ) -> Result<(), MessagingError> {
        let mut properties = BasicProperties::default()
            .with_message_id(command.id.as_str().into())
            .with_user_id(ShortString::from(self.user.as_str()))
            .with_headers(headers);
        if let Some(correlation_id) = correlation_id {
            properties = properties.with_correlation_id(correlation_id.into());
        }
        self.publish(Outgoing {
            exchange: &self.names.commands_exchange,
            routing_key: &self.names.commands_queue,
            body: &command.to_json(),
            properties,
            must_route: true,
        })
        .await
    }

    /// Copies a delivery into a retry tier queue (default exchange), expiring after `expiration_ms`.
    pub async fn to_retry_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: &BasicProperties,
        headers: FieldTable,
        expiration_ms: u128,
    ) -> Result<(), MessagingError> {
        let properties = self
            .copy_properties(properties)
            .with_headers(headers)
            .with_expiration(expiration_ms.to_string().into());
        self.publish(Outgoing {
            exchange: "",
            routing_key: queue,
            body,
            properties,
            must_route: true,
        })
        .await
    }

    /// Copies a delivery into `queue` (by the default exchange): the queue of the commands
    /// waiting for a busy target, or the keyed queue (see `keyed`).
    pub async fn to_queue(
        &self,
        queue: &str,
        body: &[u8],
        properties: &BasicProperties,
        headers: FieldTable,
    ) -> Result<(), MessagingError> {
        let properties = self.copy_properties(properties).with_headers(headers);
        self.publish(Outgoing {
            exchange: "",
            routing_key: queue,
            body,
            properties,
            must_route: true,
        })
        .await
    }

    /// Copies a delivery to the dead-letter exchange with the failure headers.
    pub async fn to_dead_letters(
        &self,
        body: &[u8],
        properties: &BasicProperties,
        headers: FieldTable,
    ) -> Result<(), MessagingError> {
        let properties = self.copy_properties(properties).with_headers(headers);
        self.publish(Outgoing {
            exchange: &self.names.dead_exchange,
            routing_key: &self.names.commands_queue,
            body,
            properties,
            must_route: true,
        })
        .await
    }
}

impl Publisher {
    /// Properties for a copy of a delivery: its ids and timestamp, signed by this
    /// connection's user, without the original expiration (a copy sets its own, if any).
    fn copy_properties(&self, properties: &BasicProperties) -> BasicProperties {
        let mut copy =
            BasicProperties::default().with_user_id(ShortString::from(self.user.as_str()));
        if let Some(v) = properties.message_id() {
            copy = copy.with_message_id(v.clone());
        }
        if let Some(v) = properties.correlation_id() {
            copy = copy.with_correlation_id(v.clone());
        }
        if let Some(v) = properties.timestamp() {
            copy = copy.with_timestamp(*v);
        }
        copy
    }
}
