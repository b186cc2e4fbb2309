//! Shared test support: unique names, real PostgreSQL databases, local and Garage storage.
#![allow(dead_code)]

pub mod broker;
pub mod consul_double;
pub mod fault_proxy;
pub mod harness;
pub mod tally;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use bytes::Bytes;
use crm_backup::config::Settings;
use crm_backup::jobs::JobContext;
use object_store::aws::{AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequestBody;

/// A name no other test (or test run) uses: `<prefix>_<pid>_<n>_<random>`.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let random: u32 = rand::random::<u32>() % 100_000;
    format!("{prefix}_{}_{n}_{random}", std::process::id())
}

/// Server URL without a database, from TEST_DATABASE_URL (set by scripts/test.sh).
pub fn pg_server_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string())
        .trim_end_matches('/')
        .to_string()
}

pub fn pg_url(database: &str) -> String {
    format!("{}/{database}", pg_server_url())
}

/// Runs SQL through psql against `database`; panics with psql's stderr on failure.
pub fn psql(database: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-d",
            &pg_url(database),
            "-c",
            sql,
        ])
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "psql failed on {database}: {}\nSQL: {sql}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub fn database_exists(name: &str) -> bool {
    psql(
        "postgres",
        &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
    ) == "1"
}

/// A database that is dropped when the guard goes out of scope.
pub struct TestDatabase {
    pub name: String,
}

impl TestDatabase {
    pub fn create(prefix: &str) -> Self {
        let name = unique(prefix);
        psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        TestDatabase { name }
    }

    /// Adopts a database created by the code under test, so it gets dropped too.
    pub fn adopt(name: &str) -> Self {
        TestDatabase {
            name: name.to_string(),
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                "-X",
                "-q",
                "-d",
                &pg_url("postgres"),
                "-c",
                &format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name),
            ])
            .output();
    }
}

/// Where a test's backups go.
pub enum Store {
    /// A fresh temporary directory.
    Local,
    /// The Garage bucket, under a unique prefix.
    Garage,
}

/// Settings and context for one test, with its own storage.
pub struct TestSetup {
    pub env: HashMap<String, String>,
    pub settings: Settings,
    pub ctx: JobContext,
    pub storage_dir: Option<tempfile::TempDir>,
    pub prefix: String,
}

impl TestSetup {
    pub fn new(database: &str, store: Store, extra: &[(&str, &str)]) -> Self {
        let mut env = HashMap::new();
        env.insert("BACKUP_CONFIG_DIR".to_string(), "/nonexistent".to_string());
        env.insert("DATABASE_URL".to_string(), pg_url(database));
        // Tests publish as the broker's `guest`, which they grant everything explicitly;
        // tests of the permission model set their own grants.
        env.insert(
            "BACKUP__AUTHORIZATION__GRANTS".to_string(),
            "guest=*".to_string(),
        );
        env.insert(
            "BACKUP_SCHEDULER_ID_SALT".to_string(),
            "a test salt, sixteen characters or more".to_string(),
        );
        // Every test's manifests are signed and checked, unsigned ones refused.
        let (secret_key_file, public_key) = signing_key();
        env.insert(
            "BACKUP_SIGNING_KEY_FILE".to_string(),
            secret_key_file.display().to_string(),
        );
        env.insert(
            "BACKUP_SIGNING_PUBLIC_KEYS".to_string(),
            public_key.to_string(),
        );
        env.insert(
            "BACKUP__SIGNING__ALLOW_UNSIGNED".to_string(),
            "false".to_string(),
        );
        let prefix = unique("t");
        let storage_dir = match store {
            Store::Local => {
                let dir = tempfile::tempdir().expect("tempdir");
                env.insert(
                    "BACKUP_STORAGE_DIR".to_string(),
                    dir.path().display().to_string(),
                );
                Some(dir)
            }
            Store::Garage => {
                for (name, value) in garage_env() {
                    env.insert(name, value);
                }
                env.insert("BACKUP_STORAGE_PREFIX".to_string(), prefix.clone());
                None
            }
        };
        for (key, value) in extra {
            env.insert(key.to_string(), value.to_string());
        }
        let settings = Settings::load(&env).expect("test settings load");
        let ctx = JobContext::new(settings.clone()).expect("context");
        TestSetup {
            env,
            settings,
            ctx,
            storage_dir,
            prefix,
        }
    }

