//! The permission model and the attacks it stops, through the real worker and broker: who may
//! ask for what, a sender header from outside, replays of refused letters, command ids claimed
//! in advance, backups that change what they are, and connection strings passed as database
//! names (a loopback listener stands for the attacker's host).

mod common;

use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::harness::{Harness, backup_command};
use crm_backup::audit;
use crm_backup::messaging::command::Command as BackupCommand;
use crm_backup::messaging::dlq::{self, ReplayRules, Selection};
use crm_backup::messaging::event;
use crm_backup::messaging::headers;
use crm_backup::model::{Action, TargetKind, TargetSelector};
use lapin::types::FieldTable;

/// A listener on loopback that counts the connections it accepts (and closes them).
struct Trap {
    port: u16,
    accepted: Arc<AtomicUsize>,
}

impl Trap {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Trap { port, accepted }
    }

    fn connections(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn restore_command(options: serde_json::Value) -> BackupCommand {
    let mut command = BackupCommand::new(
        Action::Restore,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    command.backup_id = Some("latest".into());
    command.options = options;
    command
}

/// The last event of `command`: a `backup.failed` that will not be retried, of `kind`.
fn assert_refused(events: &[crm_backup::messaging::event::Event], kind: &str) -> String {
    let last = events.last().unwrap();
    assert_eq!(last.event, event::FAILED, "{events:#?}");
    assert_eq!(last.will_retry, Some(false));
    let error = last.error.clone().unwrap();
    assert_eq!(error.kind, kind, "{error:?}");
    error.message
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nobody_is_trusted_implicitly_and_refused_letters_stay_dead() {
    // The worker's own user (guest) may only back up.
    let mut h = Harness::new(
        "sec_grants",
        &[("BACKUP__AUTHORIZATION__GRANTS", "guest=backup")],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    assert_eq!(
        client.follow(&backup).await.last().unwrap().event,
        event::COMPLETED
    );

    let into = common::unique("sec_denied");
    let restore = restore_command(serde_json::json!({ "into": into }));
    client.send(&restore).await;
    let message = assert_refused(&client.follow(&restore).await, "unauthorized");
    assert!(
        message.contains("AMQP user `guest` may not restore postgres"),
        "{message}"
    );
    assert!(!common::database_exists(&into));

    // A verify it may not ask for either; prune neither.
    let mut verify = BackupCommand::new(
        Action::Verify,
        TargetSelector::One(TargetKind::Postgres),
        "test-suite",
    );
    verify.backup_id = Some("latest".into());
    client.send(&verify).await;
    assert_refused(&client.follow(&verify).await, "unauthorized");

    // Replaying the dead letters never runs what was refused.
    let permissions = h.setup.settings.authorization.policy().unwrap();
    let rules = ReplayRules {
        permissions: &permissions,
        include_restores: true,
        replayed_by: "cli:tester",
    };
    let names = client.publisher.names().clone();
    let replayed = dlq::replay(
        &client.connection,
        &client.publisher,
        &Selection::All,
        &rules,
        false,
    )
    .await
    .unwrap();
    assert_eq!(replayed.len(), 2);
    assert!(replayed.iter().all(|r| {
        r.skipped
            .as_deref()
            .is_some_and(|why| why.contains("unauthorized"))
    }));
    let letters = dlq::list(&client.connection, &names, &["guest".to_string()])
        .await
        .unwrap();
    assert_eq!(letters.len(), 2, "both letters stay dead");
    assert!(!common::database_exists(&into));

    // An operator's replay from the CLI: recorded with what it skipped.
    let env = h.setup.env.clone();
    let (ok, stdout, stderr) =
        tokio::task::spawn_blocking(move || common::run_cli(&env, &["dlq", "replay", "--all"]))
            .await
            .unwrap();
    assert!(ok, "{stdout}{stderr}");

    // The step and both refusals left audit records in storage, with the verified user.
    let since = chrono::Utc::now() - chrono::Duration::hours(1);
    let mut history = audit::read(&h.setup.ctx.storage, since, None, 100)
        .await
        .unwrap();
    let replay = history.records.remove(0);
    assert_eq!(
        (replay.action.as_str(), replay.origin),
        ("dlq-replay", audit::Origin::Cli),
        "{replay:#?}"
    );
    let details = replay.details.unwrap();
    assert_eq!(
        details["replayed"].as_array().unwrap().len(),
        0,
        "{details}"
    );
    assert_eq!(details["skipped"].as_array().unwrap().len(), 2, "{details}");
    let seen: Vec<(&str, &str, &str)> = history
        .records
        .iter()
        .map(|r| (r.action.as_str(), r.outcome.as_str(), r.user.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            ("verify", "refused", "guest"),
            ("restore", "refused", "guest"),
            ("backup", "completed", "guest")
        ],
        "{history:#?}"
    );
    for record in &history.records {
        assert_eq!(record.origin, audit::Origin::Worker);
        assert_eq!(record.requested_by, "test-suite");
    }
    assert_eq!(
        history.records[1].error_kind.as_deref(),
        Some("unauthorized")
    );
    assert_eq!(history.records[1].options["into"], into.as_str());
    assert_eq!(
        history.records[2].command_id.as_deref(),
        Some(backup.id.as_str())
    );
    assert!(history.records[2].backup_id.is_some() && history.records[2].raw_bytes > Some(0));
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sender_header_from_outside_is_ignored() {
    let mut h = Harness::new("sec_header", &[]);
    let (_, intruder_url) = h.vhost.user("intruder");
    h.start_worker().await;
    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    client.follow(&backup).await;

    // The intruder has no grants; a header naming guest (who may do everything) changes nothing.
    let intruder = h.client_as(&intruder_url).await;
    let into = common::unique("sec_spoofed");
    let restore = restore_command(serde_json::json!({ "into": into }));
    let mut spoofed = FieldTable::default();
    headers::set_text(&mut spoofed, headers::SENDER, "guest");
    intruder
        .publisher
        .command(&restore, None, spoofed)
        .await
        .unwrap();
    let message = assert_refused(&client.follow(&restore).await, "unauthorized");
    assert!(message.contains("intruder"), "{message}");
    assert!(!common::database_exists(&into));
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_command_id_cannot_be_claimed_in_advance() {
    let mut h = Harness::new("sec_ids", &[]);
    h.start_worker().await;
    let mut client = h.client().await;
    let first = backup_command(TargetKind::Postgres);
    client.send(&first).await;
    client.follow(&first).await;

    // A cheap verify under the id the next backup will use...
    let mut claim = BackupCommand::new(
        Action::Verify,
        TargetSelector::One(TargetKind::Postgres),
        "someone",
    );
    claim.backup_id = Some("latest".into());
    client.send(&claim).await;
    assert_eq!(
        client.follow(&claim).await.last().unwrap().event,
        event::COMPLETED
    );
    // ...does not make that backup look done: it is refused as a conflict.
    let mut real = backup_command(TargetKind::Postgres);
    real.id = claim.id.clone();
    client.send(&real).await;
    let message = assert_refused(&client.follow(&real).await, "id_conflict");
    assert!(
        message.contains("already used by a different command"),
        "{message}"
    );
    assert_eq!(h.manifests_of(&real.id).await, 0);
    // The same command again is still answered from its marker.
    client.send(&claim).await;
    assert_eq!(
        client.follow(&claim).await.last().unwrap().event,
        event::COMPLETED
    );
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn backups_that_change_what_they_are_need_their_own_grant() {
    let mut h = Harness::new(
        "sec_scope",
        &[
            ("BACKUP__AUTHORIZATION__GRANTS", "guest=backup"),
            ("BACKUP__RETENTION__MAX_RETAIN", "30d"),
        ],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    let mut partial = backup_command(TargetKind::Postgres);
    partial.options = serde_json::json!({ "schemas": ["public"] });
    client.send(&partial).await;
    let message = assert_refused(&client.follow(&partial).await, "unauthorized");
    assert!(
        message.contains("change what a backup of postgres is"),
        "{message}"
    );
    let mut pinned = backup_command(TargetKind::Postgres);
    pinned.retain_until = Some(chrono::Utc::now() + chrono::Duration::days(3650));
    client.send(&pinned).await;
    assert_refused(&client.follow(&pinned).await, "unauthorized");
    assert_eq!(
        h.manifests_of(&partial.id).await + h.manifests_of(&pinned.id).await,
        0
    );
    h.stop_workers().await;

    // Granted, the pin still may not reach past retention.max_retain.
    let mut h = Harness::new(
        "sec_scope2",
        &[
            ("BACKUP__AUTHORIZATION__GRANTS", "guest=*"),
            ("BACKUP__RETENTION__MAX_RETAIN", "30d"),
        ],
    );
    h.start_worker().await;
    let mut client = h.client().await;
    client.send(&pinned).await;
    let message = assert_refused(&client.follow(&pinned).await, "invalid_request");
    assert!(message.contains("retention.max_retain"), "{message}");
    h.stop_workers().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_connection_string_as_a_database_name_reaches_nobody() {
    let trap = Trap::start();
    let mut h = Harness::new("sec_dbname", &[]);
    h.start_worker().await;
    let mut client = h.client().await;
    let backup = backup_command(TargetKind::Postgres);
    client.send(&backup).await;
    client.follow(&backup).await;

    let hostile = format!("host=127.0.0.1 port={} dbname=x", trap.port);
    let restore = restore_command(serde_json::json!({ "into": hostile }));
    client.send(&restore).await;
    let message = assert_refused(&client.follow(&restore).await, "invalid_options");
    assert!(message.contains("not a plain database name"), "{message}");

    // The same name read from a manifest (a drill derives its scratch name from it).
    let manifest = crm_backup::storage::catalog::latest(&h.setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap()
        .unwrap();
    common::rewrite_facts(&h.setup, &manifest, |facts| {
        facts["database"] = serde_json::json!(hostile)
    })
    .await;
    let err = common::drill_details(&h.setup, &manifest)
        .await
        .unwrap_err();
    assert!(err.contains("not a plain database name"), "{err}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        trap.connections(),
        0,
        "nothing connected to the attacker's host"
    );
    h.stop_workers().await;
}
