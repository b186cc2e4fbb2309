//! Per-target turns. A step holds its target's lease (see `lease`), and a command that finds
//! the target busy waits in `backup.waiting.<target>` instead of spinning through the retry
//! tiers. The step holding the target runs the waiting commands next, under the same lease,
//! one after another while no delivery waits for one of the worker's slots (always at least
//! one, so nothing waits behind a busy queue for ever), and looks at the queue again once it
//! lets go. Twice a second a sweep takes any target whose commands wait and whose lease is
//! free (its holder died, or let go just before a command was parked). A step whose target
//! another step of the same worker holds waits for it instead. A worker runs at most
//! `rabbitmq.concurrency` steps at once, whichever queue they come from.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions};
use tokio_util::sync::CancellationToken;

use crate::messaging::lease::Lease;
use crate::messaging::topology;
use crate::model::TargetKind;

use super::delivery::process;
use super::{Settle, StepEnv};

/// The lease a delivery's step holds when it settles, handed from the step to what runs
/// after it (and, for a waiting command, the lease its step is to use).
pub(super) type HeldLease = Arc<Mutex<Option<Lease>>>;

pub(super) fn held_lease(held: &HeldLease) -> std::sync::MutexGuard<'_, Option<Lease>> {
    held.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The held lease, if it is on `target` (any target for `None`).
pub(super) fn take_lease(held: &HeldLease, target: Option<TargetKind>) -> Option<Lease> {
    let mut lease = held_lease(held);
    match lease.as_ref() {
        Some(on) if target.is_none_or(|target| on.target() == target) => lease.take(),
        _ => None,
    }
}

/// One delivery of the consumed queues: waits for a slot, runs it, then the commands that
/// wait for the target it leased.
pub(super) async fn handle(env: Arc<StepEnv>, delivery: Delivery, cancel: CancellationToken) {
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
pub(super) async fn sweep(env: Arc<StepEnv>, cancel: CancellationToken) {
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
