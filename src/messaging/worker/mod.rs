//! The worker: consumes `backup.commands`, runs one step per message, publishes events,
//! and acks a message only once its outcome is durable.
//!
//! Outcomes of one delivery:
//! - done → marker `commands/<id>.json` written, `backup.completed` confirmed, ack;
//! - retryable failure → copy confirmed in the next retry tier, `backup.failed`, ack;
//! - permanent failure or attempts exhausted → copy confirmed in the dead letters, ack;
//! - target busy → copy in the target's waiting queue, attempt unchanged, ack;
//! - shutdown or broker loss mid-step → no ack: the broker redelivers it.
//!
//! Where each part lives:
//! - `waiting`: a delivery's slot, and per-target turns (a busy target's commands wait in
//!   `backup.waiting.<target>` and run next under its lease);
//! - `delivery`: one delivery from parse to outcome: authorization, the marker check,
//!   fan-out, the step under its lease;
//! - `outcome`: making an outcome durable: the marker and `backup.completed`, a retry tier,
//!   the waiting queue or the dead letters, with their `backup.failed` events;
//! - `record`: the audit records of steps and refusals.

mod delivery;
mod outcome;
mod record;
mod waiting;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use futures::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::authorization::Policy;
use crate::jobs::JobContext;
use crate::messaging::keyed;
use crate::messaging::lease::Leases;
use crate::messaging::publisher::Publisher;
use crate::messaging::retry::RetryPolicy;
use crate::messaging::{
    MessagingError, RECONNECT_MAX_PAUSE, amqp_user, connect, reconnect_backoff, topology,
};
use crate::metrics::{Metrics, WorkerState};
use crate::model::TargetKind;
use waiting::{handle, sweep};

