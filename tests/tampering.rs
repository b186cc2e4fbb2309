//! Tampering: random byte flips, truncations and appends of the stored artifacts and manifests
//! of encrypted, signed backups (PostgreSQL and documents, in the local storage).
//! Every one must fail `verify`, and a restore must refuse it before anything reaches the
//! destination. `TAMPER_CASES` sets how many (120 here; scripts/reliability.sh runs 1,000).

mod common;

use std::path::PathBuf;

use common::{Store, TestDatabase, TestSetup, psql};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog::BackupRef;
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

/// One change to a file: a flipped byte, a cut, or bytes added at the end.
fn tamper(rng: &mut impl Rng, bytes: &mut Vec<u8>) -> String {
    match rng.random_range(0..3) {
        0 if !bytes.is_empty() => {
            let at = rng.random_range(0..bytes.len());
            bytes[at] ^= rng.random_range(1..=255u8);
            format!("flip at {at}")
        }
        1 if !bytes.is_empty() => {
            let len = rng.random_range(0..bytes.len());
            bytes.truncate(len);
            format!("cut to {len}")
        }
        _ => {
            let extra = rng.random_range(1..64);
            bytes.extend((0..extra).map(|_| rng.random::<u8>()));
            format!("{extra} bytes appended")
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tampered_artifact_or_manifest_is_caught() {
    let cases: usize = std::env::var("TAMPER_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("TAMPER_SEED")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(rand::random);
    let keys = tempfile::tempdir().unwrap();
    let (recipient, identity) = common::age_key(keys.path());
    let db = TestDatabase::create("tamper");
    psql(
        &db.name,
        "CREATE TABLE notes AS SELECT i, md5(i::text) AS note FROM generate_series(1, 2000) i",
    );
    let documents = tempfile::tempdir().unwrap();
    for i in 0..20 {
        std::fs::write(
            documents.path().join(format!("doc{i}.txt")),
            format!("document {i}\n").repeat(50),
        )
        .unwrap();
    }
    let root = documents.path().display().to_string();
    let identity = identity.display().to_string();
    let setup = TestSetup::new(
        &db.name,
        Store::Local,
        &[
            ("BACKUP_AGE_RECIPIENTS", recipient.as_str()),
            ("BACKUP_AGE_IDENTITY_FILE", identity.as_str()),
            ("BACKUP__DOCUMENTS__ENABLED", "true"),
            ("DOCUMENTS_STORAGE_ROOT", root.as_str()),
        ],
    );
    let mut manifests = Vec::new();
    for target in [TargetKind::Postgres, TargetKind::Documents] {
        manifests.push(
            run_backup(
                &setup.ctx,
                &BackupRequest::new(target, "test"),
                &CancellationToken::new(),
            )
            .await
            .unwrap(),
        );
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let restores = tempfile::tempdir().unwrap();
    let mut caught = 0;
    for case in 0..cases {
        let manifest = &manifests[case % manifests.len()];
        let dir = setup
            .storage_path()
            .join(format!("{}/{}", manifest.target, manifest.id));
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().path())
            // The manifest and the artifacts; the signature file's unsigned comment line may
            // change without harm.
            .filter(|path| path.extension().is_none_or(|ext| ext != "minisig"))
            .collect();
        files.sort();
        let file = files[rng.random_range(0..files.len())].clone();
        let original = std::fs::read(&file).unwrap();
        let mut bytes = original.clone();
        let change = tamper(&mut rng, &mut bytes);
        std::fs::write(&file, &bytes).unwrap();
        let what = format!("seed {seed}, case {case}: {} {change}", file.display());

        let report = verify_backup(&setup.ctx, manifest).await;
        assert!(
            report.as_ref().map_or(true, |report| !report.ok()),
            "verify passed {what}: {report:?}"
        );
        // A restore refuses it before the destination exists.
        if case % 4 < 2 {
            let destination = restores.path().join(format!("case-{case}"));
            let options = match manifest.target {
                TargetKind::Documents => serde_json::json!({"to": destination}),
                _ => serde_json::json!({"into": format!("{}_t{case}", db.name)}),
            };
            let restored = run_restore(
                &setup.ctx,
                &RestoreRequest {
                    target: manifest.target,
                    backup: BackupRef::Id(manifest.id.clone()),
                    options,
                    command_id: None,
                },
            )
            .await;
            assert!(restored.is_err(), "a restore used {what}");
            assert!(!destination.exists(), "{what}: the destination was created");
            assert!(
                !common::database_exists(&format!("{}_t{case}", db.name)),
                "{what}: the database was created"
            );
        }
        std::fs::write(&file, &original).unwrap();
        caught += 1;
    }
    // The untouched backups still verify: every failure above was the tampering.
    for manifest in &manifests {
        assert!(verify_backup(&setup.ctx, manifest).await.unwrap().ok());
    }
    println!("tampering: {caught} of {cases} caught by verify (seed {seed})");
}