    pub fn storage_path(&self) -> &Path {
        self.storage_dir.as_ref().expect("local storage").path()
    }

    /// Every file under the local storage directory.
    pub fn stored_files(&self) -> Vec<PathBuf> {
        fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
            for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                let path = entry.path();
                if path.is_dir() {
                    walk(&path, out);
                } else {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        walk(self.storage_path(), &mut files);
        files
    }
}

/// The seed S3 variables pointing at the Garage started by scripts/test.sh.
pub fn garage_env() -> Vec<(String, String)> {
    let get = |name: &str| {
        std::env::var(format!("BACKUP_TEST_S3_{name}")).unwrap_or_else(|_| {
            panic!("BACKUP_TEST_S3_{name} is not set: run the suite with ./scripts/test.sh, which starts Garage")
        })
    };
    vec![
        ("BACKUP_S3_ENDPOINT".into(), get("ENDPOINT")),
        ("BACKUP_S3_BUCKET".into(), get("BUCKET")),
        ("BACKUP_S3_REGION".into(), get("REGION")),
        ("BACKUP_S3_ACCESS_KEY".into(), get("ACCESS_KEY")),
        ("BACKUP_S3_SECRET_KEY".into(), get("SECRET_KEY")),
    ]
}

/// Unfinished multipart uploads in the Garage bucket under `prefix` (S3 ListMultipartUploads).
pub async fn garage_multipart_uploads(prefix: &str) -> usize {
    let env: HashMap<String, String> = garage_env().into_iter().collect();
    let url = format!(
        "{}/{}?prefix={prefix}&uploads=",
        env["BACKUP_S3_ENDPOINT"], env["BACKUP_S3_BUCKET"]
    );
    let mut request = http::Request::builder()
        .method("GET")
        .uri(&url)
        .body(HttpRequestBody::from(Bytes::new()))
        .unwrap();
    let credential = AwsCredential {
        key_id: env["BACKUP_S3_ACCESS_KEY"].clone(),
        secret_key: env["BACKUP_S3_SECRET_KEY"].clone(),
        token: None,
    };
    AwsAuthorizer::new(&credential, "s3", &env["BACKUP_S3_REGION"])
        .try_authorize(&mut request, None)
        .expect("sign");
    let client = reqwest::Client::new();
    let mut builder = client.get(&url);
    for (name, value) in request.headers() {
        builder = builder.header(name.as_str(), value.as_bytes());
    }
    let response = builder.send().await.expect("ListMultipartUploads");
    let status = response.status();
    let body = response.text().await.unwrap();
    assert!(status.is_success(), "ListMultipartUploads: {status} {body}");
    body.matches("<Upload>").count()
}

/// The test process's minisign key pair: (unencrypted secret key file, 0600; public key).
pub fn signing_key() -> &'static (PathBuf, String) {
    static KEY: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let (file, public) = minisign_key(&dir, "signing");
        (file, public)
    })
}

/// A new minisign key pair in `dir`: (`<name>.key`, 0600; public key).
pub fn minisign_key(dir: &Path, name: &str) -> (PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let pair = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    let path = dir.join(format!("{name}.key"));
    std::fs::write(&path, pair.sk.to_box(None).unwrap().to_string()).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (path, pair.pk.to_base64())
}

/// An age key pair for a test: (public key, identity file).
pub fn age_key(dir: &Path) -> (String, PathBuf) {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let path = dir.join("backup.key");
    std::fs::write(&path, format!("{}\n", identity.to_string().expose_secret())).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    (identity.to_public().to_string(), path)
}

pub fn crm_backup_bin() -> &'static str {
    env!("CARGO_BIN_EXE_crm-backup")
}

