//! What every benchmark client opens first: a connection to the workers' broker with the
//! topology declared, a publisher of commands and a subscription to every event.

use crm_backup::config::{RabbitmqSettings, Settings};
use crm_backup::messaging::client::EventSubscription;
use crm_backup::messaging::publisher::Publisher;
use crm_backup::messaging::{self, topology};
use secrecy::SecretString;

pub struct BenchClient {
    /// Kept open for as long as the publisher and the subscription are used.
    pub connection: lapin::Connection,
    pub publisher: Publisher,
    pub events: EventSubscription,
}

/// Connects to `url` with the queue and exchange names of the environment's configuration.
pub async fn connect(url: &str) -> Result<BenchClient, Box<dyn std::error::Error>> {
    let names = Settings::load(&std::env::vars().collect())?.messaging;
    let rabbitmq = RabbitmqSettings {
        url: SecretString::from(url.to_string()),
        concurrency: 1,
    };
    let connection = messaging::connect(&rabbitmq, "bench client").await?;
    topology::declare(&connection, &names).await?;
    let publisher = Publisher::open(&connection, &names, &messaging::amqp_user(&rabbitmq)).await?;
    let events = EventSubscription::open(&connection, &names).await?;
    Ok(BenchClient {
        connection,
        publisher,
        events,
    })
}
