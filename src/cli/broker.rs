//! The commands that talk to the broker: the worker, setup, enqueue and the dead letters.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::args::DlqCommand;
use super::trail::{self, Trail};
use super::{Failure, requester};
use crm_backup::config::BrokerConfig;
use crm_backup::jobs::JobContext;
use crm_backup::messaging::{
    self, client::EventSubscription, command::Command, dlq::Selection, event, publisher::Publisher,
};
use crm_backup::metrics::{WorkerState, from_storage};
use crm_backup::model::{Action, TargetSelector};

pub async fn worker(ctx: JobContext) -> Result<ExitCode, Failure> {
    let shutdown = CancellationToken::new();
    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            wait_for_signal().await;
            tracing::info!("signal received: shutting down");
            shutdown.cancel();
        }
    });
    let state = Arc::new(WorkerState::default());
    // The gauges start from storage, not from "never", and follow what CLI runs and other
    // workers do.
    let since = chrono::Utc::now() - from_storage::FIRST_LOOKBACK;
    let mut since = from_storage::refresh(&ctx.storage, &state.metrics, since).await;
    tokio::spawn({
        let (storage, metrics, shutdown) =
            (ctx.storage.clone(), state.metrics.clone(), shutdown.clone());
        let every = ctx.settings.http.metrics_refresh.0;
        async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.cancelled() => return,
                }
                since = from_storage::refresh(&storage, &metrics, since).await;
            }
        }
    });
    let listen = ctx.settings.http.listen.clone();
    if !listen.is_empty() {
        crm_backup::endpoint::serve(&listen, state.clone(), shutdown.clone()).await?;
    }
    messaging::worker::run(ctx, state, shutdown).await?;
    Ok(ExitCode::SUCCESS)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut terminate) => {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

pub async fn setup(config: &BrokerConfig, json: bool) -> Result<ExitCode, Failure> {
    let connection = messaging::connect(&config.rabbitmq, "crm-backup setup").await?;
    messaging::topology::declare(&connection, &config.messaging).await?;
    if json {
        println!(
            "{}",
            json!({"declared": true, "commands_queue": config.messaging.commands_queue,
                   "dead_queue": config.messaging.dead_queue})
        );
    } else {
        println!("RabbitMQ topology declared");
    }
    Ok(ExitCode::SUCCESS)
}

/// What `enqueue` publishes.
pub struct Enqueue {
    pub action: Action,
    pub target: TargetSelector,
    /// For restore, verify, drill: an id or `latest`.
    pub backup: Option<String>,
    pub options: serde_json::Map<String, serde_json::Value>,
    pub reason: Option<String>,
    pub id: Option<String>,
    pub wait: bool,
    pub timeout: Duration,
}

pub async fn enqueue(
    config: &BrokerConfig,
    request: &Enqueue,
    json: bool,
) -> Result<ExitCode, Failure> {
    let mut command = Command::new(request.action, request.target, &requester());
    command.options = serde_json::Value::Object(request.options.clone());
    command.backup_id = request.backup.clone();
    command.reason = request.reason.clone();
    if let Some(id) = &request.id {
        command.id = id.clone();
    }
    // The same checks the worker makes, before anything is published.
    let command = Command::parse(&command.to_json())?;
    let connection = messaging::connect(&config.rabbitmq, "crm-backup enqueue").await?;
    let user = messaging::amqp_user(&config.rabbitmq);
    let publisher = Publisher::open(&connection, &config.messaging, &user).await?;
    let mut events = if request.wait {
        Some(EventSubscription::open(&connection, &config.messaging).await?)
    } else {
        None
    };
    publisher
        .command(&command, Some(&command.id), Default::default())
        .await?;
    if json {
        println!("{}", json!({"enqueued": command}));
    } else {
        println!(
            "enqueued {} {} {} (id {})",
            command.action,
            command.target,
            command.backup_id.as_deref().unwrap_or(""),
            command.id
        );
    }
    let Some(events) = events.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    let finals = events
        .wait_for(&command, request.timeout, |event| {
            println!("{}", String::from_utf8_lossy(&event.to_json()));
        })
        .await?;
    let failed: Vec<String> = finals
        .iter()
        .filter(|e| e.event != event::COMPLETED)
        .map(|e| {
            let error = e
                .error
                .as_ref()
                .map_or("failed".to_string(), |err| err.message.clone());
            format!("{}: {error}", e.command_id)
        })
        .collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(Failure(format!("command failed: {}", failed.join("; "))))
    }
}

