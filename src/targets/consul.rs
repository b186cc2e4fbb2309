//! Consul: the KV store (always, `GET /v1/kv/?recurse`) and, when the token allows it, the
//! full snapshot (`GET /v1/snapshot`: catalog, sessions, ACLs). KV restores through
//! `PUT /v1/txn` in batches of at most 64 operations; a snapshot restores only in place
//! and only when asked.
//!
//! The KV artifact is in `consul kv export` format, so `consul kv import` reads it too.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use futures::StreamExt;
use reqwest::{Method, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::http::ApiClient;
use super::{
    ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, exclusive_options,
    parse_options, read_limited,
};
use crate::config::ConsulSettings;
use crate::model::TargetKind;
use crate::pipeline::{ArtifactReader, ChannelSource, Inspect};
use crate::storage::manifest::Facts;
use crate::storage::manifest::{ArtifactRecord, Manifest};

const KIND: TargetKind = TargetKind::Consul;
const KV_ARTIFACT: &str = "kv.json";
const KV_FORMAT: &str = "consul-kv-export-json";
const SNAPSHOT_ARTIFACT: &str = "consul.snap";
const SNAPSHOT_FORMAT: &str = "consul-snapshot";
/// Consul refuses transactions of more operations than this.
pub const TXN_LIMIT: usize = 64;
/// Consul refuses transaction bodies over `txn_max_req_len` (512 KiB by default): stay below.
pub const TXN_MAX_BYTES: usize = 400 * 1024;
const MAX_KV_BYTES: u64 = 1 << 30;

pub struct Consul {
    address: String,
    token: SecretString,
    snapshot: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupOptions {
    /// Override `consul.snapshot` for this backup.
    snapshot: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOptions {
    /// Write the keys under this prefix (beside the originals). Default
    /// `restored/<backup id>/`.
    prefix: Option<String>,
    /// Write the keys under their own names.
    #[serde(default)]
    in_place: bool,
    /// Also delete keys (under the prefix) that the backup does not have.
    #[serde(default)]
    delete_absent: bool,
    /// Also restore the full snapshot (replaces the cluster state; needs in_place).
    #[serde(default)]
    snapshot: bool,
}

/// One key as `consul kv export` writes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvEntry {
    pub key: String,
    pub flags: u64,
    /// Base64 of the raw value.
    pub value: String,
}

/// One key as the HTTP API returns it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ApiKv {
    key: String,
    #[serde(default)]
    flags: u64,
    value: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConsulFacts {
    pub key_count: usize,
    pub kv_index: Option<u64>,
    pub snapshot: bool,
    pub snapshot_index: Option<u64>,
    /// Why the snapshot is not in this backup, when it is not.
    pub snapshot_skipped: Option<String>,
}

impl Consul {
    pub fn new(settings: &ConsulSettings) -> Self {
        Consul {
            address: settings.address.clone(),
            token: settings.token.clone(),
            snapshot: settings.snapshot,
        }
    }

    fn client(&self) -> Result<ApiClient, TargetError> {
        ApiClient::new(
            KIND,
            &self.address,
            vec![self.token.expose_secret().to_string()],
        )
    }

    fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let token = self.token.expose_secret();
        if token.is_empty() {
            request
        } else {
            request.header("X-Consul-Token", token)
        }
    }

    /// Every key under `prefix` (all keys for ``), with the KV index of the read.
    async fn read_kv(
        &self,
        client: &ApiClient,
        prefix: &str,
    ) -> Result<(Vec<KvEntry>, Option<u64>), TargetError> {
        let path = format!("/v1/kv/{}?recurse=true", urlencode_path(prefix));
        let response = client
            .send(Method::GET, &path, |r| self.authorize(r))
            .await?;
        let index = consul_index(&response);
        if response.status() == StatusCode::NOT_FOUND {
            return Ok((Vec::new(), index)); // an empty store answers 404
        }
        let response = client
            .expect_success(response, "GET /v1/kv/?recurse")
            .await?;
        let body = client
            .body(response, MAX_KV_BYTES as usize, "GET /v1/kv/?recurse")
            .await?;
        let keys: Vec<ApiKv> = serde_json::from_slice(&body).map_err(|err| {
            TargetError::Unusable(format!("GET /v1/kv/?recurse: not a KV listing: {err}"))
        })?;
        let entries = keys
            .into_iter()
            .map(|kv| KvEntry {
                key: kv.key,
                flags: kv.flags,
                value: kv.value.unwrap_or_default(),
            })
            .collect();
        Ok((entries, index))
    }

    /// Streams the snapshot into an artifact; `Ok(Err(reason))` when the token may not take it.
    async fn snapshot(
        &self,
        client: &ApiClient,
        sink: &mut ArtifactSink,
    ) -> Result<Result<Option<u64>, String>, TargetError> {
        let response = client
            .send(Method::GET, "/v1/snapshot", |r| self.authorize(r))
            .await?;
        if response.status() == StatusCode::FORBIDDEN {
            return Ok(Err(format!(
                "HTTP 403: {}",
                client.error_text(response).await
            )));
        }
        let response = client.expect_success(response, "GET /v1/snapshot").await?;
        let index = consul_index(&response);
        let (tx, source) = ChannelSource::new();
        let download = async move {
            let mut body = response.bytes_stream();
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|err| TargetError::Unreachable {
                    target: KIND,
                    message: format!("reading the snapshot: {err}"),
                })?;
                if tx.send(chunk).await.is_err() {
                    break; // the pipeline stopped: its own error says why
                }
            }
            Ok::<_, TargetError>(())
        };
        let (downloaded, streamed) = tokio::join!(
            download,
            sink.stream(SNAPSHOT_ARTIFACT, SNAPSHOT_FORMAT, source, Magic::default())
        );
        let streamed = streamed?;
        downloaded?;
        // What verify and the drill would refuse is never committed: an answer of 200 that
        // is not a snapshot (an empty body, a proxy's page) fails the backup instead.
        if !streamed.inspector.is_gzip() {
            return Err(TargetError::Tool {
                tool: "consul".into(),
                message: format!(
                    "GET /v1/snapshot answered with {} bytes that are not a gzip stream \
                     (Consul snapshots are gzipped)",
                    streamed.artifact.record().raw_size
                ),
                retryable: true,
            });
        }
        sink.commit(streamed.artifact).await?;
        Ok(Ok(index))
    }

    /// Applies the operations in transactions of at most 64 operations and 400 KiB; a key
    /// too large for any transaction is written on its own with `PUT /v1/kv/<key>`.
    /// Returns the number of transactions.
    async fn apply(&self, client: &ApiClient, operations: &[Value]) -> Result<usize, TargetError> {
        let (batches, singles) = batch_operations(operations);
        for batch in &batches {
            let body = Value::Array(batch.clone());
            let response = client
                .send(Method::PUT, "/v1/txn", |r| self.authorize(r).json(&body))
                .await?;
            client.expect_success(response, "PUT /v1/txn").await?;
        }
        for op in singles {
            let kv = &op["KV"];
            let key = kv["Key"].as_str().unwrap_or_default();
            let value = BASE64
                .decode(kv["Value"].as_str().unwrap_or_default())
                .map_err(|err| TargetError::Unusable(format!("value of `{key}`: {err}")))?;
            let path = format!(
                "/v1/kv/{}?flags={}",
                urlencode_path(key),
                kv["Flags"].as_u64().unwrap_or(0)
            );
            let response = client
                .send(Method::PUT, &path, |r| {
                    self.authorize(r).body(value.clone())
                })
                .await?;
            client
                .expect_success(response, &format!("PUT /v1/kv/{key}"))
                .await?;
        }
        Ok(batches.len())
    }
}

