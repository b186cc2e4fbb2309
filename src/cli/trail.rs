//! The CLI's audit records (see `crm_backup::audit`): who ran what, as the operating
//! system knows the user, with the outcome, written when each operation ends; and, for the
//! operations a worker also runs (backup, restore, verify, drill, prune), the same
//! `backup.*` events a worker publishes, so that what watches the events sees CLI runs too.

use std::time::{Duration, Instant};

use crm_backup::audit::{self, AuditRecord, Origin, Outcome};
use crm_backup::config::{MessagingSettings, RabbitmqSettings};
use crm_backup::jobs::JobError;
use crm_backup::messaging::dispatch::StepOutcome;
use crm_backup::messaging::event::{self, Event, EventError};
use crm_backup::messaging::publisher::Publisher;
use crm_backup::messaging::{self as broker};
use crm_backup::model::Action;
use crm_backup::storage::Storage;
use tokio::sync::OnceCell;

/// How long the CLI waits for the broker before it runs without publishing events.
const BROKER_WAIT: Duration = Duration::from_secs(5);

/// Where the CLI's records go, and who it runs as.
pub struct Trail {
    /// None when storage could not be opened (a broker command with a broken storage
    /// configuration): records then go to the log only.
    storage: Option<Storage>,
    user: String,
    requested_by: String,
    /// The broker events go to (`messaging.cli_events`), connected at the first operation.
    broker: Option<(RabbitmqSettings, MessagingSettings)>,
    events: OnceCell<Option<Events>>,
}

/// A connection that publishes events.
struct Events {
    connection: lapin::Connection,
    publisher: Publisher,
}

impl Trail {
    pub fn new(storage: Option<Storage>) -> Self {
        Trail {
            storage,
            user: os_user(),
            requested_by: super::requester(),
            broker: None,
            events: OnceCell::new(),
        }
    }

    /// Operations started with [`Trail::start`] publish their events to this broker.
    pub fn with_events(
        mut self,
        rabbitmq: &RabbitmqSettings,
        messaging: &MessagingSettings,
    ) -> Self {
        if messaging.cli_events {
            self.broker = Some((rabbitmq.clone(), messaging.clone()));
        }
        self
    }

    /// A record of an operation that starts now, under a command id of its own; its
    /// `backup.started` event is published.
    pub async fn start(&self, action: Action, target: &str) -> AuditRecord {
        let mut record = self.record(action.as_str(), Some(target));
        record.command_id = Some(format!("cli-{}", uuid::Uuid::new_v4()));
        self.publish(self.event(event::STARTED, &record)).await;
        record
    }

    /// Closes the broker connection, if one was opened.
    pub async fn close(&self) {
        if let Some(Some(events)) = self.events.get() {
            let _ = events.connection.close(200, "cli done".into()).await;
        }
    }

    /// A record of `action` on `target`, to be completed and written by [`Trail::write`].
    pub fn record(&self, action: &str, target: Option<&str>) -> AuditRecord {
        let mut record = AuditRecord::new(Origin::Cli, &self.user, &self.requested_by, action);
        record.target = target.map(String::from);
        record
    }

    /// Writes `record`, ended now, of an operation that began at `started`; an operation
    /// begun with [`Trail::start`] publishes its `backup.completed` or `backup.failed`.
    pub async fn write(&self, record: AuditRecord, started: Instant) {
        self.finish(record, started, None).await;
    }

    /// [`Trail::write`] of a backup, whose event carries what the worker's does.
    pub async fn write_backup(&self, record: AuditRecord, started: Instant, outcome: StepOutcome) {
        self.finish(record, started, Some(outcome)).await;
    }

