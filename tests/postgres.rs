//! PostgreSQL backup and restore against the real server, real pg_dump/pg_restore, local and Garage storage.

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::fault_proxy::{Direction, Fault, FaultProxy};
use common::{
    Store, TestDatabase, TestSetup, age_key, database_exists, garage_multipart_uploads, psql,
    run_cli, tool_wrapper, unique,
};
use crm_backup::config::Settings;
use crm_backup::jobs::JobContext;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::drill::{DrillRequest, run_drill};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::pipeline::Inspect;
use crm_backup::storage::catalog::{self, BackupRef};
use crm_backup::storage::manifest::Manifest;
use crm_backup::targets::postgres::PostgresFacts;
use crm_backup::targets::postgres::archive::ArchiveCounter;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const FIXTURE: &str = r#"
CREATE SCHEMA crm;
CREATE SCHEMA billing;
CREATE TYPE crm.deal_stage AS ENUM ('lead', 'qualified', 'won', 'lost');
CREATE SEQUENCE crm.ticket_seq START 1000;
CREATE TABLE crm.customers (
    id bigserial PRIMARY KEY, name text NOT NULL, email text UNIQUE, profile jsonb,
    created_at timestamptz NOT NULL DEFAULT '2026-01-01 00:00:00+00');
CREATE TABLE crm.deals (
    id serial PRIMARY KEY, customer_id bigint REFERENCES crm.customers(id),
    stage crm.deal_stage NOT NULL, amount numeric(12,2),
    ticket int NOT NULL DEFAULT nextval('crm.ticket_seq'));
CREATE TABLE billing.invoices (id int PRIMARY KEY, customer_id bigint, total numeric, lines jsonb, note text);
CREATE TABLE public.documents_meta (id int PRIMARY KEY, doc oid, title text);
CREATE VIEW crm.open_deals AS
    SELECT d.id, d.amount, c.name FROM crm.deals d JOIN crm.customers c ON c.id = d.customer_id
    WHERE d.stage IN ('lead', 'qualified');
CREATE FUNCTION crm.total_for(cust bigint) RETURNS numeric LANGUAGE sql STABLE
    AS $$ SELECT coalesce(sum(amount), 0) FROM crm.deals WHERE customer_id = cust $$;
CREATE FUNCTION billing.touch() RETURNS trigger LANGUAGE plpgsql
    AS $$ BEGIN NEW.note := coalesce(NEW.note, '') || ' ✓'; RETURN NEW; END $$;
CREATE TRIGGER invoices_touch BEFORE INSERT ON billing.invoices
    FOR EACH ROW EXECUTE FUNCTION billing.touch();
INSERT INTO crm.customers (name, email, profile)
    SELECT 'Клиент ' || i || ' 客户 ñ', 'c' || i || '@example.com',
           jsonb_build_object('i', i, 'tags', jsonb_build_array('vip', 'ß'), 'even', i % 2 = 0)
    FROM generate_series(1, 5000) i;
INSERT INTO crm.deals (customer_id, stage, amount)
    SELECT (i % 5000) + 1, (ARRAY['lead','qualified','won','lost'])[i % 4 + 1]::crm.deal_stage, i * 1.5
    FROM generate_series(1, 20000) i;
INSERT INTO billing.invoices
    SELECT i, i % 5000 + 1, i * 10, jsonb_build_array(jsonb_build_object('sku', 'x' || i)), 'Счёт №' || i
    FROM generate_series(1, 3000) i;
INSERT INTO public.documents_meta
    SELECT i, lo_from_bytea(0, convert_to(repeat('документ ' || i || ' ', 200), 'UTF8')), 'doc ' || i
    FROM generate_series(1, 5) i;
SELECT setval('crm.ticket_seq', 424242);
"#;

fn create_fixture(prefix: &str) -> TestDatabase {
    let db = TestDatabase::create(prefix);
    psql(&db.name, FIXTURE);
    db
}

