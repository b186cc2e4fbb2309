//! Consul, against an HTTP double that follows Consul's documented API (tests/common/consul_double.rs):
//! Consul cannot be installed on the test machines; docker-compose.yml runs the real one.

mod common;

use common::consul_double::{ConsulDouble, ConsulState};
use common::{Store, TestSetup};
use crm_backup::jobs::backup::{BackupRequest, run_backup};
use crm_backup::jobs::verify::verify_backup;
use crm_backup::model::TargetKind;
use crm_backup::storage::manifest::Manifest;
use crm_backup::targets::consul::ConsulFacts;
use serde_json::json;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "0b6f2b1c-consul-secret-token";
/// A real Consul snapshot is a gzipped archive; the double serves gzip bytes.
const SNAPSHOT: &[u8] = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03fake consul snapshot payload";

fn populated() -> ConsulState {
    let mut state = ConsulState {
        kv_token: Some(TOKEN.into()),
        management_token: Some(TOKEN.into()),
        snapshot: SNAPSHOT.to_vec(),
        index: 100,
        ..ConsulState::default()
    };
    for i in 0..150 {
        state.kv.insert(
            format!("crm/config/key-{i:03}"),
            (i, format!("value {i}").into_bytes()),
        );
    }
    state
        .kv
        .insert("crm/binary".into(), (42, (0..=255u8).collect()));
    // Near Consul's 512 KiB value limit: too large for a transaction, written on its own.
    state
        .kv
        .insert("crm/large".into(), (0, vec![b'z'; 500 * 1024]));
    state.kv.insert("crm/empty".into(), (0, Vec::new()));
    state
        .kv
        .insert("crm/ключ".into(), (0, "значение".as_bytes().to_vec()));
    state
}

fn setup(double: &ConsulDouble, token: &str) -> TestSetup {
    TestSetup::new(
        "postgres",
        Store::Local,
        &[
            ("CONSUL_HTTP_ADDR", double.address.as_str()),
            ("CONSUL_HTTP_TOKEN", token),
            ("BACKUP__CONSUL__ENABLED", "true"),
        ],
    )
}

async fn backup(setup: &TestSetup) -> Result<(Manifest, ConsulFacts), String> {
    run_backup(
        &setup.ctx,
        &BackupRequest::new(TargetKind::Consul, "test"),
        &CancellationToken::new(),
    )
    .await
    .map(|m| {
        let facts = m.source.parse().unwrap();
        (m, facts)
    })
    .map_err(|e| format!("{e} (retryable: {})", e.retryable()))
}