/// How often a worker looks for commands waiting for a target nobody holds.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Runs the worker until `shutdown` fires, reconnecting whenever the broker goes away.
pub async fn run(
    ctx: JobContext,
    state: Arc<WorkerState>,
    shutdown: CancellationToken,
) -> Result<(), MessagingError> {
    let backoff = reconnect_backoff(Duration::from_millis(250));
    let mut pauses = backoff.build();
    loop {
        let started = Instant::now();
        let result = session(&ctx, &state, &shutdown).await;
        state.consuming.store(false, Ordering::SeqCst);
        match result {
            Ok(()) => return Ok(()),
            Err(err) if !err.retryable() => return Err(err),
            Err(err) => {
                if started.elapsed() > Duration::from_secs(30) {
                    pauses = backoff.build();
                }
                let pause = pauses.next().unwrap_or(RECONNECT_MAX_PAUSE);
                tracing::warn!(error = %err, retry_in = ?pause, "broker session ended; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// Everything a step handler needs.
struct StepEnv {
    ctx: JobContext,
    connection: Arc<lapin::Connection>,
    publisher: Publisher,
    /// Broker users whose re-publications carry a trusted original sender.
    relays: Vec<String>,
    leases: Leases,
    policy: RetryPolicy,
    permissions: Policy,
    metrics: Arc<Metrics>,
    /// One permit per step this worker may run at once.
    slots: Arc<Semaphore>,
    /// Deliveries waiting for a slot: a step running waiting commands gives way to them.
    queued: AtomicUsize,
    /// A sweep is running (one at a time).
    sweeping: AtomicBool,
    /// The worker is shutting down: start nothing new.
    stopping: CancellationToken,
}

impl StepEnv {
    /// A slot for one step, or `None` when the worker stops first.
    async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.queued_while(async {
            tokio::select! {
                permit = self.slots.clone().acquire_owned() => permit.ok(),
                _ = self.stopping.cancelled() => None,
            }
        })
        .await
    }

    /// Runs `wait` counted in `queued`: a step running waiting commands gives way to it.
    async fn queued_while<T>(&self, wait: impl Future<Output = T>) -> T {
        self.queued.fetch_add(1, Ordering::SeqCst);
        let done = wait.await;
        self.queued.fetch_sub(1, Ordering::SeqCst);
        done
    }
}

/// One connection's lifetime: declare, consume, handle; returns Ok only on shutdown.
async fn session(
    ctx: &JobContext,
    state: &WorkerState,
    shutdown: &CancellationToken,
) -> Result<(), MessagingError> {
    let settings = &ctx.settings;
    let connection = Arc::new(connect(&settings.rabbitmq, "crm-backup worker").await?);
    topology::declare(&connection, &settings.messaging).await?;
    let user = amqp_user(&settings.rabbitmq);
    let relays = super::relays(&user, &settings.messaging);
    let env = Arc::new(StepEnv {
        ctx: ctx.clone(),
        connection: connection.clone(),
        publisher: Publisher::open(&connection, &settings.messaging, &user).await?,
        relays,
        leases: Leases::new(&settings.rabbitmq, &settings.messaging.lease_queue_prefix),
        policy: RetryPolicy::from_settings(&settings.messaging),
        permissions: settings
            .authorization
            .policy()
            .map_err(|err| MessagingError::Topology(err.to_string()))?,
        metrics: state.metrics.clone(),
        slots: Arc::new(Semaphore::new(usize::from(settings.rabbitmq.concurrency))),
        queued: AtomicUsize::new(0),
        sweeping: AtomicBool::new(false),
        stopping: shutdown.child_token(),
    });
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(settings.rabbitmq.concurrency, BasicQosOptions::default())
        .await?;
    let queues = keyed::queues(&settings.messaging, settings.identity_file().is_some());
    let mut consumers = Vec::new();
    for queue in &queues {
        let tag = format!("crm-backup-worker-{}", uuid::Uuid::new_v4());
        let consumer = channel
            .basic_consume(
                (*queue).into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        consumers.push((tag, consumer));
    }
    let tags: Vec<String> = consumers.iter().map(|(tag, _)| tag.clone()).collect();
    let mut consumer =
        futures::stream::select_all(consumers.into_iter().map(|(_, consumer)| consumer));
    state.consuming.store(true, Ordering::SeqCst);
    tracing::info!(
        ?queues,
        concurrency = settings.rabbitmq.concurrency,
        "worker consuming"
    );

    let steps_cancel = CancellationToken::new();
    let mut steps = JoinSet::new();
    let mut count_queues_every = tokio::time::interval(settings.http.metrics_refresh.0);
    let mut sweep_tick = tokio::time::interval(SWEEP_EVERY);
    let ended = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            _ = count_queues_every.tick() => count_queues(&env).await,
            _ = sweep_tick.tick() => {
                if !env.sweeping.swap(true, Ordering::SeqCst) {
                    steps.spawn(sweep(env.clone(), steps_cancel.child_token()));
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    steps.spawn(handle(env.clone(), delivery, steps_cancel.child_token()));
                }
                Some(Err(err)) => break Err(MessagingError::from(err)),
                None => break Err(MessagingError::Broker("the broker cancelled the consumer".into())),
            },
            Some(joined) = steps.join_next(), if !steps.is_empty() => {
                if let Err(err) = joined {
                    tracing::error!(error = %err, "a step task panicked; its command will be redelivered");
                }
            }
        }
    };
    state.consuming.store(false, Ordering::SeqCst);
    env.stopping.cancel();
    match &ended {
        Ok(()) => {
            for tag in &tags {
                let _ = channel
                    .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                    .await;
            }
            let limit = settings.messaging.shutdown_timeout.0;
            tracing::info!(
                running = steps.len(),
                ?limit,
                "shutting down: letting running steps finish"
            );
            if tokio::time::timeout(limit, drain(&mut steps))
                .await
                .is_err()
            {
                tracing::warn!(
                    "steps still running at the shutdown timeout: aborting them; the broker will redeliver their commands"
                );
                steps_cancel.cancel();
                drain(&mut steps).await;
            }
        }
        Err(err) => {
            // Leases and unacked deliveries died with the connection: stop the steps,
            // their commands come back on the next connection.
            tracing::warn!(error = %err, running = steps.len(), "broker connection lost: aborting running steps");
            steps_cancel.cancel();
            drain(&mut steps).await;
        }
    }
    let _ = connection.close(200, "worker stopping".into()).await;
    ended
}

/// The dead letters and the commands waiting per target, for the metrics.
async fn count_queues(env: &StepEnv) {
    let names = &env.ctx.settings.messaging;
    match topology::depth(&env.connection, &names.dead_queue).await {
        Ok(depth) => env.metrics.set_dead_letters(depth.messages),
        Err(err) => {
            tracing::warn!(error = %err, queue = %names.dead_queue, "cannot count the dead letters")
        }
    }
    for target in TargetKind::ALL {
        let queue = topology::waiting_queue(names, target);
        if let Ok(depth) = topology::depth(&env.connection, &queue).await {
            env.metrics.set_waiting(target.as_str(), depth.messages);
        }
    }
}

async fn drain(steps: &mut JoinSet<()>) {
    while steps.join_next().await.is_some() {}
}

/// How a delivery is settled once its outcome is durable.
#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Requeue,
}
