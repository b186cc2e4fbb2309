//! Workers killed at random moments. Two worker processes share one vhost and one storage;
//! rounds of commands over all five targets (backup, verify, drill, restore, prune) run while
//! a killer SIGKILLs a random worker every 0.5–5 s and starts another in its place, until
//! `KILLS` kills (8 here; the reliability campaign asks for 20 and more). Every command must
//! end completed and never run twice: each backup command with one manifest whose artifacts
//! verify (a result re-announced by a redelivery is counted), and once prune has run after
//! `retention.debris_grace` no unfinished backup and no staging file is left.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::consul_double::{ConsulDouble, ConsulState};
use common::harness::{EventLog, Harness, backup_command, is_final};
use common::psql;
use crm_backup::jobs::prune::{PruneRequest, run_prune};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::messaging::command::Command as BackupCommand;
use crm_backup::messaging::event::{self, Event};
use crm_backup::model::{Action, TargetKind, TargetSelector};
use crm_backup::storage::catalog;
use rand::Rng;
use tokio_util::sync::CancellationToken;

const TARGETS: [TargetKind; 5] = TargetKind::ALL;

fn kills_wanted() -> usize {
    std::env::var("KILLS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(8)
}

/// A worker process whose log is appended to `log` (searched for panics at the end).
fn spawn_worker(env: &[(String, String)], log: &Path) -> Child {
    let log = std::fs::File::options()
        .create(true)
        .append(true)
        .open(log)
        .expect("worker log");
    Command::new(common::crm_backup_bin())
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env.iter().cloned())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("worker process starts")
}

fn command(action: Action, target: TargetKind, options: serde_json::Value) -> BackupCommand {
    let mut command = BackupCommand::new(action, TargetSelector::One(target), "test-suite");
    command.backup_id = Some("latest".into());
    command.options = options;
    command
}

