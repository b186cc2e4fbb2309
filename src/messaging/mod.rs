//! RabbitMQ: topology, command and event types, the publisher, the worker, retries and dead letters.
//!
//! ```text
//! backup.commands (direct) ─► backup.commands (quorum; x-delivery-limit; DLX backup.dead)
//!                          ─► backup.commands.keyed (the same; see `keyed`)
//! retryable failure ─► backup.retry.<delay> (TTL, DLX → backup.commands)
//! permanent / exhausted ─► backup.dead (fanout) ─► backup.commands.dead
//! events ─► backup.notifications (topic): backup.started | backup.completed | backup.failed
//! ```

pub mod client;
pub mod command;
pub mod dispatch;
pub mod dlq;
pub mod event;
pub mod headers;
pub mod keyed;
pub mod lease;
pub mod publisher;
pub mod retry;
pub mod topology;
pub mod worker;

use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPSoftError};
use lapin::{Connection, ConnectionProperties};
use secrecy::ExposeSecret;

use crate::config::RabbitmqSettings;
use crate::telemetry::redact_url;

#[derive(Debug, thiserror::Error)]
pub enum MessagingError {
    #[error("cannot connect to RabbitMQ at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("RabbitMQ: {0}")]
    Broker(String),
    #[error("RabbitMQ did not confirm the publish to `{0}`")]
    NotConfirmed(String),
    #[error("RabbitMQ topology conflict: {0}")]
    Topology(String),
    /// An exchange or queue the command uses does not exist (the broker's 404).
    #[error(
        "RabbitMQ: {0}; `crm-backup setup` declares the exchanges and queues (a worker does when it starts)"
    )]
    NotDeclared(String),
}

impl MessagingError {
    /// Connection and confirm problems pass, and so does a missing queue (a worker declares
    /// the topology again when it reconnects); a topology conflict needs an operator.
    pub fn retryable(&self) -> bool {
        !matches!(self, MessagingError::Topology(_))
    }
}

impl From<lapin::Error> for MessagingError {
    fn from(err: lapin::Error) -> Self {
        match soft_error(&err, AMQPSoftError::NOTFOUND) {
            Some(amqp) => MessagingError::NotDeclared(amqp.get_message().to_string()),
            None => MessagingError::Broker(err.to_string()),
        }
    }
}

/// The broker's channel-level error of `kind` that `err` carries, if it is one.
pub(crate) fn soft_error(err: &lapin::Error, kind: AMQPSoftError) -> Option<&AMQPError> {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(amqp) if *amqp.kind() == AMQPErrorKind::Soft(kind) => {
            Some(amqp)
        }
        _ => None,
    }
}

/// The broker users whose re-published commands carry a trusted original sender: `user`
/// (this process's own) and the configured `messaging.relay_users`.
pub fn relays(user: &str, names: &crate::config::MessagingSettings) -> Vec<String> {
    let mut relays = names.relay_users.clone();
    relays.push(user.to_string());
    relays
}

/// The longest pause between two attempts to reach the broker.
pub const RECONNECT_MAX_PAUSE: std::time::Duration = std::time::Duration::from_secs(30);

/// Pauses between attempts to reach the broker again: doubling from `first` up to
/// [`RECONNECT_MAX_PAUSE`], with jitter so that a fleet of workers does not reconnect in step.
pub fn reconnect_backoff(first: std::time::Duration) -> backon::ExponentialBuilder {
    backon::ExponentialBuilder::default()
        .with_min_delay(first)
        .with_max_delay(RECONNECT_MAX_PAUSE)
        .with_jitter()
        .without_max_times()
}

/// Opens a connection named `name` (shown in the management UI).
pub async fn connect(
    settings: &RabbitmqSettings,
    name: &str,
) -> Result<Connection, MessagingError> {
    let url = settings.url.expose_secret();
    let failed = |message: String| MessagingError::Connect {
        url: redact_url(url),
        message,
    };
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(failed)?;
    uri.query.frame_max = uri.query.frame_max.or(Some(FRAME_MAX));
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect_uri(uri, properties)
        .await
        .map_err(|err| failed(err.to_string()))
}

/// The largest frame this side asks for (unless the URL sets `frame_max`). lapin keeps 32
/// frames of buffer each way per connection: RabbitMQ's default of 128 KiB would cost 8 MiB of
/// memory for every connection (the CLI's events, each step's lease), for commands and events
/// of a few hundred bytes; longer messages are sent in several frames.
const FRAME_MAX: u32 = 16 * 1024;

/// The AMQP user of the configured URL (what the broker checks `user_id` against).
pub fn amqp_user(settings: &RabbitmqSettings) -> String {
    url::Url::parse(settings.url.expose_secret())
        .ok()
        .map(|url| url.username().to_string())
        .filter(|user| !user.is_empty())
        .unwrap_or_else(|| "guest".to_string())
}
