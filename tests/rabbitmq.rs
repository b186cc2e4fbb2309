//! RabbitMQ definitions: back up, delete, restore (beside and in place), compare — real broker.

mod common;

use common::broker::{TestVhost, management};
use common::{Store, TestSetup};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::restore::{RestoreRequest, run_restore};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::storage::catalog::BackupRef;
use crm_backup::targets::rabbitmq::RabbitmqFacts;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

fn escape(vhost: &str) -> String {
    vhost.replace('/', "%2F")
}

/// The vhost's topology, in a form that compares equal across vhosts.
fn topology(vhost: &str) -> Value {
    let get = |what: &str| -> Vec<Value> {
        serde_json::from_str(&management(
            "GET",
            &format!("{what}/{}", escape(vhost)),
            None,
        ))
        .unwrap()
    };
    let mut exchanges: Vec<Value> = get("exchanges")
        .into_iter()
        .filter(|e| {
            !e["name"].as_str().unwrap().is_empty()
                && !e["name"].as_str().unwrap().starts_with("amq.")
        })
        .map(|e| {
            json!([
                e["name"],
                e["type"],
                e["durable"],
                e["auto_delete"],
                e["arguments"]
            ])
        })
        .collect();
    let mut queues: Vec<Value> = get("queues")
        .into_iter()
        .map(|q| json!([q["name"], q["durable"], q["auto_delete"], q["arguments"]]))
        .collect();
    let mut bindings: Vec<Value> = get("bindings")
        .into_iter()
        .filter(|b| !b["source"].as_str().unwrap().is_empty())
        .map(|b| {
            json!([
                b["source"],
                b["destination"],
                b["destination_type"],
                b["routing_key"],
                b["arguments"]
            ])
        })
        .collect();
    let mut policies: Vec<Value> = get("policies")
        .into_iter()
        .map(|p| {
            json!([
                p["name"],
                p["pattern"],
                p["apply-to"],
                p["definition"],
                p["priority"]
            ])
        })
        .collect();
    for list in [&mut exchanges, &mut queues, &mut bindings, &mut policies] {
        list.sort_by_key(|v| v.to_string());
    }
    json!({ "exchanges": exchanges, "queues": queues, "bindings": bindings, "policies": policies })
}

