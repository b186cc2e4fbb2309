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
//! Dispatch per target: a step holds its target's lease (see `lease`), and a command that
//! finds the target busy waits in `backup.waiting.<target>` instead of spinning through the
//! retry tiers. The step holding the target runs the waiting commands next, under the same
//! lease, one after another while no delivery waits for one of the worker's slots (always at
//! least one, so nothing waits behind a busy queue for ever), and looks at the queue again
//! once it lets go. Twice a second a sweep takes any target whose commands wait and whose
//! lease is free (its holder died, or let go just before a command was parked). A step whose
//! target another step of the same worker holds waits for it instead. A worker runs at most
//! `rabbitmq.concurrency` steps at once, whichever queue they come from.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions,
};
use lapin::types::FieldTable;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::command::Command;
use super::dispatch::{StepOutcome, prune_step, run_step};
use super::event::{self, Event, EventError};
use super::keyed::{self, HandOverError};
use super::lease::{Lease, Leases};
use super::publisher::Publisher;
use super::retry::{Decision, RetryPolicy};
use super::{
    MessagingError, RECONNECT_MAX_PAUSE, amqp_user, connect, headers, reconnect_backoff, topology,
};
use crate::audit::{self, AuditRecord, Origin, Outcome};
use crate::authorization::{Policy, Request};
use crate::jobs::{JobContext, JobError};
use crate::metrics::{BackupFacts, Metrics, WorkerState};
use crate::model::TargetKind;
use crate::model::{Action, TargetSelector};
use crate::progress;
use crate::storage::catalog;
use crate::storage::layout::command_marker_key;
use backon::BackoffBuilder;

/// `x-last-error` is cut to this many characters.
const MAX_ERROR_HEADER: usize = 1000;

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

/// The lease a delivery's step holds when it settles, handed from the step to what runs
/// after it (and, for a waiting command, the lease its step is to use).
type HeldLease = Arc<Mutex<Option<Lease>>>;

