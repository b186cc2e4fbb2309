//! TLS to PostgreSQL, against the local server with `ssl = on` and a certificate for
//! `localhost` signed by a CA that scripts/test.sh made (TEST_PG_TLS_CA). The role
//! crm_backup_tls_only is refused without TLS (`hostnossl … reject`), so a backup and restore
//! that succeed as it prove that both the worker's own connections and pg_dump/pg_restore
//! used TLS. Also: a restore that connects as a role without SUPERUSER.

mod common;

use common::{Store, TestDatabase, TestSetup, database_exists, pg_server_url, psql, unique};
use crm_backup::jobs::JobError;
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog::BackupRef;
use serde_json::json;
use tokio_util::sync::CancellationToken;

fn ca_file() -> String {
    std::env::var("TEST_PG_TLS_CA").expect(
        "TEST_PG_TLS_CA is not set: run the suite with ./scripts/test.sh, which enables TLS on \
         the local PostgreSQL",
    )
}

fn fixture(prefix: &str) -> TestDatabase {
    let db = TestDatabase::create(prefix);
    psql(
        &db.name,
        "CREATE TABLE deals (id int PRIMARY KEY, title text);
         INSERT INTO deals SELECT i, 'deal ' || i FROM generate_series(1, 300) i;",
    );
    db
}

/// The server's URL as `user` (password `password`), to `database` on `host`.
fn url_as(user: &str, password: &str, host: &str, database: &str) -> String {
    let mut url = url::Url::parse(&pg_server_url()).unwrap();
    url.set_username(user).unwrap();
    url.set_password(Some(password)).unwrap();
    url.set_host(Some(host)).unwrap();
    url.set_path(database);
    url.to_string()
}

/// A setup connecting as the TLS-only role to `host`, with TLS parameters `tls`.
fn setup_with(database: &str, host: &str, tls: &str) -> TestSetup {
    let mut setup = TestSetup::new(database, Store::Local, &[]);
    let url = format!(
        "{}?{tls}",
        url_as("crm_backup_tls_only", "tls-only", host, database)
    );
    setup.env.insert("DATABASE_URL".into(), url);
    let settings = crm_backup::config::Settings::load(&setup.env).expect("settings");
    setup.ctx = crm_backup::jobs::JobContext::new(settings.clone()).expect("context");
    setup.settings = settings;
    setup
}

async fn backup(setup: &TestSetup) -> Result<crm_backup::storage::manifest::Manifest, JobError> {
    let request = BackupRequest::new(TargetKind::Postgres, "test");
    run_backup(&setup.ctx, &request, &CancellationToken::new()).await
}

async fn restore(setup: &TestSetup, id: &str, into: &str) -> Result<(), JobError> {
    let request = RestoreRequest {
        target: TargetKind::Postgres,
        backup: BackupRef::Id(id.parse().unwrap()),
        options: json!({ "into": into }),
        command_id: None,
    };
    run_restore(&setup.ctx, &request).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes_work_like_libpq() {
    let source = fixture("tls_src");
    let ca = ca_file();

    // require: encrypted, the certificate not checked (any host name).
    let setup = setup_with(&source.name, "127.0.0.1", "sslmode=require");
    let manifest = backup(&setup).await.expect("a backup with sslmode=require");
    let into = unique("tls_into");
    let _restored = TestDatabase::adopt(&into);
    restore(&setup, manifest.id.as_str(), &into)
        .await
        .expect("a restore with sslmode=require");
    assert_eq!(psql(&into, "SELECT count(*) FROM deals"), "300");

    // verify-full against the name in the certificate.
    let full = format!("sslmode=verify-full&sslrootcert={ca}");
    let setup = setup_with(&source.name, "localhost", &full);
    backup(&setup)
        .await
        .expect("verify-full with the right host name");

    // verify-full against a name the certificate does not have: refused, not retried.
    let setup = setup_with(&source.name, "127.0.0.1", &full);
    let err = backup(&setup).await.unwrap_err();
    assert!(!err.retryable(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");
    assert!(err.to_string().contains("sslrootcert"), "{err}");

    // verify-ca checks the chain only: the same host is fine...
    let setup = setup_with(
        &source.name,
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={ca}"),
    );
    backup(&setup)
        .await
        .expect("verify-ca ignores the host name");
    // ... but not a chain to another CA (the system's roots do not know the test CA).
    let setup = setup_with(
        &source.name,
        "localhost",
        "sslmode=verify-full&sslrootcert=system",
    );
    let err = backup(&setup).await.unwrap_err();
    assert!(!err.retryable(), "{err}");
    assert!(err.to_string().contains("certificate"), "{err}");

    // disable: the server refuses this role without TLS.
    let setup = setup_with(&source.name, "127.0.0.1", "sslmode=disable");
    let err = backup(&setup).await.unwrap_err();
    assert!(err.to_string().contains("no encryption"), "{err}");
    // A missing CA file is named.
    let setup = setup_with(
        &source.name,
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
    );
    let err = backup(&setup).await.unwrap_err();
    assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    assert!(!err.retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_role_without_superuser_is_all_a_dump_gets() {
    let source = fixture("role_src");
    // Something only a superuser may create: the restore role cannot restore it.
    psql(
        &source.name,
        "CREATE FUNCTION noop_trigger() RETURNS event_trigger LANGUAGE plpgsql AS 'BEGIN END';
         CREATE EVENT TRIGGER audit_ddl ON ddl_command_start EXECUTE FUNCTION noop_trigger();",
    );
    let role = unique("restorer");
    psql(
        "postgres",
        &format!("CREATE ROLE {role} LOGIN NOSUPERUSER PASSWORD 'restorer'"),
    );
    let restore_url = url_as(&role, "restorer", "127.0.0.1", "postgres");
    let setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[("RESTORE_DATABASE_URL", restore_url.as_str())],
    );
    let manifest = backup(&setup).await.expect("backup");

    let into = unique("role_into");
    let _cleanup = TestDatabase::adopt(&into);
    let err = restore(&setup, manifest.id.as_str(), &into)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("event trigger"),
        "the dump ran with the role's privileges only: {err}"
    );
    assert!(!database_exists(&into), "the failed restore was removed");

    // Without the superuser-only object, the restore works; the role owns what it restored.
    psql(&source.name, "DROP EVENT TRIGGER audit_ddl");
    let manifest = backup(&setup).await.expect("backup");
    restore(&setup, manifest.id.as_str(), &into)
        .await
        .expect("restore as the role");
    assert_eq!(psql(&into, "SELECT count(*) FROM deals"), "300");
    assert_eq!(
        psql(
            &into,
            "SELECT tableowner FROM pg_tables WHERE tablename = 'deals'"
        ),
        role
    );

    // A superuser as the restore role is refused before anything happens.
    let superuser = format!("{}/postgres", pg_server_url());
    let setup = TestSetup::new(
        &source.name,
        Store::Local,
        &[
            ("RESTORE_DATABASE_URL", superuser.as_str()),
            ("BACKUP_STORAGE_DIR", setup.storage_path().to_str().unwrap()),
        ],
    );
    let other = unique("role_super");
    let err = restore(&setup, manifest.id.as_str(), &other)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("is a superuser"), "{err}");
    assert!(!database_exists(&other));
    drop(_cleanup);
    psql("postgres", &format!("DROP ROLE {role}"));
}
