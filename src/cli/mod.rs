//! The operator CLI: `args` (the grammar), `backups` (run, list, show, restore, verify,
//! drill, prune, history: the commands that need storage), `broker` (worker, setup, enqueue,
//! dlq), `output` (how results print), `trail` (the audit record of each operation).
//!
//! Exit status 0 means success; anything else failed, with a one-line reason on stderr.

mod args;
mod backups;
mod broker;
mod output;
mod progress;
mod trail;

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use args::{Cli, Command, OptionArgs};
use crm_backup::config::Settings;
use crm_backup::jobs::JobContext;
use crm_backup::model::{Action, TargetKind, TargetSelector};
use crm_backup::telemetry;

/// A CLI failure: printed as one line, exit status 1.
pub struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(err.to_string())
    }
}

pub fn main() -> ExitCode {
    crm_backup::return_large_frees();
    let cli = Cli::parse();
    // Operator commands print their results on stdout; logs only for warnings. lapin logs a
    // channel the broker closed as an error, which the command's own error already says.
    telemetry::init(if matches!(cli.command, Command::Worker) {
        "info"
    } else {
        "warn,lapin=off"
    });
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    let env: HashMap<String, String> = std::env::vars().collect();
    // The broker-only commands read the broker's settings and nothing else.
    match command {
        Command::Setup { output } => {
            let config = Settings::broker(&env)?;
            let trail = broker_trail(&config);
            let started = Instant::now();
            let result = broker::setup(&config, output.json).await;
            trail
                .write(
                    trail::finished(trail.record("setup", None), &result),
                    started,
                )
                .await;
            return result;
        }
        Command::History {
            target,
            since,
            limit,
            output,
        } => {
            let storage = crm_backup::storage::Storage::open(&Settings::storage(&env)?)?;
            let since = crm_backup::config::parse_duration(&since).map_err(Failure)?;
            return backups::history(&storage, target.selector(), since, limit, output.json).await;
        }
        Command::Enqueue {
            action,
            target,
            backup,
            options,
            reason,
            id,
            wait,
            timeout,
            output,
        } => {
            let action = Action::from(action);
            let target = target
                .selector()
                .ok_or_else(|| Failure("say which target (or all)".into()))?;
            let request = broker::Enqueue {
                action,
                target,
                backup: (action != Action::Backup && action != Action::Prune)
                    .then_some(backup.backup),
                options: typed_options(action, target, &options)?,
                reason,
                // Known before it is published, for the audit record.
                id: Some(id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string())),
                wait,
                timeout: crm_backup::config::parse_duration(&timeout).map_err(Failure)?,
            };
            let config = Settings::broker(&env)?;
            let trail = broker_trail(&config);
            let started = Instant::now();
            let mut record = trail
                .record("enqueue", Some(&target.to_string()))
                .with_options(&serde_json::Value::Object(request.options.clone()));
            record.command_id = request.id.clone();
            record.backup_id = request.backup.clone();
            record.details = Some(json!({"action": action.as_str()}));
            let result = broker::enqueue(&config, &request, output.json).await;
            trail.write(trail::finished(record, &result), started).await;
            return result;
        }
        Command::Dlq { command } => {
            let config = Settings::broker(&env)?;
            return broker::dlq(&config, &broker_trail(&config), command).await;
        }
        _ => {}
    }
    let settings = Settings::load(&env)?;
    if let Some(bits) = settings.storage.umask_bits() {
        rustix::process::umask(rustix::fs::Mode::from_bits_truncate(bits));
    }
    let ctx = JobContext::new(settings)?;
    let trail = trail::Trail::new(Some(ctx.storage.clone()))
        .with_events(&ctx.settings.rabbitmq, &ctx.settings.messaging);
    let result = storage_command(&ctx, &trail, command).await;
    trail.close().await;
    result
}