fn held_lease(held: &HeldLease) -> std::sync::MutexGuard<'_, Option<Lease>> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The held lease, if it is on `target` (any target for `None`).
fn take_lease(held: &HeldLease, target: Option<TargetKind>) -> Option<Lease> {
    let mut lease = held_lease(held);
    match lease.as_ref() {
        Some(on) if target.is_none_or(|target| on.target() == target) => lease.take(),
        _ => None,
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

/// Sets the dead-letter gauge to the depth of `queue`.
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

/// One delivery of the consumed queues: waits for a slot, runs it, then the commands that
/// wait for the target it leased.
async fn handle(env: Arc<StepEnv>, delivery: Delivery, cancel: CancellationToken) {
    let Some(_slot) = env.slot().await else {
        // Shutting down before it started: back to the queue.
        let _ = delivery
            .nack(BasicNackOptions {
                requeue: true,
                ..BasicNackOptions::default()
            })
            .await;
        return;
    };
    let held = HeldLease::default();
    settle_one(&env, delivery, &cancel, &held).await;
    if let Some(lease) = take_lease(&held, None) {
        run_waiting(&env, lease, &cancel).await;
    }
}

/// Every few seconds: the targets with waiting commands whose lease nobody holds.
async fn sweep(env: Arc<StepEnv>, cancel: CancellationToken) {
    for target in TargetKind::ALL {
        if env.stopping.is_cancelled() {
            break;
        }
        let names = &env.ctx.settings.messaging;
        let queue = topology::waiting_queue(names, target);
        match topology::depth(&env.connection, &queue).await {
            Ok(depth) if depth.messages > 0 => {}
            Ok(_) => continue,
            Err(err) => {
                // Deleted under the worker? Declare it again rather than fail every sweep.
                tracing::warn!(error = %err, %queue, "cannot look at a waiting queue; declaring the topology again");
                if let Err(err) = topology::declare(&env.connection, names).await {
                    tracing::warn!(error = %err, "declaring the topology failed");
                }
                break;
            }
        }
        let Some(_slot) = env.slot().await else { break };
        if let Ok(Some(lease)) = env.leases.try_acquire(target, false).await {
            run_waiting(&env, lease, &cancel).await;
        }
    }
    env.sweeping.store(false, Ordering::SeqCst);
}

/// Runs the commands waiting for `lease`'s target, oldest first, under that lease: at least
/// one, then more while no delivery waits for a slot. Releases the lease at the end, then
/// looks once more: a command parked while the lease was being let go found it taken, and
/// whoever holds the target next must run it.
async fn run_waiting(env: &Arc<StepEnv>, lease: Lease, cancel: &CancellationToken) {
    let target = lease.target();
    let queue = topology::waiting_queue(&env.ctx.settings.messaging, target);
    let mut next = Some(lease);
    while let Some(lease) = next.take() {
        take_waiting(env, lease, &queue, cancel).await;
        if env.stopping.is_cancelled() || env.queued.load(Ordering::SeqCst) > 0 {
            break;
        }
        match topology::depth(&env.connection, &queue).await {
            Ok(depth) if depth.messages > 0 => {}
            _ => break,
        }
        next = env.leases.try_acquire(target, false).await.ok().flatten();
    }
}

/// One turn of [`run_waiting`]: takes waiting commands from `queue` under `lease`, and
/// releases it.
async fn take_waiting(env: &Arc<StepEnv>, lease: Lease, queue: &str, cancel: &CancellationToken) {
    let held = HeldLease::new(Mutex::new(Some(lease)));
    let Ok(channel) = env.connection.create_channel().await else {
        return;
    };
    let mut ran = 0;
    loop {
        let leased = held_lease(&held)
            .as_ref()
            .is_some_and(|lease| !lease.lost().is_cancelled());
        if !leased
            || env.stopping.is_cancelled()
            || (ran > 0 && env.queued.load(Ordering::SeqCst) > 0)
        {
            break;
        }
        let delivery = match channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
        {
            Ok(Some(message)) => message.delivery,
            Ok(None) => break,
            Err(err) => {
                tracing::warn!(error = %err, %queue, "could not take a waiting command");
                break;
            }
        };
        ran += 1;
        if let Settle::Requeue = settle_one(env, delivery, cancel, &held).await {
            break;
        }
    }
    if let Some(lease) = take_lease(&held, None) {
        lease.release().await;
    }
    let _ = channel.close(200, "waiting commands taken".into()).await;
}

/// Runs one delivery and settles it; returns how.
async fn settle_one(
    env: &Arc<StepEnv>,
    delivery: Delivery,
    cancel: &CancellationToken,
    held: &HeldLease,
) -> Settle {
    let delivery = Arc::new(delivery);
    // A panic inside a step must not strand its delivery unacked: requeue it, and let
    // the quorum queue's delivery limit stop a message that keeps failing this way.
    let processed = tokio::spawn({
        let (env, delivery, cancel, held) =
            (env.clone(), delivery.clone(), cancel.clone(), held.clone());
        async move { process(&env, &delivery, &cancel, &held).await }
    })
    .await;
    let settle = match processed {
        Ok(Ok(settle)) => settle,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "could not make the outcome durable; the command goes back to the queue");
            Settle::Requeue
        }
        Err(err) => {
            tracing::error!(error = %err, "a step panicked; the command goes back to the queue");
            Settle::Requeue
        }
    };
    let settled = match settle {
        Settle::Ack => delivery.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            delivery
                .nack(BasicNackOptions {
                    requeue: true,
                    ..BasicNackOptions::default()
                })
                .await
        }
    };
    if let Err(err) = settled {
        tracing::warn!(error = %err, "could not settle a delivery; the broker will redeliver it");
    }
    settle
}

/// Facts about the delivery every outcome needs.
struct Received<'a> {
    delivery: &'a Delivery,
    attempt: u32,
    correlation_id: Option<String>,
    /// Who the command is checked as (see [`headers::sender`]).
    sender: Option<String>,
}