    async fn finish(
        &self,
        mut record: AuditRecord,
        started: Instant,
        outcome: Option<StepOutcome>,
    ) {
        record.at = chrono::Utc::now();
        record.duration_ms = started.elapsed().as_millis() as u64;
        match &self.storage {
            Some(storage) => audit::write(storage, &record).await,
            None => {
                tracing::warn!(
                    target: "audit",
                    record = %serde_json::to_string(&record).unwrap_or_default(),
                    "audit (not stored: storage is not configured correctly)"
                );
            }
        }
        if record.command_id.is_some() {
            let mut done = match record.outcome {
                Outcome::Completed => self.event(event::COMPLETED, &record),
                _ => {
                    let mut failed = self.event(event::FAILED, &record);
                    failed.error = Some(EventError {
                        kind: record.error_kind.clone().unwrap_or_default(),
                        message: record.error.clone().unwrap_or_default(),
                        retryable: false,
                    });
                    failed.will_retry = Some(false);
                    failed
                }
            };
            done.duration_ms = Some(record.duration_ms);
            done.size_bytes = record.stored_bytes;
            done.raw_size_bytes = record.raw_bytes;
            done.details = record.details.clone();
            if let Some(outcome) = outcome {
                done.sha256 = outcome.sha256;
                done.location = outcome.location;
                done.set_id = outcome.set_id;
                done.warnings = (!outcome.warnings.is_empty()).then_some(outcome.warnings);
            }
            self.publish(done).await;
        }
    }

    /// An event of the operation `record` describes.
    fn event(&self, name: &str, record: &AuditRecord) -> Event {
        let mut event = Event::new(name, record.command_id.as_deref().unwrap_or_default(), 1);
        event.action = Some(record.action.clone());
        event.target = record.target.clone();
        event.backup_id = record.backup_id.clone();
        event.requested_by = Some(self.requested_by.clone());
        event
    }

    /// Publishes `event` when a broker is configured and reachable; the operation goes on
    /// either way (a broker that cannot be reached is said once).
    async fn publish(&self, event: Event) {
        let Some((rabbitmq, messaging)) = &self.broker else {
            return;
        };
        let events = self
            .events
            .get_or_init(|| async {
                let opened = async {
                    let connection = broker::connect(rabbitmq, "crm-backup cli").await?;
                    broker::topology::declare_notifications(&connection, messaging).await?;
                    let user = broker::amqp_user(rabbitmq);
                    let publisher = Publisher::open(&connection, messaging, &user).await?;
                    Ok::<_, broker::MessagingError>(Events { connection, publisher })
                };
                match tokio::time::timeout(BROKER_WAIT, opened).await {
                    Ok(Ok(events)) => Some(events),
                    Ok(Err(err)) => {
                        tracing::warn!(error = %err, "backup.* events of this run are not published (messaging.cli_events = false stops trying)");
                        None
                    }
                    Err(_) => {
                        tracing::warn!(wait = ?BROKER_WAIT, "the broker did not answer: backup.* events of this run are not published");
                        None
                    }
                }
            })
            .await;
        if let Some(events) = events
            && let Err(err) = events.publisher.event(&event).await
        {
            tracing::warn!(error = %err, event = %event.event, command_id = %event.command_id, "could not publish the event");
        }
    }
}

/// `record` with the outcome of a CLI command.
pub fn finished(
    record: AuditRecord,
    result: &Result<std::process::ExitCode, super::Failure>,
) -> AuditRecord {
    match result {
        Ok(_) => record,
        Err(super::Failure(message)) => record.failed(Outcome::Failed, "cli", message),
    }
}

/// `record` with the failure `err` of a job.
pub fn failed(record: AuditRecord, err: &JobError) -> AuditRecord {
    let outcome = match err {
        JobError::Cancelled => Outcome::Cancelled,
        _ => Outcome::Failed,
    };
    record.failed(outcome, err.kind(), &err.to_string())
}

/// The user the process runs as, by its real user id (what `USER` says is not checked).
fn os_user() -> String {
    let uid = rustix::process::getuid().as_raw();
    std::fs::read_to_string("/etc/passwd")
        .ok()
        .and_then(|passwd| user_of(&passwd, uid))
        .unwrap_or_else(|| format!("uid:{uid}"))
}

/// The name of `uid` in a passwd file.
fn user_of(passwd: &str, uid: u32) -> Option<String> {
    passwd.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        let id: u32 = fields.nth(1)?.parse().ok()?;
        (id == uid && !name.is_empty()).then(|| name.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_found_by_id() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n# comment\nbroken\nops:x:1000:1000::/home/ops:/bin/sh\n";
        assert_eq!(user_of(passwd, 0).as_deref(), Some("root"));
        assert_eq!(user_of(passwd, 1000).as_deref(), Some("ops"));
        assert_eq!(user_of(passwd, 7), None);
    }
}
