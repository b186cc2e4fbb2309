//! The operator CLI as a user runs it: exit codes, one-line errors, output lines.

mod common;

use std::collections::HashMap;

use common::{Store, TestDatabase, TestSetup, psql, run_cli};

fn env_with(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let dir = std::env::temp_dir().join(common::unique("cli_storage"));
    let mut env: HashMap<String, String> = HashMap::from([
        ("BACKUP_CONFIG_DIR".to_string(), "/nonexistent".to_string()),
        ("BACKUP_STORAGE_DIR".to_string(), dir.display().to_string()),
    ]);
    for (key, value) in pairs {
        env.insert(key.to_string(), value.to_string());
    }
    env
}

#[test]
fn a_bad_configuration_value_stops_start_up_naming_the_key() {
    let cases = [
        (
            "BACKUP__PIPELINE__ZSTD_LEVEL",
            "fast",
            "pipeline.zstd_level",
        ),
        ("BACKUP_RETENTION_DAYS", "a week", "retention.days"),
        (
            "DATABASE_URL",
            "mysql://root@db/crm",
            "postgres.database_url",
        ),
        (
            "BACKUP__STORAGE__PARTS_IN_FLIGHT",
            "0",
            "storage.parts_in_flight",
        ),
        (
            "BACKUP__HTTP__METRICS_REFRESH",
            "0s",
            "http.metrics_refresh",
        ),
        (
            "BACKUP__SIZE_CHECK__DROP_RATIO",
            "NaN",
            "size_check.drop_ratio",
        ),
        (
            "BACKUP__SIZE_CHECK__JUMP_RATIO",
            "0.5",
            "size_check.jump_ratio",
        ),
    ];
    for (name, value, key) in cases {
        let (ok, stdout, stderr) = run_cli(&env_with(&[(name, value)]), &["list"]);
        assert!(!ok, "{name}={value} must fail: {stdout}");
        assert!(stderr.contains(key), "{name}={value}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    }
}

#[test]
fn secrets_in_configuration_never_reach_output() {
    let env = env_with(&[("DATABASE_URL", "postgres://app:hunter2@127.0.0.1:1/crm")]);
    let (ok, stdout, stderr) = run_cli(&env, &["run", "postgres"]);
    assert!(!ok);
    assert!(
        !stdout.contains("hunter2") && !stderr.contains("hunter2"),
        "{stdout}{stderr}"
    );
    assert_eq!(
        common::error_lines(&stderr),
        ["error: postgres: postgres is unreachable: error connecting to server"],
        "{stderr}"
    );
}

#[test]
fn run_prints_one_line_per_target_and_list_shows_it() {
    let db = TestDatabase::create("cli_run");
    psql(
        &db.name,
        "CREATE TABLE t AS SELECT generate_series(1, 1000) AS n",
    );
    let setup = TestSetup::new(&db.name, Store::Local, &[]);

    let (ok, stdout, stderr) = run_cli(
        &setup.env,
        &["run", "postgres", "--reason", "before migration 0042"],
    );
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    assert!(lines[0].starts_with("postgres"), "{stdout}");
    for part in ["raw", "stored", " s ", "/s"] {
        assert!(lines[0].contains(part), "`{part}` missing: {stdout}");
    }

    let (ok, stdout, _) = run_cli(&setup.env, &["run", "postgres", "--json"]);
    assert!(ok);
    let line: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(line["ok"], true);
    assert!(line["raw_size_bytes"].as_u64().unwrap() > line["size_bytes"].as_u64().unwrap());

    let (ok, stdout, _) = run_cli(&setup.env, &["list", "postgres", "--json"]);
    assert!(ok);
    let rows: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert_eq!(rows[0]["reason"], "before migration 0042");

    let id = rows[1]["backup_id"].as_str().unwrap();
    let (ok, stdout, _) = run_cli(&setup.env, &["show", "--backup", id, "--json"]);
    assert!(ok);
    let manifest: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(manifest["source"]["tables"][0]["rows"], 1000);
    // The latest backup of a target, as a summary for people.
    let (ok, stdout, _) = run_cli(&setup.env, &["show", "postgres"]);
    assert!(ok);
    assert!(
        stdout.starts_with(&format!("backup     {id}\n")),
        "{stdout}"
    );
    assert!(stdout.contains("artifact   "), "{stdout}");

    let (ok, _, stderr) = run_cli(
        &setup.env,
        &["show", "--backup", "20200101T000000Z-postgres-abcd"],
    );
    assert!(!ok);
    assert!(stderr.contains("not found"), "{stderr}");
    let (ok, _, stderr) = run_cli(&setup.env, &["run", "mysql"]);
    assert!(!ok);
    assert!(stderr.contains("invalid value 'mysql'"), "{stderr}");
    assert!(
        stderr.contains("possible values: postgres, redis"),
        "{stderr}"
    );
    // Option values are typed by the option.
    let (ok, _, stderr) = run_cli(&setup.env, &["run", "postgres", "--option", "globals=yes"]);
    assert!(!ok);
    assert!(
        stderr.contains("option `globals` takes true or false"),
        "{stderr}"
    );
}

#[test]
fn run_all_backs_up_every_enabled_target_and_fails_if_one_fails() {
    let db = TestDatabase::create("cli_all");
    let documents = tempfile::tempdir().unwrap();
    std::fs::write(documents.path().join("invoice.pdf"), b"%PDF").unwrap();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let root = documents.path().display().to_string();
    let setup = TestSetup::new(
        &db.name,
        Store::Local,
        &[
            ("REDIS_PORT", closed_port.as_str()),
            ("DOCUMENTS_STORAGE_ROOT", root.as_str()),
            ("BACKUP__DOCUMENTS__ENABLED", "true"),
        ],
    );
    let (ok, stdout, stderr) = run_cli(
        &setup.env,
        &[
            "run",
            "all",
            "--json",
            "--option",
            "documents.incremental=true",
        ],
    );
    assert!(!ok, "one target failed: {stdout}");
    assert!(stderr.contains("redis"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let outcome: Vec<(String, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["target"].as_str().unwrap().to_string(),
                l["ok"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        outcome,
        [
            ("postgres".to_string(), true),
            ("redis".into(), false),
            ("rabbitmq".into(), true),
            ("documents".into(), true)
        ]
    );
    assert_eq!(lines[1]["error"]["retryable"], true);

    // The successful ones form one set.
    let (ok, stdout, _) = run_cli(&setup.env, &["list", "--json"]);
    assert!(ok);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(rows.len(), 3);
    let set_ids: std::collections::BTreeSet<_> = rows
        .iter()
        .map(|r| r["set_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(set_ids.len(), 1, "{rows:?}");

    // Disabled targets are left out of `all`.
    let mut env = setup.env.clone();
    for name in ["REDIS", "RABBITMQ_DEFINITIONS", "DOCUMENTS"] {
        env.insert(format!("BACKUP__{name}__ENABLED"), "false".into());
    }
    let (ok, stdout, stderr) = run_cli(&env, &["run", "all"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
}

#[test]
fn children_get_no_secret_they_do_not_need() {
    let db = TestDatabase::create("cli_env");
    let bin = tempfile::tempdir().unwrap();
    let seen = bin.path().join("environment");
    let bin_dir = common::pg_dump_wrapper(
        bin.path(),
        &format!("env > {}\nexec pg_dump \"$@\"", seen.display()),
    );
    let url = common::pg_url(&db.name);
    let env = env_with(&[
        ("DATABASE_URL", url.as_str()),
        ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
        ("BACKUP_S3_SECRET_KEY", "s3-secret-of-the-worker"),
        ("REDIS_PASSWORD", "redis-secret-of-the-worker"),
        (
            "RABBITMQ_URL",
            "amqp://worker:broker-secret@127.0.0.1:5672/%2f",
        ),
        ("BACKUP_SCHEDULER_ID_SALT", "salt-secret-of-the-worker"),
    ]);
    let (ok, stdout, stderr) = run_cli(&env, &["run", "postgres"]);
    assert!(ok, "{stdout}{stderr}");
    let environment = std::fs::read_to_string(&seen).unwrap();
    for secret in [
        "s3-secret",
        "redis-secret",
        "broker-secret",
        "salt-secret",
        "BACKUP_",
    ] {
        assert!(
            !environment.contains(secret),
            "pg_dump saw {secret}:\n{environment}"
        );
    }
    assert!(environment.contains("PGDATABASE="), "{environment}");
}

#[test]
fn local_backups_are_readable_by_their_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let db = TestDatabase::create("cli_modes");
    let url = common::pg_url(&db.name);
    let env = env_with(&[("DATABASE_URL", url.as_str())]);
    let (ok, stdout, stderr) = run_cli(&env, &["run", "postgres"]);
    assert!(ok, "{stdout}{stderr}");
    let root = std::path::PathBuf::from(&env["BACKUP_STORAGE_DIR"]);
    let mut checked = 0;
    let mut stack = vec![root];
    while let Some(dir) = stack.pop() {
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "{}", dir.display());
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", path.display());
                checked += 1;
            }
        }
    }
    assert!(checked >= 2, "an artifact and a manifest");
}

#[test]
fn every_operation_leaves_an_audit_record_that_history_shows() {
    let db = TestDatabase::create("cli_audit");
    psql(
        &db.name,
        "CREATE TABLE t AS SELECT generate_series(1, 100) AS n",
    );
    let setup = TestSetup::new(&db.name, Store::Local, &[]);
    let mut env = setup.env.clone();
    env.insert("USER".into(), "says-anything".into());
    // Audit records are logged whatever the level.
    env.insert("RUST_LOG".into(), "error".into());
    let into = common::unique("cli_audit_into");
    let _restored = TestDatabase::adopt(&into);

    let (ok, _, stderr) = run_cli(&env, &["run", "postgres"]);
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("audit") && stderr.contains("action=backup"),
        "the record is logged at RUST_LOG=error: {stderr}"
    );
    // A record past retention.audit_days (400), which the prune below deletes.
    let old_day = setup.storage_path().join("audit/2020/01/01");
    std::fs::create_dir_all(&old_day).unwrap();
    std::fs::write(old_day.join("000000.000Z-old.json"), b"{}").unwrap();
    for args in [
        &["verify", "postgres"][..],
        &["restore", "postgres", "--into", &into],
        &["prune", "postgres"],
    ] {
        let (ok, _, stderr) = run_cli(&env, args);
        assert!(ok, "{args:?}: {stderr}");
    }
    let (ok, _, stderr) = run_cli(&env, &["restore", "postgres", "--in-place"]);
    assert!(!ok);
    assert_eq!(
        common::error_lines(&stderr),
        ["error: this restore changes the live source (in place); add --yes to confirm"]
    );

    // Another process reads them back from storage, newest first.
    let (ok, stdout, stderr) = run_cli(&setup.env, &["history", "--json"]);
    assert!(ok, "{stderr}");
    let records: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap(),
                r["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            ("restore", "refused"),
            ("prune", "completed"),
            ("restore", "completed"),
            ("verify", "completed"),
            ("backup", "completed")
        ],
        "{stdout}"
    );
    let os_user = std::process::Command::new("id")
        .arg("-un")
        .output()
        .unwrap();
    let os_user = String::from_utf8_lossy(&os_user.stdout).trim().to_string();
    let backup_id = records[4]["backup_id"].as_str().unwrap();
    for record in &records {
        assert_eq!(record["origin"], "cli");
        assert_eq!(
            record["user"],
            os_user.as_str(),
            "the verified user, not $USER"
        );
        assert_eq!(record["requested_by"], "cli:says-anything");
        assert_eq!(record["target"], "postgres");
        assert!(record["duration_ms"].is_u64());
    }
    assert_eq!(records[2]["backup_id"], backup_id);
    assert_eq!(
        records[2]["details"]["destination"],
        format!("postgres database {into}")
    );
    assert_eq!(records[2]["options"]["into"], into.as_str());
    assert_eq!(records[3]["backup_id"], backup_id);
    assert!(records[4]["raw_bytes"].as_u64() > Some(0));
    assert_eq!(records[0]["error_kind"], "unconfirmed");
    assert_eq!(records[1]["details"]["audit_records_deleted"], 1);
    assert!(!old_day.join("000000.000Z-old.json").exists());

    // Stored one object per record under audit/<yyyy>/<mm>/<dd>/.
    let day = chrono::Utc::now().format("%Y/%m/%d").to_string();
    let stored = std::fs::read_dir(setup.storage_path().join("audit").join(&day))
        .unwrap()
        .count();
    assert_eq!(stored, 5);

    // The table, and the filters.
    let (ok, stdout, _) = run_cli(&setup.env, &["history"]);
    assert!(ok);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 6, "{stdout}");
    assert!(lines[0].starts_with("WHEN (UTC)"), "{stdout}");
    assert!(
        lines[1].contains("restore") && lines[1].contains("refused") && lines[1].contains("--yes"),
        "{stdout}"
    );
    assert!(
        lines[3].contains(&format!("into postgres database {into}")),
        "{stdout}"
    );
    let (ok, stdout, _) = run_cli(&setup.env, &["history", "redis"]);
    assert!(
        ok && stdout.starts_with("nothing recorded since"),
        "{stdout}"
    );
    let (ok, stdout, _) = run_cli(&setup.env, &["history", "--since", "1s"]);
    assert!(ok, "{stdout}");
    let (ok, stdout, _) = run_cli(&setup.env, &["history", "--limit", "2", "--json"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Vec<serde_json::Value>>(&stdout)
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn long_operations_show_progress_as_a_bar_on_a_terminal_and_as_log_lines_otherwise() {
    let db = TestDatabase::create("cli_progress");
    common::psql(
        &db.name,
        "CREATE TABLE notes AS SELECT i, md5(i::text) AS note FROM generate_series(1, 20000) i",
    );
    let bin = tempfile::tempdir().unwrap();
    // The dump's first bytes, then a pause: progress is reported while the step runs.
    let bin_dir = common::pg_dump_wrapper(
        bin.path(),
        "pg_dump \"$@\" | { head -c 65536; sleep 1.5; cat; }",
    );
    let url = common::pg_url(&db.name);
    let env = env_with(&[
        ("DATABASE_URL", url.as_str()),
        ("BACKUP__POSTGRES__BIN_DIR", bin_dir.as_str()),
        ("BACKUP__PIPELINE__PROGRESS_EVERY", "300ms"),
        ("BACKUP__PIPELINE__CHUNK_KIB", "16"),
        ("BACKUP__MESSAGING__CLI_EVENTS", "false"),
    ]);
    let (ok, stdout, stderr) = run_cli(&env, &["run", "postgres"]);
    assert!(ok, "{stdout}{stderr}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|line| line.contains(" progress: backup postgres: "))
        .collect();
    assert!(lines.len() >= 2, "no progress lines: {stderr}");
    assert!(
        lines.iter().any(|line| line.contains("bytes_done=65536")),
        "the bytes read so far: {lines:#?}"
    );

    // Under a pseudo-terminal: a bar with the bytes, the rate and the size expected from
    // the previous backup.
    let mut command = String::from("exec");
    for arg in [common::crm_backup_bin(), "run", "postgres"] {
        command.push_str(&format!(" '{arg}'"));
    }
    let out = std::process::Command::new("script")
        .args(["-qec", &command, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .envs(&env)
        .output()
        .expect("script (util-linux) runs");
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    assert!(
        terminal.contains("backup postgres [")
            && terminal.contains(" of ~")
            && terminal.contains("/s"),
        "no progress bar on the terminal: {terminal}"
    );
    assert!(
        !terminal.contains(" progress: "),
        "log lines instead of the bar: {terminal}"
    );
}

#[test]
fn broker_commands_on_a_vhost_without_the_topology_name_what_is_missing_and_the_fix() {
    let vhost = common::broker::TestVhost::create("cli_bare");
    let env = env_with(&[("RABBITMQ_URL", vhost.url().as_str())]);
    let fix = "`crm-backup setup` declares the exchanges and queues";
    for (args, missing) in [
        (&["dlq", "list"][..], "no queue 'backup.commands.dead'"),
        (
            &["dlq", "replay", "--all"],
            "no queue 'backup.commands.dead'",
        ),
        (
            &["enqueue", "backup", "postgres"],
            "no exchange 'backup.commands'",
        ),
    ] {
        let (ok, stdout, stderr) = run_cli(&env, args);
        assert!(!ok, "{args:?} must fail: {stdout}");
        let errors = common::error_lines(&stderr);
        assert_eq!(
            errors.len(),
            1,
            "{args:?}: one line, no lapin log: {stderr}"
        );
        assert!(
            errors[0].contains(missing) && errors[0].contains(fix),
            "{args:?}: {stderr}"
        );
    }

    let (ok, stdout, stderr) = run_cli(&env, &["setup"]);
    assert!(ok, "{stdout}{stderr}");
    let (ok, stdout, stderr) = run_cli(&env, &["dlq", "list", "--json"]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout.trim(), "[]");
}
