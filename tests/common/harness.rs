//! A worker in the test process with its own vhost, database and storage, and a client that
//! publishes commands and follows their events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crm_backup::config::RabbitmqSettings;
use crm_backup::messaging::client::EventSubscription;
use crm_backup::messaging::command::Command as BackupCommand;
use crm_backup::messaging::event::{self, Event};
use crm_backup::messaging::publisher::{Outgoing, Publisher};
use crm_backup::messaging::worker;
use crm_backup::messaging::{self as broker};
use crm_backup::metrics::WorkerState;
use crm_backup::model::{Action, TargetKind, TargetSelector};
use crm_backup::storage::catalog;
use lapin::BasicProperties;
use secrecy::SecretString;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::broker::{TestVhost, assert_valid_event};
use super::{Store, TestDatabase, TestSetup, psql};

pub const WAIT: Duration = Duration::from_secs(60);

/// A worker running in this process, with its own vhost, database and storage.
pub struct Harness {
    pub vhost: TestVhost,
    pub _db: TestDatabase,
    pub setup: TestSetup,
    pub workers: Vec<(CancellationToken, JoinHandle<()>, Arc<WorkerState>)>,
}

impl Harness {
    pub fn new(prefix: &str, extra: &[(&str, &str)]) -> Self {
        Self::with_store(prefix, Store::Local, extra)
    }

    pub fn with_store(prefix: &str, store: Store, extra: &[(&str, &str)]) -> Self {
        let vhost = TestVhost::create(prefix);
        let db = TestDatabase::create(prefix);
        psql(
            &db.name,
            "CREATE TABLE crm_notes AS SELECT i, md5(i::text) AS note FROM generate_series(1, 2000) i",
        );
        let url = vhost.url();
        let mut env: Vec<(&str, &str)> = vec![
            ("RABBITMQ_URL", url.as_str()),
            ("BACKUP__MESSAGING__RETRY_DELAYS", "1s,2s"),
            ("BACKUP__MESSAGING__MAX_ATTEMPTS", "3"),
            ("BACKUP__MESSAGING__SHUTDOWN_TIMEOUT", "20s"),
        ];
        env.extend_from_slice(extra);
        let setup = TestSetup::new(&db.name, store, &env);
        Harness {
            vhost,
            _db: db,
            setup,
            workers: Vec::new(),
        }
    }

    pub async fn start_worker(&mut self) {
        self.start_worker_with(self.setup.ctx.clone()).await;
    }

    /// A worker with settings of its own (another key, another queue), on the same storage.
    pub async fn start_worker_with(&mut self, ctx: crm_backup::jobs::JobContext) {
        let shutdown = CancellationToken::new();
        let state = Arc::new(WorkerState::default());
        let handle = tokio::spawn({
            let state = state.clone();
            let shutdown = shutdown.clone();
            async move {
                worker::run(ctx, state, shutdown)
                    .await
                    .expect("worker runs");
            }
        });
        wait_until("the worker consumes", || {
            state.consuming.load(Ordering::SeqCst)
        })
        .await;
        self.workers.push((shutdown, handle, state));
    }

    pub async fn stop_workers(&mut self) {
        for (shutdown, handle, _) in self.workers.drain(..) {
            shutdown.cancel();
            let _ = handle.await;
        }
    }

    pub fn rabbitmq(&self, url: &str) -> RabbitmqSettings {
        RabbitmqSettings {
            url: SecretString::from(url.to_string()),
            concurrency: 1,
        }
    }

    /// A client as guest: publisher plus an event subscription opened before anything is sent.
    pub async fn client(&self) -> Client {
        self.client_as(&self.vhost.url()).await
    }

    pub async fn client_as(&self, url: &str) -> Client {
        let settings = self.rabbitmq(url);
        let connection = broker::connect(&settings, "test client").await.unwrap();
        broker::topology::declare(&connection, &self.setup.settings.messaging)
            .await
            .unwrap();
        let user = broker::amqp_user(&settings);
        let publisher = Publisher::open(&connection, &self.setup.settings.messaging, &user)
            .await
            .unwrap();
        let events = EventSubscription::open(&connection, &self.setup.settings.messaging)
            .await
            .unwrap();
        Client {
            connection,
            publisher,
            events,
        }
    }

    pub async fn manifests_of(&self, command_id: &str) -> usize {
        catalog::list(&self.setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap()
            .manifests
            .iter()
            .filter(|m| m.command_id.as_deref() == Some(command_id))
            .count()
    }

    /// Env for a worker child process (same settings as in-process; its HTTP endpoint on
    /// a port of its own).
    pub fn child_env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = self
            .setup
            .env
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        env.push(("BACKUP__HTTP__LISTEN".into(), "127.0.0.1:0".into()));
        env
    }
}

pub struct Client {
    pub connection: lapin::Connection,
    pub publisher: Publisher,
    pub events: EventSubscription,
}

