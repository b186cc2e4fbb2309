//! `crm-backup-scheduler`: publishes the configured schedules' commands at their fire times.
//!
//! Small on purpose: it links the broker client and the schedule logic, no database,
//! Redis or storage code. Fires missed while it was down (within `scheduler.missed_window`)
//! are published at start; command ids are derived from (schedule, fire time), so two
//! schedulers, or a restart, never cause a second run.

use std::collections::HashMap;
use std::process::ExitCode;
use std::time::Duration;

use chrono::Utc;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use backon::BackoffBuilder;
use crm_backup::config::{SchedulerConfig, Settings};
use crm_backup::messaging::publisher::Publisher;
use crm_backup::messaging::{self, MessagingError, RECONNECT_MAX_PAUSE, reconnect_backoff};
use crm_backup::schedule::{Schedule, next_fire};
use crm_backup::telemetry;

fn main() -> ExitCode {
    telemetry::init("info");
    let env: HashMap<String, String> = std::env::vars().collect();
    let config = match Settings::scheduler(&env) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let schedules: Result<Vec<Schedule>, _> = config
        .scheduler
        .schedules
        .iter()
        .map(Schedule::parse)
        .collect();
    let schedules = match schedules {
        Ok(schedules) => schedules,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    runtime.spawn({
        let shutdown = shutdown.clone();
        async move {
            let mut terminate =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = async { if let Some(t) = terminate.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
            shutdown.cancel();
        }
    });
    match runtime.block_on(run(&config, &schedules, &shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

async fn run(
    config: &SchedulerConfig,
    schedules: &[Schedule],
    shutdown: &CancellationToken,
) -> Result<(), MessagingError> {
    let now = Utc::now();
    for schedule in schedules {
        match schedule.next_after(now) {
            Some(fire) => tracing::info!(schedule = %schedule.name, next_fire = %fire, "scheduled"),
            None => tracing::warn!(schedule = %schedule.name, "never fires"),
        }
    }
    let window = chrono::Duration::from_std(config.scheduler.missed_window.0).unwrap_or_default();
    let mut published_until = now - window;
    let mut pauses = reconnect_backoff(Duration::from_millis(500)).build();
    loop {
        match session(config, schedules, shutdown, &mut published_until).await {
            Ok(()) => return Ok(()),
            Err(err) if !err.retryable() => return Err(err),
            Err(err) => {
                let pause = pauses.next().unwrap_or(RECONNECT_MAX_PAUSE);
                tracing::warn!(error = %err, retry_in = ?pause, "broker unavailable; fires are kept and published on reconnect");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => return Ok(()),
                }
            }
        }
    }
}

/// Publishes every fire in `(published_until, now]`, then sleeps until the next one.
async fn session(
    config: &SchedulerConfig,
    schedules: &[Schedule],
    shutdown: &CancellationToken,
    published_until: &mut chrono::DateTime<Utc>,
) -> Result<(), MessagingError> {
    let connection = messaging::connect(&config.rabbitmq, "crm-backup scheduler").await?;
    messaging::topology::declare(&connection, &config.messaging).await?;
    let user = messaging::amqp_user(&config.rabbitmq);
    let publisher = Publisher::open(&connection, &config.messaging, &user).await?;
    loop {
        let now = Utc::now();
        let mut due: Vec<_> = schedules
            .iter()
            .flat_map(|s| {
                s.fires_between(*published_until, now)
                    .into_iter()
                    .map(move |fire| (fire, s))
            })
            .collect();
        due.sort_by_key(|(fire, _)| *fire);
        for (fire, schedule) in due {
            let command = schedule.command_for(fire, config.scheduler.id_salt.expose_secret());
            publisher
                .command(&command, Some(&command.id), Default::default())
                .await?;
            tracing::info!(schedule = %schedule.name, %fire, command_id = %command.id, "published");
        }
        *published_until = now;
        let Some((next, _)) = next_fire(schedules, now) else {
            tracing::warn!("no schedule will ever fire; idling");
            shutdown.cancelled().await;
            return Ok(());
        };
        let wait = (next - Utc::now()).to_std().unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}