fn consul_index(response: &reqwest::Response) -> Option<u64> {
    response
        .headers()
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn urlencode_path(key: &str) -> String {
    key.split('/')
        .map(|part| url::form_urlencoded::byte_serialize(part.as_bytes()).collect::<String>())
        .collect::<Vec<_>>()
        .join("/")
}

/// The transaction operations of a KV restore (pure, table-tested): a `set` per key of the
/// backup under `prefix`, and with `delete_absent` a `delete` per existing key it lacks.
pub fn plan_kv_restore(
    entries: &[KvEntry],
    prefix: &str,
    existing: &BTreeSet<String>,
    delete_absent: bool,
) -> Vec<Value> {
    let restored: BTreeSet<String> = entries
        .iter()
        .map(|e| format!("{prefix}{}", e.key))
        .collect();
    let mut operations: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({"KV": {"Verb": "set", "Key": format!("{prefix}{}", e.key), "Value": e.value, "Flags": e.flags}})
        })
        .collect();
    if delete_absent {
        operations.extend(
            existing
                .iter()
                .filter(|key| key.starts_with(prefix) && !restored.contains(*key))
                .map(|key| json!({"KV": {"Verb": "delete", "Key": key}})),
        );
    }
    operations
}

/// Splits operations into transactions within Consul's limits (pure, table-tested); the
/// operations too large for any transaction come back separately.
pub fn batch_operations(operations: &[Value]) -> (Vec<Vec<Value>>, Vec<Value>) {
    let mut batches: Vec<Vec<Value>> = Vec::new();
    let mut singles = Vec::new();
    let mut current: Vec<Value> = Vec::new();
    let mut size = 2;
    for op in operations {
        let op_size = op.to_string().len() + 1;
        if op_size + 2 > TXN_MAX_BYTES {
            singles.push(op.clone());
            continue;
        }
        if current.len() == TXN_LIMIT || size + op_size > TXN_MAX_BYTES {
            batches.push(std::mem::take(&mut current));
            size = 2;
        }
        size += op_size;
        current.push(op.clone());
    }
    if !current.is_empty() {
        batches.push(current);
    }
    (batches, singles)
}

