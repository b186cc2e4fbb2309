//! Prune against real storage (a local directory and the Garage bucket): the retention plan
//! is applied manifest first, kept backups stay restorable, unreadable manifests and young
//! debris are left alone, old debris goes, and a dry run touches nothing.

mod common;

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use common::{Store, TestDatabase, TestSetup, psql, run_cli};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::prune::{PruneRequest, run_prune};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::{BackupId, TargetKind};
use crm_backup::storage::catalog;
use crm_backup::storage::layout::artifact_key;
use crm_backup::storage::manifest::Manifest;
use tokio_util::sync::CancellationToken;

const RETENTION: [(&str, &str); 4] = [
    ("BACKUP__RETENTION__DAILY", "3"),
    ("BACKUP__RETENTION__WEEKLY", "0"),
    ("BACKUP__RETENTION__MONTHLY", "2"),
    ("BACKUP__RETENTION__YEARLY", "1"),
];

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

/// A copy of `real` (its artifact bytes too) as if it had been taken at `time`.
async fn plant(setup: &TestSetup, real: &Manifest, time: DateTime<Utc>, suffix: &str) -> Manifest {
    let storage = &setup.ctx.storage;
    let id: BackupId = format!("{}-postgres-{suffix}", time.format("%Y%m%dT%H%M%SZ"))
        .parse()
        .unwrap();
    let mut manifest = real.clone();
    manifest.id = id.clone();
    manifest.command_id = None;
    manifest.started_at = time;
    manifest.finished_at = time + chrono::Duration::seconds(3);
    for artifact in &mut manifest.artifacts {
        let bytes = storage.get_bytes(&artifact.key, u64::MAX).await.unwrap();
        let file = artifact.key.rsplit('/').next().unwrap().to_string();
        artifact.key = artifact_key(&id, &file);
        storage.put_bytes(&artifact.key, bytes).await.unwrap();
    }
    catalog::commit(storage, &manifest, setup.ctx.signer.as_deref())
        .await
        .unwrap();
    manifest
}

async fn prune(
    ctx: &crm_backup::jobs::JobContext,
    dry_run: bool,
    now: DateTime<Utc>,
) -> crm_backup::jobs::prune::PruneReport {
    let request = PruneRequest {
        targets: vec![TargetKind::Postgres],
        dry_run,
    };
    run_prune(ctx, &request, now).await.unwrap()
}

/// Stores one object as it is (debris, a broken manifest).
async fn put(setup: &TestSetup, key: &str, bytes: &'static [u8]) {
    setup
        .ctx
        .storage
        .put_bytes(key, Bytes::from_static(bytes))
        .await
        .unwrap();
}