/// A documents tree: 300 files of 8–40 KB.
fn documents(root: &Path) {
    let mut rng = rand::rng();
    for i in 0..300 {
        let dir = root.join(format!("deal-{}", i % 12));
        std::fs::create_dir_all(&dir).unwrap();
        let len = rng.random_range(8_000..40_000);
        let bytes: Vec<u8> = (0..len).map(|_| rng.random_range(b'a'..=b'z')).collect();
        std::fs::write(dir.join(format!("contract-{i}.txt")), bytes).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_killed_at_random_moments_end_every_command_once() {
    let docs = tempfile::tempdir().unwrap();
    documents(docs.path());
    let restores = tempfile::tempdir().unwrap();
    let consul = ConsulDouble::start(ConsulState {
        // Consul snapshots are gzip streams.
        snapshot: b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03a consul snapshot".to_vec(),
        ..ConsulState::default()
    })
    .await;
    for i in 0..50 {
        consul.set(
            &format!("crm/config/key-{i}"),
            0,
            format!("value {i}").as_bytes(),
        );
    }
    let restore_root = restores.path().display().to_string();
    let docs_root = docs.path().display().to_string();
    let h = Harness::new(
        "k_kill",
        &[
            ("BACKUP__CONSUL__ENABLED", "true"),
            ("CONSUL_HTTP_ADDR", consul.address.as_str()),
            ("BACKUP__DOCUMENTS__ENABLED", "true"),
            ("DOCUMENTS_STORAGE_ROOT", docs_root.as_str()),
            ("BACKUP__RESTORE__ROOT", restore_root.as_str()),
            ("BACKUP__RETENTION__DAILY", "2"),
            ("BACKUP__RETENTION__WEEKLY", "0"),
            ("BACKUP__RETENTION__MONTHLY", "0"),
            ("BACKUP__RETENTION__YEARLY", "0"),
            ("BACKUP__RETENTION__DEBRIS_GRACE", "5s"),
            // Redeliveries after a kill are not attempts; 20 kills spread over the rounds.
            ("BACKUP__MESSAGING__DELIVERY_LIMIT", "10"),
        ],
    );
    psql(
        &h._db.name,
        "CREATE TABLE deals AS SELECT i, md5(i::text) || md5((i * 3)::text) AS v \
         FROM generate_series(1, 200000) i",
    );
    let log = EventLog::open(&h).await;
    let mut client = h.client().await;

    // The killer: a random worker, at a random moment, while commands run.
    let env = h.child_env();
    let logs = tempfile::tempdir().unwrap();
    let worker_log = logs.path().join("workers.log");
    let kills = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let killer = tokio::spawn({
        let (kills, stop, log) = (kills.clone(), stop.clone(), worker_log.clone());
        async move {
            let mut workers = vec![spawn_worker(&env, &log), spawn_worker(&env, &log)];
            loop {
                let pause = rand::rng().random_range(500..5000);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(pause)) => {}
                }
                let victim = rand::rng().random_range(0..workers.len());
                workers[victim].kill().unwrap(); // SIGKILL
                workers[victim].wait().unwrap();
                workers[victim] = spawn_worker(&env, &log);
                kills.fetch_add(1, Ordering::SeqCst);
            }
            for mut worker in workers {
                let _ = worker.kill();
                let _ = worker.wait();
            }
        }
    });

    let started = Instant::now();
    let mut sent: Vec<BackupCommand> = Vec::new();
    let mut restored: Vec<String> = Vec::new();
    let mut round = 0;
    while round == 0 || kills.load(Ordering::SeqCst) < kills_wanted() {
        round += 1;
        let backups: Vec<BackupCommand> = TARGETS.iter().map(|t| backup_command(*t)).collect();
        for command in &backups {
            client.send(command).await;
        }
        client.follow_all(&backups.iter().collect::<Vec<_>>()).await;
        sent.extend(backups);

        let mut checks: Vec<BackupCommand> = Vec::new();
        for target in TARGETS {
            checks.push(command(Action::Verify, target, serde_json::Value::Null));
            checks.push(command(Action::Drill, target, serde_json::Value::Null));
        }
        let into = common::unique("k_restored");
        checks.push(command(
            Action::Restore,
            TargetKind::Postgres,
            serde_json::json!({ "into": into }),
        ));
        checks.push(command(
            Action::Restore,
            TargetKind::Documents,
            serde_json::json!({ "to": format!("{restore_root}/round-{round}") }),
        ));
        checks.push(command(
            Action::Restore,
            TargetKind::Redis,
            serde_json::json!({ "to_file": format!("{restore_root}/round-{round}.rdb") }),
        ));
        // Under the default prefix, restored/<backup id>/.
        checks.push(command(
            Action::Restore,
            TargetKind::Consul,
            serde_json::Value::Null,
        ));
        let vhost_prefix = format!("k-restored-{round}-");
        checks.push(command(
            Action::Restore,
            TargetKind::Rabbitmq,
            serde_json::json!({ "vhost": h.vhost.name, "vhost_prefix": vhost_prefix }),
        ));
        checks.push(BackupCommand::new(
            Action::Prune,
            TargetSelector::All,
            "test-suite",
        ));
        for command in &checks {
            client.send(command).await;
        }
        client.follow_all(&checks.iter().collect::<Vec<_>>()).await;
        // Restored keys would be in the next backups, doubling the store every round.
        consul
            .state
            .lock()
            .unwrap()
            .kv
            .retain(|key, _| !key.starts_with("restored/"));
        drop(common::TestDatabase::adopt(&into));
        drop(common::broker::TestVhost::adopt(&format!(
            "{vhost_prefix}{}",
            h.vhost.name
        )));
        restored.push(into);
        sent.extend(checks);
    }
    stop.cancel();
    killer.await.unwrap();
    let took = started.elapsed();

    // Every command ended exactly once, and completed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut by_command: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for event in log.take().await {
        by_command
            .entry(event.command_id.clone())
            .or_default()
            .push(event);
    }
    let lost = sent
        .iter()
        .filter(|c| {
            !by_command
                .get(&c.id)
                .is_some_and(|e| e.iter().any(is_final))
        })
        .count();
    let mut reruns = 0;
    let mut repeated = 0;
    for command in &sent {
        let events = by_command.get(&command.id).cloned().unwrap_or_default();
        let finals: Vec<&Event> = events.iter().filter(|e| is_final(e)).collect();
        assert!(
            !finals.is_empty(),
            "{:?} {} never ended: {events:#?}",
            command.action,
            command.id
        );
        // A worker killed after announcing the result but before acking the delivery leaves
        // it to be redelivered, and the redelivery finds the command's marker and announces
        // the same result again (docs/contract.md: completed commands are re-announced, never
        // run twice). Such repeats are counted; any other outcome fails.
        assert!(
            finals.iter().all(|e| e.event == event::COMPLETED),
            "{events:#?}"
        );
        repeated += finals.len() - 1;
        if finals.len() > 1 {
            let seen: Vec<_> = events.iter().map(|e| (&e.event, e.attempt, e.at)).collect();
            eprintln!("repeated: {:?} {}: {seen:?}", command.action, command.id);
        }
        let starts = events.iter().filter(|e| e.event == event::STARTED).count();
        reruns += starts.saturating_sub(1);
    }

    // One manifest per backup command, whatever prune kept verifies, and no debris.
    let mut manifests = 0;
    let mut corrupt = 0;
    for target in TARGETS {
        let listed = catalog::list(&h.setup.ctx.storage, target).await.unwrap();
        for manifest in &listed.manifests {
            manifests += 1;
            let report = verify_backup(&h.setup.ctx, manifest).await.unwrap();
            if !report.ok() {
                eprintln!("does not verify: {report:?}");
                corrupt += 1;
            }
        }
        let mut per_command: BTreeMap<String, usize> = BTreeMap::new();
        for manifest in &listed.manifests {
            *per_command
                .entry(manifest.command_id.clone().unwrap_or_default())
                .or_default() += 1;
        }
        assert!(
            per_command.values().all(|n| *n == 1),
            "{target:?}: {per_command:?}"
        );
    }
    assert_eq!(corrupt, 0, "every manifest left verifies");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let pruned = run_prune(
        &h.setup.ctx,
        &PruneRequest {
            targets: TARGETS.to_vec(),
            dry_run: false,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let mut leftovers = Vec::new();
    for path in h.setup.stored_files() {
        let relative = path.strip_prefix(h.setup.storage_path()).unwrap();
        let name = relative.to_string_lossy().to_string();
        let dir = path.parent().unwrap();
        let in_backup_dir = TARGETS
            .iter()
            .any(|t| name.starts_with(&format!("{}/", t.as_str())));
        if name.contains('#') || (in_backup_dir && !dir.join("manifest.json").exists()) {
            leftovers.push(name);
        }
    }
    assert!(leftovers.is_empty(), "orphans after prune: {leftovers:?}");
    // Nor a scratch database of a drill, or the staging database of a restore, on the server.
    let names: Vec<String> = restored
        .iter()
        .flat_map(|into| [format!("'{into}_restoring'"), format!("'{into}'")])
        .chain([
            format!("'{}_drill'", h._db.name),
            format!("'{}_drill_restoring'", h._db.name),
        ])
        .collect();
    let scratch = psql(
        "postgres",
        &format!(
            "SELECT string_agg(datname, ' ') FROM pg_database WHERE datname IN ({})",
            names.join(", ")
        ),
    );
    assert!(scratch.is_empty(), "databases left: {scratch}");

    // Every restore's output took its name whole: no staging name is left beside one.
    let staged: Vec<String> = std::fs::read_dir(restores.path())
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".restoring"))
        .collect();
    assert!(staged.is_empty(), "restores left staging names: {staged:?}");

    // No worker panicked, in a step or anywhere else.
    let worker_log = std::fs::read_to_string(&worker_log).unwrap_or_default();
    let panics = worker_log.matches("panicked").count();
    assert_eq!(panics, 0, "{worker_log}");

    common::tally::Tally {
        commands: sent.len(),
        lost,
        duplicated: repeated,
        corrupt,
        orphaned: leftovers.len(),
        panics,
        restarts: 0,
    }
    .print(
        "kills",
        &format!(
            "{} SIGKILLs over {round} rounds, {reruns} steps started again after a kill or a retry, \
             {manifests} manifests verified after prune, {} directories of debris cleared by prune, {} s",
            kills.load(Ordering::SeqCst),
            pruned.debris.len(),
            took.as_secs()
        ),
    );
}