pub(crate) fn parse_kv(body: &[u8]) -> Result<Vec<KvEntry>, String> {
    let entries: Vec<KvEntry> =
        serde_json::from_slice(body).map_err(|err| format!("not a KV export: {err}"))?;
    if let Some(bad) = entries.iter().find(|e| BASE64.decode(&e.value).is_err()) {
        return Err(format!("the value of `{}` is not base64", bad.key));
    }
    Ok(entries)
}

/// Checks a restore's options (see `Target::check_restore`): true when it changes the live
/// keys or cluster state.
fn check_restore(options: &RestoreOptions) -> Result<bool, TargetError> {
    let invalid = |message: &str| TargetError::InvalidOptions {
        target: KIND,
        message: message.to_string(),
    };
    exclusive_options(
        KIND,
        ("prefix", options.prefix.is_some()),
        ("in_place", options.in_place),
    )?;
    if options.prefix.as_deref() == Some("") {
        return Err(invalid(
            "an empty prefix restores over the source's keys: that is in place (in_place: true)",
        ));
    }
    if options.snapshot && !options.in_place {
        return Err(invalid(
            "a snapshot replaces the whole cluster state: it restores only with in_place",
        ));
    }
    if options.delete_absent && !options.in_place {
        return Err(invalid(
            "delete_absent deletes live keys: it restores only with in_place",
        ));
    }
    Ok(options.in_place)
}

#[async_trait]
impl Target for Consul {
    fn check_restore(&self, options: &Value) -> Result<bool, TargetError> {
        check_restore(&parse_options(KIND, options)?)
    }

