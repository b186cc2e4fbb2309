//! Shared services that go away mid-step and come back: the S3 server (Garage, stopped and
//! started again) and the broker (`rabbitmqctl stop_app` / `start_app`, or with
//! `OUTAGE_BROKER=node` a full node restart). Every other test of this binary needs those
//! services, so these run one at a time; a guard brings each service back even when a test
//! fails. `OUTAGE_SECS` sets how long each outage lasts (15 s; the reliability campaign
//! uses 60).

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use common::harness::{EventLog, Harness, backup_command, wait_until};
use common::tally::Tally;
use common::{Store, TestDatabase, TestSetup, garage_multipart_uploads, psql};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::messaging::event;
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog;
use tokio_util::sync::CancellationToken;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn outage() -> Duration {
    let secs = std::env::var("OUTAGE_SECS")
        .ok()
        .and_then(|secs| secs.parse().ok())
        .unwrap_or(15);
    Duration::from_secs(secs)
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Garage stopped; started again by [`GarageDown::start`] or on drop.
struct GarageDown {
    up: bool,
}

impl GarageDown {
    const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/garage.sh");

    fn stop() -> Self {
        run(Self::SCRIPT, &["stop"]);
        GarageDown { up: false }
    }

    fn start(mut self) {
        run(Self::SCRIPT, &[]);
        self.up = true;
    }
}

impl Drop for GarageDown {
    fn drop(&mut self) {
        if !self.up {
            let _ = Command::new(Self::SCRIPT).output();
        }
    }
}

/// The broker stopped; started again by [`BrokerDown::start`] or on drop.
struct BrokerDown {
    node: bool,
    up: bool,
}

impl BrokerDown {
    fn stop() -> Self {
        let node = std::env::var("OUTAGE_BROKER").as_deref() == Ok("node");
        run("rabbitmqctl", &[if node { "stop" } else { "stop_app" }]);
        BrokerDown { node, up: false }
    }

    fn bring_up(&self) -> std::io::Result<()> {
        if self.node {
            Command::new("rabbitmq-server").arg("-detached").status()?;
            Command::new("rabbitmqctl")
                .args(["await_startup", "--timeout", "120"])
                .status()?;
        } else {
            Command::new("rabbitmqctl").arg("start_app").status()?;
        }
        Ok(())
    }

    fn start(mut self) {
        self.bring_up().unwrap();
        self.up = true;
        // The management API (vhosts, queue depths) comes up with the rest.
        let overview = format!("{}/api/overview", common::broker::management_base());
        for _ in 0..480 {
            let answered = Command::new("curl")
                .args(["-s", "-f", "-o", "/dev/null", &overview])
                .status()
                .is_ok_and(|status| status.success());
            if answered {
                return;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("the management API did not come back");
    }
}

impl Drop for BrokerDown {
    fn drop(&mut self) {
        if !self.up {
            let _ = self.bring_up();
        }
    }
}

/// A real `pg_dump` whose output pauses once, after `pause_at` bytes of its first run, until
/// the test resumes it: the moment a fault is injected is known, not guessed.
struct PausingDump {
    dir: tempfile::TempDir,
}

impl PausingDump {
    fn new(pause_at: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let first = dir.path().join("first");
        std::fs::write(&first, "").unwrap();
        let script = dir.path().join("pause.py");
        std::fs::write(
            &script,
            format!(
                "import os, subprocess, sys, time\n\
                 dump = subprocess.Popen(['pg_dump'] + sys.argv[1:], stdout=subprocess.PIPE)\n\
                 sent = 0\n\
                 while (b := dump.stdout.read(65536)):\n    \
                     sys.stdout.buffer.write(b); sys.stdout.buffer.flush(); sent += len(b)\n    \
                     if sent >= {pause_at} and os.path.exists({first:?}):\n        \
                         os.remove({first:?}); open({paused:?}, 'w').close()\n        \
                         while not os.path.exists({resume:?}): time.sleep(0.05)\n\
                 sys.exit(dump.wait())\n",
                first = first.display().to_string(),
                paused = dir.path().join("paused").display().to_string(),
                resume = dir.path().join("resume").display().to_string(),
            ),
        )
        .unwrap();
        common::pg_dump_wrapper(
            dir.path(),
            &format!("exec python3 {} \"$@\"", script.display()),
        );
        PausingDump { dir }
    }

    fn bin_dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    async fn wait_paused(&self) {
        let paused = self.path("paused");
        for _ in 0..1200 {
            if paused.exists() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("pg_dump never reached its pause");
    }

    fn resume(&self) {
        std::fs::write(self.path("resume"), "").unwrap();
    }
}

/// ~30 MB of dump that compresses to ~14 MB: three parts of 5 MiB.
fn add_noise(database: &str) {
    psql(
        database,
        "CREATE TABLE noise AS SELECT i, md5(random()::text) || md5(random()::text) AS v \
         FROM generate_series(1, 400000) i",
    );
}

/// Waits until the backup's multipart upload exists in Garage: the upload is under way.
async fn wait_for_upload(prefix: &str) {
    for _ in 0..600 {
        if garage_multipart_uploads(prefix).await > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no multipart upload started under {prefix}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn storage_down_mid_upload_the_backup_completes_without_a_dead_letter() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let dump = PausingDump::new(20_000_000);
    let bin_dir = dump.bin_dir();
    let mut h = Harness::with_store(
        "o_s3",
        Store::Garage,
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__STORAGE__PART_SIZE_MIB", "5"),
            // Production's retry schedule: a failed attempt waits 5 s, then 30 s.
            ("BACKUP__MESSAGING__RETRY_DELAYS", "5s,30s"),
            ("BACKUP__MESSAGING__MAX_ATTEMPTS", "6"),
        ],
    );
    add_noise(&h._db.name);
    h.start_worker().await;
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;

    dump.wait_paused().await;
    wait_for_upload(&h.setup.prefix).await;
    let down = GarageDown::stop();
    let stopped = Instant::now();
    dump.resume();
    tokio::time::sleep(outage()).await;
    down.start();
    let events = client.follow(&command).await;
    let took = stopped.elapsed();

    let last = events.last().unwrap();
    assert_eq!(last.event, event::COMPLETED, "{events:#?}");
    assert!(
        events.iter().all(|e| e.will_retry != Some(false)),
        "nothing failed for good: {events:#?}"
    );
    assert_eq!(dead_letters(&h).await, 0, "no dead letter");
    assert_eq!(h.manifests_of(&command.id).await, 1);
    let listed = catalog::list(&h.setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap();
    let report = verify_backup(&h.setup.ctx, &listed.manifests[0])
        .await
        .unwrap();
    assert!(report.ok(), "{report:?}");
    let attempts = events.iter().filter(|e| e.event == event::STARTED).count();
    if outage() <= Duration::from_secs(30) {
        // Well inside storage.retry_timeout (3 min): the part uploads wait it out.
        assert_eq!(attempts, 1, "{events:#?}");
    }
    let retried: Vec<String> = events
        .iter()
        .filter_map(|e| e.error.as_ref().map(|error| error.message.clone()))
        .collect();
    Tally {
        commands: 1,
        ..Tally::default()
    }
    .print(
        &format!("S3 (Garage) stopped for {} s mid-upload, under a worker", outage().as_secs()),
        &format!(
            "completed on attempt {attempts}, {} s after the stop, 0 dead letters; retried after: {retried:?}",
            took.as_secs()
        ),
    );
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_longer_than_the_retry_budget_fails_retryably_and_commits_nothing() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let source = TestDatabase::create("o_budget");
    add_noise(&source.name);
    let dump = PausingDump::new(20_000_000);
    let bin_dir = dump.bin_dir();
    let setup = TestSetup::new(
        &source.name,
        Store::Garage,
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__STORAGE__PART_SIZE_MIB", "5"),
            ("BACKUP__STORAGE__REQUEST_TIMEOUT", "2s"),
            ("BACKUP__STORAGE__CONNECT_TIMEOUT", "1s"),
            ("BACKUP__STORAGE__MAX_RETRIES", "3"),
            ("BACKUP__STORAGE__RETRY_TIMEOUT", "3s"),
        ],
    );
    let request = BackupRequest::new(TargetKind::Postgres, "test");
    let cancel = CancellationToken::new();
    let started = Instant::now();
    let (result, down) = tokio::join!(run_backup(&setup.ctx, &request, &cancel), async {
        dump.wait_paused().await;
        wait_for_upload(&setup.prefix).await;
        let down = GarageDown::stop();
        dump.resume();
        down
    });
    // Garage is still down: the attempt gave up on its own.
    let err = result.expect_err("no backup without its storage");
    let gave_up = started.elapsed();
    down.start();
    let message = err.to_string();
    assert!(err.retryable(), "{message}");
    assert!(message.contains("storage"), "{message}");
    let listed = catalog::list(&setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap();
    assert!(listed.manifests.is_empty(), "{listed:?}");
    let objects = setup.ctx.storage.list("postgres/").await.unwrap();
    assert!(objects.is_empty(), "no object: {objects:?}");

    let manifest = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .expect("the next attempt succeeds");
    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");
    Tally {
        commands: 2,
        ..Tally::default()
    }
    .print(
        "S3 stopped past a 3 s retry budget (storage.retry_timeout)",
        &format!(
            "the attempt failed as retryable after {} s, 0 manifests, 0 objects; the next attempt completed and verified",
            gave_up.as_secs()
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_restarted_mid_step_loses_no_command_and_runs_it_once() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bin = tempfile::tempdir().unwrap();
    let first = bin.path().join("first");
    std::fs::write(&first, "").unwrap();
    // The first dump is still running when the broker goes away.
    let bin_dir = common::pg_dump_wrapper(
        bin.path(),
        &format!(
            "if [ -e {f} ]; then rm {f}; exec sleep 600; fi\nexec pg_dump \"$@\"",
            f = first.display()
        ),
    );
    let mut h = Harness::new(
        "o_broker",
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    h.start_worker().await;
    let state = h.workers[0].2.clone();
    let events = EventLog::open(&h).await;
    let command = backup_command(TargetKind::Postgres);
    {
        let client = h.client().await;
        client.send(&command).await;
    }
    events.wait_started(&command.id).await;

    let down = BrokerDown::stop();
    let stopped = Instant::now();
    // Its lease died with the connection: the worker stops the step and keeps nothing of it.
    wait_until("the worker sees the broker gone", || {
        !state.consuming.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    tokio::time::sleep(outage().saturating_sub(stopped.elapsed())).await;
    let debris: Vec<PathBuf> = h
        .setup
        .stored_files()
        .into_iter()
        .filter(|path| !path.to_string_lossy().contains("/audit/"))
        .collect();
    assert!(debris.is_empty(), "the stopped step left {debris:?}");
    down.start();

    // The worker reconnects unaided and the broker redelivers the unacknowledged command.
    let seen = events.until_final(&command.id).await;
    let completed = seen.iter().filter(|e| e.event == event::COMPLETED).count();
    assert_eq!(completed, 1, "{seen:#?}");
    assert_eq!(h.manifests_of(&command.id).await, 1, "{seen:#?}");
    wait_until("the worker consumes again", || {
        state.consuming.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;

    // And it takes new commands.
    let next = backup_command(TargetKind::Postgres);
    let mut client = h.client().await;
    client.send(&next).await;
    let after = client.follow(&next).await;
    assert_eq!(after.last().unwrap().event, event::COMPLETED, "{after:#?}");
    assert_eq!(dead_letters(&h).await, 0, "no dead letter");
    Tally {
        commands: 2,
        ..Tally::default()
    }
    .print(
        &format!(
            "RabbitMQ {} for {} s mid-step",
            if std::env::var("OUTAGE_BROKER").as_deref() == Ok("node") {
                "node stopped (rabbitmqctl stop), then started,"
            } else {
                "stop_app, then start_app,"
            },
            outage().as_secs()
        ),
        "the worker stopped the step, reconnected unaided; the command ran again after it: 1 completed event, 1 manifest, 0 dead letters; a new command completed",
    );
    h.stop_workers().await;
}

/// Messages in the dead-letter queue, once the management API has counted them (it takes a
/// few seconds after a broker restart).
async fn dead_letters(h: &Harness) -> i64 {
    let dead = &h.setup.settings.messaging.dead_queue;
    for _ in 0..100 {
        let count = h.vhost.queue_messages(dead);
        if count >= 0 {
            return count;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    h.vhost.queue_messages(dead)
}