impl Received<'_> {
    fn event(&self, name: &str, command_id: &str, command: Option<&Command>) -> Event {
        let mut event = Event::new(name, command_id, self.attempt);
        event.correlation_id = self.correlation_id.clone();
        if let Some(command) = command {
            event.action = Some(command.action.to_string());
            event.target = Some(command.target.to_string());
            event.set_id = command.set_id.clone();
            event.requested_by = Some(command.requested_by.clone());
        }
        event
    }
}

async fn process(
    env: &StepEnv,
    delivery: &Delivery,
    cancel: &CancellationToken,
    held: &HeldLease,
) -> Result<Settle, MessagingError> {
    let received = Received {
        delivery,
        attempt: headers::attempt(&delivery.properties),
        correlation_id: delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_string()),
        sender: headers::sender(&delivery.properties, &env.relays),
    };
    let command = match Command::parse(&delivery.data) {
        Ok(command) => command,
        Err(err) => {
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map_or("unknown".to_string(), |id| id.as_str().to_string());
            let mut failed = received.event(event::FAILED, &id, None);
            (failed.action, failed.target) = loose_action_target(&delivery.data);
            audit_refusal(env, &received, &failed, None, err.kind(), &err.to_string()).await;
            return dead_letter(env, &received, failed, err.kind(), &err.to_string(), false).await;
        }
    };
    if let Err((kind, message)) = authorize(env, &received, &command) {
        let failed = received.event(event::FAILED, &command.id, Some(&command));
        audit_refusal(env, &received, &failed, Some(&command), kind, &message).await;
        return dead_letter(env, &received, failed, kind, &message, false).await;
    }
    if let Some(settle) = announce_if_done(env, &received, &command).await? {
        return Ok(settle);
    }
    if let Some(message) = past_delivery_limit(
        &delivery.properties,
        env.ctx.settings.messaging.delivery_limit,
    ) {
        let failed = received.event(event::FAILED, &command.id, Some(&command));
        return dead_letter(env, &received, failed, "delivery_limit", &message, false).await;
    }
    match command.target {
        TargetSelector::All if command.action != Action::Prune => {
            fan_out(env, &received, &command).await
        }
        TargetSelector::All => step(env, &received, &command, None, cancel, held).await,
        TargetSelector::One(target) => {
            step(env, &received, &command, Some(target), cancel, held).await
        }
    }
}

/// The quorum queue dead-letters a delivery returned more than `limit` times (each worker
/// running it died or lost the broker) without a word to the requester. The last delivery it
/// allows is therefore dead-lettered here, with its `backup.failed` event: the reason, when
/// this delivery is that one.
fn past_delivery_limit(properties: &lapin::BasicProperties, limit: u32) -> Option<String> {
    let returned = headers::int(properties, headers::DELIVERY_COUNT).unwrap_or(0);
    (returned >= i64::from(limit)).then(|| {
        format!(
            "delivered {} times without finishing: each worker running it died or lost the \
             broker (messaging.delivery_limit is {limit})",
            returned + 1
        )
    })
}

