//! One step per target at a time, across all workers: a lease that dies with its holder.
//!
//! The lease is an exclusive queue `backup.lease.<target>` on the holder's connection:
//! another connection declaring it gets `RESOURCE_LOCKED`, and the broker deletes it the
//! moment the holder's connection closes, however the holder died. Exclusive queues are
//! per connection, so steps inside one worker are serialised by a local lock first: a step
//! waits for its sibling rather than bouncing through the retry queues.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::sync::OwnedMutexGuard;

use super::MessagingError;
use crate::storage::layout::TargetKind;

type LocalLocks = Arc<Mutex<HashMap<TargetKind, Arc<tokio::sync::Mutex<()>>>>>;

#[derive(Clone)]
pub struct Leases {
    connection: Arc<Connection>,
    prefix: String,
    local: LocalLocks,
}

/// A held lease; release it when the step is done (dropping it releases too, later).
pub struct Lease {
    queue: String,
    channel: Option<Channel>,
    _local: OwnedMutexGuard<()>,
}

impl Leases {
    pub fn new(connection: Arc<Connection>, prefix: &str) -> Self {
        Leases {
            connection,
            prefix: prefix.to_string(),
            local: LocalLocks::default(),
        }
    }

    /// The lease on `target`, or `None` when another worker holds it. Waits while a
    /// step of this worker holds it.
    pub async fn try_acquire(&self, target: TargetKind) -> Result<Option<Lease>, MessagingError> {
        let local = {
            let mut locks = self
                .local
                .lock()
                .map_err(|_| MessagingError::Broker("lease table poisoned".into()))?;
            locks.entry(target).or_default().clone()
        };
        let local = local.lock_owned().await;
        let queue = format!("{}{}", self.prefix, target);
        // A throwaway channel: the broker closes it when the queue is locked.
        let channel = self.connection.create_channel().await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        match channel
            .queue_declare(queue.as_str().into(), options, FieldTable::default())
            .await
        {
            Ok(_) => Ok(Some(Lease {
                queue,
                channel: Some(channel),
                _local: local,
            })),
            Err(err) if err.to_string().contains("RESOURCE_LOCKED") => Ok(None),
            Err(err) => Err(err.into()),
        }
    }
}

impl Lease {
    /// Deletes the lease queue so the next step can take it at once.
    pub async fn release(mut self) {
        if let Some(channel) = self.channel.take() {
            delete(channel, &self.queue).await;
        }
    }
}

async fn delete(channel: Channel, queue: &str) {
    let _ = channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = channel.close(200, "lease released".into()).await;
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Some(channel) = self.channel.take() {
            let queue = self.queue.clone();
            tokio::spawn(async move { delete(channel, &queue).await });
        }
    }
}
