//! The examples of docs/contract.md are part of the contract: they must match the schemas and work.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::broker::TestVhost;
use common::{Store, TestDatabase, TestSetup};
use crm_backup::messaging::command::Command;
use crm_backup::messaging::worker;
use crm_backup::metrics::WorkerState;
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog;
use tokio_util::sync::CancellationToken;

const CONTRACT: &str = include_str!("../docs/contract.md");

/// The fenced block after each `<!-- marker -->` line.
fn blocks_after(marker: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut lines = CONTRACT.lines();
    while let Some(line) = lines.next() {
        if line.trim() != format!("<!-- {marker} -->") {
            continue;
        }
        let fence = lines.next().expect("a fenced block follows the marker");
        assert!(
            fence.starts_with("```"),
            "marker {marker} is not followed by a fence"
        );
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        blocks.push(body.join("\n"));
    }
    blocks
}

#[test]
fn readme_commands_match_the_schema_and_parse() {
    let schema: serde_json::Value =
        serde_json::from_str(include_str!("../schemas/command.schema.json")).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();
    let examples = blocks_after("command example");
    assert!(examples.len() >= 2);
    for example in &examples {
        let value: serde_json::Value = serde_json::from_str(example).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&value)
            .map(|e| e.to_string())
            .collect();
        assert!(errors.is_empty(), "{example}: {errors:?}");
        Command::parse(example.as_bytes()).unwrap_or_else(|e| panic!("{example}: {e}"));
    }
    // The schema rejects what the worker rejects.
    let mut bad: serde_json::Value = serde_json::from_str(&examples[0]).unwrap();
    bad["colour"] = "red".into();
    assert!(!validator.is_valid(&bad));
    let mut restore_all: serde_json::Value = serde_json::from_str(&examples[1]).unwrap();
    restore_all["target"] = "all".into();
    assert!(!validator.is_valid(&restore_all));
    assert!(Command::parse(restore_all.to_string().as_bytes()).is_err());
    // Options: per action and target, typed; the schema and the worker agree.
    let with_options = |action: &str, target: &str, options: serde_json::Value| {
        let mut command: serde_json::Value = serde_json::from_str(&examples[0]).unwrap();
        command["action"] = action.into();
        command["target"] = target.into();
        command["options"] = options;
        command["backup_id"] = if matches!(action, "backup" | "prune") {
            serde_json::Value::Null
        } else {
            "latest".into()
        };
        let schema_ok = validator.is_valid(&command);
        let worker_ok = Command::parse(command.to_string().as_bytes()).is_ok();
        assert_eq!(schema_ok, worker_ok, "{command}");
        schema_ok
    };
    use serde_json::json;
    assert!(with_options(
        "backup",
        "postgres",
        json!({"schemas": ["crm"], "globals": true})
    ));
    assert!(with_options(
        "restore",
        "redis",
        json!({"host": "10.0.0.7", "port": 6380})
    ));
    assert!(with_options(
        "restore",
        "redis",
        json!({"existing": "skip", "in_place": true})
    ));
    assert!(with_options("prune", "all", json!({"dry_run": true})));
    assert!(with_options(
        "backup",
        "all",
        json!({"documents.incremental": true})
    ));
    assert!(!with_options(
        "backup",
        "postgres",
        json!({"schemas": "crm"})
    ));
    assert!(!with_options("restore", "redis", json!({"port": "6380"})));
    assert!(!with_options(
        "restore",
        "redis",
        json!({"existing": "merge"})
    ));
    assert!(!with_options(
        "restore",
        "postgres",
        json!({"vhost": "crm"})
    ));
    assert!(!with_options("verify", "postgres", json!({"deep": true})));
    assert!(!with_options("backup", "all", json!({"incremental": true})));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_python_snippet_requests_a_backup_and_gets_its_result() {
    let snippet = blocks_after("pika example")
        .pop()
        .expect("the contract has a pika example");
    let vhost = TestVhost::create("pika");
    let db = TestDatabase::create("pika");
    let url = vhost.url();
    let setup = TestSetup::new(&db.name, Store::Local, &[("RABBITMQ_URL", url.as_str())]);
    let shutdown = CancellationToken::new();
    let state = Arc::new(WorkerState::default());
    let worker = tokio::spawn(worker::run(
        setup.ctx.clone(),
        state.clone(),
        shutdown.clone(),
    ));
    while !state.consuming.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("request_backup.py");
    std::fs::write(&script, snippet).unwrap();
    let out = tokio::process::Command::new("python3")
        .arg(&script)
        .env("AMQP_URL", &url)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.first().copied(), Some("backup.started "), "{stdout}");
    let completed = lines.last().unwrap();
    let backup_id = completed
        .strip_prefix("backup.completed ")
        .expect("completed last");
    let manifest = catalog::get(&setup.ctx.storage, &backup_id.parse().unwrap())
        .await
        .unwrap();
    assert_eq!(manifest.target, TargetKind::Postgres);
    assert_eq!(manifest.requested_by, "crm-api");
    shutdown.cancel();
    let _ = worker.await;
}

#[test]
fn alert_rules_are_valid_and_pass_their_unit_tests() {
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/deploy"))
            .output()
            .expect("promtool runs (scripts/test.sh installs Debian's prometheus package)");
        assert!(
            out.status.success(),
            "promtool {args:?}:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The Grafana dashboard's queries are valid PromQL (checked by promtool as recording rules)
/// over metrics the worker exports.
#[test]
fn the_dashboard_queries_valid_promql_over_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(include_str!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/grafana/crm-backup.json"
    )))
    .expect("the dashboard is JSON");
    let exported = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics/mod.rs"));
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "successful backup",
        "drill",
        "size",
        "duration",
        "Dead letters",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel on {wanted}: {titles:?}"
        );
    }
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .enumerate()
    {
        for metric in expr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|word| word.starts_with("crm_backup_"))
        {
            assert!(
                exported.contains(&format!("`{metric}`")),
                "the dashboard queries {metric}, which the worker does not export"
            );
        }
        rules.push_str(&format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            serde_json::to_string(&expr).unwrap()
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("dashboard.yml"), &rules).unwrap();
    let out = std::process::Command::new("promtool")
        .args(["check", "rules", "dashboard.yml"])
        .current_dir(dir.path())
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "{rules}\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