/// Whether the command's sender may make it (and its options are valid where it runs):
/// `Err((kind, message))` for the dead letter.
fn authorize(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<(), (&'static str, String)> {
    let in_place = match (command.action, command.target) {
        (Action::Restore, TargetSelector::One(kind)) => env
            .ctx
            .targets
            .get(kind)
            .and_then(|target| target.check_restore(&command.options))
            .map_err(|err| (err.kind(), err.to_string()))?,
        _ => false,
    };
    let request = Request {
        action: command.action,
        target: command.target,
        in_place,
        scoped: command.action == Action::Backup && command.changes_what_a_backup_is(),
    };
    env.permissions
        .check(received.sender.as_deref(), &request)
        .map_err(|refusal| ("unauthorized", refusal.to_string()))
}

/// A command whose marker exists is done: re-announce its result instead of running it. A
/// marker of a different command under the same id (another action, target, options, backup
/// or sender) refuses this one: an id cannot be claimed in advance by a cheaper command.
async fn announce_if_done(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Option<Settle>, MessagingError> {
    match read_marker(env, &command.id).await {
        Ok(Some(marker))
            if marker
                .command_digest
                .as_deref()
                .is_some_and(|digest| digest != command.digest(received.sender.as_deref())) =>
        {
            let failed = received.event(event::FAILED, &command.id, Some(command));
            let message = format!(
                "command id `{}` was already used by a different command (another action, \
                 target, options, backup or sender)",
                command.id
            );
            audit_refusal(
                env,
                received,
                &failed,
                Some(command),
                "id_conflict",
                &message,
            )
            .await;
            dead_letter(env, received, failed, "id_conflict", &message, false)
                .await
                .map(Some)
        }
        Ok(Some(_))
            if headers::flag(&received.delivery.properties, headers::COPY)
                && !received.delivery.redelivered =>
        {
            tracing::info!(command_id = %command.id, "a copy of a command already done: acked without announcing it again");
            Ok(Some(Settle::Ack))
        }
        Ok(Some(Marker {
            event: mut done, ..
        })) => {
            tracing::info!(command_id = %command.id, "command already done: re-announcing its result");
            done.correlation_id = received.correlation_id.clone().or(done.correlation_id);
            done.at = Utc::now();
            env.publisher.event(&done).await?;
            Ok(Some(Settle::Ack))
        }
        Ok(None) => Ok(None),
        Err(err) => fail(env, received, command, &err).await.map(Some),
    }
}

/// `all`: one step command per enabled target, sharing the parent's id as `set_id`.
/// The started event, naming the steps, goes out first: whoever follows the parent
/// then knows every step before any of them can report.
async fn fan_out(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Settle, MessagingError> {
    let steps: Vec<Command> = env
        .ctx
        .targets
        .enabled()
        .into_iter()
        .map(|target| command.step_for(target))
        .collect();
    let mut started = received.event(event::STARTED, &command.id, Some(command));
    started.set_id = Some(command.id.clone());
    started.details = Some(serde_json::json!({
        "steps": steps.iter().map(|step| step.id.clone()).collect::<Vec<_>>(),
    }));
    env.publisher.event(&started).await?;
    let mut sender = FieldTable::default();
    headers::set_text(
        &mut sender,
        headers::SENDER,
        received.sender.as_deref().unwrap_or_default(),
    );
    for step in &steps {
        env.publisher
            .command(step, received.correlation_id.as_deref(), sender.clone())
            .await?;
    }
    tracing::info!(command_id = %command.id, steps = steps.len(), "fanned out");
    Ok(Settle::Ack)
}

/// Runs one step under the target's lease: the one `held` for it, or a new one. The lease
/// stays in `held` afterwards, for the waiting commands.
async fn step(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: Option<TargetKind>,
    cancel: &CancellationToken,
    held: &HeldLease,
) -> Result<Settle, MessagingError> {
    let settings = &env.ctx.settings;
    if keyed::hands_over(
        command.action,
        !settings.pipeline.age_recipients.is_empty(),
        settings.identity_file().is_some(),
    ) {
        return hand_over(env, received, command).await;
    }
    let lease = match target {
        Some(target) => match take_lease(held, Some(target)) {
            Some(lease) => Some(lease),
            None => {
                // A step of this worker on the target: wait for it here, counted as waiting
                // for a slot so that it gives way after its current command.
                match env
                    .queued_while(env.leases.try_acquire(target, true))
                    .await?
                {
                    Some(lease) => Some(lease),
                    None => return busy(env, received, command, target).await,
                }
            }
        },
        None => None,
    };
    // The step stops if the worker shuts down or the lease's connection is lost.
    let step_cancel = cancel.child_token();
    if let Some(lease) = &lease {
        let lost = lease.lost().clone();
        let step_cancel = step_cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = lost.cancelled() => step_cancel.cancel(),
                _ = step_cancel.cancelled() => {}
            }
        });
    }
    let settle = run_leased(env, received, command, target, &step_cancel).await;
    step_cancel.cancel();
    if let Some(lease) = lease {
        // Released once the delivery is settled: a worker that dies before its ack leaves
        // the target to nobody else while the outcome is not yet settled.
        *held_lease(held) = Some(lease);
    }
    settle
}

