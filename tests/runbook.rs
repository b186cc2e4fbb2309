//! The runbook's disaster recovery with stock tools, run as written against real encrypted,
//! signed backups in the S3 server (Garage): PostgreSQL and documents come back from nothing
//! but the bucket, the age key and the signing public key.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{Store, TestDatabase, TestSetup, psql};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::model::TargetKind;
use tokio_util::sync::CancellationToken;

const RUNBOOK: &str = include_str!("../backups/README.md");

/// The fenced block after `<!-- stock-tool restore: <name> -->`.
fn snippet(name: &str) -> String {
    let marker = format!("<!-- stock-tool restore: {name} -->");
    let mut lines = RUNBOOK.lines().skip_while(|line| line.trim() != marker);
    assert!(lines.next().is_some(), "the runbook has no {marker}");
    let fence = lines.next().expect("a fenced block follows the marker");
    assert!(
        fence.starts_with("```sh"),
        "{marker} is not followed by a sh block"
    );
    lines
        .take_while(|line| !line.starts_with("```"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs the helpers and `name`'s block in `dir` with bash, as an operator would paste them.
fn run_snippet(name: &str, dir: &Path, env: &BTreeMap<&str, String>) -> String {
    let script = format!(
        "set -euo pipefail\n{}\n{}\n",
        snippet("helpers"),
        snippet(name)
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGHOST", "127.0.0.1")
        .env("PGUSER", "postgres")
        .envs(env)
        .output()
        .expect("bash runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "the runbook's {name} restore failed:\n{script}\n{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_runbooks_stock_tool_restore_brings_back_postgres_and_documents_from_s3() {
    let keys = tempfile::tempdir().unwrap();
    let (recipient, identity) = common::age_key(keys.path());
    let source = TestDatabase::create("runbook");
    psql(
        &source.name,
        "CREATE SCHEMA crm; CREATE TABLE crm.customers AS SELECT i AS id, md5(i::text) AS name \
         FROM generate_series(1, 3000) i; CREATE TABLE crm.notes (id int PRIMARY KEY)",
    );
    let documents = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(documents.path().join("contracts/2026")).unwrap();
    let files = [
        ("contracts/2026/acme.pdf", vec![7u8; 70_000]),
        ("contracts/2026/empty.txt", Vec::new()),
        ("readme.txt", b"signed copies live here\n".to_vec()),
    ];
    for (path, body) in &files {
        std::fs::write(documents.path().join(path), body).unwrap();
    }
    let root = documents.path().display().to_string();
    let setup = TestSetup::new(
        &source.name,
        Store::Garage,
        &[
            ("BACKUP_AGE_RECIPIENTS", recipient.as_str()),
            ("BACKUP__DOCUMENTS__ENABLED", "true"),
            ("DOCUMENTS_STORAGE_ROOT", root.as_str()),
            ("BACKUP__STORAGE__S3_UNSIGNED_PAYLOAD", "true"),
        ],
    );
    for target in [TargetKind::Postgres, TargetKind::Documents] {
        run_backup(
            &setup.ctx,
            &BackupRequest::new(target, "test"),
            &CancellationToken::new(),
        )
        .await
        .unwrap_or_else(|err| panic!("{target} backup: {err}"));
    }

    let restored_db = TestDatabase::adopt(&common::unique("runbook_restored"));
    let work = tempfile::tempdir().unwrap();
    let restore_dir = work.path().join("documents-restored");
    let s3 = |name: &str| setup.env[&format!("BACKUP_S3_{name}")].clone();
    let env = BTreeMap::from([
        ("S3_ENDPOINT", s3("ENDPOINT")),
        ("S3_REGION", s3("REGION")),
        ("S3_BUCKET", s3("BUCKET")),
        ("S3_ACCESS_KEY", s3("ACCESS_KEY")),
        ("S3_SECRET_KEY", s3("SECRET_KEY")),
        ("S3_PREFIX", setup.prefix.clone()),
        ("AGE_KEY", identity.display().to_string()),
        ("SIGNING_PUBLIC_KEY", common::signing_key().1.clone()),
        ("RESTORE_DB", restored_db.name.clone()),
        ("RESTORE_DIR", restore_dir.display().to_string()),
    ]);

    let postgres_dir = work.path().join("postgres");
    std::fs::create_dir(&postgres_dir).unwrap();
    let stdout = run_snippet("postgres", &postgres_dir, &env);
    assert_eq!(stdout.trim().lines().last(), Some("2"), "{stdout}");
    assert_eq!(
        psql(
            &restored_db.name,
            "SELECT count(*), sum(id) FROM crm.customers"
        ),
        psql(&source.name, "SELECT count(*), sum(id) FROM crm.customers")
    );
    assert!(
        std::fs::read_dir(&postgres_dir).unwrap().all(|entry| {
            let name = entry.unwrap().file_name();
            !name.to_string_lossy().ends_with(".age")
        }),
        "nothing encrypted is left behind"
    );

    let documents_dir = work.path().join("documents");
    std::fs::create_dir(&documents_dir).unwrap();
    run_snippet("documents", &documents_dir, &env);
    for (path, body) in &files {
        assert_eq!(
            &std::fs::read(restore_dir.join(path)).unwrap(),
            body,
            "{path}"
        );
    }

    // A forged artifact stops the runbook before anything is decrypted or restored.
    let manifest = crm_backup::storage::catalog::latest(&setup.ctx.storage, TargetKind::Documents)
        .await
        .unwrap()
        .unwrap();
    let key = manifest.artifacts[0].key.clone();
    setup
        .ctx
        .storage
        .put_bytes(&key, bytes::Bytes::from_static(b"forged"))
        .await
        .unwrap();
    let forged_dir = work.path().join("forged");
    std::fs::create_dir(&forged_dir).unwrap();
    let mut env = env;
    env.insert(
        "RESTORE_DIR",
        work.path().join("forged-restore").display().to_string(),
    );
    let script = format!(
        "set -euo pipefail\n{}\n{}\n",
        snippet("helpers"),
        snippet("documents")
    );
    let out = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(&forged_dir)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(&env)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a forged artifact was restored");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        said.contains("FAILED"),
        "sha256sum names the mismatch: {said}"
    );
    assert!(!work.path().join("forged-restore").exists());
}
