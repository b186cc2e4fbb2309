//! One step per target at a time, across all workers: a lease that dies with its holder.
//!
//! The lease is an exclusive queue `backup.lease.<target>` on the holder's connection:
//! another connection declaring it gets `RESOURCE_LOCKED`, and the broker deletes it the
//! moment the holder's connection closes, however the holder died. Exclusive queues are
//! per connection, so steps of one worker are also serialised by a local set.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};

use super::MessagingError;
use crate::storage::layout::TargetKind;

#[derive(Clone)]
pub struct Leases {
    connection: Arc<Connection>,
    prefix: String,
    held: Arc<Mutex<HashSet<TargetKind>>>,
}

/// A held lease; release it when the step is done (dropping it releases too, later).
pub struct Lease {
    target: TargetKind,
    queue: String,
    channel: Option<Channel>,
    held: Arc<Mutex<HashSet<TargetKind>>>,
}

impl Leases {
    pub fn new(connection: Arc<Connection>, prefix: &str) -> Self {
        Leases {
            connection,
            prefix: prefix.to_string(),
            held: Arc::default(),
        }
    }

    /// The lease on `target`, or `None` when another step holds it.
    pub async fn try_acquire(&self, target: TargetKind) -> Result<Option<Lease>, MessagingError> {
        if !self.mark(target, true) {
            return Ok(None);
        }
        let queue = format!("{}{}", self.prefix, target);
        let declared = async {
            // A throwaway channel: the broker closes it when the queue is locked.
            let channel = self.connection.create_channel().await?;
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(queue.as_str().into(), options, FieldTable::default())
                .await?;
            Ok::<_, lapin::Error>(channel)
        }
        .await;
        match declared {
            Ok(channel) => Ok(Some(Lease {
                target,
                queue,
                channel: Some(channel),
                held: self.held.clone(),
            })),
            Err(err) => {
                self.mark(target, false);
                if err.to_string().contains("RESOURCE_LOCKED") {
                    Ok(None)
                } else {
                    Err(err.into())
                }
            }
        }
    }

    /// Adds (or removes) `target` in this worker's set; false if it was already there.
    fn mark(&self, target: TargetKind, take: bool) -> bool {
        match self.held.lock() {
            Ok(mut held) if take => held.insert(target),
            Ok(mut held) => held.remove(&target),
            Err(_) => false,
        }
    }
}

impl Lease {
    pub fn target(&self) -> TargetKind {
        self.target
    }

    /// Deletes the lease queue so the next step can take it at once.
    pub async fn release(mut self) {
        if let Some(channel) = self.channel.take() {
            let _ = channel
                .queue_delete(self.queue.as_str().into(), QueueDeleteOptions::default())
                .await;
            let _ = channel.close(200, "lease released".into()).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if let Ok(mut held) = self.held.lock() {
            held.remove(&self.target);
        }
        if let Some(channel) = self.channel.take() {
            let queue = self.queue.clone();
            tokio::spawn(async move {
                let _ = channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await;
                let _ = channel.close(200, "lease released".into()).await;
            });
        }
    }
}
