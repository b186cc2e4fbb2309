//! One step per target at a time, across all workers: a lease that dies with its holder.
//!
//! The lease is an exclusive queue `backup.lease.<target>`, declared on a connection of its
//! own that lives as long as the step: another worker declaring it gets `RESOURCE_LOCKED`,
//! and the broker deletes it the moment that connection closes, however the holder died.
//! A connection per attempt, not a channel: the broker closes the channel of a refused
//! declaration, and lapin never reuses such channel ids, so after 2047 refusals a shared
//! connection could open no channel at all. A local lock answers for this worker's own steps
//! without a round trip to the broker: a step waits there for its sibling.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, Event};
use tokio::sync::OwnedMutexGuard;
use tokio_util::sync::CancellationToken;

use super::{MessagingError, connect};
use crate::config::RabbitmqSettings;
use lapin::protocol::AMQPSoftError;

use crate::model::TargetKind;

type LocalLocks = Arc<Mutex<HashMap<TargetKind, Arc<tokio::sync::Mutex<()>>>>>;

#[derive(Clone)]
pub struct Leases {
    settings: RabbitmqSettings,
    prefix: String,
    local: LocalLocks,
}

/// A held lease. Release it when the step is done; dropping it releases it too.
pub struct Lease {
    target: TargetKind,
    connection: Option<Connection>,
    lost: CancellationToken,
    _local: OwnedMutexGuard<()>,
}

impl Leases {
    pub fn new(settings: &RabbitmqSettings, prefix: &str) -> Self {
        Leases {
            settings: settings.clone(),
            prefix: prefix.to_string(),
            local: LocalLocks::default(),
        }
    }

    /// The lease on `target`, or `None` when another worker holds it, or when another step of
    /// this worker holds it and `wait_here` is false (with it, this waits for that step).
    pub async fn try_acquire(
        &self,
        target: TargetKind,
        wait_here: bool,
    ) -> Result<Option<Lease>, MessagingError> {
        let local = {
            let mut locks = self
                .local
                .lock()
                .map_err(|_| MessagingError::Broker("lease table poisoned".into()))?;
            locks.entry(target).or_default().clone()
        };
        let local = if wait_here {
            local.lock_owned().await
        } else {
            let Ok(local) = local.try_lock_owned() else {
                return Ok(None);
            };
            local
        };
        let connection = connect(&self.settings, &format!("crm-backup lease {target}")).await?;
        let declared = async {
            let channel = connection.create_channel().await?;
            let options = QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(
                    format!("{}{target}", self.prefix).as_str().into(),
                    options,
                    FieldTable::default(),
                )
                .await
        }
        .await;
        match declared {
            Ok(_) => {
                let lost = CancellationToken::new();
                let mut events = connection.events_listener();
                tokio::spawn({
                    let lost = lost.clone();
                    async move {
                        loop {
                            tokio::select! {
                                event = events.next() => match event {
                                    Some(Event::Error(_)) | None => break,
                                    Some(_) => {}
                                },
                                // Released (or dropped): stop watching.
                                _ = lost.cancelled() => return,
                            }
                        }
                        lost.cancel();
                    }
                });
                Ok(Some(Lease {
                    target,
                    connection: Some(connection),
                    lost,
                    _local: local,
                }))
            }
            Err(err) => {
                let _ = connection.close(200, "lease not taken".into()).await;
                if is_resource_locked(&err) {
                    Ok(None)
                } else {
                    Err(err.into())
                }
            }
        }
    }
}

impl Lease {
    pub fn target(&self) -> TargetKind {
        self.target
    }

    /// Cancelled if the lease's connection is lost while the step runs: another worker
    /// may then take the target, so the step must stop.
    pub fn lost(&self) -> &CancellationToken {
        &self.lost
    }

    /// Closes the lease's connection; the broker deletes the queue at once.
    pub async fn release(mut self) {
        self.lost.cancel();
        if let Some(connection) = self.connection.take() {
            let _ = connection.close(200, "lease released".into()).await;
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.lost.cancel();
        if let Some(connection) = self.connection.take() {
            tokio::spawn(async move {
                let _ = connection.close(200, "lease released".into()).await;
            });
        }
    }
}

/// The broker's answer when another connection holds the exclusive lease queue: 405.
fn is_resource_locked(err: &lapin::Error) -> bool {
    super::soft_error(err, AMQPSoftError::RESOURCELOCKED).is_some()
}