impl Client {
    pub async fn send(&self, command: &BackupCommand) {
        self.publisher
            .command(
                command,
                Some(&format!("corr-{}", command.id)),
                Default::default(),
            )
            .await
            .unwrap();
    }

    pub async fn send_raw(&self, body: &[u8], message_id: &str) {
        let names = self.publisher.names().clone();
        self.publisher
            .publish(Outgoing {
                exchange: &names.commands_exchange,
                routing_key: &names.commands_queue,
                body,
                properties: BasicProperties::default().with_message_id(message_id.into()),
                must_route: true,
            })
            .await
            .unwrap();
    }

    /// Every event of several commands running at once, until each has ended.
    pub async fn follow_all(&mut self, commands: &[&BackupCommand]) -> Vec<Event> {
        let mut pending: std::collections::BTreeSet<&str> =
            commands.iter().map(|c| c.id.as_str()).collect();
        let mut seen = Vec::new();
        while !pending.is_empty() {
            let event =
                self.events.next(WAIT).await.unwrap().unwrap_or_else(|| {
                    panic!("no event within {WAIT:?}; events so far: {seen:#?}")
                });
            if !pending.contains(event.command_id.as_str()) {
                continue;
            }
            assert_valid_event(&event);
            let terminal = event.event == event::COMPLETED
                || (event.event == event::FAILED && event.will_retry != Some(true));
            if terminal {
                pending.remove(event.command_id.as_str());
            }
            seen.push(event);
        }
        seen
    }

    /// Every event of `command` until it ends, each validated against the schema.
    pub async fn follow(&mut self, command: &BackupCommand) -> Vec<Event> {
        let mut seen = Vec::new();
        self.events
            .wait_for(command, WAIT, |event| {
                assert_valid_event(event);
                seen.push(event.clone());
            })
            .await
            .unwrap_or_else(|err| panic!("{err}; events so far: {seen:#?}"));
        seen
    }
}

pub async fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..400 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting until {what}");
}

pub fn backup_command(target: TargetKind) -> BackupCommand {
    BackupCommand::new(Action::Backup, TargetSelector::One(target), "test-suite")
}

pub fn names(events: &[Event]) -> Vec<(String, u32)> {
    events
        .iter()
        .map(|e| (e.event.clone(), e.attempt))
        .collect()
}

/// A durable queue bound to the events exchange: unlike a client's exclusive subscription,
/// it keeps what is published while its reader is away (a broker restart) and lets a test
/// count every event, duplicates included.
pub struct EventLog {
    url: String,
    queue: String,
}

impl EventLog {
    pub async fn open(h: &Harness) -> Self {
        let log = EventLog {
            url: h.vhost.url(),
            queue: super::unique("event_log"),
        };
        let connection = lapin::Connection::connect(&log.url, Default::default())
            .await
            .unwrap();
        broker::topology::declare(&connection, &h.setup.settings.messaging)
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .queue_declare(
                log.queue.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .unwrap();
        channel
            .queue_bind(
                log.queue.as_str().into(),
                h.setup
                    .settings
                    .messaging
                    .notifications_exchange
                    .as_str()
                    .into(),
                "backup.#".into(),
                Default::default(),
                Default::default(),
            )
            .await
            .unwrap();
        let _ = connection.close(200, "".into()).await;
        log
    }

    /// Every event logged since the last call.
    pub async fn take(&self) -> Vec<Event> {
        let connection = lapin::Connection::connect(&self.url, Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        let mut events = Vec::new();
        while let Some(message) = channel
            .basic_get(self.queue.as_str().into(), Default::default())
            .await
            .unwrap()
        {
            message.ack(Default::default()).await.unwrap();
            events.push(serde_json::from_slice(&message.delivery.data).unwrap());
        }
        let _ = connection.close(200, "".into()).await;
        events
    }

    /// The events of `command_id` from now on, until one ends it, and those of the next
    /// three seconds (where a second final event would show).
    pub async fn until_final(&self, command_id: &str) -> Vec<Event> {
        let mut seen: Vec<Event> = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        while std::time::Instant::now() < deadline {
            seen.extend(
                self.take()
                    .await
                    .into_iter()
                    .filter(|e| e.command_id == command_id),
            );
            if seen.iter().any(is_final) {
                tokio::time::sleep(Duration::from_secs(3)).await;
                seen.extend(
                    self.take()
                        .await
                        .into_iter()
                        .filter(|e| e.command_id == command_id),
                );
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        panic!("no final event for {command_id}: {seen:#?}");
    }

    /// Waits until `command_id` has started (taking the events seen meanwhile).
    pub async fn wait_started(&self, command_id: &str) {
        for _ in 0..600 {
            if self
                .take()
                .await
                .iter()
                .any(|e| e.command_id == command_id && e.event == event::STARTED)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{command_id} never started");
    }
}

/// `backup.completed`, or `backup.failed` that will not be retried.
pub fn is_final(event: &Event) -> bool {
    event.event == event::COMPLETED
        || (event.event == event::FAILED && event.will_retry != Some(true))
}