/// Runs the CLI with the test's environment; returns (status ok, stdout, stderr).
/// Runs the CLI; a run that takes more than five minutes is killed (and fails), so that a
/// hang fails its test instead of the whole suite.
pub fn run_cli(env: &HashMap<String, String>, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("timeout")
        .args(["--signal=KILL", "300"])
        .arg(crm_backup_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .envs(env)
        .output()
        .expect("crm-backup runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The CLI's stderr without its audit log lines: what a failure says.
pub fn error_lines(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|line| !line.contains(" audit: audit "))
        .collect()
}

/// A `pg_dump` wrapper in its own directory; `script` is the shell body run before the
/// real pg_dump (`$@` are its arguments). `--version` always answers. The other tools
/// (`pg_restore` for verify, `psql`, `pg_dumpall`) are the real ones, for a directory that
/// serves as `postgres.bin_dir`.
pub fn pg_dump_wrapper(dir: &Path, script: &str) -> String {
    for tool in ["pg_restore", "psql", "pg_dumpall"] {
        tool_wrapper(dir, tool, &format!("exec {tool} \"$@\""));
    }
    tool_wrapper(dir, "pg_dump", script)
}

/// A wrapper of PostgreSQL tool `tool` in `dir`: `script` runs first (`$@` are the tool's
/// arguments); `--version` always answers.
pub fn tool_wrapper(dir: &Path, tool: &str, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(tool);
    std::fs::write(
        &path,
        format!("#!/bin/sh\nif [ \"$1\" = --version ]; then exec {tool} --version; fi\n{script}\n"),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir.display().to_string()
}

/// Validates the manifest as stored against schemas/manifest.schema.json; returns it as JSON.
pub async fn assert_manifest_valid(
    setup: &TestSetup,
    manifest: &crm_backup::storage::manifest::Manifest,
) -> serde_json::Value {
    let key = crm_backup::storage::layout::manifest_key(&manifest.id);
    let stored = setup
        .ctx
        .storage
        .get_bytes(&key, u64::MAX)
        .await
        .expect("manifest stored");
    let instance: serde_json::Value = serde_json::from_slice(&stored).unwrap();
    let errors: Vec<String> = manifest_validator()
        .iter_errors(&instance)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "manifest {key} violates the schema: {errors:#?}"
    );
    instance
}

pub fn manifest_validator() -> jsonschema::Validator {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../../schemas/manifest.schema.json")).unwrap();
    jsonschema::validator_for(&schema).expect("manifest schema compiles")
}

/// Restores `manifest` (its own target) with `options`; the report's details, or the error text.
pub async fn restore_details(
    setup: &TestSetup,
    manifest: &crm_backup::storage::manifest::Manifest,
    options: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let request = crm_backup::jobs::restore::RestoreRequest {
        target: manifest.target,
        backup: crm_backup::storage::catalog::BackupRef::Id(manifest.id.clone()),
        options,
        command_id: None,
    };
    crm_backup::jobs::restore::run_restore(&setup.ctx, &request)
        .await
        .map(|(_, _, report)| report.details)
        .map_err(|err| err.to_string())
}

/// Runs a restore drill of `manifest`; the drill's details, or the error as text.
pub async fn drill_details(
    setup: &TestSetup,
    manifest: &crm_backup::storage::manifest::Manifest,
) -> Result<serde_json::Value, String> {
    let request = crm_backup::jobs::drill::DrillRequest {
        target: manifest.target,
        backup: crm_backup::storage::catalog::BackupRef::Id(manifest.id.clone()),
    };
    crm_backup::jobs::drill::run_drill(&setup.ctx, &request)
        .await
        .map(|(_, report)| report.details)
        .map_err(|err| err.to_string())
}

/// Stores `manifest` again as it was, signed (undoing [`rewrite_facts`]).
pub async fn recommit(setup: &TestSetup, manifest: &crm_backup::storage::manifest::Manifest) {
    crm_backup::storage::catalog::commit(&setup.ctx.storage, manifest, setup.ctx.signer.as_deref())
        .await
        .expect("manifest stored again");
}

/// Stores `manifest` again with `edit` applied to its facts (a manifest that lies).
pub async fn rewrite_facts(
    setup: &TestSetup,
    manifest: &crm_backup::storage::manifest::Manifest,
    edit: impl FnOnce(&mut serde_json::Value),
) {
    let mut changed = manifest.clone();
    let mut facts = changed.source.to_value();
    edit(&mut facts);
    changed.source = crm_backup::storage::manifest::Facts::of(&facts);
    crm_backup::storage::catalog::commit(&setup.ctx.storage, &changed, setup.ctx.signer.as_deref())
        .await
        .expect("manifest rewritten");
}