async fn run_leased(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: Option<TargetKind>,
    cancel: &CancellationToken,
) -> Result<Settle, MessagingError> {
    // A duplicate may have waited for the lease while its twin ran: check again.
    if let Some(settle) = announce_if_done(env, received, command).await? {
        return Ok(settle);
    }
    // A crash between the manifest and the marker must not make a second backup.
    if let (true, Some(target), Action::Backup) =
        (received.delivery.redelivered, target, command.action)
        && let Ok(listing) = catalog::list(&env.ctx.storage, target).await
        && let Some(manifest) = listing
            .manifests
            .iter()
            .find(|m| m.command_id.as_deref() == Some(command.id.as_str()))
    {
        tracing::info!(command_id = %command.id, backup_id = %manifest.id, "redelivered command already has its backup");
        let outcome = StepOutcome::of_manifest(&env.ctx, manifest);
        return complete(env, received, command, outcome, Duration::ZERO).await;
    }
    env.publisher
        .event(&received.event(event::STARTED, &command.id, Some(command)))
        .await?;
    let started = Instant::now();
    env.metrics.step_started();
    let result = match target {
        Some(target) => {
            let tracker = progress::Tracker::start(command.action, target, None);
            let metrics = env.metrics.clone();
            let report = move |tracker: &progress::Tracker| {
                progress::log(tracker);
                metrics.set_step_bytes(
                    tracker.action.as_str(),
                    tracker.target.as_str(),
                    tracker.done(),
                );
            };
            let ticker = progress::Ticker::start(
                tracker,
                env.ctx.settings.pipeline.progress_every.0,
                report,
            );
            let result = run_step(&env.ctx, command, target, cancel).await;
            // No report may land after the gauge is back at 0.
            ticker.stop().await;
            env.metrics
                .set_step_bytes(command.action.as_str(), target.as_str(), 0);
            result
        }
        // Only prune runs `all` as one step; every other action fans out per target.
        None => prune_step(&env.ctx, command, TargetKind::ALL.to_vec()).await,
    };
    audit::write(
        &env.ctx.storage,
        &step_record(received, command, &result, started.elapsed()),
    )
    .await;
    let outcome = match &result {
        Ok(_) => "completed",
        Err(JobError::Cancelled) => "cancelled",
        Err(_) => "failed",
    };
    env.metrics.step_finished(
        command.action.as_str(),
        &command.target.to_string(),
        outcome,
        started.elapsed(),
        result
            .as_ref()
            .ok()
            .and_then(|outcome| {
                Some(BackupFacts {
                    raw_bytes: outcome.raw_size_bytes?,
                    stored_bytes: outcome.size_bytes?,
                    warnings: outcome.warnings.clone(),
                })
            })
            .as_ref(),
    );
    match result {
        Ok(outcome) => complete(env, received, command, outcome, started.elapsed()).await,
        Err(JobError::Cancelled) => Ok(Settle::Requeue),
        Err(err) => fail(env, received, command, &err).await,
    }
}

/// Passes a command this worker cannot decrypt for to the key-holding workers.
async fn hand_over(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
) -> Result<Settle, MessagingError> {
    match keyed::hand_over(
        &env.connection,
        &env.publisher,
        command.action,
        &received.delivery.data,
        &received.delivery.properties,
        relayed_headers(received),
    )
    .await
    {
        Ok(()) => {
            tracing::info!(command_id = %command.id, action = %command.action, "handed over to the key-holding workers");
            Ok(Settle::Ack)
        }
        Err(HandOverError::Broker(err)) => Err(err),
        Err(err @ HandOverError::NoKeyholder { .. }) => {
            fail_as(
                env,
                received,
                command,
                "no_keyholder",
                &err.to_string(),
                true,
            )
            .await
        }
    }
}