    async fn backup(&self, options: &Value, sink: &mut ArtifactSink) -> Result<Facts, TargetError> {
        let options: BackupOptions = parse_options(KIND, options)?;
        let client = self.client()?;
        let (entries, kv_index) = self.read_kv(&client, "").await?;
        let body = serde_json::to_vec(&entries).expect("entries serialize");
        sink.store(KV_ARTIFACT, KV_FORMAT, body).await?;
        let mut facts = ConsulFacts {
            key_count: entries.len(),
            kv_index,
            snapshot: false,
            snapshot_index: None,
            snapshot_skipped: None,
        };
        if options.snapshot.unwrap_or(self.snapshot) {
            match self.snapshot(&client, sink).await? {
                Ok(index) => {
                    facts.snapshot = true;
                    facts.snapshot_index = index;
                }
                Err(reason) => {
                    tracing::warn!(%reason, "the Consul token may not take a snapshot: KV only");
                    facts.snapshot_skipped = Some(reason);
                }
            }
        } else {
            facts.snapshot_skipped = Some("disabled (consul.snapshot = false)".into());
        }
        Ok(Facts::of(&facts))
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &Value,
    ) -> Result<RestoreReport, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        check_restore(&options)?;
        let client = self.client()?;
        let body = source
            .read_whole(source.record(KV_ARTIFACT)?, MAX_KV_BYTES)
            .await?;
        let entries = parse_kv(&body).map_err(TargetError::Unusable)?;
        let prefix = match (&options.prefix, options.in_place) {
            (Some(prefix), _) => prefix.clone(),
            (None, true) => String::new(),
            // One prefix per backup, so a redelivered restore finds its first attempt's keys.
            (None, false) => format!("restored/{}/", source.manifest.id),
        };
        let mut already_there = 0;
        let existing = if options.delete_absent || !options.in_place {
            let (existing, _) = self.read_kv(&client, &prefix).await?;
            existing
        } else {
            Vec::new()
        };
        if !options.in_place {
            // Beside the original means keys nobody else wrote: under a prefix holding other
            // keys or values, the restore would overwrite live ones. What an earlier attempt of
            // this restore wrote (the backup's keys with its values) is no obstacle: writing
            // it again changes nothing.
            let wanted: BTreeMap<String, (&str, u64)> = entries
                .iter()
                .map(|e| (format!("{prefix}{}", e.key), (e.value.as_str(), e.flags)))
                .collect();
            let foreign = existing
                .iter()
                .filter(|e| wanted.get(&e.key) != Some(&(e.value.as_str(), e.flags)))
                .count();
            if foreign > 0 {
                return Err(TargetError::Refused(format!(
                    "{foreign} keys already exist under the prefix `{prefix}` that the backup \
                     does not hold with those values: restore beside the original under an \
                     unused prefix, or in place (in_place: true)"
                )));
            }
            already_there = existing.len();
        }
        let existing: BTreeSet<String> = existing.into_iter().map(|e| e.key).collect();
        let operations = plan_kv_restore(&entries, &prefix, &existing, options.delete_absent);
        let deleted = operations.len() - entries.len();
        let transactions = self.apply(&client, &operations).await?;
        let mut snapshot_restored = false;
        if options.snapshot {
            let record = source.record(SNAPSHOT_ARTIFACT).map_err(|_| {
                TargetError::Unusable(
                    "this backup has no snapshot (see source.snapshot_skipped)".into(),
                )
            })?;
            let body = source.read_whole(record, MAX_KV_BYTES).await?;
            let response = client
                .send(Method::PUT, "/v1/snapshot", |r| {
                    self.authorize(r).body(body.clone())
                })
                .await?;
            client.expect_success(response, "PUT /v1/snapshot").await?;
            snapshot_restored = true;
        }
        Ok(RestoreReport {
            destination: format!(
                "Consul {} KV prefix `{prefix}`",
                crate::telemetry::redact_url(&self.address)
            ),
            details: json!({
                "prefix": prefix,
                "keys": entries.len(),
                "deleted": deleted,
                "already_there": already_there,
                "transactions": transactions,
                "snapshot_restored": snapshot_restored,
            }),
        })
    }

    /// Nothing is written to Consul (that would be the live one): the KV export is
    /// decoded and its keys counted against the facts; a recorded snapshot must be there
    /// and be a gzip stream.
    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        let expected: ConsulFacts = source.facts()?;
        let body = source
            .read_whole(source.record(KV_ARTIFACT)?, MAX_KV_BYTES)
            .await?;
        let entries = parse_kv(&body)
            .map_err(|reason| TargetError::Unusable(format!("{KV_ARTIFACT}: {reason}")))?;
        if entries.len() != expected.key_count {
            return Err(TargetError::Mismatch(format!(
                "{KV_ARTIFACT} holds {} keys, the manifest recorded {}",
                entries.len(),
                expected.key_count
            )));
        }
        let snapshot_bytes = if expected.snapshot {
            let snapshot = source
                .read_whole(source.record(SNAPSHOT_ARTIFACT)?, MAX_KV_BYTES)
                .await?;
            if !snapshot.starts_with(&[0x1f, 0x8b]) {
                return Err(TargetError::Mismatch(format!(
                    "{SNAPSHOT_ARTIFACT} is not a gzip stream (Consul snapshots are gzipped)"
                )));
            }
            Some(snapshot.len())
        } else {
            None
        };
        Ok(RestoreReport {
            destination: "KV export decoded and counted in memory (nothing written)".into(),
            details: json!({ "keys": entries.len(), "snapshot_bytes": snapshot_bytes }),
        })
    }

    async fn check_artifact(
        &self,
        _manifest: &Manifest,
        record: &ArtifactRecord,
        mut reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        let body = read_limited(&mut reader, &record.name, MAX_KV_BYTES).await?;
        let unusable = |reason: String| TargetError::Unusable(format!("{}: {reason}", record.name));
        if record.format == SNAPSHOT_FORMAT {
            if !body.starts_with(&[0x1f, 0x8b]) {
                return Err(unusable(
                    "not a gzip stream (Consul snapshots are gzipped)".into(),
                ));
            }
            return Ok(format!("snapshot: {} bytes of gzip", body.len()));
        }
        let entries = parse_kv(&body).map_err(unusable)?;
        Ok(format!("KV export parses: {} keys", entries.len()))
    }
}