async fn keys(setup: &TestSetup) -> Vec<String> {
    let mut keys: Vec<String> = setup
        .ctx
        .storage
        .list("postgres/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    keys.sort();
    keys
}

async fn prune_scenario(db_prefix: &str, store: Store) {
    let db = TestDatabase::create(db_prefix);
    psql(
        &db.name,
        "CREATE TABLE t (id int); INSERT INTO t SELECT generate_series(1, 100);",
    );
    let setup = TestSetup::new(&db.name, store, &RETENTION);
    let request = BackupRequest::new(TargetKind::Postgres, "test-suite");
    let real = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap();

    // Nightly backups 2026-02-20 .. 2026-02-28, three older ones, one with retain_until.
    let mut planted = Vec::new();
    for day in 20..=28 {
        planted.push(plant(&setup, &real, at(2026, 2, day, 2), &format!("d{day}aa")).await);
    }
    let january = plant(&setup, &real, at(2026, 1, 15, 2), "jan15").await;
    let december = plant(&setup, &real, at(2025, 12, 10, 2), "dec10").await;
    let mut pinned = real.clone();
    pinned.retain_until = Some(at(2027, 1, 1, 0));
    let pinned = plant(&setup, &pinned, at(2025, 6, 1, 2), "pin01").await;

    let storage = &setup.ctx.storage;
    // A manifest nobody can read, with an artifact beside it: never deleted.
    put(
        &setup,
        "postgres/20250101T020000Z-postgres-bad01/manifest.json",
        b"{ not json",
    )
    .await;
    put(
        &setup,
        "postgres/20250101T020000Z-postgres-bad01/crm.dump.zst",
        b"x",
    )
    .await;
    // The debris of a crashed run: objects, no manifest.
    let debris = "postgres/20260225T030000Z-postgres-crash/crm.dump.zst";
    storage
        .put_bytes(debris, Bytes::from_static(b"partial"))
        .await
        .unwrap();

    // daily 3: real (today), 02-28, 02-27; monthly 2: real, 02-28; yearly 1: real;
    // retain_until: 2025-06-01. Everything else goes.
    let now = at(2026, 3, 1, 12);
    let mut expected_deleted: Vec<String> = planted[..7].iter().map(|m| m.id.to_string()).collect();
    expected_deleted.reverse();
    expected_deleted.push(january.id.to_string());
    expected_deleted.push(december.id.to_string());

    let before = keys(&setup).await;
    let dry = prune(&setup.ctx, true, now).await;
    assert_eq!(dry.deleted, expected_deleted);
    assert_eq!(keys(&setup).await, before, "a dry run deletes nothing");
    assert_eq!(dry.unreadable.len(), 1, "{:?}", dry.unreadable);
    assert!(
        dry.debris.is_empty(),
        "young debris may be a backup in progress"
    );
    let kept: Vec<&str> = dry
        .decisions
        .iter()
        .filter(|d| d.keep)
        .map(|d| d.id.as_str())
        .collect();
    assert_eq!(
        kept,
        vec![
            real.id.as_str(),
            planted[8].id.as_str(),
            planted[7].id.as_str(),
            pinned.id.as_str()
        ]
    );
    assert!(dry.decisions.iter().all(|d| d.keep != d.reasons.is_empty()));

    let done = prune(&setup.ctx, false, now).await;
    assert_eq!(done.deleted, expected_deleted);
    let after = keys(&setup).await;
    for id in &expected_deleted {
        assert!(
            !after.iter().any(|k| k.contains(id.as_str())),
            "{id} left objects behind: {after:?}"
        );
    }
    for id in &kept {
        let manifest = catalog::get(storage, &id.parse().unwrap()).await.unwrap();
        let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
        assert!(
            report.ok(),
            "kept backup {id} no longer verifies: {report:?}"
        );
    }
    assert!(after.iter().any(|k| k.contains("bad01/manifest.json")));
    assert!(after.iter().any(|k| k.contains("bad01/crm.dump.zst")));
    assert!(after.contains(&debris.to_string()));

    // With no grace, the crashed run's objects are debris and go; the rest stays. (Debris
    // age is measured against the objects' real write times, hence the real clock.)
    let mut no_grace: Vec<(&str, &str)> = RETENTION.to_vec();
    no_grace.push(("BACKUP__RETENTION__DEBRIS_GRACE", "0s"));
    let mut env = setup.env.clone();
    for (key, value) in &no_grace {
        env.insert(key.to_string(), value.to_string());
    }
    let settings = crm_backup::config::Settings::load(&env).unwrap();
    let ctx = crm_backup::jobs::JobContext::new(settings).unwrap();
    let swept = prune(&ctx, false, Utc::now()).await;
    assert!(swept.deleted.is_empty(), "{:?}", swept.deleted);
    assert_eq!(swept.debris.len(), 1);
    assert_eq!(
        swept.debris[0].dir,
        "postgres/20260225T030000Z-postgres-crash/"
    );
    let after_sweep = keys(&setup).await;
    assert!(!after_sweep.contains(&debris.to_string()));
    assert_eq!(after_sweep.len(), after.len() - 1);

    // The CLI's dry run names a reason for every backup it keeps.
    let (ok, stdout, stderr) = run_cli(&setup.env, &["prune", "--dry-run", "--target", "postgres"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&format!("{}", pinned.id)), "{stdout}");
    assert!(stdout.contains("retain_until 2027-01-01"), "{stdout}");
    assert!(stdout.contains("newest of its target"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("keep") && l.contains("unreadable") && l.contains("bad01")),
        "{stdout}"
    );
    assert_eq!(
        keys(&setup).await,
        after_sweep,
        "the CLI dry run deleted something"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_applies_retention_on_local_storage() {
    prune_scenario("prune_local", Store::Local).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_applies_retention_on_garage() {
    prune_scenario("prune_s3", Store::Garage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_reads_newest_first_and_agrees_with_the_full_listing() {
    let db = TestDatabase::create("latest");
    let setup = TestSetup::new(&db.name, Store::Local, &[]);
    let request = BackupRequest::new(TargetKind::Postgres, "test-suite");
    let real = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap();
    // Started a millisecond later in (usually) the same second, with an id that sorts
    // before the real one's: only the start time can tell which is newer.
    let later = plant(
        &setup,
        &real,
        real.started_at + chrono::Duration::milliseconds(1),
        "0000a",
    )
    .await;
    let older = plant(&setup, &real, at(2026, 1, 1, 2), "old01").await;
    let storage = &setup.ctx.storage;
    // Newer than both: the debris of a crashed run and a manifest nobody can read.
    put(
        &setup,
        "postgres/20991231T000000Z-postgres-crash/crm.dump.zst",
        b"partial",
    )
    .await;
    put(
        &setup,
        "postgres/20981231T000000Z-postgres-bad01/manifest.json",
        b"{ not json",
    )
    .await;

    let latest = catalog::latest(storage, TargetKind::Postgres)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(latest.id, later.id);
    let listing = catalog::list(storage, TargetKind::Postgres).await.unwrap();
    assert_eq!(listing.manifests.last().unwrap().id, latest.id);
    assert_eq!(listing.manifests.first().unwrap().id, older.id);
    assert!(
        catalog::latest(storage, TargetKind::Redis)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_removes_staging_files_that_killed_local_uploads_left() {
    let db = TestDatabase::create("prune_staging");
    psql(
        &db.name,
        "CREATE TABLE t (id int); INSERT INTO t VALUES (1);",
    );
    let mut hour_grace: Vec<(&str, &str)> = RETENTION.to_vec();
    hour_grace.push(("BACKUP__RETENTION__DEBRIS_GRACE", "1h"));
    let setup = TestSetup::new(&db.name, Store::Local, &hour_grace);
    let request = BackupRequest::new(TargetKind::Postgres, "test-suite");
    let real = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap();

    // A process killed mid-upload leaves `<artifact>#<digits>`, invisible to listings.
    let plant = |file: &str| {
        let path = setup.storage_path().join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, b"half an artifact").unwrap();
        path
    };
    let stale = plant("postgres/20260301T030000Z-postgres-kill1/crm.dump.zst#4711");
    let young = plant("postgres/20260302T030000Z-postgres-live1/crm.dump.zst#12");
    // And a command marker's and an audit record's, from a worker killed as it wrote them.
    let marker = plant("commands/c-killed.json#1");
    let record = plant("audit/2026/03/01/030000.000Z-killed.json#3");
    let young_marker = plant("commands/c-writing.json#2");
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    for old in [&stale, &marker, &record] {
        std::fs::File::options()
            .write(true)
            .open(old)
            .unwrap()
            .set_modified(two_hours_ago)
            .unwrap();
    }
    let ids_before = keys(&setup).await;

    let dry = prune(&setup.ctx, true, Utc::now()).await;
    assert_eq!(dry.debris.len(), 3, "{:?}", dry.debris);
    assert!(
        stale.exists() && marker.exists() && record.exists(),
        "a dry run deletes nothing"
    );

    let swept = prune(&setup.ctx, false, Utc::now()).await;
    let dirs: Vec<&str> = swept.debris.iter().map(|d| d.dir.as_str()).collect();
    assert_eq!(
        dirs,
        [
            "postgres/20260301T030000Z-postgres-kill1/",
            "commands/",
            "audit/"
        ]
    );
    assert_eq!(swept.debris[0].bytes, 16);
    assert_eq!(swept.debris[1].objects, 1);
    assert!(!stale.exists(), "the stale staging file is gone");
    assert!(
        !marker.exists() && !record.exists(),
        "so are the marker's and the record's"
    );
    assert!(young.exists(), "a young one may be an upload in progress");
    assert!(
        young_marker.exists(),
        "and a young marker's may be a write in progress"
    );
    assert_eq!(
        keys(&setup).await,
        ids_before,
        "committed backups untouched"
    );
    let report = verify_backup(&setup.ctx, &real).await.unwrap();
    assert!(report.ok(), "{report:?}");
}