/// Marker first, then the confirmed event: a redelivery then finds the marker.
async fn complete(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    outcome: StepOutcome,
    elapsed: Duration,
) -> Result<Settle, MessagingError> {
    let mut done = received.event(event::COMPLETED, &command.id, Some(command));
    done.backup_id = outcome.backup_id;
    done.set_id = outcome.set_id.or(done.set_id);
    done.size_bytes = outcome.size_bytes;
    done.raw_size_bytes = outcome.raw_size_bytes;
    done.sha256 = outcome.sha256;
    done.location = outcome.location;
    done.details = outcome.details;
    done.warnings = (command.action == Action::Backup && !outcome.warnings.is_empty())
        .then_some(outcome.warnings);
    done.duration_ms = Some(elapsed.as_millis() as u64);
    let marker = command_marker_key(&command.id);
    let body = Marker {
        event: done.clone(),
        command_digest: Some(command.digest(received.sender.as_deref())),
    };
    if let Err(err) = env
        .ctx
        .storage
        .put_bytes(
            &marker,
            bytes::Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
        )
        .await
    {
        return Err(MessagingError::Broker(format!(
            "writing the command marker {marker} failed: {err}"
        )));
    }
    env.publisher.event(&done).await?;
    Ok(Settle::Ack)
}

/// A failed step: retry tier or dead letter, by the error's class and the attempt count.
async fn fail(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    err: &JobError,
) -> Result<Settle, MessagingError> {
    fail_as(
        env,
        received,
        command,
        err.kind(),
        &err.to_string(),
        err.retryable(),
    )
    .await
}

async fn fail_as(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    kind: &str,
    message: &str,
    retryable: bool,
) -> Result<Settle, MessagingError> {
    let failed = received.event(event::FAILED, &command.id, Some(command));
    match env
        .policy
        .after_failure(received.attempt, retryable, rand::random::<f64>())
    {
        Decision::DeadLetter => dead_letter(env, received, failed, kind, message, retryable).await,
        Decision::Retry {
            tier,
            next_attempt,
            expiration,
        } => {
            let headers = failure_headers(received, next_attempt, kind, message);
            let queue = to_tier(env, received, tier, expiration, headers).await?;
            announce_failure(env, failed, kind, message, true, true).await;
            tracing::info!(command_id = %command.id, attempt = received.attempt, %queue, "will retry");
            Ok(Settle::Ack)
        }
    }
}

/// Copies the delivery into retry tier `tier`; returns the queue's name.
async fn to_tier(
    env: &StepEnv,
    received: &Received<'_>,
    tier: usize,
    expiration: Duration,
    headers: FieldTable,
) -> Result<String, MessagingError> {
    let queue = env
        .policy
        .queue_name(&env.publisher.names().retry_queue_prefix, tier);
    env.publisher
        .to_retry_queue(
            &queue,
            &received.delivery.data,
            &received.delivery.properties,
            headers,
            expiration.as_millis(),
        )
        .await?;
    Ok(queue)
}

/// The target is busy with another step: wait for it in its waiting queue, attempt
/// unchanged. A command that needs the age identity, where backups are encrypted, waits in
/// the first retry tier instead: a worker without the identity may be the one holding the
/// target, and could only hand it back.
async fn busy(
    env: &StepEnv,
    received: &Received<'_>,
    command: &Command,
    target: TargetKind,
) -> Result<Settle, MessagingError> {
    let encrypts = !env.ctx.settings.pipeline.age_recipients.is_empty();
    if !keyed::hands_over(command.action, encrypts, false) {
        let queue = topology::waiting_queue(&env.ctx.settings.messaging, target);
        env.publisher
            .to_queue(
                &queue,
                &received.delivery.data,
                &received.delivery.properties,
                relayed_headers(received),
            )
            .await?;
        tracing::info!(command_id = %command.id, %queue, "target busy: waiting");
        return Ok(Settle::Ack);
    }
    let Decision::Retry {
        tier,
        next_attempt,
        expiration,
    } = env
        .policy
        .when_busy(received.attempt, rand::random::<f64>())
    else {
        unreachable!("when_busy always retries");
    };
    let mut headers = relayed_headers(received);
    headers::set_int(&mut headers, headers::ATTEMPT, i64::from(next_attempt));
    let queue = to_tier(env, received, tier, expiration, headers).await?;
    tracing::info!(command_id = %command.id, %queue, "target busy: delayed");
    Ok(Settle::Ack)
}