fn populate(vhost: &str) {
    let v = escape(vhost);
    management(
        "PUT",
        &format!("exchanges/{v}/crm.events"),
        Some(r#"{"type":"topic","durable":true}"#),
    );
    management(
        "PUT",
        &format!("exchanges/{v}/crm.direct"),
        Some(r#"{"type":"direct","durable":true,"arguments":{"alternate-exchange":"crm.events"}}"#),
    );
    management(
        "PUT",
        &format!("queues/{v}/crm.fsm"),
        Some(r#"{"durable":true,"arguments":{"x-queue-type":"quorum"}}"#),
    );
    management(
        "PUT",
        &format!("queues/{v}/crm.mail"),
        Some(r#"{"durable":true,"arguments":{"x-max-length":1000,"x-message-ttl":60000}}"#),
    );
    management(
        "POST",
        &format!("bindings/{v}/e/crm.events/q/crm.fsm"),
        Some(r#"{"routing_key":"deal.*","arguments":{}}"#),
    );
    management(
        "POST",
        &format!("bindings/{v}/e/crm.direct/q/crm.mail"),
        Some(r#"{"routing_key":"mail","arguments":{"x-kind":"ü"}}"#),
    );
    management(
        "PUT",
        &format!("policies/{v}/crm-ttl"),
        Some(
            r#"{"pattern":"^crm\\.mail$","definition":{"max-length":500},"apply-to":"queues","priority":1}"#,
        ),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip_beside_and_in_place() {
    let vhost = TestVhost::create("defs");
    populate(&vhost.name);
    let original = topology(&vhost.name);
    assert_eq!(original["queues"].as_array().unwrap().len(), 2);
    let setup = TestSetup::new("postgres", Store::Local, &[]);

    let manifest = run_backup(
        &setup.ctx,
        &BackupRequest::new(TargetKind::Rabbitmq, "test"),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    common::assert_manifest_valid(&setup, &manifest).await;
    let facts: RabbitmqFacts = manifest.source.parse().unwrap();
    assert!(
        facts.vhosts >= 2 && facts.queues >= 2 && facts.bindings >= 2 && facts.policies >= 1,
        "{facts:?}"
    );
    assert!(verify_backup(&setup.ctx, &manifest).await.unwrap().ok());
    // The drill imports nothing: it decodes the definitions and counts them.
    let drilled = common::drill_details(&setup, &manifest).await.unwrap();
    assert_eq!(drilled["queues"], json!(facts.queues));
    common::rewrite_facts(&setup, &manifest, |f| f["queues"] = json!(facts.queues + 1)).await;
    let err = common::drill_details(&setup, &manifest).await.unwrap_err();
    assert!(err.contains("queues:"), "{err}");
    common::recommit(&setup, &manifest).await;

    // Beside: the vhost comes back under a new name, the original untouched.
    let request = RestoreRequest {
        target: TargetKind::Rabbitmq,
        backup: BackupRef::Id(manifest.id.clone()),
        options: json!({ "vhost": vhost.name, "vhost_prefix": "restored-" }),
        command_id: None,
    };
    let (_, _, report) = run_restore(&setup.ctx, &request).await.unwrap();
    let beside = TestVhost::adopt(&format!("restored-{}", vhost.name));
    assert_eq!(report.details["vhosts"], json!([beside.name]));
    assert_eq!(topology(&beside.name), original);
    assert_eq!(report.details["users_imported"], 0);

    // Without a prefix: one name per backup, so a redelivered restore imports into the same
    // vhost instead of making another copy.
    for _delivery in 0..2 {
        let request = RestoreRequest {
            target: TargetKind::Rabbitmq,
            backup: BackupRef::Id(manifest.id.clone()),
            options: json!({ "vhost": vhost.name }),
            command_id: Some("cmd-default-prefix".into()),
        };
        let (_, _, report) = run_restore(&setup.ctx, &request).await.unwrap();
        let name = format!("restored-{}-{}", manifest.id, vhost.name);
        assert_eq!(report.details["vhosts"], json!([name]));
    }
    let by_default = TestVhost::adopt(&format!("restored-{}-{}", manifest.id, vhost.name));
    assert_eq!(topology(&by_default.name), original);

    // In place: delete the vhost, restore it from the backup.
    management("DELETE", &format!("vhosts/{}", vhost.name), None);
    let request = RestoreRequest {
        target: TargetKind::Rabbitmq,
        backup: BackupRef::Latest,
        options: json!({ "vhost": vhost.name, "in_place": true }),
        command_id: None,
    };
    run_restore(&setup.ctx, &request).await.unwrap();
    management(
        "PUT",
        &format!("permissions/{}/guest", vhost.name),
        Some(r#"{"configure":".*","write":".*","read":".*"}"#),
    );
    assert_eq!(topology(&vhost.name), original);

    // A vhost the backup does not have is a clear, permanent error.
    let request = RestoreRequest {
        target: TargetKind::Rabbitmq,
        backup: BackupRef::Latest,
        options: json!({ "vhost": "no-such-vhost" }),
        command_id: None,
    };
    let err = run_restore(&setup.ctx, &request).await.unwrap_err();
    assert!(
        err.to_string().contains("no vhost `no-such-vhost`"),
        "{err}"
    );
    assert!(!err.retryable());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_management_api_is_retryable_and_leaves_nothing() {
    let setup = TestSetup::new(
        "postgres",
        Store::Local,
        &[(
            "RABBITMQ_MANAGEMENT_URL",
            "http://guest:s3cret-pw@127.0.0.1:1",
        )],
    );
    let err = run_backup(
        &setup.ctx,
        &BackupRequest::new(TargetKind::Rabbitmq, "test"),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.retryable(), "{err}");
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
    assert!(setup.stored_files().is_empty());

    let wrong_password = TestSetup::new(
        "postgres",
        Store::Local,
        &[(
            "RABBITMQ_MANAGEMENT_URL",
            "http://guest:wrong@127.0.0.1:15672",
        )],
    );
    let err = run_backup(
        &wrong_password.ctx,
        &BackupRequest::new(TargetKind::Rabbitmq, "test"),
        &CancellationToken::new(),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    assert!(!err.retryable());
}

/// A management API that answers `head`, then (for a chunked body) an endless stream of `x`.
fn endless_answer(head: &'static str) -> u16 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut request = [0u8; 4096];
                let _ = stream.read(&mut request);
                let _ = stream.write_all(head.as_bytes());
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                while head.contains("chunked") && stream.write_all(chunk.as_bytes()).is_ok() {}
            });
        }
    });
    port
}

/// Answers are read only up to a limit: an error body that never ends still gives an error
/// at once, and a body declared larger than the limit is refused before it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_management_api_answer_without_end_is_cut_at_a_limit() {
    for (head, says) in [
        (
            "HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP 400 Bad Request: xxxx",
        ),
        (
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8589934592\r\n\r\n",
            "larger than the 536870912 bytes it may be",
        ),
    ] {
        let port = endless_answer(head);
        let url = format!("http://guest:guest@127.0.0.1:{port}");
        let setup = TestSetup::new(
            "postgres",
            Store::Local,
            &[("RABBITMQ_MANAGEMENT_URL", url.as_str())],
        );
        let (request, cancel) = (
            BackupRequest::new(TargetKind::Rabbitmq, "test"),
            CancellationToken::new(),
        );
        let backup = run_backup(&setup.ctx, &request, &cancel);
        let err = tokio::time::timeout(std::time::Duration::from_secs(30), backup)
            .await
            .expect("the answer is cut, not read to its end")
            .unwrap_err();
        assert!(err.to_string().contains(says), "{err}");
        assert!(!err.retryable(), "{err}");
        assert!(setup.stored_files().is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_and_credentials_go_to_no_other_broker_unless_allowed() {
    let vhost = TestVhost::create("defs_elsewhere");
    populate(&vhost.name);
    let setup = TestSetup::new("postgres", Store::Local, &[]);
    let manifest = run_backup(
        &setup.ctx,
        &BackupRequest::new(TargetKind::Rabbitmq, "test"),
        &CancellationToken::new(),
    )
    .await
    .unwrap();
    // The attacker's "management API": counts connections.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(stream);
        }
    });
    let attempt = |options: serde_json::Value| {
        let request = RestoreRequest {
            target: TargetKind::Rabbitmq,
            backup: BackupRef::Id(manifest.id.clone()),
            options,
            command_id: None,
        };
        let ctx = setup.ctx.clone();
        async move {
            run_restore(&ctx, &request)
                .await
                .map(|_| ())
                .unwrap_err()
                .to_string()
        }
    };
    let elsewhere = format!("http://127.0.0.1:{port}");
    let err = attempt(json!({ "management_url": elsewhere, "in_place": true })).await;
    assert!(err.contains("not in restore.allowed_destinations"), "{err}");
    let with_credentials = format!("http://admin:pw@127.0.0.1:{port}");
    let err = attempt(json!({ "management_url": with_credentials })).await;
    assert!(err.contains("carries credentials"), "{err}");
    // The source's own vhost names, by an empty prefix: that is in place.
    let err = attempt(json!({ "vhost": vhost.name, "vhost_prefix": "" })).await;
    assert!(err.contains("in place"), "{err}");
    std::thread::sleep(std::time::Duration::from_millis(200));
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}