async fn restore(
    setup: &TestSetup,
    manifest: &Manifest,
    options: serde_json::Value,
) -> Result<serde_json::Value, String> {
    common::restore_details(setup, manifest, options).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_that_is_not_gzip_fails_the_backup_and_stores_nothing() {
    // An answer of 200 that is no snapshot: empty, or a proxy's page. verify and the drill
    // refuse such an artifact, so the backup must not call it a success.
    for body in [&b""[..], &b"<html>502 Bad Gateway</html>"[..]] {
        let double = ConsulDouble::start(ConsulState {
            snapshot: body.to_vec(),
            ..populated()
        })
        .await;
        let setup = setup(&double, TOKEN);
        let err = backup(&setup)
            .await
            .expect_err("no backup of a non-snapshot");
        assert!(err.contains("not a gzip stream"), "{err}");
        assert!(err.contains("retryable: true"), "{err}");
        assert!(
            setup.stored_files().is_empty(),
            "{:?}",
            setup.stored_files()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_and_snapshot_round_trip_in_batches_of_64() {
    let double = ConsulDouble::start(populated()).await;
    let original = double.state.lock().unwrap().kv.clone();
    let setup = setup(&double, TOKEN);
    let (manifest, facts) = backup(&setup).await.unwrap();
    common::assert_manifest_valid(&setup, &manifest).await;
    assert_eq!(facts.key_count, 154);
    assert_eq!(facts.kv_index, Some(100));
    assert!(facts.snapshot && facts.snapshot_skipped.is_none());
    assert_eq!(manifest.artifacts.len(), 2);
    let report = verify_backup(&setup.ctx, &manifest).await.unwrap();
    assert!(report.ok(), "{report:?}");
    let drilled = common::drill_details(&setup, &manifest).await.unwrap();
    assert_eq!(drilled["keys"], 154);
    assert!(drilled["snapshot_bytes"].as_u64().unwrap() > 0);
    common::rewrite_facts(&setup, &manifest, |f| f["key_count"] = json!(155)).await;
    let err = common::drill_details(&setup, &manifest).await.unwrap_err();
    assert!(
        err.contains("holds 154 keys") && err.contains("recorded 155"),
        "{err}"
    );
    common::recommit(&setup, &manifest).await;

    // Lose everything, then restore in place.
    double.state.lock().unwrap().kv.clear();
    let details = restore(&setup, &manifest, json!({ "in_place": true }))
        .await
        .unwrap();
    assert_eq!(details["keys"], 154);
    {
        let state = double.state.lock().unwrap();
        assert_eq!(
            state.kv, original,
            "values (binary, 500 KiB, empty, non-ASCII) and flags come back"
        );
        assert!(
            state.txn_sizes.iter().all(|n| *n <= 64),
            "{:?}",
            state.txn_sizes
        );
        assert_eq!(
            state.txn_sizes.iter().sum::<usize>(),
            153,
            "all but the large key in transactions"
        );
        assert!(
            state.restored_snapshot.is_none(),
            "the snapshot is restored only when asked"
        );
    }

    // Beside: under a prefix, the originals untouched.
    double.set("crm/config/key-000", 0, b"changed since");
    restore(&setup, &manifest, json!({ "prefix": "restored/check/" }))
        .await
        .unwrap();
    {
        let state = double.state.lock().unwrap();
        assert_eq!(state.kv["restored/check/crm/config/key-000"].1, b"value 0");
        assert_eq!(state.kv["crm/config/key-000"].1, b"changed since");
    }
    // Delivered again (its worker killed before the command was marked done): the keys under
    // the prefix are the backup's own, so it completes. One key changed since is refused.
    let again = restore(&setup, &manifest, json!({ "prefix": "restored/check/" }))
        .await
        .unwrap();
    assert_eq!(again["already_there"], again["keys"], "{again}");
    double.set("restored/check/crm/config/key-001", 0, b"edited");
    let err = restore(&setup, &manifest, json!({ "prefix": "restored/check/" }))
        .await
        .unwrap_err();
    assert!(
        err.contains("1 keys already exist under the prefix"),
        "{err}"
    );
    assert_eq!(
        double.state.lock().unwrap().kv["restored/check/crm/config/key-001"].1,
        b"edited"
    );

    // delete_absent removes keys the backup does not have.
    double.set("crm/added-later", 0, b"x");
    restore(
        &setup,
        &manifest,
        json!({ "in_place": true, "delete_absent": true }),
    )
    .await
    .unwrap();
    {
        let state = double.state.lock().unwrap();
        assert!(!state.kv.contains_key("crm/added-later"));
        assert_eq!(state.kv["crm/config/key-000"].1, b"value 0");
    }

    // The snapshot: only in place, only when asked.
    let err = restore(&setup, &manifest, json!({ "snapshot": true }))
        .await
        .unwrap_err();
    assert!(err.contains("only with in_place"), "{err}");
    restore(
        &setup,
        &manifest,
        json!({ "snapshot": true, "in_place": true }),
    )
    .await
    .unwrap();
    assert_eq!(
        double.state.lock().unwrap().restored_snapshot.as_deref(),
        Some(SNAPSHOT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_backup_is_refused_and_leaves_nothing() {
    let double = ConsulDouble::start(populated()).await;
    let setup = setup(&double, "");
    let err = backup(&setup).await.unwrap_err();
    assert!(
        err.contains("403") && err.contains("retryable: false"),
        "{err}"
    );
    assert!(setup.stored_files().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_without_snapshot_rights_backs_up_kv_and_says_why() {
    let mut state = populated();
    state.management_token = Some("management-only".into());
    let double = ConsulDouble::start(state).await;
    let setup = setup(&double, TOKEN);
    let (manifest, facts) = backup(&setup).await.unwrap();
    assert!(!facts.snapshot);
    assert!(
        facts.snapshot_skipped.as_ref().unwrap().contains("403"),
        "{facts:?}"
    );
    assert_eq!(manifest.artifacts.len(), 1);
    assert!(
        !serde_json::to_string(&manifest).unwrap().contains(TOKEN),
        "the token never reaches the manifest"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_are_retried() {
    let mut state = populated();
    state.failures = [503, 500, 503].into_iter().collect();
    let double = ConsulDouble::start(state).await;
    let setup = setup(&double, TOKEN);
    let (_, facts) = backup(&setup).await.unwrap();
    assert_eq!(facts.key_count, 154);
    assert!(double.state.lock().unwrap().requests >= 5);

    let mut state = populated();
    state.failures = std::iter::repeat_n(503, 20).collect();
    let failing = ConsulDouble::start(state).await;
    let err = backup(&self::setup(&failing, TOKEN)).await.unwrap_err();
    assert!(
        err.contains("503") && err.contains("retryable: true"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_store_is_backed_up_as_zero_keys() {
    let double = ConsulDouble::start(ConsulState {
        snapshot: SNAPSHOT.to_vec(),
        ..ConsulState::default()
    })
    .await;
    let setup = setup(&double, "");
    let (manifest, facts) = backup(&setup).await.unwrap();
    assert_eq!(facts.key_count, 0);
    let details = restore(&setup, &manifest, json!({ "in_place": true }))
        .await
        .unwrap();
    assert_eq!(
        (details["keys"].as_u64(), details["transactions"].as_u64()),
        (Some(0), Some(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_beside_the_original_cannot_reach_the_live_keys() {
    let double = ConsulDouble::start(populated()).await;
    let original = double.state.lock().unwrap().kv.clone();
    let setup = setup(&double, TOKEN);
    let (manifest, _) = backup(&setup).await.unwrap();
    for (options, says) in [
        (
            json!({ "prefix": "", "delete_absent": true }),
            "empty prefix",
        ),
        (
            json!({ "prefix": "restored/x/", "delete_absent": true }),
            "only with in_place",
        ),
        (
            json!({ "prefix": "crm/" }),
            "already exist under the prefix",
        ),
    ] {
        let err = restore(&setup, &manifest, options.clone())
            .await
            .unwrap_err();
        assert!(err.contains(says), "{options}: {err}");
    }
    assert_eq!(
        double.state.lock().unwrap().kv,
        original,
        "the live keys are unchanged"
    );
}