async fn dead_letter(
    env: &StepEnv,
    received: &Received<'_>,
    failed: Event,
    kind: &str,
    message: &str,
    retryable: bool,
) -> Result<Settle, MessagingError> {
    let headers = failure_headers(received, received.attempt, kind, message);
    env.publisher
        .to_dead_letters(
            &received.delivery.data,
            &received.delivery.properties,
            headers,
        )
        .await?;
    announce_failure(env, failed, kind, message, retryable, false).await;
    env.metrics.dead_lettered(kind);
    tracing::warn!(command_id = %failed_id(received), kind, message, "dead-lettered");
    Ok(Settle::Ack)
}

fn failed_id(received: &Received<'_>) -> String {
    received
        .delivery
        .properties
        .message_id()
        .as_ref()
        .map_or_else(String::new, |id| id.as_str().to_string())
}

/// The failed event is published after the copy is safe; losing it loses no command.
async fn announce_failure(
    env: &StepEnv,
    mut failed: Event,
    kind: &str,
    message: &str,
    retryable: bool,
    will_retry: bool,
) {
    failed.error = Some(EventError {
        kind: kind.to_string(),
        message: message.to_string(),
        retryable,
    });
    failed.will_retry = Some(will_retry);
    if let Err(err) = env.publisher.event(&failed).await {
        tracing::warn!(error = %err, command_id = %failed.command_id, "could not publish backup.failed");
    }
}

/// The headers of a copy the worker publishes: the delivery's, with the sender it was
/// checked as (whatever a sender header from outside said).
fn relayed_headers(received: &Received<'_>) -> FieldTable {
    // The count is of the queue the delivery came from; the copy starts its own.
    let mut table = headers::without(
        &headers::copy(&received.delivery.properties),
        headers::DELIVERY_COUNT,
    );
    headers::set_text(
        &mut table,
        headers::SENDER,
        received.sender.as_deref().unwrap_or_default(),
    );
    headers::set_bool(&mut table, headers::COPY, true);
    table
}

fn failure_headers(received: &Received<'_>, attempt: u32, kind: &str, message: &str) -> FieldTable {
    let mut table = relayed_headers(received);
    let message: String = message.chars().take(MAX_ERROR_HEADER).collect();
    headers::set_int(&mut table, headers::ATTEMPT, i64::from(attempt));
    headers::set_text(&mut table, headers::LAST_ERROR, &message);
    headers::set_text(&mut table, headers::ERROR_KIND, kind);
    headers::set_text(&mut table, headers::FAILED_AT, &Utc::now().to_rfc3339());
    headers::set_text(
        &mut table,
        headers::ORIGINAL_ROUTING_KEY,
        received.delivery.routing_key.as_str(),
    );
    table
}

/// What `commands/<id>.json` holds: the completed event, and the digest of the command that
/// completed (absent in markers written before digests were).
#[derive(serde::Serialize, serde::Deserialize)]
struct Marker {
    event: Event,
    command_digest: Option<String>,
}

async fn read_marker(env: &StepEnv, command_id: &str) -> Result<Option<Marker>, JobError> {
    match env
        .ctx
        .storage
        .get_bytes(&command_marker_key(command_id))
        .await
    {
        Ok(bytes) => Ok(serde_json::from_slice::<Marker>(&bytes).ok().or_else(|| {
            let event = serde_json::from_slice::<Event>(&bytes).ok()?;
            Some(Marker {
                event,
                command_digest: None,
            })
        })),
        Err(crate::storage::StorageError::NotFound { .. }) => Ok(None),
        Err(err) => Err(err.into()),
    }
}