/// Everything that must survive a round trip: schema DDL, every table's rows, sequences,
/// large objects.
fn fingerprint(database: &str) -> BTreeMap<String, String> {
    let mut print = BTreeMap::new();
    let tables = psql(
        database,
        "SELECT schemaname || '.' || tablename FROM pg_tables \
         WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
    );
    for table in tables.lines() {
        let digest = psql(
            database,
            &format!(
                "SELECT count(*) || ':' || md5(coalesce(string_agg(t::text, E'\\n' ORDER BY t::text), '')) FROM {table} t"
            ),
        );
        print.insert(format!("table {table}"), digest);
    }
    print.insert(
        "sequences".into(),
        psql(
            database,
            "SELECT string_agg(schemaname || '.' || sequencename || '=' || coalesce(last_value, 0), ',' \
             ORDER BY schemaname, sequencename) FROM pg_sequences",
        ),
    );
    print.insert(
        "large objects".into(),
        psql(
            database,
            "SELECT coalesce(string_agg(oid::text || ':' || md5(lo_get(oid)), ',' ORDER BY oid), '') FROM pg_largeobject_metadata",
        ),
    );
    let schema = Command::new("pg_dump")
        .args([
            "--schema-only",
            "--no-password",
            "-d",
            &common::pg_url(database),
        ])
        .output()
        .expect("pg_dump --schema-only");
    assert!(schema.status.success());
    let ddl: String = String::from_utf8_lossy(&schema.stdout)
        .lines()
        .filter(|line| {
            !line.starts_with("--")
                && !line.starts_with("\\restrict")
                && !line.starts_with("\\unrestrict")
        })
        .collect::<Vec<_>>()
        .join("\n");
    print.insert("schema".into(), ddl);
    print
}

/// Asserts two fingerprints are equal, naming only what differs.
fn assert_same(actual: &BTreeMap<String, String>, expected: &BTreeMap<String, String>) {
    let differing: Vec<_> = expected
        .keys()
        .chain(actual.keys())
        .filter(|key| actual.get(*key) != expected.get(*key))
        .map(|key| {
            format!(
                "{key}:\n  restored: {:?}\n  expected: {:?}",
                actual.get(key),
                expected.get(key)
            )
        })
        .collect();
    assert!(
        differing.is_empty(),
        "restored database differs:\n{}",
        differing.join("\n")
    );
}

async fn backup(setup: &TestSetup, options: serde_json::Value) -> Manifest {
    let mut request = BackupRequest::new(TargetKind::Postgres, "test");
    request.options = options;
    run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .expect("backup succeeds")
}

async fn restore_into(setup: &TestSetup, manifest: &Manifest, database: &str) {
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Id(manifest.id.clone()),
        options: json!({ "into": database }),
        command_id: None,
    };
    run_restore(&setup.ctx, &request)
        .await
        .expect("restore succeeds");
}

fn facts(manifest: &Manifest) -> PostgresFacts {
    manifest.source.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_of_every_schema_through_local_storage() {
    let source = create_fixture("pg_roundtrip");
    let before = fingerprint(&source.name);
    let setup = TestSetup::new(&source.name, Store::Local, &[]);

    let manifest = backup(&setup, json!(null)).await;

    let facts = facts(&manifest);
    assert_eq!(facts.database, source.name);
    assert_eq!(facts.schemas, vec!["billing", "crm", "public"]);
    let rows: BTreeMap<String, i64> = facts
        .tables
        .iter()
        .map(|t| (format!("{}.{}", t.schema, t.name), t.rows))
        .collect();
    assert_eq!(rows["crm.customers"], 5000);
    assert_eq!(rows["crm.deals"], 20000);
    assert_eq!(rows["billing.invoices"], 3000);
    assert_eq!(rows["public.documents_meta"], 5);
    assert_eq!(facts.large_objects, Some(5));
    assert_eq!(
        facts.row_count_source, "archive",
        "counted from the dump itself"
    );
    assert!(facts.server_version.starts_with("15") || !facts.server_version.is_empty());
    // Read from the archive's header; the same words as the tool's own.
    let version = std::process::Command::new("pg_dump")
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        facts.pg_dump_version,
        String::from_utf8(version.stdout).unwrap().trim()
    );
    let dump = &manifest.artifacts[0];
    assert!(dump.key.ends_with(".dump.zst"), "{}", dump.key);
    assert!(
        dump.stored_size < dump.raw_size,
        "zstd should shrink the dump"
    );
    assert!(manifest.artifacts[0].encryption.is_none());

    // The catalog is read back from storage.
    let listed = catalog::list(&setup.ctx.storage, TargetKind::Postgres)
        .await
        .unwrap();
    assert_eq!(listed.manifests, vec![manifest.clone()]);

    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");

    let restored = TestDatabase::adopt(&unique("pg_restored"));
    restore_into(&setup, &manifest, &restored.name).await;
    assert_same(&fingerprint(&restored.name), &before);
    // The original was not touched.
    assert_same(&fingerprint(&source.name), &before);
}

