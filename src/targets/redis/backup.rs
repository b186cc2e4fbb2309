//! Redis backups: an RDB over the replication protocol, or, where the server refuses
//! `SYNC`, a key stream of SCAN + DUMP + PTTL (not one point in time, but works everywhere).

use std::collections::BTreeMap;
use std::io::ErrorKind;

use bytes::Bytes;
use serde::Deserialize;

use super::format::{RdbCheck, encode_end, encode_record, keys_header};
use super::keys::Scanner;
use super::payload::PayloadReader;
use super::replication::Replica;
use super::{
    DbKeys, KEYS_ARTIFACT, KEYS_FORMAT, RDB_ARTIFACT, RDB_FORMAT, READ_TIMEOUT, Redis, RedisFacts,
    connect, info, lost, parse_keyspace,
};
use crate::config::RedisMode;
use crate::pipeline::{ChannelSource, PipelineError};
use crate::storage::manifest::Facts;
use crate::targets::{ArtifactSink, TargetError};

/// `options` of a redis backup command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackupOptions {
    mode: Option<RedisMode>,
}

pub(super) async fn run(
    redis: &Redis,
    options: &BackupOptions,
    sink: &mut ArtifactSink,
) -> Result<Facts, TargetError> {
    let mut facts = facts(redis).await?;
    facts.mode = options.mode.unwrap_or(redis.mode);
    if facts.mode == RedisMode::Rdb {
        match rdb(redis, sink).await? {
            Ok(version) => facts.rdb_version = Some(version),
            Err(refusal) => {
                tracing::warn!(reason = %refusal, "Redis refused SYNC: falling back to SCAN + DUMP");
                facts.mode = RedisMode::Keys;
                facts.fallback_reason = Some(format!("SYNC refused: {refusal}"));
            }
        }
    }
    if facts.mode == RedisMode::Keys {
        facts.keys_written = Some(keys(redis, sink, &facts.databases()?).await?);
    }
    Ok(Facts::of(&facts))
}

/// What INFO says of the server and its keyspace.
async fn facts(redis: &Redis) -> Result<RedisFacts, TargetError> {
    let mut conn = connect(&redis.source(), 0).await?;
    let server = info(&mut conn, "server").await?;
    let memory = info(&mut conn, "memory").await?;
    let keyspace: BTreeMap<String, DbKeys> = info(&mut conn, "keyspace")
        .await?
        .into_iter()
        .filter(|(db, _)| db.starts_with("db"))
        .map(|(db, value)| (db, parse_keyspace(&value)))
        .collect();
    let find = |pairs: &[(String, String)], key: &str| {
        pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
    };
    Ok(RedisFacts {
        redis_version: find(&server, "redis_version").unwrap_or_default(),
        mode: redis.mode,
        fallback_reason: None,
        rdb_version: None,
        key_count: keyspace.values().map(|d| d.keys).sum(),
        keyspace,
        keys_written: None,
        used_memory: find(&memory, "used_memory")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    })
}

/// Streams an RDB snapshot; `Ok(Err(reason))` when the server refuses SYNC.
async fn rdb(redis: &Redis, sink: &mut ArtifactSink) -> Result<Result<u32, String>, TargetError> {
    let replica = Replica::connect(&redis.source()).await?;
    let (payload, reader, _closer) = match replica.sync(READ_TIMEOUT).await? {
        Ok(stream) => stream,
        Err(refusal) => return Ok(Err(refusal)),
    };
    // `_closer` shuts the connection when this future is dropped (a cancelled step), so
    // the pipeline's thread stops reading at once.
    let streamed = sink
        .stream(
            RDB_ARTIFACT,
            RDB_FORMAT,
            PayloadReader::new(payload, reader),
            RdbCheck::default(),
        )
        .await
        .map_err(|err| match err {
            PipelineError::Source(err)
                if matches!(err.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) =>
            {
                lost(std::io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no data from Redis for {} seconds", READ_TIMEOUT.as_secs()),
                ))
            }
            PipelineError::Source(err) => lost(err),
            other => other.into(),
        })?;
    let version = streamed
        .inspector
        .finish()
        .map_err(|reason| TargetError::Tool {
            tool: "redis".into(),
            message: format!("the RDB stream is invalid: {reason}"),
            retryable: true,
        })?;
    sink.commit(streamed.artifact).await?;
    Ok(Ok(version))
}

/// Writes every key of `dbs` as a key stream; returns the number of keys.
async fn keys(redis: &Redis, sink: &mut ArtifactSink, dbs: &[u32]) -> Result<u64, TargetError> {
    let source = redis.source();
    let (tx, stream) = ChannelSource::new();
    let scan = async move {
        let mut out = keys_header();
        let mut count = 0u64;
        for &db in dbs {
            let mut scanner = Scanner::new(connect(&source, db).await?, db);
            while let Some(batch) = scanner.next_batch().await? {
                for record in &batch {
                    encode_record(record, &mut out);
                    count += 1;
                }
                // A closed channel: the pipeline stopped, and its error says why.
                if out.len() >= 1 << 20
                    && tx
                        .send(Bytes::from(std::mem::take(&mut out)))
                        .await
                        .is_err()
                {
                    return Ok(count);
                }
            }
        }
        encode_end(count, &mut out);
        let _ = tx.send(Bytes::from(out)).await;
        Ok::<_, TargetError>(count)
    };
    let (scanned, streamed) =
        tokio::join!(scan, sink.stream(KEYS_ARTIFACT, KEYS_FORMAT, stream, ()));
    let streamed = streamed?;
    let count = scanned?;
    sink.commit(streamed.artifact).await?;
    Ok(count)
}