/// `action` and `target` of a message that is not a valid command, when they can be read.
fn loose_action_target(body: &[u8]) -> (Option<String>, Option<String>) {
    let value: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let field = |name: &str| value.get(name).and_then(|v| v.as_str()).map(String::from);
    (field("action"), field("target"))
}

/// The audit record of a step that ran.
fn step_record(
    received: &Received<'_>,
    command: &Command,
    result: &Result<StepOutcome, JobError>,
    elapsed: Duration,
) -> AuditRecord {
    let mut record = command_record(received, command);
    record.duration_ms = elapsed.as_millis() as u64;
    match result {
        Ok(outcome) => {
            record.backup_id = outcome.backup_id.clone().or(record.backup_id);
            record.stored_bytes = outcome.size_bytes;
            record.raw_bytes = outcome.raw_size_bytes;
            // Where a restore went is what its record is for; reports too large are left
            // to the event.
            record.details = outcome.details.clone().filter(|details| {
                command.action == Action::Restore && details.to_string().len() <= 16 * 1024
            });
            if !outcome.warnings.is_empty() {
                record.details = Some(serde_json::json!({"warnings": outcome.warnings}));
            }
            record
        }
        Err(JobError::Cancelled) => record.failed(
            Outcome::Cancelled,
            "cancelled",
            "cancelled before it finished: it runs again",
        ),
        Err(err) => record.failed(Outcome::Failed, err.kind(), &err.to_string()),
    }
}

/// A record of `command` as received: who sent it, what it asks for.
fn command_record(received: &Received<'_>, command: &Command) -> AuditRecord {
    let mut record = AuditRecord::new(
        Origin::Worker,
        received.sender.as_deref().unwrap_or_default(),
        &command.requested_by,
        command.action.as_str(),
    )
    .with_options(&command.options);
    record.target = Some(command.target.to_string());
    record.command_id = Some(command.id.clone());
    record.backup_id = command.backup_id.clone();
    record.attempt = Some(received.attempt);
    record
}

/// The audit record of a command that was not run: not valid, not authorized, or its id
/// taken by another command.
async fn audit_refusal(
    env: &StepEnv,
    received: &Received<'_>,
    failed: &Event,
    command: Option<&Command>,
    kind: &str,
    message: &str,
) {
    let record = match command {
        Some(command) => command_record(received, command),
        None => {
            let mut record = AuditRecord::new(
                Origin::Worker,
                received.sender.as_deref().unwrap_or_default(),
                "",
                &failed
                    .action
                    .as_deref()
                    .unwrap_or("unknown")
                    .chars()
                    .take(64)
                    .collect::<String>(),
            );
            // As the message said them: cut to a sane length.
            record.target = failed.target.as_ref().map(|t| t.chars().take(64).collect());
            record.command_id = Some(failed.command_id.clone()).filter(|id| !id.is_empty());
            record.attempt = Some(received.attempt);
            record
        }
    };
    audit::write(
        &env.ctx.storage,
        &record.failed(Outcome::Refused, kind, message),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, FieldTable};

    use super::*;

    fn returned(times: Option<i64>) -> lapin::BasicProperties {
        let mut headers = FieldTable::default();
        if let Some(times) = times {
            headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(times));
        }
        lapin::BasicProperties::default().with_headers(headers)
    }

    #[test]
    fn the_last_delivery_the_broker_allows_is_dead_lettered_by_the_worker() {
        assert_eq!(past_delivery_limit(&returned(None), 5), None);
        assert_eq!(past_delivery_limit(&returned(Some(4)), 5), None);
        let reason = past_delivery_limit(&returned(Some(5)), 5).unwrap();
        assert!(reason.contains("delivered 6 times"), "{reason}");
        assert!(past_delivery_limit(&returned(Some(9)), 5).is_some());
    }
}