/// The first two bytes of a stream, for the gzip magic number.
#[derive(Default)]
struct Magic(Vec<u8>);

impl Magic {
    fn is_gzip(&self) -> bool {
        self.0 == [0x1f, 0x8b]
    }
}

impl Inspect for Magic {
    fn inspect(&mut self, raw: &[u8]) {
        let missing = 2usize.saturating_sub(self.0.len());
        self.0.extend_from_slice(&raw[..missing.min(raw.len())]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str) -> KvEntry {
        KvEntry {
            key: key.into(),
            flags: 7,
            value: BASE64.encode(key),
        }
    }

    #[test]
    fn the_options_structs_accept_what_the_options_table_lists() {
        use crate::model::Action;
        use crate::targets::tests::accepts_listed_options;
        accepts_listed_options::<BackupOptions>(Action::Backup, KIND);
        accepts_listed_options::<RestoreOptions>(Action::Restore, KIND);
    }

    #[test]
    fn restore_plans_set_every_key_under_the_prefix() {
        let plan = plan_kv_restore(
            &[entry("a"), entry("b/c")],
            "restored/x/",
            &BTreeSet::new(),
            false,
        );
        assert_eq!(plan.len(), 2);
        assert_eq!(plan[1]["KV"]["Key"], "restored/x/b/c");
        assert_eq!(plan[1]["KV"]["Flags"], 7);
        assert_eq!(plan[1]["KV"]["Verb"], "set");
    }

    #[test]
    fn batches_respect_the_operation_count_and_the_body_size() {
        let small: Vec<Value> = (0..150)
            .map(|i| json!({"KV": {"Verb": "set", "Key": format!("k{i}"), "Value": ""}}))
            .collect();
        let (batches, singles) = batch_operations(&small);
        assert_eq!(
            batches.iter().map(Vec::len).collect::<Vec<_>>(),
            [64, 64, 22]
        );
        assert!(singles.is_empty());

        let big = |n: usize| json!({"KV": {"Verb": "set", "Key": "big", "Value": "x".repeat(n)}});
        let (batches, singles) =
            batch_operations(&[big(150_000), big(150_000), big(150_000), big(500_000)]);
        assert_eq!(batches.iter().map(Vec::len).collect::<Vec<_>>(), [2, 1]);
        assert_eq!(singles.len(), 1);
        for batch in &batches {
            assert!(Value::Array(batch.clone()).to_string().len() <= TXN_MAX_BYTES);
        }
    }

    #[test]
    fn delete_absent_removes_only_missing_keys_under_the_prefix() {
        let existing: BTreeSet<String> = ["app/a", "app/old", "other/x"]
            .into_iter()
            .map(String::from)
            .collect();
        let plan = plan_kv_restore(&[entry("a")], "app/", &existing, true);
        let deletes: Vec<&Value> = plan
            .iter()
            .filter(|op| op["KV"]["Verb"] == "delete")
            .collect();
        assert_eq!(deletes.len(), 1);
        assert_eq!(deletes[0]["KV"]["Key"], "app/old");
        let none = plan_kv_restore(&[entry("a")], "app/", &existing, false);
        assert!(none.iter().all(|op| op["KV"]["Verb"] == "set"));
    }
}