#[test]
fn rows_are_counted_in_the_archive_exactly_as_count_star_sees_them() {
    let db = create_fixture("pg_archive_count");
    psql(
        &db.name,
        "CREATE TABLE public.empty (x int); CREATE TABLE public.\"Odd \"\"name\"\"\" (t text); \
        INSERT INTO public.\"Odd \"\"name\"\"\" VALUES (E'a\\nb'), (E'\\\\.'), ('\\.'), (NULL)",
    );
    let dump = Command::new("pg_dump")
        .args([
            "-Fc",
            "-Z0",
            "--no-password",
            "-d",
            &common::pg_url(&db.name),
        ])
        .output()
        .unwrap();
    assert!(dump.status.success());
    let count = |piece: usize| {
        let mut counter = ArchiveCounter::default();
        for chunk in dump.stdout.chunks(piece) {
            counter.inspect(chunk);
        }
        counter.finish().unwrap()
    };
    let summary = count(dump.stdout.len());
    // The stream arrives in pieces cut anywhere: 7-byte pieces give the same answer.
    let piecewise = count(7);
    assert_eq!(piecewise.rows, summary.rows);
    assert_eq!(piecewise.pg_dump_version, summary.pg_dump_version);
    let counts = summary.rows;
    let tables = psql(
        &db.name,
        "SELECT schemaname || '|' || tablename FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', 'information_schema')",
    );
    assert_eq!(counts.len(), tables.lines().count(), "{counts:?}");
    for line in tables.lines() {
        let (schema, table) = line.split_once('|').unwrap();
        let expected: i64 = psql(
            &db.name,
            &format!(
                "SELECT count(*) FROM \"{schema}\".\"{}\"",
                table.replace('"', "\"\"")
            ),
        )
        .parse()
        .unwrap();
        assert_eq!(
            counts[&(schema.to_string(), table.to_string())],
            expected,
            "{schema}.{table}"
        );
    }
    assert_eq!(
        counts[&("public".to_string(), "Odd \"name\"".to_string())],
        4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_round_trip_through_garage() {
    let source = create_fixture("pg_garage");
    let before = fingerprint(&source.name);
    let keys = tempfile::tempdir().unwrap();
    let (public, identity) = age_key(keys.path());
    let identity = identity.display().to_string();
    let setup = TestSetup::new(
        &source.name,
        Store::Garage,
        &[
            ("BACKUP_AGE_RECIPIENTS", public.as_str()),
            ("BACKUP_AGE_IDENTITY_FILE", identity.as_str()),
            // Small parts so the dump spans several multipart parts.
            ("BACKUP__STORAGE__PART_SIZE_MIB", "5"),
            // Parts sent as UNSIGNED-PAYLOAD (the https setting); the other Garage tests sign.
            ("BACKUP__STORAGE__S3_UNSIGNED_PAYLOAD", "true"),
        ],
    );

    let manifest = backup(&setup, json!({})).await;
    let dump = &manifest.artifacts[0];
    assert!(dump.key.ends_with(".dump.zst.age"), "{}", dump.key);
    let encryption = dump.encryption.as_ref().expect("encrypted");
    assert_eq!(
        encryption.recipients,
        vec![crm_backup::pipeline::fingerprint(&public)]
    );

    let restored = TestDatabase::adopt(&unique("pg_garage_restored"));
    restore_into(&setup, &manifest, &restored.name).await;
    assert_same(&fingerprint(&restored.name), &before);

    // Without the private key, the backup cannot be read, and the error says why.
    let mut env = setup.env.clone();
    env.remove("BACKUP_AGE_IDENTITY_FILE");
    let no_key = JobContext::new(Settings::load(&env).unwrap()).unwrap();
    let other = unique("pg_nokey");
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Id(manifest.id.clone()),
        options: json!({ "into": other }),
        command_id: None,
    };
    let err = run_restore(&no_key, &request).await.unwrap_err();
    assert!(
        err.to_string().contains("BACKUP_AGE_IDENTITY_FILE"),
        "{err}"
    );
    assert!(!err.retryable());
    assert!(!database_exists(&other));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_filters_choose_what_is_dumped() {
    let source = create_fixture("pg_filter");
    let setup = TestSetup::new(&source.name, Store::Local, &[]);

    let only_crm = backup(&setup, json!({ "schemas": ["crm"] })).await;
    let facts_crm = facts(&only_crm);
    assert_eq!(facts_crm.schemas, vec!["crm"]);
    assert!(facts_crm.tables.iter().all(|t| t.schema == "crm"));
    assert_eq!(facts_crm.large_objects, None);
    let restored = TestDatabase::adopt(&unique("pg_filter_crm"));
    restore_into(&setup, &only_crm, &restored.name).await;
    assert_eq!(
        psql(
            &restored.name,
            "SELECT string_agg(nspname, ',' ORDER BY nspname) FROM pg_namespace WHERE nspname IN ('crm', 'billing')"
        ),
        "crm"
    );
    assert_eq!(
        psql(&restored.name, "SELECT count(*) FROM crm.deals"),
        "20000"
    );
    assert_eq!(
        psql(&restored.name, "SELECT count(*) FROM crm.open_deals"),
        "10000"
    );

    let without_billing = backup(&setup, json!({ "exclude_schemas": ["billing"] })).await;
    let facts_nb = facts(&without_billing);
    assert_eq!(facts_nb.schemas, vec!["crm", "public"]);
    assert!(!facts_nb.tables.iter().any(|t| t.schema == "billing"));

    let mut request = BackupRequest::new(TargetKind::Postgres, "test");
    request.options = json!({ "schemas": ["nope"] });
    let err = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("schema `nope` does not exist"),
        "{err}"
    );
    assert!(!err.retryable());
    request.options = json!({ "schema": ["crm"] });
    let err = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("unknown field `schema`"), "{err}");
    assert_eq!(
        catalog::list(&setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap()
            .manifests
            .len(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_database_fails_clearly_and_leaves_nothing() {
    let setup = TestSetup::new(
        "postgres",
        Store::Local,
        &[("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/crm")],
    );
    let request = BackupRequest::new(TargetKind::Postgres, "test");
    let err = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .unwrap_err();
    let message = err.to_string();
    assert!(message.contains("unreachable"), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    assert!(err.retryable(), "a down database may come back: {message}");
    assert!(
        setup.stored_files().is_empty(),
        "{:?}",
        setup.stored_files()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_connection_lost_mid_dump_fails_clearly_and_leaves_nothing() {
    let source = create_fixture("pg_cut");
    psql(
        &source.name,
        "CREATE TABLE public.noise AS SELECT i, md5(i::text) || md5((i * 7)::text) AS v \
         FROM generate_series(1, 200000) i",
    );
    let proxy = FaultProxy::start("127.0.0.1:5432").await;
    // The test's server URL, through the proxy: trust auth or the test password alike.
    let url = common::pg_url(&source.name).replace(":5432/", &format!(":{}/", proxy.port()));
    let setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[("DATABASE_URL", url.as_str())],
    );
    // pg_dump's COPY of the 13 MB table is under way when every connection drops.
    proxy.cut_after(Direction::Received, 5_000_000, Fault::Down);

    let request = BackupRequest::new(TargetKind::Postgres, "test");
    let err = run_backup(&setup.ctx, &request, &CancellationToken::new())
        .await
        .expect_err("a dump cut short is never committed");

    assert_eq!(proxy.cuts(), 1, "the proxy cut the dump");
    let message = err.to_string();
    assert!(message.contains("pg_dump"), "names pg_dump: {message}");
    assert!(
        err.retryable(),
        "a lost connection may come back: {message}"
    );
    assert!(
        setup.stored_files().is_empty(),
        "{:?}",
        setup.stored_files()
    );
}

/// A `pg_dump` that streams part of a real dump, then dies by SIGKILL.
fn killing_pg_dump(dir: &std::path::Path, bytes: u64) -> String {
    let script = dir.join("pg_dump");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then exec pg_dump --version; fi\n\
             pg_dump \"$@\" | head -c {bytes}\nkill -KILL $$\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_pg_dump_leaves_no_manifest_and_no_upload() {
    let source = create_fixture("pg_killed");
    // Incompressible rows, so more than one 5 MiB part is uploaded before the kill.
    psql(
        &source.name,
        "CREATE TABLE public.noise AS SELECT i, md5(i::text) || md5((i * 7)::text) AS v FROM generate_series(1, 200000) i",
    );
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = killing_pg_dump(bin.path(), 12_000_000);
    for store in [Store::Local, Store::Garage] {
        let setup = TestSetup::new(
            &source.name,
            store,
            &[
                ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
                ("BACKUP__STORAGE__PART_SIZE_MIB", "5"),
            ],
        );
        let err = run_backup(
            &setup.ctx,
            &BackupRequest::new(TargetKind::Postgres, "test"),
            &CancellationToken::new(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("pg_dump was killed by signal 9"),
            "{err}"
        );
        assert!(err.retryable());
        let listed = catalog::list(&setup.ctx.storage, TargetKind::Postgres)
            .await
            .unwrap();
        assert!(listed.manifests.is_empty());
        if setup.storage_dir.is_some() {
            assert!(
                setup.stored_files().is_empty(),
                "{:?}",
                setup.stored_files()
            );
        } else {
            // The check can see an unfinished upload when there is one…
            let mut upload = setup
                .ctx
                .storage
                .start_upload("postgres/probe")
                .await
                .unwrap();
            upload
                .write(bytes::Bytes::from(vec![7u8; 6 << 20]))
                .await
                .unwrap();
            assert_eq!(garage_multipart_uploads(&setup.prefix).await, 1);
            upload.abort().await.unwrap();
            // …and the killed backup left none.
            assert_eq!(garage_multipart_uploads(&setup.prefix).await, 0);
            let objects = setup.ctx.storage.list("postgres/").await.unwrap();
            assert!(objects.is_empty(), "{objects:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_fails_verify_and_restore() {
    let source = create_fixture("pg_flip");
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!(null)).await;
    let key = manifest.artifacts[0].key.clone();

    let (ok, stdout, _) = run_cli(&setup.env, &["verify", "--backup", manifest.id.as_str()]);
    assert!(ok, "{stdout}");

    let path = setup.storage_path().join(&key);
    let pristine = std::fs::read(&path).unwrap();
    // A byte flipped early (in the dump's table of contents, which `pg_restore --list`
    // reads) and one in the middle: verify fails promptly either way, naming the artifact.
    for offset in [1000, pristine.len() / 2] {
        let mut bytes = pristine.clone();
        bytes[offset] ^= 0x01;
        std::fs::write(&path, bytes).unwrap();
        let started = std::time::Instant::now();
        let (ok, stdout, stderr) =
            run_cli(&setup.env, &["verify", "--backup", manifest.id.as_str()]);
        assert!(!ok, "verify must fail (offset {offset}): {stdout}");
        assert!(stderr.contains(&key), "stderr names the artifact: {stderr}");
        assert_eq!(common::error_lines(&stderr).len(), 1, "one line: {stderr}");
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "verify took {:?}",
            started.elapsed()
        );
    }

    let target = unique("pg_flip_restore");
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Latest,
        options: json!({ "into": target }),
        command_id: None,
    };
    let err = run_restore(&setup.ctx, &request).await.unwrap_err();
    assert!(err.to_string().contains(&key), "{err}");
    assert!(
        !database_exists(&target),
        "a failed restore leaves no database behind"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_artifact_never_reaches_pg_restore_when_verified_first() {
    let source = create_fixture("pg_first");
    // pg_restore wrapped: every run is logged.
    let tools = tempfile::tempdir().unwrap();
    let log = tools.path().join("pg_restore.log");
    tool_wrapper(tools.path(), "pg_dump", "exec pg_dump \"$@\"");
    let bin_dir = tool_wrapper(
        tools.path(),
        "pg_restore",
        &format!("echo \"$@\" >> '{}'\nexec pg_restore \"$@\"", log.display()),
    );
    let setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str())],
    );
    let manifest = backup(&setup, json!(null)).await;
    let key = &manifest.artifacts[0].key;
    let path = setup.storage_path().join(key);
    let mut bytes = std::fs::read(&path).unwrap();
    let near_the_end = bytes.len() - 16;
    bytes[near_the_end] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let restore = |ctx: JobContext, into: String| {
        let request = RestoreRequest {
            target: TargetKind::Postgres,
            backup: BackupRef::Id(manifest.id.clone()),
            options: json!({ "into": into }),
            command_id: None,
        };
        async move { run_restore(&ctx, &request).await.map(|_| ()).unwrap_err() }
    };

    // Verified first (the default): refused before pg_restore runs or a database exists.
    let into = unique("pg_first_into");
    let err = restore(setup.ctx.clone(), into.clone()).await;
    assert!(
        err.to_string().contains(key.as_str()) && err.to_string().contains("stored SHA-256"),
        "{err}"
    );
    assert!(
        !log.exists(),
        "pg_restore ran: {:?}",
        std::fs::read_to_string(&log)
    );
    assert!(!database_exists(&into));

    // Streamed (verify_first off): the same corruption is found at the end, after pg_restore
    // received the bytes (then the half-restored database is dropped).
    let streamed = TestSetup::new(
        &source.name,
        Store::Local,
        &[
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
            ("BACKUP__RESTORE__VERIFY_FIRST", "false"),
            ("BACKUP_STORAGE_DIR", setup.storage_path().to_str().unwrap()),
        ],
    );
    let err = restore(streamed.ctx.clone(), into.clone()).await;
    assert!(err.to_string().contains(key.as_str()), "{err}");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("--single-transaction")
    );
    assert!(!database_exists(&into));

    // A staging directory that cannot take the file is named, with the setting.
    let nowhere = TestSetup::new(
        &source.name,
        Store::Local,
        &[
            ("BACKUP__RESTORE__STAGING_DIR", "/nonexistent/staging"),
            ("BACKUP_STORAGE_DIR", setup.storage_path().to_str().unwrap()),
        ],
    );
    let err = restore(nowhere.ctx.clone(), into.clone()).await;
    assert!(
        err.to_string()
            .contains("/nonexistent/staging (restore.staging_dir)"),
        "{err}"
    );
    assert!(!database_exists(&into));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_interrupted_mid_way_is_redone_from_scratch() {
    let source = create_fixture("pg_rerun");
    let before = fingerprint(&source.name);
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!({})).await;
    // What a worker killed mid-restore leaves: the destination's staging database, half
    // filled. The destination itself never appeared.
    let into = TestDatabase::adopt(&common::unique("pg_rerun_into"));
    let staging = TestDatabase::adopt(&format!("{}_restoring", into.name));
    psql("postgres", &format!("CREATE DATABASE \"{}\"", staging.name));
    psql(&staging.name, "CREATE TABLE half_done (i int)");
    assert!(!common::database_exists(&into.name));

    // The redelivered command restores, and the leftover is gone.
    restore_into(&setup, &manifest, &into.name).await;
    assert_same(&fingerprint(&into.name), &before);
    assert!(!common::database_exists(&staging.name));
}

/// What a worker killed after the restored database took its name, and before the command
/// was marked done, leaves is a finished restore: the command's redelivery reports it restored
/// and runs nothing again. Another command is still refused, and in place the swap happens once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_redelivered_after_it_finished_is_reported_restored_once() {
    let source = create_fixture("pg_redo");
    let before = fingerprint(&source.name);
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!({})).await;
    let into = TestDatabase::adopt(&common::unique("pg_redo_into"));
    let request = |command: &str, options: serde_json::Value| RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Id(manifest.id.clone()),
        options,
        command_id: Some(command.into()),
    };
    let into_options = json!({ "into": into.name });

    let (_, _, first) = run_restore(&setup.ctx, &request("cmd-a", into_options.clone()))
        .await
        .unwrap();
    assert!(first.details.get("already_restored").is_none(), "{first:?}");
    let (_, _, again) = run_restore(&setup.ctx, &request("cmd-a", into_options.clone()))
        .await
        .unwrap();
    assert_eq!(again.details["already_restored"], true, "{again:?}");
    assert_eq!(again.details["database"], into.name.as_str());
    assert_same(&fingerprint(&into.name), &before);

    let err = run_restore(&setup.ctx, &request("cmd-b", into_options))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // In place over `into`: swapped once, however often the command is delivered.
    let in_place = json!({ "into": into.name, "in_place": true });
    let replaced = || {
        psql(
            "postgres",
            &format!(
                "SELECT datname FROM pg_database WHERE datname LIKE '{}\\_replaced\\_%'",
                into.name
            ),
        )
    };
    for (delivery, already) in [(1, false), (2, true)] {
        let (_, _, report) = run_restore(&setup.ctx, &request("cmd-c", in_place.clone()))
            .await
            .unwrap();
        assert_eq!(
            report.details.get("already_restored").is_some(),
            already,
            "delivery {delivery}: {report:?}"
        );
        assert_eq!(replaced().lines().count(), 1, "delivery {delivery}");
    }
    let _aside = TestDatabase::adopt(&replaced());
    assert_same(&fingerprint(&into.name), &before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_never_overwrites_unless_in_place() {
    let source = create_fixture("pg_inplace");
    let before = fingerprint(&source.name);
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!(null)).await;

    // Restoring "into" the original (or any existing database) is refused.
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Latest,
        options: json!({ "into": source.name }),
        command_id: None,
    };
    let err = run_restore(&setup.ctx, &request).await.unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");

    // Without options, a new database is created beside the original.
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Latest,
        options: json!(null),
        command_id: None,
    };
    let (_, _, report) = run_restore(&setup.ctx, &request).await.unwrap();
    let beside = TestDatabase::adopt(report.details["database"].as_str().unwrap());
    assert!(
        beside
            .name
            .starts_with(&format!("{}_restore_", source.name))
    );
    assert_same(&fingerprint(&beside.name), &before);

    // The CLI asks for confirmation before an in-place restore.
    let (ok, _, stderr) = run_cli(
        &setup.env,
        &["restore", "--backup", manifest.id.as_str(), "--in-place"],
    );
    assert!(!ok);
    assert!(stderr.contains("--yes"), "{stderr}");
    // The same through an option, and through the destination named as an option value.
    let (ok, _, stderr) = run_cli(
        &setup.env,
        &[
            "restore",
            "--backup",
            manifest.id.as_str(),
            "--option",
            "in_place=true",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("--yes"), "{stderr}");

    // Damage the original (with a session open on it), then restore it in place.
    psql(
        &source.name,
        "DELETE FROM crm.deals WHERE id % 2 = 0; DROP TABLE billing.invoices; CREATE TABLE crm.extra (x int)",
    );
    let damaged = fingerprint(&source.name);
    let mut session = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-d",
            &common::pg_url(&source.name),
            "-c",
            "SELECT pg_sleep(60)",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (ok, stdout, stderr) = run_cli(
        &setup.env,
        &[
            "restore",
            "--backup",
            manifest.id.as_str(),
            "--in-place",
            "--yes",
            "--json",
        ],
    );
    let _ = session.kill();
    let _ = session.wait();
    assert!(ok, "{stdout} {stderr}");
    assert_same(&fingerprint(&source.name), &before);
    // The replaced database is kept, renamed, with the state it had.
    let report: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    let previous = TestDatabase::adopt(report["details"]["previous_database"].as_str().unwrap());
    assert!(
        previous
            .name
            .starts_with(&format!("{}_replaced_", source.name)),
        "{report}"
    );
    assert_same(&fingerprint(&previous.name), &damaged);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn artifacts_restore_with_stock_tools() {
    let source = create_fixture("pg_stock");
    let before = fingerprint(&source.name);
    let keys = tempfile::tempdir().unwrap();
    let (public, identity) = age_key(keys.path());
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let plain = backup(&setup, json!(null)).await;
    let encrypted_setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[("BACKUP_AGE_RECIPIENTS", public.as_str())],
    );
    let encrypted = backup(&encrypted_setup, json!(null)).await;

    let target = TestDatabase::create("pg_stock_zstd");
    let file = setup.storage_path().join(&plain.artifacts[0].key);
    let shell = format!(
        "zstd -d < '{}' | pg_restore --no-password -d '{}'",
        file.display(),
        common::pg_url(&target.name)
    );
    let status = Command::new("sh").args(["-c", &shell]).status().unwrap();
    assert!(status.success(), "{shell}");
    assert_same(&fingerprint(&target.name), &before);

    let age_cli = ["age", "rage"]
        .into_iter()
        .find(|tool| {
            Command::new(tool)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("the age CLI is installed by scripts/test.sh");
    let target = TestDatabase::create("pg_stock_age");
    let file = encrypted_setup
        .storage_path()
        .join(&encrypted.artifacts[0].key);
    let shell = format!(
        "{age_cli} -d -i '{}' '{}' | zstd -d | pg_restore --no-password -d '{}'",
        identity.display(),
        file.display(),
        common::pg_url(&target.name)
    );
    let status = Command::new("sh").args(["-c", &shell]).status().unwrap();
    assert!(status.success(), "{shell}");
    assert_same(&fingerprint(&target.name), &before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_match_their_schema() {
    let source = create_fixture("pg_schema");
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!({ "globals": true })).await;
    assert_eq!(manifest.artifacts.len(), 2);
    assert_eq!(manifest.artifacts[1].name, "globals.sql");

    let instance = common::assert_manifest_valid(&setup, &manifest).await;
    let validator = common::manifest_validator();

    // The schema is not vacuous: a manifest without artifacts' hashes is rejected.
    let mut broken = instance.clone();
    broken["artifacts"][0]
        .as_object_mut()
        .unwrap()
        .remove("raw_sha256");
    assert!(!validator.is_valid(&broken));
    let mut broken = instance;
    broken["source"]["tables"] = json!("many");
    assert!(!validator.is_valid(&broken));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_restores_into_a_scratch_database_and_catches_wrong_counts() {
    let source = create_fixture("pg_drill");
    let before = fingerprint(&source.name);
    let setup = TestSetup::new(&source.name, Store::Local, &[]);
    let manifest = backup(&setup, json!({})).await;
    let scratch_databases = || {
        psql(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_database WHERE starts_with(datname, '{}_drill')",
                source.name
            ),
        )
    };
    let latest = DrillRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Latest,
    };
    // What a drill killed mid-way leaves: its scratch database and the restore's staging one.
    for leftover in ["drill", "drill_restoring"] {
        psql(
            "postgres",
            &format!("CREATE DATABASE \"{}_{leftover}\"", source.name),
        );
    }
    assert_eq!(scratch_databases(), "2");
    let (drilled, report) = run_drill(&setup.ctx, &latest).await.expect("drill passes");
    assert_eq!(drilled.id, manifest.id);
    assert!(report.verify.ok());
    assert!(
        report.scratch.contains(&format!("{}_drill", source.name)),
        "{}",
        report.scratch
    );
    assert_eq!(report.details["rows"], json!(facts(&manifest).row_count));
    assert_eq!(
        scratch_databases(),
        "0",
        "the scratch database is dropped, and what an interrupted drill left"
    );

    // A manifest whose row count the dump does not hold fails the drill.
    common::rewrite_facts(&setup, &manifest, |facts| {
        let rows = facts["tables"][0]["rows"].as_i64().unwrap();
        facts["tables"][0]["rows"] = json!(rows + 1);
    })
    .await;
    let err = run_drill(&setup.ctx, &latest).await.unwrap_err();
    assert_eq!(err.kind(), "restore_mismatch", "{err}");
    assert_eq!(
        scratch_databases(),
        "0",
        "a failed drill drops its database too"
    );
    assert_same(&fingerprint(&source.name), &before);
}

/// A PostgreSQL server of the test's own (initdb into a temporary directory, trust auth, a
/// free port), so that restarting it cuts no other test's connections. Stopped on drop.
struct OwnServer {
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnServer {
    const BIN: &'static str = "/usr/lib/postgresql/15/bin";

    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        // The server refuses to run as root: as root, it runs as `postgres`.
        let status = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success() || !Self::as_root());
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let server = OwnServer { dir, port };
        let data = server.data();
        server.tool(&[
            "initdb",
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-D",
            &data,
        ]);
        let options = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            server.dir.path().display()
        );
        let log = server.dir.path().join("log").display().to_string();
        server.tool(&[
            "pg_ctl", "-D", &data, "-o", &options, "-l", &log, "-w", "start",
        ]);
        server
    }

    fn as_root() -> bool {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() == 0 }
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Runs a server tool (as `postgres` when this is root); panics with its output if it fails.
    fn tool(&self, args: &[&str]) -> String {
        let program = format!("{}/{}", Self::BIN, args[0]);
        let mut command = if Self::as_root() {
            let mut command = Command::new("runuser");
            command.args(["-u", "postgres", "--", &program]);
            command
        } else {
            Command::new(&program)
        };
        let out = command.args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    fn url(&self) -> String {
        self.url_of("postgres")
    }

    fn url_of(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn psql(&self, sql: &str) -> String {
        self.psql_in("postgres", sql)
    }

    fn psql_in(&self, database: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args([
                "-XAtq",
                "-v",
                "ON_ERROR_STOP=1",
                &self.url_of(database),
                "-c",
                sql,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `pg_ctl restart -m fast`: every session is terminated, the server comes back.
    fn restart(&self) {
        // The log file again: without it the new server would write to this pipe.
        let log = self.dir.path().join("log").display().to_string();
        self.tool(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-l",
            &log,
            "-m",
            "fast",
            "-w",
            "restart",
        ]);
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        let data = self.data();
        let _ = std::panic::catch_unwind(|| {
            self.tool(&["pg_ctl", "-D", &data, "-m", "immediate", "-w", "stop"])
        });
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restarted_mid_dump_fails_retryably_and_the_retry_restores() {
    let server = OwnServer::start();
    server.psql(
        "CREATE TABLE noise AS SELECT i, md5(i::text) || md5((i * 7)::text) AS v \
         FROM generate_series(1, 300000) i",
    );
    // The real pg_dump, read at ~6 MB/s so that its COPY of the ~21 MB table is still
    // running when the server restarts under it.
    let bin = tempfile::tempdir().unwrap();
    let bin_dir = common::pg_dump_wrapper(
        bin.path(),
        "exec python3 -c 'import subprocess, sys, time\n\
         dump = subprocess.Popen([\"pg_dump\"] + sys.argv[1:], stdout=subprocess.PIPE)\n\
         while (b := dump.stdout.read(65536)):\n    \
         sys.stdout.buffer.write(b); sys.stdout.buffer.flush(); time.sleep(0.01)\n\
         sys.exit(dump.wait())' \"$@\"",
    );
    let url = server.url();
    let setup = TestSetup::new(
        "postgres",
        Store::Local,
        &[
            ("DATABASE_URL", url.as_str()),
            ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
        ],
    );
    let request = BackupRequest::new(TargetKind::Postgres, "test");

    let cancel = CancellationToken::new();
    let (result, copying) = tokio::join!(run_backup(&setup.ctx, &request, &cancel), async {
        let copying = "SELECT count(*) FROM pg_stat_activity \
                           WHERE pid <> pg_backend_pid() AND state = 'active' AND query LIKE 'COPY %'";
        for _ in 0..400 {
            if server.psql(copying) == "1" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        let copying = server.psql(copying) == "1";
        if copying {
            server.restart();
        }
        copying
    });
    assert!(copying, "pg_dump's COPY never started: {result:?}");

    let err = result.expect_err("a dump cut by a restart is never committed");
    let message = err.to_string();
    assert!(message.contains("pg_dump"), "names pg_dump: {message}");
    assert!(err.retryable(), "a restarted server comes back: {message}");
    assert!(
        setup.stored_files().is_empty(),
        "{:?}",
        setup.stored_files()
    );

    // The retry, against the restarted server, stores a backup that verifies and restores.
    let manifest = backup(&setup, json!({})).await;
    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");
    let rows = facts(&manifest).tables;
    assert_eq!(
        rows.iter().find(|t| t.name == "noise").map(|t| t.rows),
        Some(300000),
        "{rows:?}"
    );
    let digest = "SELECT md5(string_agg(v, ',' ORDER BY i)) FROM noise";
    restore_into(&setup, &manifest, "restored").await;
    assert_eq!(server.psql_in("restored", digest), server.psql(digest));
    common::tally::Tally {
        commands: 2,
        ..Default::default()
    }
    .print(
        "PostgreSQL restarted mid-COPY (pg_ctl restart -m fast)",
        "retryable failure, nothing stored; the retry verified and restored 300000 equal rows",
    );
}