pub async fn dlq(
    config: &BrokerConfig,
    trail: &Trail,
    command: DlqCommand,
) -> Result<ExitCode, Failure> {
    let started = std::time::Instant::now();
    let mut record = match &command {
        DlqCommand::Replay {
            ids,
            all,
            include_restores,
            dry_run,
            ..
        } => Some(trail.record("dlq-replay", None).with_options(&json!({
            "ids": ids, "all": all, "include_restores": include_restores, "dry_run": dry_run,
        }))),
        DlqCommand::List { .. } => None,
    };
    let result = dlq_command(config, command, &mut record).await;
    if let Some(record) = record {
        trail.write(trail::finished(record, &result), started).await;
    }
    result
}

/// `dlq list` or `dlq replay`; a replay says in `record` what it replayed and skipped.
async fn dlq_command(
    config: &BrokerConfig,
    command: DlqCommand,
    record: &mut Option<crm_backup::audit::AuditRecord>,
) -> Result<ExitCode, Failure> {
    let connection = messaging::connect(&config.rabbitmq, "crm-backup dlq").await?;
    match command {
        DlqCommand::List { output } => {
            let relays =
                messaging::relays(&messaging::amqp_user(&config.rabbitmq), &config.messaging);
            let letters = messaging::dlq::list(&connection, &config.messaging, &relays).await?;
            if output.json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters in {}", config.messaging.dead_queue);
            } else {
                for letter in &letters {
                    println!(
                        "{}  {} {}  from {}  attempts {}  {}  {}",
                        letter.id,
                        letter.action.as_deref().unwrap_or("-"),
                        letter.target.as_deref().unwrap_or("-"),
                        letter.sender.as_deref().unwrap_or("(no user_id)"),
                        letter.attempts,
                        letter.failed_at.as_deref().unwrap_or("-"),
                        letter.last_error.as_deref().unwrap_or("-"),
                    );
                }
            }
        }
        DlqCommand::Replay {
            ids,
            all,
            include_restores,
            dry_run,
            output,
        } => {
            let user = messaging::amqp_user(&config.rabbitmq);
            let publisher = Publisher::open(&connection, &config.messaging, &user).await?;
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids.clone())
            };
            let permissions = config.authorization.policy()?;
            let replayed_by = requester();
            let rules = messaging::dlq::ReplayRules {
                permissions: &permissions,
                include_restores,
                replayed_by: &replayed_by,
            };
            let replayed =
                messaging::dlq::replay(&connection, &publisher, &selection, &rules, dry_run)
                    .await?;
            if let Some(record) = record.as_mut() {
                let (done, skipped): (Vec<_>, Vec<_>) =
                    replayed.iter().partition(|replay| replay.skipped.is_none());
                record.details = Some(json!({
                    "replayed": done.iter().map(|r| &r.letter.id).collect::<Vec<_>>(),
                    "skipped": skipped
                        .iter()
                        .map(|r| json!({"id": r.letter.id, "reason": r.skipped}))
                        .collect::<Vec<_>>(),
                }));
            }
            if output.json {
                println!(
                    "{}",
                    json!({"dry_run": dry_run, "replayed_by": replayed_by, "letters": replayed})
                );
            } else {
                let verb = if dry_run { "would replay" } else { "replayed" };
                for replay in &replayed {
                    let letter = &replay.letter;
                    let what = format!(
                        "{} ({} {}, from {})",
                        letter.id,
                        letter.action.as_deref().unwrap_or("-"),
                        letter.target.as_deref().unwrap_or("-"),
                        letter.sender.as_deref().unwrap_or("(no user_id)")
                    );
                    match &replay.skipped {
                        None => println!("{verb} {what}"),
                        Some(reason) => println!("skipped {what}: {reason}"),
                    }
                }
            }
            let missing: Vec<&str> = ids
                .iter()
                .filter(|id| !replayed.iter().any(|r| &r.letter.id == *id))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(Failure(format!(
                    "not in the dead letters: {}",
                    missing.join(", ")
                )));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
