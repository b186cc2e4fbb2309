//! Network faults between crm-backup and its S3 storage: the real Garage behind a proxy
//! that cuts, drops or stalls connections mid-upload (`common::fault_proxy`), a real
//! PostgreSQL and pg_dump as the source.

mod common;

use std::time::{Duration, Instant};

use common::fault_proxy::{Direction, Fault, FaultProxy};
use common::{Store, TestDatabase, TestSetup, garage_env, psql, unique};
use crm_backup::jobs::JobError;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::pipeline::open_artifact;
use crm_backup::storage::catalog::{self, BackupRef};
use crm_backup::storage::manifest::Manifest;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio_util::sync::CancellationToken;

/// A database whose dump compresses to ~14 MB: three 5 MiB parts.
fn source_database(prefix: &str) -> TestDatabase {
    let db = TestDatabase::create(prefix);
    psql(
        &db.name,
        "CREATE TABLE noise AS SELECT i, md5(random()::text) || md5(random()::text) AS v \
         FROM generate_series(1, 400000) i",
    );
    db
}

/// Row count and a digest of every row, in order.
fn contents(database: &str) -> String {
    psql(
        database,
        "SELECT count(*) || ' ' || md5(string_agg(i || ':' || v, ',' ORDER BY i)) FROM noise",
    )
}

/// Garage's `host:port`, for the proxy.
fn garage_address() -> String {
    let endpoint = garage_env()
        .into_iter()
        .find(|(name, _)| name == "BACKUP_S3_ENDPOINT")
        .map(|(_, value)| value)
        .unwrap();
    endpoint
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

async fn backup(setup: &TestSetup) -> Result<Manifest, JobError> {
    let request = BackupRequest::new(TargetKind::Postgres, "test");
    run_backup(&setup.ctx, &request, &CancellationToken::new()).await
}

fn setup_through(proxy: &FaultProxy, database: &str, extra: &[(&str, &str)]) -> TestSetup {
    let url = proxy.url();
    let mut pairs = vec![
        ("BACKUP_S3_ENDPOINT", url.as_str()),
        ("BACKUP__STORAGE__PART_SIZE_MIB", "5"),
    ];
    pairs.extend_from_slice(extra);
    TestSetup::new(database, Store::Garage, &pairs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_mid_upload_are_retried_and_the_backup_restores() {
    let source = source_database("faults_cut");
    let proxy = FaultProxy::start(&garage_address()).await;
    let setup = setup_through(&proxy, &source.name, &[]);
    // In the middle of the second part.
    proxy.cut_after(Direction::Sent, 7_000_000, Fault::None);

    let manifest = backup(&setup)
        .await
        .expect("the backup survives a cut connection");

    assert_eq!(proxy.cuts(), 1, "the proxy cut the upload once");
    let stored = manifest.artifacts[0].stored_size;
    assert!(stored > 12_000_000, "three parts were uploaded: {stored}");
    // A download cut halfway resumes where it broke (a ranged GET); the digests prove it.
    proxy.cut_after(Direction::Received, 7_000_000, Fault::None);
    let report = verify_backup(&setup.ctx, &manifest)
        .await
        .expect("verify survives a cut download");
    assert!(report.ok(), "{report:?}");
    assert_eq!(proxy.cuts(), 2, "the proxy cut the download");
    let restored = TestDatabase::adopt(&unique("faults_cut_restored"));
    run_restore(
        &setup.ctx,
        &RestoreRequest {
            target: TargetKind::Postgres,
            backup: BackupRef::Id(manifest.id.clone()),
            options: json!({ "into": restored.name }),
            command_id: None,
        },
    )
    .await
    .expect("restore succeeds");
    assert_eq!(contents(&restored.name), contents(&source.name));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_lost_mid_upload_fails_the_backup_as_retryable_and_commits_nothing() {
    let source = source_database("faults_lost");
    for fault in [Fault::Down, Fault::Hang] {
        let proxy = FaultProxy::start(&garage_address()).await;
        let setup = setup_through(
            &proxy,
            &source.name,
            &[
                ("BACKUP__STORAGE__REQUEST_TIMEOUT", "2s"),
                ("BACKUP__STORAGE__CONNECT_TIMEOUT", "1s"),
                ("BACKUP__STORAGE__MAX_RETRIES", "3"),
                ("BACKUP__STORAGE__RETRY_TIMEOUT", "3s"),
            ],
        );
        proxy.cut_after(Direction::Sent, 7_000_000, fault);

        let started = Instant::now();
        let err = backup(&setup)
            .await
            .expect_err("the backup cannot succeed without its storage");
        let took = started.elapsed();

        assert_eq!(proxy.cuts(), 1, "{fault:?}: the proxy cut the upload");
        let message = err.to_string();
        assert!(err.retryable(), "{fault:?}: {message}");
        assert!(message.contains("storage"), "{fault:?}: {message}");
        // The failure reported is the part upload's, not that of the abort after it.
        assert!(
            message.contains("Error performing PUT"),
            "{fault:?}: {message}"
        );
        let secret = &setup.env["BACKUP_S3_SECRET_KEY"];
        assert!(!message.contains(secret.as_str()), "{fault:?}: {message}");
        // Retries end within retry_timeout for the part and again for the abort; a hang
        // that outlived its timeouts would stall here far longer.
        assert!(took < Duration::from_secs(60), "{fault:?}: took {took:?}");

        proxy.set(Fault::None);
        let listed = catalog::list(&setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap();
        assert!(listed.manifests.is_empty(), "{fault:?}: {listed:?}");
        let objects = setup.ctx.storage.list("postgres/").await.unwrap();
        assert!(objects.is_empty(), "{fault:?}: {objects:?}");

        // The next attempt, once storage is back, succeeds.
        let manifest = backup(&setup)
            .await
            .expect("the retry succeeds once storage is back");
        let report = verify_backup(&setup.ctx, &manifest)
            .await
            .expect("verify runs");
        assert!(report.ok(), "{fault:?}: {report:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_slower_than_the_request_timeout_still_gets_the_whole_artifact() {
    // pg_restore can stop reading for as long as a lock or a checkpoint holds it. A download
    // paced by its reader must not die of the request timeout (which covers a response's
    // body) nor of the retry budget its resumptions would share.
    let source = source_database("faults_slow");
    let proxy = FaultProxy::start(&garage_address()).await;
    let setup = setup_through(
        &proxy,
        &source.name,
        &[
            ("BACKUP__STORAGE__REQUEST_TIMEOUT", "1s"),
            ("BACKUP__STORAGE__RETRY_TIMEOUT", "2s"),
        ],
    );
    let manifest = backup(&setup).await.expect("backup");
    let record = &manifest.artifacts[0];

    let started = Instant::now();
    let mut artifact = open_artifact(
        &setup.ctx.storage,
        record,
        &setup.ctx.keyring().unwrap(),
        setup.ctx.codec.chunk_size,
        None,
    )
    .await
    .expect("the download starts");
    let mut buf = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = artifact
            .reader
            .read(&mut buf)
            .await
            .expect("the download goes on");
        if n == 0 {
            break;
        }
        read += n as u64;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    artifact
        .verification
        .result()
        .await
        .expect("both digests match");
    assert_eq!(read, record.raw_size);
    let took = started.elapsed();
    assert!(
        took > Duration::from_secs(5),
        "the reader took {took:?}: longer than the request and retry timeouts together"
    );
}
