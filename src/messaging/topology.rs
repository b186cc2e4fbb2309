//! Declares the exchanges and queues of DESIGN §3, idempotently (at worker start and by `setup`).

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{Channel, Connection, ExchangeKind};

use super::MessagingError;
use super::retry::RetryPolicy;
use crate::config::MessagingSettings;
use crate::model::TargetKind;

fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (key, value) in entries {
        table.insert(ShortString::from(*key), value.clone());
    }
    table
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(value.as_bytes().to_vec()))
}

/// Declares everything; safe to run any number of times. A queue that exists with other
/// arguments is reported as a topology conflict naming it.
pub async fn declare(
    connection: &Connection,
    names: &MessagingSettings,
) -> Result<(), MessagingError> {
    let channel = connection.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    let exchanges = [
        (&names.commands_exchange, ExchangeKind::Direct),
        (&names.dead_exchange, ExchangeKind::Fanout),
        (&names.notifications_exchange, ExchangeKind::Topic),
    ];
    for (name, kind) in exchanges {
        channel
            .exchange_declare(name.as_str().into(), kind, durable, FieldTable::default())
            .await
            .map_err(|err| conflict(name, err))?;
    }
    let commands_args = table(&[
        ("x-queue-type", text("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(i64::from(names.delivery_limit)),
        ),
        ("x-dead-letter-exchange", text(&names.dead_exchange)),
    ]);
    // Commands handed over to key-holding workers (see `keyed`) live as the others do.
    for name in [&names.commands_queue, &names.keyed_queue] {
        queue(&channel, name, commands_args.clone()).await?;
        bind(&channel, name, &names.commands_exchange, name).await?;
    }
    // So do commands waiting for their busy target (reached by name, bound to nothing).
    for target in TargetKind::ALL {
        queue(
            &channel,
            &waiting_queue(names, target),
            commands_args.clone(),
        )
        .await?;
    }

    queue(&channel, &names.dead_queue, FieldTable::default()).await?;
    bind(&channel, &names.dead_queue, &names.dead_exchange, "").await?;

    let policy = RetryPolicy::from_settings(names);
    for (tier, delay) in policy.delays.iter().enumerate() {
        let args = table(&[
            (
                "x-message-ttl",
                AMQPValue::LongLongInt(delay.as_millis() as i64),
            ),
            ("x-dead-letter-exchange", text(&names.commands_exchange)),
            ("x-dead-letter-routing-key", text(&names.commands_queue)),
        ]);
        queue(
            &channel,
            &policy.queue_name(&names.retry_queue_prefix, tier),
            args,
        )
        .await?;
    }
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

/// The queue of the commands waiting for `target`: `backup.waiting.<target>`.
pub fn waiting_queue(names: &MessagingSettings, target: TargetKind) -> String {
    format!("{}{target}", names.waiting_queue_prefix)
}

/// What a passive declare tells of a queue.
pub struct Depth {
    pub messages: u32,
    pub consumers: u32,
}

/// The depth and consumers of `queue`, by a passive declare on a channel of its own (a
/// failure closes that channel, not a shared one).
pub async fn depth(connection: &Connection, queue: &str) -> Result<Depth, MessagingError> {
    let channel = connection.create_channel().await?;
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    let _ = channel.close(200, "inspected".into()).await;
    Ok(Depth {
        messages: declared.message_count(),
        consumers: declared.consumer_count(),
    })
}

/// Declares the events exchange alone: what a process that only publishes events (the CLI)
/// needs, with the settings [`declare`] gives it.
pub async fn declare_notifications(
    connection: &Connection,
    names: &MessagingSettings,
) -> Result<(), MessagingError> {
    let channel = connection.create_channel().await?;
    let name = &names.notifications_exchange;
    channel
        .exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|err| conflict(name, err))?;
    let _ = channel.close(200, "declared".into()).await;
    Ok(())
}

async fn queue(channel: &Channel, name: &str, args: FieldTable) -> Result<(), MessagingError> {
    let options = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(name.into(), options, args)
        .await
        .map(|_| ())
        .map_err(|err| conflict(name, err))
}

async fn bind(
    channel: &Channel,
    queue: &str,
    exchange: &str,
    key: &str,
) -> Result<(), MessagingError> {
    channel
        .queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|err| conflict(queue, err))
}

fn conflict(name: &str, err: lapin::Error) -> MessagingError {
    let message = err.to_string();
    if message.contains("PRECONDITION_FAILED") || message.contains("inequivalent") {
        MessagingError::Topology(format!(
            "`{name}` exists with different settings ({message}); delete it or align the configuration"
        ))
    } else {
        MessagingError::Broker(format!("declaring `{name}`: {message}"))
    }
}