/// The commands that work on storage (and the worker).
async fn storage_command(
    ctx: &JobContext,
    trail: &trail::Trail,
    command: Command,
) -> Result<ExitCode, Failure> {
    match command {
        Command::Worker => broker::worker(ctx.clone()).await,
        Command::Run {
            target,
            schemas,
            exclude_schemas,
            globals,
            options,
            reason,
            output,
        } => {
            let target = target
                .selector()
                .ok_or_else(|| Failure("say which target to back up (or all)".into()))?;
            let mut options = typed_options(Action::Backup, target, &options)?;
            let flags = [
                ("schemas", (!schemas.is_empty()).then(|| json!(schemas))),
                (
                    "exclude_schemas",
                    (!exclude_schemas.is_empty()).then(|| json!(exclude_schemas)),
                ),
                ("globals", globals.then_some(json!(true))),
            ];
            for (name, value) in flags {
                if let Some(value) = value {
                    // With `all`, PostgreSQL's own flags go to PostgreSQL.
                    let key = match target {
                        TargetSelector::All => format!("{}.{name}", TargetKind::Postgres),
                        TargetSelector::One(_) => name.to_string(),
                    };
                    options.insert(key, value);
                }
            }
            backups::run(ctx, trail, target, options, reason, output.json).await
        }
        Command::List { target, output } => {
            backups::list(ctx, target.selector(), output.json).await
        }
        Command::Show {
            target,
            backup,
            output,
        } => backups::show(ctx, target.selector(), &backup.backup, output.json).await,
        Command::Restore {
            target,
            backup,
            into,
            in_place,
            yes,
            no_owner,
            options,
            output,
        } => {
            // The target of the options: named, or the one the backup id names.
            let selector = target.selector().or_else(|| {
                let id: crm_backup::model::BackupId = backup.backup.parse().ok()?;
                Some(TargetSelector::One(id.target()))
            });
            let mut restore = typed_options(
                Action::Restore,
                selector.unwrap_or(TargetSelector::All),
                &options,
            )?;
            if let Some(into) = into {
                restore.insert("into".into(), json!(into));
            }
            if in_place {
                restore.insert("in_place".into(), json!(true));
            }
            if no_owner {
                restore.insert("no_owner".into(), json!(true));
            }
            backups::restore(
                ctx,
                trail,
                selector,
                &backup.backup,
                restore,
                yes,
                output.json,
            )
            .await
        }
        Command::Verify {
            target,
            backup,
            output,
        } => backups::verify(ctx, trail, target.selector(), &backup.backup, output.json).await,
        Command::Drill {
            target,
            backup,
            output,
        } => backups::drill(ctx, trail, target.selector(), &backup.backup, output.json).await,
        Command::Prune {
            target,
            dry_run,
            output,
        } => backups::prune(ctx, trail, target.selector(), dry_run, output.json).await,
        Command::Setup { .. }
        | Command::Enqueue { .. }
        | Command::Dlq { .. }
        | Command::History { .. } => Err(Failure(
            "a broker command reached the storage commands".into(),
        )),
    }
}

/// The audit trail of a broker command: into the configured storage, or the log only when
/// that cannot be opened (a broker command must not fail for it).
fn broker_trail(config: &crm_backup::config::BrokerConfig) -> trail::Trail {
    match crm_backup::storage::Storage::open(&config.storage) {
        Ok(storage) => trail::Trail::new(Some(storage)),
        Err(err) => {
            tracing::warn!(error = %err, "storage cannot be opened: audit records go to the log only");
            trail::Trail::new(None)
        }
    }
}

/// `--option key=value` pairs as a JSON object, each value typed by its option; with
/// `all`, keys are `<target>.<option>`.
fn typed_options(
    action: Action,
    target: TargetSelector,
    options: &OptionArgs,
) -> Result<serde_json::Map<String, serde_json::Value>, Failure> {
    let mut typed = serde_json::Map::new();
    for pair in &options.pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| Failure(format!("--option `{pair}` is not KEY=VALUE")))?;
        let value = match (target, key.split_once('.')) {
            (TargetSelector::All, Some((kind, name))) => {
                let kind: TargetKind = kind.parse()?;
                crm_backup::options::typed_value(action, Some(kind), name, value)
            }
            (TargetSelector::All, None) => {
                crm_backup::options::typed_value(action, None, key, value)
            }
            (TargetSelector::One(kind), _) => {
                crm_backup::options::typed_value(action, Some(kind), key, value)
            }
        }
        .map_err(Failure)?;
        typed.insert(key.to_string(), value);
    }
    Ok(typed)
}

/// Who runs the CLI, as commands and manifests record it: `cli:<user>`.
fn requester() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) => format!("cli:{user}"),
        Err(_) => "cli".to_string(),
    }
}
