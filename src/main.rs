//! `crm-backup`: the worker and the operator CLI (run, list, show, restore, verify,
//! drill, prune, setup, enqueue, dlq).
//!
//! Exit status 0 means success; anything else failed, with a one-line reason on stderr.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crm_backup::config::Settings;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::drill::{DrillRequest, run_drill};
use crm_backup::jobs::prune::{PruneRequest, run_prune};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::jobs::{JobContext, JobError};
use crm_backup::messaging::{
    self, client::EventSubscription, command::Command as MessageCommand, dlq::Selection, event,
    publisher::Publisher,
};
use crm_backup::metrics::WorkerState;
use crm_backup::model::{BackupId, TargetKind};
use crm_backup::storage::catalog::{self, BackupRef};
use crm_backup::storage::manifest::Manifest;
use crm_backup::telemetry;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    name = "crm-backup",
    version,
    about = "Backs up and restores the CRM's stateful services"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume `backup.commands` and run steps until SIGTERM/SIGINT.
    Worker,
    /// Declare the RabbitMQ exchanges and queues (idempotent).
    Setup,
    /// Publish a command to `backup.commands`.
    Enqueue {
        /// backup, restore, verify, drill or prune.
        action: String,
        /// A target or `all`.
        target: String,
        /// An option as key=value; the value is read as JSON when it parses (repeatable).
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// For restore / verify / drill: a backup id or `latest`.
        #[arg(long)]
        backup_id: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// The command id (idempotency key); a new UUID by default.
        #[arg(long)]
        id: Option<String>,
        /// Wait for the command's result: exit 0 when completed, 1 when failed.
        #[arg(long)]
        wait: bool,
        /// How long --wait waits, e.g. 30m.
        #[arg(long, default_value = "1h")]
        timeout: String,
    },
    /// Dead-lettered commands.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Back up now, without a broker: one line per target.
    Run {
        /// A target (postgres, …) or `all`.
        target: String,
        /// PostgreSQL: back up only this schema (repeatable).
        #[arg(long = "schema")]
        schemas: Vec<String>,
        /// PostgreSQL: leave this schema out (repeatable).
        #[arg(long = "exclude-schema")]
        exclude_schemas: Vec<String>,
        /// PostgreSQL: also dump roles (pg_dumpall --globals-only).
        #[arg(long)]
        globals: bool,
        /// A target option as key=value, e.g. incremental=true (with `all`:
        /// documents.incremental=true). Values are read as JSON when they parse.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        /// Why this backup is taken (recorded in the manifest).
        #[arg(long)]
        reason: Option<String>,
        /// Print JSON lines instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List backups, oldest first.
    List {
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Print one backup's manifest.
    Show { backup_id: String },
    /// Restore a backup (beside the original unless --in-place --yes).
    Restore {
        /// A backup id, or `latest` (then --target is required).
        backup: String,
        #[arg(long)]
        target: Option<String>,
        /// PostgreSQL: the new database to restore into (must not exist).
        #[arg(long, conflicts_with = "in_place")]
        into: Option<String>,
        /// Restore over the original. Destructive: needs --yes.
        #[arg(long)]
        in_place: bool,
        /// Confirms a destructive restore.
        #[arg(long)]
        yes: bool,
        /// PostgreSQL: do not restore object ownership.
        #[arg(long)]
        no_owner: bool,
        /// A target option as key=value (e.g. to=/srv/restore, host=10.0.0.5, existing=skip,
        /// vhost=crm, prefix=restored/); values are read as JSON when they parse.
        #[arg(long = "option", value_name = "KEY=VALUE")]
        options: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Check stored and raw SHA-256 and the structure of every artifact.
    Verify {
        /// A backup id, `latest` (with --target) or `all`.
        backup: String,
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Restore drill: verify a backup, restore it into a scratch place, compare with the
    /// manifest's facts, remove the scratch copy.
    Drill {
        target: String,
        /// A backup id (default: the target's latest).
        #[arg(long, default_value = "latest")]
        backup: String,
        #[arg(long)]
        json: bool,
    },
    /// Apply the retention policy: delete what it does not keep, and the debris of
    /// unfinished backups. `--dry-run` prints the plan with a reason for every backup.
    Prune {
        /// Only this target (default: every target).
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Show dead letters: id, action, target, attempts, last error, when.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Republish dead letters to backup.commands with attempts reset.
    Replay {
        #[arg(long = "id", required_unless_present = "all")]
        ids: Vec<String>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// Only show what would be replayed.
        #[arg(long)]
        dry_run: bool,
    },
}

/// A CLI failure: printed as one line, exit status 1.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(err: E) -> Self {
        Failure(err.to_string())
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Operator commands print their results on stdout; logs only for warnings.
    telemetry::init(if matches!(cli.command, Command::Worker) {
        "info"
    } else {
        "warn"
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
    let code = match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(Failure(message)) => {
            eprintln!("error: {}", message.replace('\n', " "));
            ExitCode::FAILURE
        }
    };
    // Everything the command waited for is done. A reader thread still blocked on a stalled
    // source whose backup already failed (its socket times out after minutes) must not hold
    // the exit, as dropping the runtime would.
    runtime.shutdown_timeout(std::time::Duration::from_secs(2));
    code
}

async fn dispatch(command: Command) -> Result<ExitCode, Failure> {
    let settings = Settings::from_process_env()?;
    let ctx = JobContext::new(settings)?;
    match command {
        Command::Worker => worker(ctx).await,
        Command::Setup => {
            let connection = messaging::connect(&ctx.settings.rabbitmq, "crm-backup setup").await?;
            messaging::topology::declare(&connection, &ctx.settings.messaging).await?;
            println!("RabbitMQ topology declared");
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            action,
            target,
            options,
            backup_id,
            reason,
            id,
            wait,
            timeout,
        } => {
            let mut command = MessageCommand::new(action.parse()?, target.parse()?, &requester());
            command.options = parse_options(&options)?;
            command.backup_id = backup_id;
            command.reason = reason;
            if let Some(id) = id {
                command.id = id;
            }
            let command = MessageCommand::parse(&command.to_json())?;
            let timeout = crm_backup::config::parse_duration(&timeout).map_err(Failure)?;
            enqueue(&ctx, &command, wait, timeout).await
        }
        Command::Dlq { command } => dlq(&ctx, command).await,
        Command::Run {
            target,
            schemas,
            exclude_schemas,
            globals,
            options: pairs,
            reason,
            json,
        } => {
            let mut options = serde_json::Map::new();
            if let serde_json::Value::Object(parsed) = parse_options(&pairs)? {
                options.extend(parsed);
            }
            if !schemas.is_empty() {
                options.insert("schemas".into(), json!(schemas));
            }
            if !exclude_schemas.is_empty() {
                options.insert("exclude_schemas".into(), json!(exclude_schemas));
            }
            if globals {
                options.insert("globals".into(), json!(true));
            }
            run(&ctx, &target, options, reason, json).await
        }
        Command::List { target, json } => list(&ctx, target.as_deref(), json).await,
        Command::Show { backup_id } => {
            let id: BackupId = backup_id.parse()?;
            let manifest = catalog::get(&ctx.storage, &id).await?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Restore {
            backup,
            target,
            into,
            in_place,
            yes,
            no_owner,
            options: pairs,
            json,
        } => {
            if in_place && !yes {
                return Err(Failure(
                    "--in-place overwrites the original; add --yes to confirm".into(),
                ));
            }
            let backup: BackupRef = backup.parse()?;
            let target = resolve_target(&backup, target.as_deref())?;
            let mut options = serde_json::Map::new();
            if let serde_json::Value::Object(parsed) = parse_options(&pairs)? {
                options.extend(parsed);
            }
            if let Some(into) = into {
                options.insert("into".into(), json!(into));
            }
            if in_place {
                options.insert("in_place".into(), json!(true));
            }
            if no_owner {
                options.insert("no_owner".into(), json!(true));
            }
            let request = RestoreRequest {
                target,
                backup,
                options: serde_json::Value::Object(options),
            };
            let (manifest, report) = run_restore(&ctx, &request).await?;
            if json {
                println!(
                    "{}",
                    json!({"backup_id": manifest.id, "target": manifest.target,
                           "destination": report.destination, "details": report.details})
                );
            } else {
                println!("restored {} into {}", manifest.id, report.destination);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify {
            backup,
            target,
            json,
        } => verify(&ctx, &backup, target.as_deref(), json).await,
        Command::Prune {
            target,
            dry_run,
            json,
        } => prune(&ctx, target.as_deref(), dry_run, json).await,
        Command::Drill {
            target,
            backup,
            json,
        } => {
            let request = DrillRequest {
                target: parse_target(&target)?,
                backup: backup.parse()?,
            };
            let (_, report) = run_drill(&ctx, &request).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "drill passed: {} verified ({} artifacts) and restored into {}",
                    report.backup_id,
                    report.verify.artifacts.len(),
                    report.scratch
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn prune(
    ctx: &JobContext,
    target: Option<&str>,
    dry_run: bool,
    json: bool,
) -> Result<ExitCode, Failure> {
    let targets = match target {
        Some(target) => vec![parse_target(target)?],
        None => TargetKind::ALL.to_vec(),
    };
    let request = PruneRequest { targets, dry_run };
    let report = run_prune(ctx, &request, chrono::Utc::now()).await?;
    if json {
        println!("{}", serde_json::to_string(&report)?);
        return Ok(ExitCode::SUCCESS);
    }
    let deleted = if dry_run { "would delete" } else { "deleted" };
    for decision in &report.decisions {
        let why = if decision.keep {
            decision
                .reasons
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join("; ")
        } else {
            "no rule keeps it".to_string()
        };
        println!(
            "{:<12} {:<9} {}  {}",
            if decision.keep { "keep" } else { deleted },
            decision.target,
            decision.id,
            why
        );
    }
    for debris in &report.debris {
        println!(
            "{:<12} {:<9} {}  unfinished backup: {} objects, {}, last written {}",
            deleted,
            "debris",
            debris.dir,
            debris.objects,
            human_bytes(debris.bytes),
            debris.last_written.format("%Y-%m-%d %H:%M:%SZ")
        );
    }
    for unreadable in &report.unreadable {
        println!("{:<12} {:<9} {}", "keep", "unreadable", unreadable);
    }
    println!(
        "{} kept, {} {}, {} debris director{} {}",
        report.kept(),
        report.deleted.len(),
        deleted,
        report.debris.len(),
        if report.debris.len() == 1 { "y" } else { "ies" },
        if dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
    Ok(ExitCode::SUCCESS)
}

async fn worker(ctx: JobContext) -> Result<ExitCode, Failure> {
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
    // Last-success gauges start from the catalog, not from "never", after a restart.
    for target in TargetKind::ALL {
        match catalog::latest(&ctx.storage, target).await {
            Ok(Some(manifest)) => {
                state
                    .metrics
                    .seed_last_success("backup", target.as_str(), manifest.finished_at)
            }
            Ok(None) => {}
            Err(err) => {
                tracing::warn!(%target, error = %err, "could not read the catalog for the metrics")
            }
        }
    }
    let listen = ctx.settings.http.listen.clone();
    if !listen.is_empty() {
        crm_backup::endpoint::serve(&listen, state.clone(), shutdown.clone())
            .await
            .map_err(|err| Failure(err.to_string()))?;
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

/// `--option k=v` pairs as a JSON object; values that parse as JSON are taken as JSON.
fn parse_options(pairs: &[String]) -> Result<serde_json::Value, Failure> {
    let mut options = serde_json::Map::new();
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| Failure(format!("--option `{pair}` is not KEY=VALUE")))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
        options.insert(key.to_string(), value);
    }
    Ok(serde_json::Value::Object(options))
}

async fn enqueue(
    ctx: &JobContext,
    command: &MessageCommand,
    wait: bool,
    timeout: std::time::Duration,
) -> Result<ExitCode, Failure> {
    let settings = &ctx.settings;
    let connection = messaging::connect(&settings.rabbitmq, "crm-backup enqueue").await?;
    let user = messaging::amqp_user(&settings.rabbitmq);
    let publisher = Publisher::open(&connection, &settings.messaging, &user).await?;
    let mut events = if wait {
        Some(EventSubscription::open(&connection, &settings.messaging).await?)
    } else {
        None
    };
    publisher
        .command(command, Some(&command.id), Default::default())
        .await?;
    println!(
        "enqueued {} {} {} (id {})",
        command.action,
        command.target,
        command.backup_id.as_deref().unwrap_or(""),
        command.id
    );
    let Some(events) = events.as_mut() else {
        return Ok(ExitCode::SUCCESS);
    };
    let finals = events
        .wait_for(command, timeout, |event| {
            println!("{}", String::from_utf8_lossy(&event.to_json()));
        })
        .await?;
    let failed: Vec<_> = finals
        .iter()
        .filter(|e| e.event != event::COMPLETED)
        .collect();
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        let reasons: Vec<String> = failed
            .iter()
            .map(|e| {
                let error = e
                    .error
                    .as_ref()
                    .map_or("failed".to_string(), |err| err.message.clone());
                format!("{}: {error}", e.command_id)
            })
            .collect();
        Err(Failure(format!("command failed: {}", reasons.join("; "))))
    }
}

async fn dlq(ctx: &JobContext, command: DlqCommand) -> Result<ExitCode, Failure> {
    let settings = &ctx.settings;
    let connection = messaging::connect(&settings.rabbitmq, "crm-backup dlq").await?;
    match command {
        DlqCommand::List { json } => {
            let letters = messaging::dlq::list(&connection, &settings.messaging).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&letters)?);
            } else if letters.is_empty() {
                println!("no dead letters in {}", settings.messaging.dead_queue);
            } else {
                for letter in &letters {
                    println!(
                        "{}  {} {}  attempts {}  {}  {}",
                        letter.id,
                        letter.action.as_deref().unwrap_or("-"),
                        letter.target.as_deref().unwrap_or("-"),
                        letter.attempts,
                        letter.failed_at.as_deref().unwrap_or("-"),
                        letter.last_error.as_deref().unwrap_or("-"),
                    );
                }
            }
        }
        DlqCommand::Replay { ids, all, dry_run } => {
            let user = messaging::amqp_user(&settings.rabbitmq);
            let publisher = Publisher::open(&connection, &settings.messaging, &user).await?;
            let selection = if all {
                Selection::All
            } else {
                Selection::Ids(ids.clone())
            };
            let replayed =
                messaging::dlq::replay(&connection, &publisher, &selection, dry_run).await?;
            let verb = if dry_run { "would replay" } else { "replayed" };
            for letter in &replayed {
                println!(
                    "{verb} {} ({} {})",
                    letter.id,
                    letter.action.as_deref().unwrap_or("-"),
                    letter.target.as_deref().unwrap_or("-")
                );
            }
            let missing: Vec<&String> = ids
                .iter()
                .filter(|id| !replayed.iter().any(|l| &l.id == *id))
                .collect();
            if !missing.is_empty() {
                return Err(Failure(format!(
                    "not in the dead letters: {}",
                    missing
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_target(target: &str) -> Result<TargetKind, Failure> {
    Ok(target.parse::<TargetKind>()?)
}

/// The target of a restore or verify: from the id, or from --target for `latest`.
fn resolve_target(backup: &BackupRef, target: Option<&str>) -> Result<TargetKind, Failure> {
    let given = target.map(parse_target).transpose()?;
    match (backup, given) {
        (BackupRef::Id(id), Some(kind)) if id.target() != kind => Err(Failure(format!(
            "backup {id} is a {} backup, not {kind}",
            id.target()
        ))),
        (BackupRef::Id(id), _) => Ok(id.target()),
        (BackupRef::Latest, Some(kind)) => Ok(kind),
        (BackupRef::Latest, None) => Err(Failure("`latest` needs --target".into())),
    }
}

async fn run(
    ctx: &JobContext,
    target: &str,
    options: serde_json::Map<String, serde_json::Value>,
    reason: Option<String>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let (kinds, set_id) = if target == "all" {
        (
            ctx.targets.enabled(),
            Some(uuid::Uuid::new_v4().to_string()),
        )
    } else {
        (vec![parse_target(target)?], None)
    };
    let cancel = CancellationToken::new();
    let mut failed = Vec::new();
    for kind in kinds {
        let mut request = BackupRequest::new(kind, &requester());
        request.reason = reason.clone();
        request.set_id = set_id.clone();
        request.options = options_for(kind, &options, target == "all");
        match run_backup(ctx, &request, &cancel).await {
            Ok(manifest) => print_backup(ctx, &manifest, json),
            Err(err) => {
                print_failure(kind, &err, json);
                failed.push(format!("{kind}: {err}"));
            }
        }
    }
    match failed.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 => Err(Failure(failed.remove(0))),
        n => Err(Failure(format!(
            "{n} targets failed: {}",
            failed.join("; ")
        ))),
    }
}

/// The options of one target: all of them for a single target; with `all`, those
/// prefixed `<target>.` (and PostgreSQL's own flags).
fn options_for(
    kind: TargetKind,
    options: &serde_json::Map<String, serde_json::Value>,
    all: bool,
) -> serde_json::Value {
    if !all {
        return serde_json::Value::Object(options.clone());
    }
    let prefix = format!("{kind}.");
    let postgres_flags = ["schemas", "exclude_schemas", "globals"];
    let picked: serde_json::Map<String, serde_json::Value> = options
        .iter()
        .filter_map(|(key, value)| match key.strip_prefix(&prefix) {
            Some(own) => Some((own.to_string(), value.clone())),
            None if kind == TargetKind::Postgres && postgres_flags.contains(&key.as_str()) => {
                Some((key.clone(), value.clone()))
            }
            None => None,
        })
        .collect();
    serde_json::Value::Object(picked)
}

fn requester() -> String {
    match std::env::var("USER").or_else(|_| std::env::var("LOGNAME")) {
        Ok(user) => format!("cli:{user}"),
        Err(_) => "cli".to_string(),
    }
}

fn print_backup(ctx: &JobContext, manifest: &Manifest, json: bool) {
    let duration = manifest.duration();
    let seconds = duration.as_secs_f64().max(0.001);
    let throughput = manifest.raw_size() as f64 / seconds;
    if json {
        println!(
            "{}",
            json!({
                "target": manifest.target,
                "backup_id": manifest.id,
                "ok": true,
                "raw_size_bytes": manifest.raw_size(),
                "size_bytes": manifest.stored_size(),
                "duration_ms": duration.as_millis() as u64,
                "throughput_bytes_per_s": throughput as u64,
                "location": ctx.storage.location_of(&format!("{}/{}/", manifest.target, manifest.id)),
            })
        );
    } else {
        println!(
            "{:<10} {}  raw {:>10}  stored {:>10}  {:>7.1} s  {}/s",
            manifest.target.as_str(),
            manifest.id,
            human_bytes(manifest.raw_size()),
            human_bytes(manifest.stored_size()),
            seconds,
            human_bytes(throughput as u64),
        );
    }
}

fn print_failure(kind: TargetKind, err: &JobError, json: bool) {
    if json {
        println!(
            "{}",
            json!({"target": kind, "ok": false,
                   "error": {"kind": err.kind(), "message": err.to_string(), "retryable": err.retryable()}})
        );
    } else {
        println!("{:<10} FAILED: {err}", kind.as_str());
    }
}

async fn list(ctx: &JobContext, target: Option<&str>, json: bool) -> Result<ExitCode, Failure> {
    let listing = match target {
        Some(target) => catalog::list(&ctx.storage, parse_target(target)?).await?,
        None => catalog::list_all(&ctx.storage).await?,
    };
    for (key, reason) in &listing.unreadable {
        tracing::warn!(%key, %reason, "skipping an unreadable manifest");
    }
    if json {
        let rows: Vec<_> = listing
            .manifests
            .iter()
            .map(|m| {
                json!({
                    "backup_id": m.id, "target": m.target, "set_id": m.set_id,
                    "started_at": m.started_at, "finished_at": m.finished_at,
                    "size_bytes": m.stored_size(), "raw_size_bytes": m.raw_size(),
                    "requested_by": m.requested_by, "reason": m.reason,
                    "retain_until": m.retain_until,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if listing.manifests.is_empty() {
        println!("no backups in {}", ctx.storage.location_of(""));
    }
    for m in &listing.manifests {
        println!(
            "{:<44} {:<10} {}  {:>10}  {:>10}  {}{}",
            m.id.as_str(),
            m.target.as_str(),
            m.finished_at.format("%Y-%m-%d %H:%M:%SZ"),
            human_bytes(m.stored_size()),
            human_bytes(m.raw_size()),
            m.requested_by,
            m.reason
                .as_deref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify(
    ctx: &JobContext,
    backup: &str,
    target: Option<&str>,
    json: bool,
) -> Result<ExitCode, Failure> {
    let manifests = if backup == "all" {
        match target {
            Some(target) => {
                catalog::list(&ctx.storage, parse_target(target)?)
                    .await?
                    .manifests
            }
            None => catalog::list_all(&ctx.storage).await?.manifests,
        }
    } else {
        let backup: BackupRef = backup.parse()?;
        let kind = resolve_target(&backup, target)?;
        vec![catalog::resolve(&ctx.storage, kind, &backup).await?]
    };
    let mut failures = Vec::new();
    for manifest in &manifests {
        let report = verify_backup(ctx, manifest).await?;
        if json {
            println!(
                "{}",
                json!({"backup_id": report.backup_id, "ok": report.ok(), "artifacts": report.artifacts})
            );
        } else {
            for check in &report.artifacts {
                println!(
                    "{} {}: {}",
                    if check.ok { "ok  " } else { "FAIL" },
                    check.key,
                    check.detail
                );
            }
        }
        if let Some(failure) = report.failure() {
            failures.push(failure);
        }
    }
    match failures.len() {
        0 => Ok(ExitCode::SUCCESS),
        1 => Err(Failure(format!("verify failed: {}", failures.remove(0)))),
        n => Err(Failure(format!(
            "verify failed for {n} artifacts; first: {}",
            failures[0]
        ))),
    }
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
