//! The scheduler binary: two instances, one run per fire; missed fires published at start.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::broker::TestVhost;
use common::{Store, TestDatabase, TestSetup};
use crm_backup::messaging::worker;
use crm_backup::metrics::WorkerState;
use crm_backup::model::TargetKind;
use crm_backup::schedule::fire_id;
use crm_backup::storage::catalog;
use crm_backup::storage::layout::command_marker_key;
use tokio_util::sync::CancellationToken;

const SCHEDULE: &str = "every-two-seconds";

fn scheduler(env: &[(String, String)]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_crm-backup-scheduler"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BACKUP_LOG_FORMAT", "json")
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("scheduler starts")
}

/// Command ids the scheduler logged as published.
fn published(child: Child) -> BTreeSet<String> {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "scheduler exits cleanly on SIGTERM");
    String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "published")
        .filter_map(|line| line["command_id"].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_schedulers_cause_one_run_per_fire_and_catch_up_missed_fires() {
    let vhost = TestVhost::create("sched");
    let db = TestDatabase::create("sched");
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("test.toml"),
        format!(
            "[scheduler]\nmissed_window = \"5s\"\n\n[[scheduler.schedules]]\nname = \"{SCHEDULE}\"\n\
             cron = \"*/2 * * * * *\"\ntimezone = \"UTC\"\naction = \"backup\"\ntarget = \"postgres\"\n"
        ),
    )
    .unwrap();
    let config_dir = config.path().display().to_string();
    let url = vhost.url();
    let setup = TestSetup::new(
        &db.name,
        Store::Local,
        &[
            ("RABBITMQ_URL", url.as_str()),
            ("BACKUP_CONFIG_DIR", config_dir.as_str()),
            ("BACKUP_ENV", "test"),
            ("BACKUP__MESSAGING__RETRY_DELAYS", "1s"),
        ],
    );
    assert_eq!(
        setup.settings.scheduler.schedules.len(),
        1,
        "the environment file replaces the default schedules"
    );

    let shutdown = CancellationToken::new();
    let state = Arc::new(WorkerState::default());
    let worker = tokio::spawn(worker::run(
        setup.ctx.clone(),
        state.clone(),
        shutdown.clone(),
    ));
    while !state.consuming.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let env: Vec<(String, String)> = setup
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let started_at = Utc::now();
    let first = scheduler(&env);
    let second = scheduler(&env);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let first = published(first);
    let second = published(second);

    // Both published the same fires; ids are derived from (schedule, fire time).
    assert!(first.len() >= 4, "{first:?}");
    let common_ids: BTreeSet<_> = first.intersection(&second).cloned().collect();
    assert!(common_ids.len() >= 3, "first {first:?} second {second:?}");

    // Fires from before the schedulers started were caught up.
    let fire_times: BTreeMap<String, DateTime<Utc>> = (-8..8)
        .map(|s| started_at + chrono::Duration::seconds(s))
        .map(|t| t.with_timezone(&Utc))
        .map(|t| DateTime::from_timestamp(t.timestamp(), 0).unwrap())
        .map(|t| {
            (
                fire_id(&setup.env["BACKUP_SCHEDULER_ID_SALT"], SCHEDULE, t),
                t,
            )
        })
        .collect();
    assert!(
        first
            .iter()
            .any(|id| fire_times.get(id).is_some_and(|t| *t < started_at)),
        "no missed fire was published at start: {first:?}"
    );

    // Every published command runs exactly once.
    let all: BTreeSet<_> = first.union(&second).cloned().collect();
    for id in &all {
        let mut done = false;
        for _ in 0..600 {
            if setup
                .ctx
                .storage
                .exists(&command_marker_key(id))
                .await
                .unwrap()
            {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(done, "command {id} never completed");
    }
    let manifests = catalog::list(&setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap()
        .manifests;
    let by_command: BTreeSet<_> = manifests
        .iter()
        .filter_map(|m| m.command_id.clone())
        .collect();
    assert_eq!(
        manifests.len(),
        all.len(),
        "one backup per fire, not per publish"
    );
    assert_eq!(by_command, all);
    assert!(
        manifests
            .iter()
            .all(|m| m.requested_by == format!("scheduler:{SCHEDULE}"))
    );
    shutdown.cancel();
    let _ = worker.await;
}

#[test]
fn the_scheduler_links_no_database_storage_or_compression_code() {
    let out = Command::new("nm")
        .args(["-C", env!("CARGO_BIN_EXE_crm-backup-scheduler")])
        .output()
        .expect("nm (binutils) is installed");
    assert!(out.status.success());
    let symbols = String::from_utf8_lossy(&out.stdout);
    assert!(
        symbols.contains("lapin::"),
        "the symbol check sees the broker client"
    );
    for crate_name in [
        "tokio_postgres::",
        "object_store::",
        "zstd::",
        "redis::",
        "reqwest::",
    ] {
        let count = symbols.matches(crate_name).count();
        assert_eq!(
            count, 0,
            "{crate_name} is linked into the scheduler ({count} symbols)"
        );
    }
}
