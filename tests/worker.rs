//! The message-driven worker against the real RabbitMQ (a vhost per test) and PostgreSQL.

mod common;

use crm_backup::audit::{Origin, Outcome};
use crm_backup::metrics::from_storage;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::broker::{TestVhost, assert_valid_event};
use common::harness::{EventLog, Harness, WAIT, backup_command, names, wait_until};
use common::{TestDatabase, pg_dump_wrapper, psql};
use crm_backup::config::RabbitmqSettings;
use crm_backup::messaging::command::Command as BackupCommand;
use crm_backup::messaging::dlq::{self, Selection};
use crm_backup::messaging::event::{self};
use crm_backup::messaging::publisher::Outgoing;
use crm_backup::model::TargetKind;
use crm_backup::model::{Action, TargetSelector};
use crm_backup::storage::catalog;
use secrecy::SecretString;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_command_runs_once_and_reports_in_order() {
    // One step at a time: the copy below is settled before the command after it starts.
    let mut h = Harness::new("w_happy", &[("BACKUP__RABBITMQ__CONCURRENCY", "1")]);
    h.start_worker().await;
    let mut client = h.client().await;
    let mut command = backup_command(TargetKind::Postgres);
    command.reason = Some("before migration 0042".into());
    client.send(&command).await;

    let events = client.follow(&command).await;
    assert_eq!(
        names(&events),
        [("backup.started".into(), 1), ("backup.completed".into(), 1)]
    );
    let done = &events[1];
    assert_eq!(
        done.correlation_id.as_deref(),
        Some(format!("corr-{}", command.id).as_str())
    );
    let backup_id = done.backup_id.clone().unwrap();
    assert!(
        done.location
            .as_ref()
            .unwrap()
            .ends_with(&format!("postgres/{backup_id}/"))
    );
    assert!(done.size_bytes.unwrap() > 0 && done.sha256.is_some());
    let manifest = catalog::get(&h.setup.ctx.storage, &backup_id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(manifest.command_id.as_deref(), Some(command.id.as_str()));
    assert_eq!(manifest.requested_by, "test-suite");
    assert_eq!(manifest.reason.as_deref(), Some("before migration 0042"));

    // The same command again: acked and re-announced, not run again.
    client.send(&command).await;
    let again = client.follow(&command).await;
    assert_eq!(names(&again), [("backup.completed".into(), 1)]);
    assert_eq!(again[0].backup_id.as_deref(), Some(backup_id.as_str()));
    assert_eq!(h.manifests_of(&command.id).await, 1);

    // A copy the worker made of it (a worker that parked or retried it and died before its
    // ack leaves both): acked in silence, the result was announced. Then a command after it.
    let log = EventLog::open(&h).await;
    let mut copy = lapin::types::FieldTable::default();
    copy.insert("x-crm-copy".into(), lapin::types::AMQPValue::Boolean(true));
    client
        .publisher
        .to_queue(
            "backup.commands",
            &command.to_json(),
            &lapin::BasicProperties::default().with_message_id(command.id.as_str().into()),
            copy,
        )
        .await
        .unwrap();
    let after = backup_command(TargetKind::Postgres);
    client.send(&after).await;
    client.follow(&after).await;
    let seen = log.take().await;
    assert!(
        !seen.is_empty() && seen.iter().all(|e| e.command_id == after.id),
        "the copy was not announced again: {seen:#?}"
    );
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_commands_are_dead_lettered_with_a_reason() {
    let mut h = Harness::new("w_malformed", &[]);
    h.start_worker().await;
    let mut client = h.client().await;

    client.send_raw(b"{this is not json", "bad-json-1").await;
    let not_json = BackupCommand {
        id: "bad-json-1".into(),
        ..backup_command(TargetKind::Postgres)
    };
    let events = client.follow(&not_json).await;
    let failed = events.last().unwrap();
    assert_eq!(failed.event, event::FAILED);
    assert_eq!(failed.will_retry, Some(false));
    assert_eq!(failed.error.as_ref().unwrap().kind, "invalid_json");

    let unknown_field = br#"{"version":1,"id":"bad-schema-1","action":"backup","target":"postgres","requested_by":"x","colour":"red"}"#;
    client.send_raw(unknown_field, "bad-schema-1").await;
    let schema = BackupCommand {
        id: "bad-schema-1".into(),
        ..backup_command(TargetKind::Postgres)
    };
    let events = client.follow(&schema).await;
    let error = events.last().unwrap().error.clone().unwrap();
    assert_eq!(error.kind, "schema_violation");
    assert!(
        error.message.contains("unknown field `colour`"),
        "{}",
        error.message
    );
    assert!(!error.retryable);

    let unknown_target = br#"{"version":1,"id":"bad-target-1","action":"backup","target":"mysql","requested_by":"x"}"#;
    client.send_raw(unknown_target, "bad-target-1").await;
    let target = BackupCommand {
        id: "bad-target-1".into(),
        ..backup_command(TargetKind::Postgres)
    };
    let events = client.follow(&target).await;
    assert!(
        events
            .last()
            .unwrap()
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("unknown target `mysql`")
    );

    let letters = dlq::list(
        &client.connection,
        client.publisher.names(),
        &["guest".to_string()],
    )
    .await
    .unwrap();
    let ids: Vec<&str> = letters.iter().map(|l| l.id.as_str()).collect();
    assert_eq!(ids, ["bad-json-1", "bad-schema-1", "bad-target-1"]);
    assert_eq!(letters[1].error_kind.as_deref(), Some("schema_violation"));
    assert!(letters[1].last_error.as_ref().unwrap().contains("colour"));
    assert_eq!(letters[1].action.as_deref(), Some("backup"));
    assert!(
        letters
            .iter()
            .all(|l| l.attempts == 1 && l.failed_at.is_some())
    );
    // Listing removes nothing.
    assert_eq!(
        dlq::list(
            &client.connection,
            client.publisher.names(),
            &["guest".to_string()]
        )
        .await
        .unwrap()
        .len(),
        3
    );
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transient_failures_are_retried_with_growing_delays() {
    let bin = tempfile::tempdir().unwrap();
    let counter = bin.path().join("count");
    std::fs::write(&counter, "0").unwrap();
    // The first two pg_dump runs die by SIGKILL (retryable); the third succeeds.
    let bin_dir = pg_dump_wrapper(
        bin.path(),
        &format!(
            "n=$(cat {c}); echo $((n + 1)) > {c}\nif [ \"$n\" -lt 2 ]; then kill -KILL $$; fi\nexec pg_dump \"$@\"",
            c = counter.display()
        ),
    );
    let mut h = Harness::new(
        "w_retry",
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;

    let events = client.follow(&command).await;
    assert_eq!(
        names(&events),
        [
            ("backup.started".into(), 1),
            ("backup.failed".into(), 1),
            ("backup.started".into(), 2),
            ("backup.failed".into(), 2),
            ("backup.started".into(), 3),
            ("backup.completed".into(), 3),
        ]
    );
    for failed in [&events[1], &events[3]] {
        assert_eq!(failed.will_retry, Some(true));
        let error = failed.error.as_ref().unwrap();
        assert!(
            error.retryable && error.message.contains("killed by signal 9"),
            "{error:?}"
        );
    }
    let first_wait = events[2].at - events[1].at;
    let second_wait = events[4].at - events[3].at;
    assert!(
        first_wait >= chrono::Duration::milliseconds(750),
        "{first_wait}"
    );
    assert!(
        second_wait >= chrono::Duration::milliseconds(1550),
        "{second_wait}"
    );
    assert!(second_wait > first_wait);
    assert_eq!(h.manifests_of(&command.id).await, 1);
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_attempts_dead_letter_and_replay_completes() {
    let bin = tempfile::tempdir().unwrap();
    let broken = bin.path().join("broken");
    std::fs::write(&broken, "").unwrap();
    let bin_dir = pg_dump_wrapper(
        bin.path(),
        &format!(
            "if [ -e {} ]; then kill -KILL $$; fi\nexec pg_dump \"$@\"",
            broken.display()
        ),
    );
    let mut h = Harness::new(
        "w_exhaust",
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;

    let events = client.follow(&command).await;
    let failures: Vec<_> = events.iter().filter(|e| e.event == event::FAILED).collect();
    assert_eq!(failures.len(), 3, "{events:#?}");
    assert_eq!(
        failures.iter().map(|e| e.will_retry).collect::<Vec<_>>(),
        [Some(true), Some(true), Some(false)]
    );
    let names_of = client.publisher.names().clone();
    let letters = dlq::list(&client.connection, &names_of, &["guest".to_string()])
        .await
        .unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, command.id);
    assert_eq!(letters[0].attempts, 3);
    assert_eq!(letters[0].error_kind.as_deref(), Some("tool_failed"));
    assert_eq!(h.manifests_of(&command.id).await, 0);

    // The cause is fixed; a dry run changes nothing, a replay runs it from attempt 1.
    std::fs::remove_file(&broken).unwrap();
    let permissions = h.setup.settings.authorization.policy().unwrap();
    let rules = dlq::ReplayRules {
        permissions: &permissions,
        include_restores: false,
        replayed_by: "cli:tester",
    };
    let planned = dlq::replay(
        &client.connection,
        &client.publisher,
        &Selection::All,
        &rules,
        true,
    )
    .await
    .unwrap();
    assert_eq!(planned[0].skipped, None);
    assert_eq!(planned.len(), 1);
    assert_eq!(
        dlq::list(&client.connection, &names_of, &["guest".to_string()])
            .await
            .unwrap()
            .len(),
        1
    );
    let replayed = dlq::replay(
        &client.connection,
        &client.publisher,
        &Selection::Ids(vec![command.id.clone()]),
        &rules,
        false,
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].letter.sender.as_deref(), Some("guest"));
    let events = client.follow(&command).await;
    assert_eq!(
        names(&events),
        [("backup.started".into(), 1), ("backup.completed".into(), 1)]
    );
    assert!(
        dlq::list(&client.connection, &names_of, &["guest".to_string()])
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(h.manifests_of(&command.id).await, 1);
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commands_for_a_busy_target_wait_for_it_without_a_retry() {
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = pg_dump_wrapper(bin.path(), "sleep 1\nexec pg_dump \"$@\"");
    // A command sent through a retry tier would come back only after 10 minutes.
    let mut h = Harness::new(
        "w_lease",
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__MESSAGING__RETRY_DELAYS", "10m"),
        ],
    );
    h.start_worker().await;
    h.start_worker().await;
    let mut client = h.client().await;
    let commands: Vec<BackupCommand> = (0..4)
        .map(|_| backup_command(TargetKind::Postgres))
        .collect();
    for command in &commands {
        client.send(command).await;
    }

    let all = client
        .follow_all(&commands.iter().collect::<Vec<_>>())
        .await;
    let span = |id: &str| {
        let of = |name: &str| {
            let at: Vec<_> = all
                .iter()
                .filter(|e| e.command_id == id && e.event == name)
                .map(|e| e.at)
                .collect();
            assert_eq!(at.len(), 1, "one {name} for {id}: {all:#?}");
            at[0]
        };
        (of(event::STARTED), of(event::COMPLETED))
    };
    let spans: Vec<_> = commands.iter().map(|c| span(&c.id)).collect();
    for (i, (a_start, a_end)) in spans.iter().enumerate() {
        for (b_start, b_end) in &spans[i + 1..] {
            assert!(
                a_end <= b_start || b_end <= a_start,
                "steps overlapped: {a_start}..{a_end} and {b_start}..{b_end}"
            );
        }
    }
    assert!(
        all.iter()
            .all(|e| e.event != event::FAILED && e.attempt == 1),
        "busy is not a failure and costs no attempt: {all:#?}"
    );
    for command in &commands {
        assert_eq!(h.manifests_of(&command.id).await, 1);
    }
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiting_command_whose_target_nobody_holds_is_swept_up() {
    let mut h = Harness::new("w_sweep", &[]);
    h.start_worker().await;
    // A waiting queue deleted under the worker is declared again by its next sweep. The
    // DELETE fails the test unless it deleted the queue; checking that the queue is gone
    // afterwards would race with a sweep that runs in between.
    let queue = format!("queues/{}/backup.waiting.postgres", h.vhost.name);
    common::broker::management("DELETE", &queue, None);
    let mut back = false;
    for _ in 0..100 {
        if h.vhost.queue_exists("backup.waiting.postgres") {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the deleted waiting queue is declared again");
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    // As left by a worker that parked it and died before the holder looked again.
    client
        .publisher
        .to_queue(
            "backup.waiting.postgres",
            &command.to_json(),
            &lapin::BasicProperties::default().with_message_id(command.id.as_str().into()),
            Default::default(),
        )
        .await
        .unwrap();
    let events = client.follow(&command).await;
    assert_eq!(
        names(&events),
        [
            (event::STARTED.to_string(), 1),
            (event::COMPLETED.to_string(), 1)
        ]
    );
    assert_eq!(h.manifests_of(&command.id).await, 1);
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_broker_connection_is_recovered() {
    let mut h = Harness::new("w_reconnect", &[]);
    h.start_worker().await;
    let state = h.workers[0].2.clone();
    // The management API lists connections a few seconds after they open.
    let mut worker_connections = Vec::new();
    for _ in 0..120 {
        worker_connections = h.vhost.connections();
        if !worker_connections.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        !worker_connections.is_empty(),
        "the worker's connection never showed up"
    );
    for name in &worker_connections {
        h.vhost.close_connection(name);
    }
    wait_until("the worker notices", || {
        !state.consuming.load(Ordering::SeqCst)
    })
    .await;
    wait_until("the worker reconnects", || {
        state.consuming.load(Ordering::SeqCst)
    })
    .await;

    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let events = client.follow(&command).await;
    assert_eq!(events.last().unwrap().event, event::COMPLETED);
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restores_are_accepted_only_from_users_granted_them() {
    let mut h = Harness::new("w_restore", &[]);
    let (ops, ops_url) = h.vhost.user("ops");
    let (_, intruder_url) = h.vhost.user("intruder");
    // Settings are read at start: rebuild the context with ops granted restores.
    let mut env = h.setup.env.clone();
    env.insert(
        "BACKUP__AUTHORIZATION__GRANTS".into(),
        format!("guest=*,{ops}=restore"),
    );
    h.setup.settings = crm_backup::config::Settings::load(&env).unwrap();
    h.setup.ctx = crm_backup::jobs::JobContext::new(h.setup.settings.clone()).unwrap();
    h.start_worker().await;

    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    let backup_id = client
        .follow(&backup)
        .await
        .last()
        .unwrap()
        .backup_id
        .clone()
        .unwrap();

    let restore = |into: &str| {
        let mut command = BackupCommand::new(
            Action::Restore,
            TargetSelector::One(TargetKind::Postgres),
            "ops-console",
        );
        command.backup_id = Some(backup_id.clone());
        command.options = serde_json::json!({ "into": into });
        command
    };
    let denied_db = common::unique("w_denied");
    let mut intruder = h.client_as(&intruder_url).await;
    let denied = restore(&denied_db);
    intruder.send(&denied).await;
    let events = intruder.follow(&denied).await;
    let error = events.last().unwrap().error.clone().unwrap();
    assert_eq!(error.kind, "unauthorized");
    assert!(!common::database_exists(&denied_db));

    let allowed_db = TestDatabase::adopt(&common::unique("w_allowed"));
    let mut operator = h.client_as(&ops_url).await;
    let allowed = restore(&allowed_db.name);
    operator.send(&allowed).await;
    let events = operator.follow(&allowed).await;
    let done = events.last().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{events:#?}");
    assert_eq!(
        psql(&allowed_db.name, "SELECT count(*) FROM crm_notes"),
        "2000"
    );
    assert!(
        done.details.as_ref().unwrap()["destination"]
            .as_str()
            .unwrap()
            .contains(&allowed_db.name)
    );

    // A worker killed after the restored database took its name, before the command was
    // marked done, leaves the command to be redelivered with no marker: it completes, as
    // already restored, and the database is not restored twice.
    h.setup
        .ctx
        .storage
        .delete(&format!("commands/{}.json", allowed.id))
        .await
        .unwrap();
    operator.send(&allowed).await;
    let events = operator.follow(&allowed).await;
    let done = events.last().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{events:#?}");
    assert_eq!(
        done.details.as_ref().unwrap()["restore"]["already_restored"],
        true,
        "{done:#?}"
    );
    h.stop_workers().await;
}

fn spawn_worker_process(h: &Harness) -> Child {
    Command::new(common::crm_backup_bin())
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(h.child_env())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("worker process starts")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_killed_mid_step_leaves_the_command_to_another_exactly_once() {
    let bin = tempfile::tempdir().unwrap();
    let first_run = bin.path().join("first");
    std::fs::write(&first_run, "").unwrap();
    // The first pg_dump stalls long enough to kill its worker under it.
    let bin_dir = pg_dump_wrapper(
        bin.path(),
        &format!(
            "if [ -e {f} ]; then rm {f}; sleep 30; fi\nexec pg_dump \"$@\"",
            f = first_run.display()
        ),
    );
    let h = Harness::new(
        "w_sigkill",
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    let mut client = h.client().await;
    let mut doomed = spawn_worker_process(&h);
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let started = client.events.next(WAIT).await.unwrap().unwrap();
    assert_eq!(
        (started.event.as_str(), started.command_id.as_str()),
        (event::STARTED, command.id.as_str())
    );
    doomed.kill().unwrap(); // SIGKILL
    doomed.wait().unwrap();

    let mut survivor = spawn_worker_process(&h);
    let events = client.follow(&command).await;
    survivor.kill().unwrap();
    survivor.wait().unwrap();
    assert_eq!(
        events.last().unwrap().event,
        event::COMPLETED,
        "{events:#?}"
    );
    assert_eq!(h.manifests_of(&command.id).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_the_running_step_finish() {
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = pg_dump_wrapper(bin.path(), "sleep 2\nexec pg_dump \"$@\"");
    let h = Harness::new(
        "w_sigterm",
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    let mut client = h.client().await;
    let mut worker = spawn_worker_process(&h);
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let started = client.events.next(WAIT).await.unwrap().unwrap();
    assert_eq!(started.event, event::STARTED);
    let status = Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let events = client.follow(&command).await;
    assert_eq!(events.last().unwrap().event, event::COMPLETED);
    let exit = worker.wait().unwrap();
    assert!(
        exit.success(),
        "the worker exits cleanly after its step: {exit}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shutdown_timeout_aborts_the_step_and_another_worker_redoes_it() {
    let bin = tempfile::tempdir().unwrap();
    let first_run = bin.path().join("first");
    std::fs::write(&first_run, "").unwrap();
    let bin_dir = pg_dump_wrapper(
        bin.path(),
        &format!(
            "if [ -e {f} ]; then rm {f}; sleep 20; fi\nexec pg_dump \"$@\"",
            f = first_run.display()
        ),
    );
    let mut h = Harness::new(
        "w_abort",
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__MESSAGING__SHUTDOWN_TIMEOUT", "1s"),
        ],
    );
    let mut client = h.client().await;
    let mut worker = spawn_worker_process(&h);
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    assert_eq!(
        client.events.next(WAIT).await.unwrap().unwrap().event,
        event::STARTED
    );
    Command::new("kill")
        .args(["-TERM", &worker.id().to_string()])
        .status()
        .unwrap();
    let exit = worker.wait().unwrap();
    assert!(exit.success(), "{exit}");
    assert_eq!(
        h.manifests_of(&command.id).await,
        0,
        "an aborted step writes no manifest"
    );
    assert!(
        h.setup
            .stored_files()
            .iter()
            .all(|f| !f.to_string_lossy().contains("postgres/")),
        "{:?}",
        h.setup.stored_files()
    );

    h.start_worker().await;
    let events = client.follow(&command).await;
    assert_eq!(
        events.last().unwrap().event,
        event::COMPLETED,
        "{events:#?}"
    );
    assert_eq!(h.manifests_of(&command.id).await, 1);
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backup_all_fans_out_into_steps_sharing_a_set_id() {
    let mut h = Harness::new("w_all", &[]);
    h.start_worker().await;
    let mut client = h.client().await;
    let command = BackupCommand::new(Action::Backup, TargetSelector::All, "scheduler:nightly");
    client.send(&command).await;
    let events = client.follow(&command).await;
    let parent = &events[0];
    assert_eq!(
        (parent.event.as_str(), parent.command_id.as_str()),
        (event::STARTED, command.id.as_str())
    );
    let done: Vec<_> = events
        .iter()
        .filter(|e| e.event == event::COMPLETED)
        .collect();
    assert_eq!(done.len(), h.setup.ctx.targets.enabled().len());
    for event in done {
        assert_eq!(event.set_id.as_deref(), Some(command.id.as_str()));
        let manifest = catalog::get(
            &h.setup.ctx.storage,
            &event.backup_id.clone().unwrap().parse().unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(manifest.set_id.as_deref(), Some(command.id.as_str()));
    }
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enqueue_wait_exits_with_the_commands_result() {
    let mut h = Harness::new("w_enqueue", &[]);
    h.start_worker().await;
    let env = h.setup.env.clone();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        common::run_cli(
            &env,
            &[
                "enqueue",
                "backup",
                "postgres",
                "--reason",
                "cli",
                "--wait",
                "--timeout",
                "60s",
            ],
        )
    })
    .await
    .unwrap();
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stdout.contains("\"event\":\"backup.completed\""),
        "{stdout}"
    );

    let env = h.setup.env.clone();
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        common::run_cli(
            &env,
            &[
                "enqueue",
                "verify",
                "postgres",
                "--backup",
                "20200101T000000Z-postgres-abcd",
                "--wait",
                "--timeout",
                "60s",
            ],
        )
    })
    .await
    .unwrap();
    assert!(!ok, "{stdout}");
    assert!(stderr.contains("not found"), "{stderr}");

    let env = h.setup.env.clone();
    let (ok, _, stderr) = tokio::task::spawn_blocking(move || {
        common::run_cli(&env, &["enqueue", "explode", "postgres"])
    })
    .await
    .unwrap();
    assert!(!ok);
    assert!(stderr.contains("invalid value 'explode'"), "{stderr}");
    assert!(
        stderr.contains("possible values: backup, restore"),
        "{stderr}"
    );

    // Both enqueues left a record (the unparsable one ran nothing), and so did the worker's
    // steps, under the same command ids.
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let history = crm_backup::audit::read(&h.setup.ctx.storage, since, None, 100)
        .await
        .unwrap();
    let enqueued: Vec<_> = history
        .records
        .iter()
        .filter(|r| r.action == "enqueue")
        .collect();
    assert_eq!(enqueued.len(), 2, "{history:#?}");
    assert_eq!(enqueued[0].outcome, Outcome::Failed);
    assert_eq!(enqueued[1].outcome, Outcome::Completed);
    assert_eq!(enqueued[1].origin, Origin::Cli);
    assert_eq!(enqueued[1].details.as_ref().unwrap()["action"], "backup");
    for (enqueue, action, outcome) in [
        (enqueued[1], "backup", Outcome::Completed),
        (enqueued[0], "verify", Outcome::Failed),
    ] {
        assert!(
            history.records.iter().any(|r| r.origin == Origin::Worker
                && r.action == action
                && r.outcome == outcome
                && r.user == "guest"
                && r.command_id == enqueue.command_id),
            "{history:#?}"
        );
    }
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_that_keeps_killing_workers_is_stopped_by_the_delivery_limit() {
    let bin = tempfile::tempdir().unwrap();
    // pg_dump's parent is the worker process: this "poison" kills whoever runs it.
    let bin_dir = pg_dump_wrapper(bin.path(), "kill -KILL $PPID\nsleep 5");
    let h = Harness::new(
        "w_poison",
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__MESSAGING__DELIVERY_LIMIT", "2"),
        ],
    );
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let names = client.publisher.names().clone();
    let mut crashes = 0;
    let letters = loop {
        let letters = dlq::list(&client.connection, &names, &["guest".to_string()])
            .await
            .unwrap();
        if !letters.is_empty() || crashes == 6 {
            break letters;
        }
        let mut worker = spawn_worker_process(&h);
        // The poison kills it; at the last delivery the broker allows, it refuses the
        // command instead and keeps running.
        let mut status = None;
        for _ in 0..100 {
            status = worker.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let Some(status) = status else {
            worker.kill().unwrap();
            worker.wait().unwrap();
            continue;
        };
        assert!(!status.success(), "the poison kills the worker");
        crashes += 1;
        // Give the broker a moment to requeue or dead-letter the unacked delivery.
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(letters.len(), 1, "after {crashes} crashes");
    assert_eq!(letters[0].id, command.id);
    assert_eq!(letters[0].error_kind.as_deref(), Some("delivery_limit"));
    assert_eq!(crashes, 2, "the limit stops it after {crashes} crashes");
    assert_eq!(h.manifests_of(&command.id).await, 0);
    // The requester hears of it: a dead letter the broker made itself would say nothing.
    let events = client.follow(&command).await;
    let failed = events.last().unwrap();
    assert_eq!(failed.event, event::FAILED, "{events:#?}");
    assert_eq!(failed.will_retry, Some(false));
    let error = failed.error.as_ref().unwrap();
    assert_eq!(error.kind, "delivery_limit");
    assert!(
        error.message.contains("delivered 3 times"),
        "{}",
        error.message
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thousands_of_refused_leases_leave_the_worker_able_to_lease() {
    // Each refusal makes the broker close a channel; lapin never reuses such channel ids,
    // so refusals on a long-lived connection would exhaust it after 2047 (seen in the
    // messaging benchmark). Leases use a connection per attempt instead.
    let vhost = TestVhost::create("w_lease_churn");
    let settings = RabbitmqSettings {
        url: SecretString::from(vhost.url()),
        concurrency: 1,
    };
    let holder = crm_backup::messaging::lease::Leases::new(&settings, "backup.lease.");
    let contender = crm_backup::messaging::lease::Leases::new(&settings, "backup.lease.");
    let held = holder
        .try_acquire(TargetKind::Redis, false)
        .await
        .unwrap()
        .expect("free at first");
    for attempt in 0..2100 {
        let refused = contender.try_acquire(TargetKind::Redis, false).await;
        assert!(
            matches!(refused, Ok(None)),
            "attempt {attempt}: {:?}",
            refused.map(|l| l.is_some())
        );
    }
    held.release().await;
    let taken = contender
        .try_acquire(TargetKind::Redis, false)
        .await
        .unwrap();
    assert!(taken.is_some(), "released leases can be taken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drill_and_prune_commands_run_through_the_worker() {
    let retention = [
        ("BACKUP__RETENTION__DAILY", "1"),
        ("BACKUP__RETENTION__WEEKLY", "0"),
        ("BACKUP__RETENTION__MONTHLY", "0"),
        ("BACKUP__RETENTION__YEARLY", "1"),
    ];
    let mut h = Harness::new("w_prune", &retention);
    h.start_worker().await;
    let mut client = h.client().await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let command = backup_command(TargetKind::Postgres);
        client.send(&command).await;
        let events = client.follow(&command).await;
        ids.push(events.last().unwrap().backup_id.clone().unwrap());
    }

    // A drill of the latest backup: verified, restored into a scratch database, dropped.
    let drill = BackupCommand::new(
        Action::Drill,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    client.send(&drill).await;
    let events = client.follow(&drill).await;
    let done = events.last().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert_valid_event(done);
    assert_eq!(done.backup_id.as_deref(), Some(ids[2].as_str()));
    let scratch = done.details.as_ref().unwrap()["scratch"].as_str().unwrap();
    assert!(
        scratch.contains("_drill") && scratch.ends_with("(dropped)"),
        "{scratch}"
    );

    // A dry run reports, deletes nothing.
    let mut dry = BackupCommand::new(
        Action::Prune,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    dry.options = serde_json::json!({ "dry_run": true });
    client.send(&dry).await;
    let events = client.follow(&dry).await;
    let done = events.last().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert_valid_event(done);
    let details = done.details.as_ref().unwrap();
    assert_eq!(details["dry_run"], true);
    assert_eq!(details["deleted"], serde_json::json!([ids[1], ids[0]]));
    assert_eq!(
        catalog::list(&h.setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap()
            .manifests
            .len(),
        3
    );

    // `all` runs as one step over every target: the two older backups go.
    let all = BackupCommand::new(Action::Prune, TargetSelector::All, "test-suite");
    client.send(&all).await;
    let events = client.follow(&all).await;
    let done = events.last().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert_eq!(done.details.as_ref().unwrap()["kept"], 1);
    let left: Vec<String> = catalog::list(&h.setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap()
        .manifests
        .iter()
        .map(|m| m.id.to_string())
        .collect();
    assert_eq!(left, vec![ids[2].clone()]);

    // Unknown prune options are a permanent failure, not a silent default.
    let mut bad = BackupCommand::new(Action::Prune, TargetSelector::All, "test-suite");
    bad.options = serde_json::json!({ "dryrun": true });
    client.send(&bad).await;
    let events = client.follow(&bad).await;
    let failed = events.last().unwrap();
    assert_eq!(failed.event, event::FAILED);
    assert_eq!(failed.will_retry, Some(false));
    assert!(failed.error.as_ref().unwrap().message.contains("dryrun"));
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_http_endpoint_reports_health_readiness_and_metrics() {
    let mut h = Harness::new("w_http", &[("BACKUP__HTTP__METRICS_REFRESH", "500ms")]);
    h.start_worker().await;
    let state = h.workers[0].2.clone();
    let stop = CancellationToken::new();
    let (address, server) = crm_backup::endpoint::serve("127.0.0.1:0", state.clone(), stop.clone())
        .await
        .expect("endpoint binds");
    let get = |path: &str| {
        let url = format!("http://{address}{path}");
        async move {
            let response = reqwest::get(url).await.expect("endpoint answers");
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, "ok\n".to_string()));
    assert_eq!(get("/readyz").await.0, 200);

    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let events = client.follow(&command).await;
    let size = events.last().unwrap().size_bytes.unwrap();
    client.send_raw(b"not json", "http-bad-1").await;
    let bad = BackupCommand {
        id: "http-bad-1".into(),
        ..backup_command(TargetKind::Postgres)
    };
    client.follow(&bad).await;

    let (status, metrics) = get("/metrics").await;
    assert_eq!(status, 200);
    for expected in [
        "crm_backup_steps_total{action=\"backup\",target=\"postgres\",outcome=\"completed\"} 1"
            .to_string(),
        "crm_backup_step_duration_seconds_count{action=\"backup\",target=\"postgres\"} 1".into(),
        format!("crm_backup_last_stored_bytes{{target=\"postgres\"}} {size}"),
        "crm_backup_dead_lettered_total{reason=\"invalid_json\"} 1".into(),
        "crm_backup_steps_running 0".into(),
        "crm_backup_consuming 1".into(),
    ] {
        assert!(
            metrics.lines().any(|l| l == expected),
            "{expected} not in\n{metrics}"
        );
    }
    assert!(metrics.contains(
        "crm_backup_last_success_timestamp_seconds{action=\"backup\",target=\"postgres\"} "
    ));
    // The letter waits in the dead-letter queue: a gauge of its depth, not a rate.
    let mut counted = false;
    for _ in 0..100 {
        if get("/metrics")
            .await
            .1
            .lines()
            .any(|l| l == "crm_backup_dead_letters 1")
        {
            counted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        counted,
        "the dead letter is counted: {}",
        get("/metrics").await.1
    );
    let metrics = get("/metrics").await.1;
    assert!(
        metrics
            .lines()
            .any(|l| l == r#"crm_backup_commands_waiting{target="postgres"} 0"#),
        "the commands waiting per target are counted: {metrics}"
    );

    // A worker that is not consuming is not ready.
    h.stop_workers().await;
    let (status, body) = get("/readyz").await;
    assert_eq!(status, 503, "{body}");
    stop.cancel();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_come_from_storage_so_a_restart_or_a_cli_run_forgets_nothing() {
    let mut h = Harness::new("w_seed", &[]);
    h.start_worker().await;
    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    assert_eq!(
        client.follow(&backup).await.last().unwrap().event,
        event::COMPLETED
    );
    let mut drill = BackupCommand::new(
        Action::Drill,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    drill.backup_id = Some("latest".into());
    client.send(&drill).await;
    assert_eq!(
        client.follow(&drill).await.last().unwrap().event,
        event::COMPLETED
    );
    h.stop_workers().await;
    // While no worker runs, an operator verifies from the CLI.
    let env = h.setup.env.clone();
    let (ok, _, stderr) =
        tokio::task::spawn_blocking(move || common::run_cli(&env, &["verify", "postgres"]))
            .await
            .unwrap();
    assert!(ok, "{stderr}");

    // A new worker knows all of it from storage alone.
    let state = crm_backup::metrics::WorkerState::default();
    let since = chrono::Utc::now() - from_storage::FIRST_LOOKBACK;
    from_storage::refresh(&h.setup.ctx.storage, &state.metrics, since).await;
    let text = state.render();
    let manifest = catalog::latest(&h.setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap()
        .unwrap();
    for action in ["backup", "drill", "verify"] {
        for metric in [
            "crm_backup_last_success_timestamp_seconds",
            "crm_backup_last_duration_seconds",
        ] {
            let series = format!("{metric}{{action=\"{action}\",target=\"postgres\"}} ");
            assert!(text.contains(&series), "{series} missing in\n{text}");
        }
    }
    for expected in [
        format!(
            "crm_backup_last_raw_bytes{{target=\"postgres\"}} {}",
            manifest.raw_size()
        ),
        format!(
            "crm_backup_last_stored_bytes{{target=\"postgres\"}} {}",
            manifest.stored_size()
        ),
        "crm_backup_build_info{version=\"0.1.0\"} 1".to_string(),
    ] {
        assert!(
            text.lines().any(|l| l == expected),
            "{expected} missing in\n{text}"
        );
    }
    let stored: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("crm_backup_storage_bytes{target=\"postgres\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(stored >= manifest.stored_size() as f64, "{text}");
    // The local directory's file system: its size and free bytes.
    let gauge = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
            .parse()
            .unwrap()
    };
    let (capacity, free) = (
        gauge("crm_backup_storage_capacity_bytes"),
        gauge("crm_backup_storage_free_bytes"),
    );
    assert!(capacity > 0.0 && free > 0.0 && free <= capacity, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_much_smaller_than_the_last_is_flagged_everywhere() {
    let mut h = Harness::new("w_size", &[]);
    h.start_worker().await;
    let mut client = h.client().await;
    let first = backup_once(&mut client).await;
    assert_eq!(first.event, event::COMPLETED);
    assert_eq!(
        first.warnings, None,
        "a first backup has nothing to compare with"
    );
    // The same data again: nothing to say.
    let same = backup_once(&mut client).await;
    assert_eq!(same.warnings, None);
    // 60 % of the rows gone: the dump is about 40 % of the last one.
    psql(&h._db.name, "DELETE FROM crm_notes WHERE i > 800");
    let smaller = backup_once(&mut client).await;
    assert_eq!(
        smaller.event,
        event::COMPLETED,
        "a flagged backup is still a backup"
    );
    assert_eq!(
        smaller.warnings,
        Some(vec!["size_drop".to_string()]),
        "raw {:?} after {:?}",
        smaller.raw_size_bytes,
        same.raw_size_bytes
    );
    let manifest = catalog::get(
        &h.setup.ctx.storage,
        &smaller.backup_id.clone().unwrap().parse().unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(manifest.warnings, ["size_drop"]);
    let history = crm_backup::audit::read(
        &h.setup.ctx.storage,
        chrono::Utc::now() - chrono::Duration::hours(1),
        None,
        10,
    )
    .await
    .unwrap();
    assert_eq!(history.records[0].backup_id, smaller.backup_id);
    assert_eq!(
        history.records[0].details.as_ref().unwrap()["warnings"],
        serde_json::json!(["size_drop"])
    );
    let text = h.workers[0].2.render();
    assert!(
        text.lines()
            .any(|l| l
                == "crm_backup_last_backup_warning{target=\"postgres\",warning=\"size_drop\"} 1"),
        "{text}"
    );
    h.stop_workers().await;
}

/// Sends one PostgreSQL backup and returns its final event.
async fn backup_once(client: &mut common::harness::Client) -> event::Event {
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    client.follow(&command).await.pop().unwrap()
}

/// Backup workers hold only the public key: a restore, drill or verify they receive goes to
/// the key-holding worker; while none consumes, it fails as retryable, naming what is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_drill_of_an_encrypted_backup_runs_on_the_key_holding_worker() {
    let keys = tempfile::tempdir().unwrap();
    let (public, identity) = common::age_key(keys.path());
    let mut h = Harness::new(
        "w_keyed",
        &[
            ("BACKUP_AGE_RECIPIENTS", public.as_str()),
            ("BACKUP__MESSAGING__RETRY_DELAYS", "2s"),
            ("BACKUP__MESSAGING__MAX_ATTEMPTS", "4"),
        ],
    );
    assert!(h.setup.settings.identity_file().is_none());
    h.start_worker().await;
    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    let done = client.follow(&backup).await.pop().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    let backup_id = done.backup_id.unwrap();
    let manifest = catalog::list(&h.setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap()
        .manifests
        .pop()
        .unwrap();
    assert!(
        manifest.artifacts.iter().all(|a| a.encryption.is_some()),
        "the backup is encrypted"
    );

    // No key-holding worker yet: the drill fails as retryable and says what is missing.
    let drill = BackupCommand::new(
        Action::Drill,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    client.send(&drill).await;
    let first = loop {
        let event = client.events.next(WAIT).await.unwrap().expect("an event");
        if event.command_id == drill.id && event.event == event::FAILED {
            break event;
        }
    };
    let error = first.error.clone().unwrap();
    assert_eq!(error.kind, "no_keyholder", "{first:?}");
    assert!(
        error.retryable && first.will_retry == Some(true),
        "{first:?}"
    );
    assert!(
        error.message.contains("backup.commands.keyed")
            && error.message.contains("BACKUP_AGE_IDENTITY_FILE"),
        "{}",
        error.message
    );

    // The key-holding worker consumes only the keyed queue: the retry is handed over to it.
    let mut env = h.setup.env.clone();
    env.insert(
        "BACKUP_AGE_IDENTITY_FILE".into(),
        identity.display().to_string(),
    );
    env.insert("BACKUP_WORKER_CONSUME".into(), "keyed".into());
    let keyholder =
        crm_backup::jobs::JobContext::new(crm_backup::config::Settings::load(&env).unwrap())
            .unwrap();
    h.start_worker_with(keyholder).await;
    let done = client.follow(&drill).await.pop().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert_eq!(done.backup_id.as_deref(), Some(backup_id.as_str()));

    // The scheduler's drills take the same way.
    let config = tempfile::tempdir().unwrap();
    std::fs::write(
        config.path().join("test.toml"),
        "[scheduler]\nmissed_window = \"1s\"\n\n[[scheduler.schedules]]\nname = \"drill-often\"\n\
         cron = \"*/2 * * * * *\"\ntimezone = \"UTC\"\naction = \"drill\"\ntarget = \"postgres\"\n",
    )
    .unwrap();
    let mut scheduler = Command::new(env!("CARGO_BIN_EXE_crm-backup-scheduler"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("BACKUP_LOG_FORMAT", "json")
        .envs(h.child_env())
        .env("BACKUP_CONFIG_DIR", config.path())
        .env("BACKUP_ENV", "test")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("scheduler starts");
    let scheduled = loop {
        let event = client.events.next(WAIT).await.unwrap().expect("an event");
        if event.action.as_deref() == Some("drill")
            && event.command_id != drill.id
            && (event.event == event::COMPLETED || event.will_retry == Some(false))
        {
            break event;
        }
    };
    let _ = scheduler.kill();
    let _ = scheduler.wait();
    assert_eq!(scheduled.event, event::COMPLETED, "{scheduled:?}");
    assert_eq!(scheduled.backup_id.as_deref(), Some(backup_id.as_str()));
    h.stop_workers().await;
}

/// The CLI's backups, verifies, restores, drills and prunes publish the events a worker's do.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_operations_publish_the_same_events_as_the_worker() {
    let h = Harness::new("w_cli_events", &[]);
    let mut client = h.client().await;
    let mut env = h.setup.env.clone();
    env.insert("USER".into(), "night-operator".into());
    let cli = |args: &'static [&'static str]| {
        let env = env.clone();
        tokio::task::spawn_blocking(move || common::run_cli(&env, args))
    };
    let mut next_two = async || {
        let mut pair = Vec::new();
        while pair.len() < 2 {
            let event = client.events.next(WAIT).await.unwrap().expect("an event");
            assert_valid_event(&event);
            pair.push(event);
        }
        pair
    };

    let (ok, stdout, stderr) = cli(&["run", "postgres", "--json"]).await.unwrap();
    assert!(ok, "{stdout}{stderr}");
    let printed: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let events = next_two().await;
    assert_eq!(
        names(&events),
        [(event::STARTED.into(), 1), (event::COMPLETED.into(), 1)]
    );
    let done = &events[1];
    assert!(done.command_id.starts_with("cli-"), "{done:?}");
    assert_eq!(events[0].command_id, done.command_id);
    assert_eq!(done.requested_by.as_deref(), Some("cli:night-operator"));
    assert_eq!(done.action.as_deref(), Some("backup"));
    assert_eq!(done.target.as_deref(), Some("postgres"));
    assert_eq!(done.backup_id.as_deref(), printed["backup_id"].as_str());
    assert!(done.sha256.is_some() && done.size_bytes.is_some() && done.duration_ms.is_some());

    let (ok, stdout, stderr) = cli(&["verify", "postgres"]).await.unwrap();
    assert!(ok, "{stdout}{stderr}");
    let events = next_two().await;
    assert_eq!(events[1].event, event::COMPLETED, "{events:?}");
    assert_eq!(events[1].action.as_deref(), Some("verify"));

    for (args, action) in [
        (&["drill", "postgres"][..], "drill"),
        (&["prune", "postgres", "--dry-run"][..], "prune"),
    ] {
        let args: Vec<&'static str> = args.to_vec();
        let env = env.clone();
        let (ok, stdout, stderr) =
            tokio::task::spawn_blocking(move || common::run_cli(&env, &args))
                .await
                .unwrap();
        assert!(ok, "{stdout}{stderr}");
        let events = next_two().await;
        assert_eq!(events[1].event, event::COMPLETED, "{events:?}");
        assert_eq!(events[1].action.as_deref(), Some(action));
        assert_eq!(
            events[1].requested_by.as_deref(),
            Some("cli:night-operator")
        );
    }

    // A failure is announced as one, final.
    let (ok, _, _) = cli(&[
        "restore",
        "postgres",
        "--backup",
        "20200101T000000Z-postgres-abcd",
        "--into",
        "nowhere",
    ])
    .await
    .unwrap();
    assert!(!ok);
    let events = next_two().await;
    let failed = &events[1];
    assert_eq!(failed.event, event::FAILED, "{events:?}");
    assert_eq!(failed.action.as_deref(), Some("restore"));
    assert_eq!(failed.will_retry, Some(false));
    assert!(failed.error.is_some());

    // Without a reachable broker the operation still runs, and says its events are missing.
    let mut offline = h.setup.env.clone();
    offline.insert(
        "RABBITMQ_URL".into(),
        "amqp://guest:guest@127.0.0.1:1/%2f".into(),
    );
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || common::run_cli(&offline, &["run", "postgres"]))
            .await
            .unwrap();
    assert!(ok, "{stdout}{stderr}");
    assert!(
        stderr.contains("events of this run are not published"),
        "{stderr}"
    );
    assert!(!stderr.contains("guest:guest"), "{stderr}");
}

/// A running step's bytes show as a gauge while it runs, and go back to 0 when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_running_step_exposes_the_bytes_it_has_moved() {
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = pg_dump_wrapper(
        bin.path(),
        "pg_dump \"$@\" | { head -c 32768; sleep 2; cat; }",
    );
    let mut h = Harness::new(
        "w_progress",
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__PIPELINE__PROGRESS_EVERY", "100ms"),
            ("BACKUP__PIPELINE__CHUNK_KIB", "16"),
        ],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let state = h.workers[0].2.clone();
    let gauge = "crm_backup_step_bytes_done{action=\"backup\",target=\"postgres\"}";
    // At least what was read before the pause (other tests in this process back up
    // PostgreSQL too, and the counter is per target).
    wait_until("the gauge shows the bytes read so far", || {
        state
            .render()
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{gauge} ")))
            .and_then(|value| value.parse::<f64>().ok())
            .is_some_and(|bytes| bytes >= 32768.0)
    })
    .await;
    let done = client.follow(&command).await.pop().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert!(
        state.render().contains(&format!("{gauge} 0")),
        "{}",
        state.render()
    );
    h.stop_workers().await;
}

/// One generated message: its body, id and properties.
fn fuzzed_message(rng: &mut impl rand::Rng, n: usize) -> (Vec<u8>, lapin::BasicProperties) {
    use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
    let id = format!("fuzz-{n}");
    let valid = serde_json::json!({
        "version": 1, "id": id, "action": "restore", "target": "postgres",
        "backup_id": "20200101T000000Z-postgres-abcd", "options": {"into": "fuzz_nowhere"},
        "requested_by": "fuzz",
    });
    let body = match rng.random_range(0..7) {
        // Schema-aware: real actions and targets, options and ids of any shape.
        0 => {
            let actions = [
                "restore", "verify", "drill", "prune", "backup", "delete", "",
            ];
            let targets = ["postgres", "redis", "documents", "mysql", "", "ALL"];
            let values = [
                serde_json::json!(null),
                serde_json::json!(-1),
                serde_json::json!("x".repeat(rng.random_range(0..3000))),
                serde_json::json!({"nested": [1, 2, {"deep": true}]}),
                serde_json::json!(["a", "b"]),
                serde_json::json!(true),
            ];
            let pick = |rng: &mut dyn rand::RngCore, options: &[serde_json::Value]| {
                options[rand::Rng::random_range(rng, 0..options.len())].clone()
            };
            let mut command = valid.clone();
            command["action"] = serde_json::json!(actions[rng.random_range(0..actions.len())]);
            command["target"] = serde_json::json!(targets[rng.random_range(0..targets.len())]);
            command["options"] = serde_json::json!({
                "into": pick(rng, &values), "dry_run": "yes", "schemas": pick(rng, &values),
            });
            command["backup_id"] = pick(rng, &values);
            if command["action"] == "prune" || command["action"] == "backup" {
                // Without a backup to act on, these are invalid by their options.
                command["options"]["colour"] = serde_json::json!("red");
            }
            serde_json::to_vec(&command).unwrap()
        }
        // Random mutations of a valid command.
        1 => {
            let mut bytes = serde_json::to_vec(&valid).unwrap();
            for _ in 0..rng.random_range(1..8) {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
            bytes
        }
        // Raw random bytes.
        2 => (0..rng.random_range(0..512))
            .map(|_| rng.random())
            .collect(),
        // Huge.
        3 => format!(
            "{{\"version\":1,\"id\":\"{id}\",\"pad\":\"{}\"}}",
            "p".repeat(2 << 20)
        )
        .into_bytes(),
        // Deeply nested.
        4 => {
            let depth = rng.random_range(100..100_000);
            format!("{}{}", "[".repeat(depth), "]".repeat(depth)).into_bytes()
        }
        // Valid JSON of the wrong kind.
        5 => b"[1, 2, 3]".to_vec(),
        // A valid command (it fails: the backup does not exist).
        _ => serde_json::to_vec(&valid).unwrap(),
    };
    let mut headers = FieldTable::default();
    let attempt = match rng.random_range(0..4) {
        0 => AMQPValue::LongString(LongString::from("abc")),
        1 => AMQPValue::LongLongInt(rng.random()),
        2 => AMQPValue::Boolean(true),
        _ => AMQPValue::LongLongInt(1),
    };
    headers.insert(ShortString::from("x-attempt"), attempt);
    if rng.random_range(0..4) == 0 {
        // A sender header from the worker's own broker user (as the tests' publisher is):
        // trusted, and `ops` has no grants here.
        headers.insert(
            ShortString::from("x-crm-sender"),
            AMQPValue::LongString(LongString::from("ops")),
        );
    }
    let content_type = [
        "application/json",
        "text/plain",
        "application/octet-stream",
        "",
    ][rng.random_range(0..4)];
    let properties = lapin::BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_user_id("guest".into())
        .with_content_type(content_type.into())
        .with_headers(headers);
    (body, properties)
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|value| value.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0)
}

/// Generated messages of every kind: each ends in exactly one final event (done, or
/// dead-lettered with a reason), no step panics, and the worker keeps consuming.
/// `FUZZ_MESSAGES` sets how many (300 here; scripts/reliability.sh sends 10,000).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn generated_messages_each_end_in_one_final_event_and_the_worker_stays_up() {
    use rand::SeedableRng;
    let messages: usize = std::env::var("FUZZ_MESSAGES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let seed: u64 = std::env::var("FUZZ_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(rand::random);
    let mut h = Harness::new("w_fuzz", &[("BACKUP__RABBITMQ__CONCURRENCY", "4")]);
    h.start_worker().await;
    let mut client = h.client().await;
    let names = client.publisher.names().clone();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let rss_before = rss_kib();
    let mut finals: std::collections::BTreeMap<String, usize> = Default::default();
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    let mut sent = 0;
    while sent < messages || finals.values().sum::<usize>() < messages {
        // Keep a few hundred in flight; read events as they come.
        while sent < messages && sent - finals.values().sum::<usize>().min(sent) < 200 {
            let (body, properties) = fuzzed_message(&mut rng, sent);
            client
                .publisher
                .publish(Outgoing {
                    exchange: &names.commands_exchange,
                    routing_key: &names.commands_queue,
                    body: &body,
                    properties,
                    must_route: true,
                })
                .await
                .unwrap();
            sent += 1;
        }
        let event = client.events.next(WAIT).await.unwrap().unwrap_or_else(|| {
            panic!(
                "seed {seed}: no event; {} of {messages} ended",
                finals.values().sum::<usize>()
            )
        });
        assert_valid_event(&event);
        let last = event.event == event::COMPLETED || event.will_retry == Some(false);
        if last {
            *finals.entry(event.command_id.clone()).or_default() += 1;
            let kind = event
                .error
                .as_ref()
                .map_or("completed", |e| e.kind.as_str());
            *kinds.entry(kind.to_string()).or_default() += 1;
        }
    }
    assert_eq!(
        finals.values().sum::<usize>(),
        messages,
        "seed {seed}: {kinds:?}"
    );
    for kind in ["delivery_limit", "internal"] {
        assert!(
            !kinds.contains_key(kind),
            "seed {seed}: {kind} (a step panicked?): {kinds:?}"
        );
    }
    assert!(
        h.workers[0].2.consuming.load(Ordering::SeqCst) && !h.workers[0].1.is_finished(),
        "seed {seed}: the worker stopped"
    );
    let grown = rss_kib().saturating_sub(rss_before);
    println!(
        "fuzz: {messages} messages, seed {seed}, outcomes {kinds:?}, RSS {} -> {} KiB",
        rss_before,
        rss_before + grown
    );
    assert!(grown < 256 * 1024, "seed {seed}: RSS grew by {grown} KiB");
    h.stop_workers().await;
}

/// A tmpfs mounted for one test, unmounted when dropped.
struct SmallDisk(tempfile::TempDir);

impl SmallDisk {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .expect("mount runs");
        assert!(
            status.success(),
            "mounting a tmpfs needs root (the test machines run as root)"
        );
        SmallDisk(dir)
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Local storage that fills up mid-backup: a clear error, no manifest, no staging file left,
/// and the worker goes on with the next command.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_local_disk_fails_the_backup_cleanly_and_the_worker_goes_on() {
    let disk = SmallDisk::mount("3m");
    let dir = disk.0.path().display().to_string();
    let mut h = Harness::new(
        "w_full",
        &[
            ("BACKUP_STORAGE_DIR", dir.as_str()),
            ("BACKUP__MESSAGING__MAX_ATTEMPTS", "2"),
        ],
    );
    psql(
        &h._db.name,
        "CREATE TABLE big AS SELECT i, md5(random()::text) || md5(random()::text) AS noise \
         FROM generate_series(1, 150000) i",
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let command = backup_command(TargetKind::Postgres);
    client.send(&command).await;
    let events = client.follow(&command).await;
    let failed = events.last().unwrap();
    assert_eq!(failed.event, event::FAILED, "{events:#?}");
    assert_eq!(failed.will_retry, Some(false));
    let error = failed.error.as_ref().unwrap();
    assert!(
        error.message.contains("No space left on device"),
        "the error says why: {error:?}"
    );

    assert!(
        catalog::list(&h.setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap()
            .manifests
            .is_empty()
    );
    // The storage directory holds audit records and nothing of the backup.
    let mut left = Vec::new();
    let mut dirs = vec![disk.0.path().to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if !path.starts_with(disk.0.path().join("audit")) {
                left.push(path);
            }
        }
    }
    assert!(left.is_empty(), "nothing of the backup is left: {left:?}");
    assert!(
        std::fs::read_dir(disk.0.path().join("audit")).is_ok(),
        "the walk saw the storage directory"
    );

    let mut prune = BackupCommand::new(
        Action::Prune,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    prune.options = serde_json::json!({ "dry_run": true });
    client.send(&prune).await;
    let done = client.follow(&prune).await.pop().unwrap();
    assert_eq!(done.event, event::COMPLETED, "{done:?}");
    assert!(h.workers[0].2.consuming.load(Ordering::SeqCst));
    h.stop_workers().await;
    drop(h);
}
