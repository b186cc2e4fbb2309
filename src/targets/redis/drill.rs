//! Redis drills and structure checks: an RDB is loaded by a private `redis-server` and its
//! key counts compared with the manifest; a key stream is decoded and counted.

use std::collections::BTreeMap;

use serde_json::json;
use tokio::io::AsyncReadExt;

use super::format::RdbCheck;
use super::keys::KeyStream;
use super::restore::write_rdb;
use super::scratch::ScratchServer;
use super::{KEYS_ARTIFACT, RDB_ARTIFACT, RDB_FORMAT, Redis, RedisFacts, command_error, connect};
use crate::pipeline::ArtifactReader;
use crate::storage::manifest::ArtifactRecord;
use crate::targets::{ArtifactSource, RestoreReport, TargetError};

pub(super) async fn run(
    redis: &Redis,
    source: &ArtifactSource,
) -> Result<RestoreReport, TargetError> {
    let facts: RedisFacts = source.facts()?;
    if let Ok(record) = source.record(KEYS_ARTIFACT) {
        // Keys mode: decode the whole stream; its records must add up to its end record,
        // and to what the manifest recorded.
        let decoded = source.open(record).await?;
        let counted = KeyStream::new(decoded.reader).count().await;
        decoded.verification.result().await?;
        let records = counted?;
        let recorded = facts.keys_written.unwrap_or(records);
        if recorded != records {
            return Err(TargetError::Mismatch(format!(
                "{KEYS_ARTIFACT} holds {records} keys, the manifest recorded {recorded}"
            )));
        }
        return Ok(RestoreReport {
            destination: "key stream decoded in memory".into(),
            details: json!({ "keys": records }),
        });
    }
    // RDB: loaded by a private redis-server; every database's key count must match INFO
    // keyspace at backup time, less at most the keys that had an expiry.
    let databases = facts.databases()?;
    let record = source.record(RDB_ARTIFACT)?;
    let scratch = tempfile::tempdir()
        .map_err(|err| TargetError::Unusable(format!("scratch directory: {err}")))?;
    write_rdb(source, record, &scratch.path().join("dump.rdb")).await?;
    let mut server = ScratchServer::start(&redis.scratch, scratch.path()).await?;
    let counted = async {
        let loaded = server.loaded().await?;
        let mut found = BTreeMap::new();
        for (db, (name, expected)) in databases.into_iter().zip(&facts.keyspace) {
            let mut conn = connect(&loaded, db).await?;
            let keys: u64 = redis::cmd("DBSIZE")
                .query_async(&mut conn)
                .await
                .map_err(|err| command_error("DBSIZE", err))?;
            if keys > expected.keys || keys + expected.expires < expected.keys {
                return Err(TargetError::Mismatch(format!(
                    "{name}: {keys} keys loaded, the manifest recorded {} ({} with an expiry)",
                    expected.keys, expected.expires
                )));
            }
            found.insert(name.clone(), keys);
        }
        Ok(found)
    }
    .await;
    server.stop().await;
    let found = counted?;
    Ok(RestoreReport {
        destination: "a private redis-server (stopped)".into(),
        details: json!({ "keys_per_db": found }),
    })
}

/// The structure of one artifact: an RDB's magic and CRC-64, or a key stream's records.
pub(super) async fn check_artifact(
    record: &ArtifactRecord,
    mut reader: ArtifactReader,
) -> Result<String, TargetError> {
    let unusable = |reason: String| TargetError::Unusable(format!("{}: {reason}", record.name));
    if record.format != RDB_FORMAT {
        let records = KeyStream::new(reader).count().await?;
        return Ok(format!("key stream: {records} keys"));
    }
    let mut check = RdbCheck::default();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader
            .read(&mut buf)
            .await
            .map_err(|err| unusable(err.to_string()))?;
        if n == 0 {
            break;
        }
        check.update(&buf[..n]);
    }
    let version = check.finish().map_err(unusable)?;
    Ok(format!("RDB version {version}, magic and CRC-64 valid"))
}
