//! Redis: a point-in-time RDB over the replication protocol (as `redis-cli --rdb`), or
//! SCAN + DUMP + PTTL where the server refuses SYNC; restored to a file or live onto a
//! running Redis with a policy for existing keys.
//!
//! Live restore of an RDB: the RDB is handed to a private, socket-only `redis-server`
//! started for the restore, and its keys are copied with DUMP/RESTORE onto the target.
//! This needs a local `redis-server` at least as new as the source and disk space for the
//! RDB, but no access to the target's host and no parser of every RDB encoding here; it
//! keeps TTLs and lets the policy decide key by key.

mod format;
mod payload;
mod resp;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use self::format::{
    Decoded, KeyRecord, KeysDecoder, RdbCheck, encode_end, encode_record, keys_header,
};
use self::payload::PayloadReader;
use self::resp::{Connection, Reply, TlsSettings, parse_info};
use super::{ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, parse_options};
use crate::config::{RedisMode, RedisSettings};
use crate::model::TargetKind;
use crate::pipeline::{ArtifactReader, ChannelSource, PipelineError};
use crate::storage::manifest::ArtifactRecord;
use crate::storage::manifest::Facts;

const KIND: TargetKind = TargetKind::Redis;
const RDB_ARTIFACT: &str = "dump.rdb";
const RDB_FORMAT: &str = "rdb";
const KEYS_ARTIFACT: &str = "keys.bin";
const KEYS_FORMAT: &str = "redis-keys";
/// Keys fetched or restored per round trip.
const BATCH: usize = 200;
/// Longest silence tolerated from a server streaming its RDB (it sends keep-alives).
const READ_TIMEOUT: Duration = Duration::from_secs(300);

pub struct Redis {
    host: String,
    port: u16,
    username: String,
    password: SecretString,
    tls: bool,
    tls_ca_file: Option<PathBuf>,
    mode: RedisMode,
    server_binary: PathBuf,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupOptions {
    mode: Option<RedisMode>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOptions {
    /// Write the RDB to this path (for a file-swap restore); it must not exist.
    to_file: Option<PathBuf>,
    /// The Redis to restore into (beside the original). Credentials default to the
    /// configured ones; `password_env` names an environment variable holding another.
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    password_env: Option<String>,
    /// TLS to that Redis (default: as configured for the source).
    tls: Option<bool>,
    /// Restore into the configured (original) Redis.
    #[serde(default)]
    in_place: bool,
    /// What to do with keys that exist in the target. Unset: refuse a non-empty target.
    existing: Option<ExistingKeys>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
enum ExistingKeys {
    Replace,
    Skip,
    FlushFirst,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RedisFacts {
    pub redis_version: String,
    pub mode: RedisMode,
    /// Why an RDB was not possible, when the backup fell back to keys.
    pub fallback_reason: Option<String>,
    pub rdb_version: Option<u32>,
    /// Keys and keys with an expiry, per database (`db0`, …), from INFO keyspace.
    pub keyspace: BTreeMap<String, DbKeys>,
    pub key_count: u64,
    /// Keys written to the artifact (keys mode).
    pub keys_written: Option<u64>,
    pub used_memory: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbKeys {
    pub keys: u64,
    pub expires: u64,
}

/// Where a restore writes keys.
struct Endpoint {
    host: String,
    port: u16,
    username: String,
    password: String,
    tls: bool,
    tls_ca_file: Option<PathBuf>,
}

impl Redis {
    pub fn new(settings: &RedisSettings) -> Self {
        Redis {
            host: settings.host.clone(),
            port: settings.port,
            username: settings.username.clone(),
            password: settings.password.clone(),
            tls: settings.tls,
            tls_ca_file: (!settings.tls_ca_file.as_os_str().is_empty())
                .then(|| settings.tls_ca_file.clone()),
            mode: settings.mode,
            server_binary: settings.server_binary.clone(),
        }
    }

    fn source(&self) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
            username: self.username.clone(),
            password: self.password.expose_secret().to_string(),
            tls: self.tls,
            tls_ca_file: self.tls_ca_file.clone(),
        }
    }

    async fn facts(&self, conn: &mut Connection) -> Result<RedisFacts, TargetError> {
        let info = |reply: Reply| -> Vec<(String, String)> {
            parse_info(&String::from_utf8_lossy(
                reply.as_bytes().unwrap_or_default(),
            ))
        };
        let server = info(call(conn, &[b"INFO", b"server"]).await?);
        let memory = info(call(conn, &[b"INFO", b"memory"]).await?);
        let keyspace = info(call(conn, &[b"INFO", b"keyspace"]).await?);
        let keyspace: BTreeMap<String, DbKeys> = keyspace
            .into_iter()
            .filter(|(db, _)| db.starts_with("db"))
            .map(|(db, value)| (db, parse_keyspace(&value)))
            .collect();
        let find = |pairs: &[(String, String)], key: &str| {
            pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
        };
        Ok(RedisFacts {
            redis_version: find(&server, "redis_version").unwrap_or_default(),
            mode: self.mode,
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
    async fn backup_rdb(
        &self,
        sink: &mut ArtifactSink,
    ) -> Result<Result<u32, String>, TargetError> {
        let mut conn = connect(&self.source()).await?;
        // Older servers reject these; the stream then comes in the `$<len>` form.
        let _ = conn
            .command(&[b"REPLCONF", b"capa", b"eof"])
            .await
            .map_err(lost)?;
        let _ = conn
            .command(&[b"REPLCONF", b"rdb-only", b"1"])
            .await
            .map_err(lost)?;
        conn.send_only(&[b"SYNC"]).await.map_err(lost)?;
        let payload = match tokio::time::timeout(READ_TIMEOUT, conn.read_sync_header())
            .await
            .map_err(|_| lost(timed_out()))?
            .map_err(lost)?
        {
            Ok(payload) => payload,
            Err(refusal) => return Ok(Err(refusal)),
        };
        // `_closer` shuts the connection when this future is dropped (a cancelled step), so
        // the pipeline's thread stops reading at once.
        let (reader, _closer) = conn.into_reader(READ_TIMEOUT).map_err(lost)?;
        let streamed = sink
            .stream(
                RDB_ARTIFACT,
                RDB_FORMAT,
                PayloadReader::new(payload, reader),
                RdbCheck::default(),
            )
            .await
            .map_err(|err| match err {
                PipelineError::Source(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                    lost(timed_out())
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

    /// SCAN + DUMP + PTTL of every database: not one point in time, but works everywhere.
    async fn backup_keys(&self, sink: &mut ArtifactSink, dbs: &[u32]) -> Result<u64, TargetError> {
        let mut conn = connect(&self.source()).await?;
        let (tx, source) = ChannelSource::new();
        let scan = async move {
            let mut out = keys_header();
            let mut count = 0u64;
            for &db in dbs {
                expect_ok(
                    call(&mut conn, &[b"SELECT", db.to_string().as_bytes()]).await?,
                    "SELECT",
                )?;
                let mut scanner = Scanner::new(db);
                while let Some(batch) = scanner.next_batch(&mut conn).await? {
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
            tokio::join!(scan, sink.stream(KEYS_ARTIFACT, KEYS_FORMAT, source, ()));
        let streamed = streamed?;
        let count = scanned?;
        sink.commit(streamed.artifact).await?;
        Ok(count)
    }

    fn endpoint(&self, options: &RestoreOptions) -> Result<Endpoint, TargetError> {
        match (&options.host, options.in_place) {
            (Some(host), false) => {
                let password = match &options.password_env {
                    Some(name) => std::env::var(name).map_err(|_| TargetError::InvalidOptions {
                        target: KIND,
                        message: format!("password_env `{name}` is not set on the worker"),
                    })?,
                    None => self.password.expose_secret().to_string(),
                };
                Ok(Endpoint {
                    host: host.clone(),
                    port: options.port.unwrap_or(6379),
                    username: options
                        .username
                        .clone()
                        .unwrap_or_else(|| self.username.clone()),
                    password,
                    tls: options.tls.unwrap_or(self.tls),
                    tls_ca_file: self.tls_ca_file.clone(),
                })
            }
            (None, true) => Ok(self.source()),
            (Some(_), true) => Err(TargetError::InvalidOptions {
                target: KIND,
                message: "host and in_place exclude each other".into(),
            }),
            (None, false) => Err(TargetError::InvalidOptions {
                target: KIND,
                message:
                    "say where to restore: to_file, host (+port) of another Redis, or in_place"
                        .into(),
            }),
        }
    }

    /// Writes the RDB of the backup to `path`.
    async fn restore_to_file(
        &self,
        source: &ArtifactSource,
        path: &Path,
    ) -> Result<RestoreReport, TargetError> {
        let record = source.record(RDB_ARTIFACT).map_err(|_| {
            TargetError::Unusable(
                "this backup is a key stream (keys mode): it restores live only".into(),
            )
        })?;
        let bytes = write_rdb(source, record, path).await?;
        Ok(RestoreReport {
            destination: format!("RDB file {}", path.display()),
            details: json!({ "file": path, "bytes": bytes }),
        })
    }

    async fn restore_live(
        &self,
        source: &ArtifactSource,
        options: &RestoreOptions,
    ) -> Result<RestoreReport, TargetError> {
        let endpoint = self.endpoint(options)?;
        let facts: RedisFacts = source.facts()?;
        let dbs: Vec<u32> = facts
            .keyspace
            .keys()
            .filter_map(|db| db[2..].parse().ok())
            .collect();
        let mut target = connect(&endpoint).await?;
        match options.existing {
            None => {
                for &db in &dbs {
                    expect_ok(
                        call(&mut target, &[b"SELECT", db.to_string().as_bytes()]).await?,
                        "SELECT",
                    )?;
                    let size = call(&mut target, &[b"DBSIZE"]).await?.as_int().unwrap_or(0);
                    if size > 0 {
                        return Err(TargetError::Refused(format!(
                            "the target Redis has {size} keys in db{db}; choose what to do with \
                             existing keys: existing = replace, skip or flush-first"
                        )));
                    }
                }
            }
            Some(ExistingKeys::FlushFirst) => {
                for &db in &dbs {
                    expect_ok(
                        call(&mut target, &[b"SELECT", db.to_string().as_bytes()]).await?,
                        "SELECT",
                    )?;
                    expect_ok(call(&mut target, &[b"FLUSHDB"]).await?, "FLUSHDB")?;
                }
            }
            Some(_) => {}
        }
        let replace = options.existing == Some(ExistingKeys::Replace);
        let mut applier = Applier::new(target, replace);
        if let Ok(record) = source.record(KEYS_ARTIFACT) {
            let decoded = source.open(record).await?;
            let mut stream = KeyStream::new(decoded.reader);
            while let Some(record) = stream.next().await? {
                applier.push(record).await?;
            }
            let ended = stream.declared();
            drop(stream);
            decoded.verification.result().await?;
            ended?;
        } else {
            let record = source.record(RDB_ARTIFACT)?;
            let scratch = tempfile::tempdir()
                .map_err(|err| TargetError::Unusable(format!("scratch directory: {err}")))?;
            let rdb = scratch.path().join("dump.rdb");
            write_rdb(source, record, &rdb).await?;
            let mut server = ScratchServer::start(&self.server_binary, scratch.path()).await?;
            let copied = async {
                let mut conn = server.connect().await?;
                for &db in &dbs {
                    expect_ok(
                        call(&mut conn, &[b"SELECT", db.to_string().as_bytes()]).await?,
                        "SELECT",
                    )?;
                    let mut scanner = Scanner::new(db);
                    while let Some(batch) = scanner.next_batch(&mut conn).await? {
                        for record in batch {
                            applier.push(record).await?;
                        }
                    }
                }
                Ok::<_, TargetError>(())
            }
            .await;
            server.stop().await;
            copied?;
        }
        let counts = applier.finish().await?;
        Ok(RestoreReport {
            destination: format!("Redis {}:{}", endpoint.host, endpoint.port),
            details: json!({
                "host": endpoint.host,
                "port": endpoint.port,
                "restored": counts.restored,
                "skipped_existing": counts.skipped,
                "expired_skipped": counts.expired,
                "existing": options.existing,
            }),
        })
    }
}

/// The records of a keys-mode artifact, decoded as the artifact streams in.
struct KeyStream<R> {
    reader: R,
    decoder: KeysDecoder,
    buf: Vec<u8>,
    declared: Option<u64>,
}

impl<R: tokio::io::AsyncRead + Unpin> KeyStream<R> {
    fn new(reader: R) -> Self {
        KeyStream {
            reader,
            decoder: KeysDecoder::default(),
            buf: vec![0u8; 256 * 1024],
            declared: None,
        }
    }

    async fn next(&mut self) -> Result<Option<KeyRecord>, TargetError> {
        loop {
            let unusable = |reason| TargetError::Unusable(format!("{KEYS_ARTIFACT}: {reason}"));
            while let Some(item) = self.decoder.next().map_err(unusable)? {
                match item {
                    Decoded::Record(record) => return Ok(Some(record)),
                    Decoded::End(count) => self.declared = Some(count),
                }
            }
            let n = self
                .reader
                .read(&mut self.buf)
                .await
                .map_err(|err| TargetError::Unusable(format!("{KEYS_ARTIFACT}: {err}")))?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.feed(&self.buf[..n]);
        }
    }

    /// After the last record: the key count the stream's end record declares.
    fn declared(&self) -> Result<u64, TargetError> {
        self.declared
            .ok_or_else(|| TargetError::Unusable(format!("{KEYS_ARTIFACT} has no end record")))
    }

    /// Reads the stream to its end, counting records; the end record must say as many.
    async fn count(mut self) -> Result<u64, TargetError> {
        let mut records = 0u64;
        while self.next().await?.is_some() {
            records += 1;
        }
        match self.declared()? {
            declared if declared == records => Ok(records),
            declared => Err(TargetError::Unusable(format!(
                "{KEYS_ARTIFACT}: {records} records, but the stream says {declared}"
            ))),
        }
    }
}

/// Reads `reader` to its end, handing each chunk to `each`; errors of either as text.
async fn for_each_chunk<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
    mut each: impl FnMut(&[u8]) -> Result<(), String>,
) -> Result<(), String> {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = reader.read(&mut buf).await.map_err(|err| err.to_string())?;
        if n == 0 {
            return Ok(());
        }
        each(&buf[..n])?;
    }
}

fn parse_keyspace(value: &str) -> DbKeys {
    let mut keys = DbKeys::default();
    for part in value.split(',') {
        match part.split_once('=') {
            Some(("keys", n)) => keys.keys = n.parse().unwrap_or(0),
            Some(("expires", n)) => keys.expires = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    keys
}

fn lost(err: std::io::Error) -> TargetError {
    TargetError::Unreachable {
        target: KIND,
        message: err.to_string(),
    }
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "no data from Redis for 5 minutes",
    )
}

async fn connect(endpoint: &Endpoint) -> Result<Connection, TargetError> {
    let connected = if endpoint.tls {
        let tls = TlsSettings::new(endpoint.tls_ca_file.as_deref()).map_err(|message| {
            TargetError::InvalidOptions {
                target: KIND,
                message: format!("Redis TLS: {message}"),
            }
        })?;
        Connection::tls(&endpoint.host, endpoint.port, &tls).await
    } else {
        Connection::tcp(&endpoint.host, endpoint.port).await
    };
    let mut conn = connected.map_err(|err| {
        let message = format!("{}:{}: {err}", endpoint.host, endpoint.port);
        // A certificate that does not verify will not verify on the next try either.
        if err.kind() == std::io::ErrorKind::InvalidData {
            TargetError::Tool {
                tool: "redis TLS".into(),
                message,
                retryable: false,
            }
        } else {
            TargetError::Unreachable {
                target: KIND,
                message,
            }
        }
    })?;
    conn.authenticate(&endpoint.username, &endpoint.password)
        .await
        .map_err(lost)?
        .map_err(|message| TargetError::Tool {
            tool: "redis".into(),
            message: format!("authentication failed: {message}"),
            retryable: false,
        })?;
    Ok(conn)
}

async fn call(conn: &mut Connection, args: &[&[u8]]) -> Result<Reply, TargetError> {
    conn.command(args).await.map_err(lost)
}

fn expect_ok(reply: Reply, what: &str) -> Result<Reply, TargetError> {
    reply.into_result().map_err(|message| TargetError::Tool {
        tool: "redis".into(),
        message: format!("{what}: {message}"),
        retryable: message.starts_with("LOADING") || message.starts_with("BUSY "),
    })
}

/// Walks the selected database with SCAN; each call returns the next batch of records
/// (DUMP + PTTL in one pipelined round trip), so memory holds one batch at a time.
struct Scanner {
    db: u32,
    cursor: Vec<u8>,
    keys: Vec<Vec<u8>>,
    done: bool,
}

impl Scanner {
    fn new(db: u32) -> Self {
        Scanner {
            db,
            cursor: b"0".to_vec(),
            keys: Vec::new(),
            done: false,
        }
    }

    async fn next_batch(
        &mut self,
        conn: &mut Connection,
    ) -> Result<Option<Vec<KeyRecord>>, TargetError> {
        while self.keys.is_empty() {
            if self.done {
                return Ok(None);
            }
            let reply = expect_ok(
                call(conn, &[b"SCAN", &self.cursor, b"COUNT", b"1000"]).await?,
                "SCAN",
            )?;
            let Reply::Array(Some(parts)) = reply else {
                return Err(TargetError::Unusable("SCAN returned no array".into()));
            };
            let [next, Reply::Array(Some(keys))] = parts.as_slice() else {
                return Err(TargetError::Unusable(
                    "SCAN returned an unexpected shape".into(),
                ));
            };
            self.cursor = next.as_bytes().unwrap_or(b"0").to_vec();
            self.done = self.cursor == b"0";
            self.keys = keys
                .iter()
                .filter_map(|k| k.as_bytes().map(<[u8]>::to_vec))
                .collect();
        }
        let take = self.keys.len().min(BATCH);
        let chunk: Vec<Vec<u8>> = self.keys.drain(..take).collect();
        let commands: Vec<Vec<Vec<u8>>> = chunk
            .iter()
            .flat_map(|key| {
                [
                    vec![b"DUMP".to_vec(), key.clone()],
                    vec![b"PTTL".to_vec(), key.clone()],
                ]
            })
            .collect();
        let replies = conn.pipeline(&commands).await.map_err(lost)?;
        let mut batch = Vec::with_capacity(chunk.len());
        for (key, pair) in chunk.into_iter().zip(replies.chunks(2)) {
            let payload = match &pair[0] {
                Reply::Bulk(Some(payload)) => payload.clone(),
                Reply::Bulk(None) => continue, // deleted since SCAN
                Reply::Error(message) => {
                    return Err(TargetError::Tool {
                        tool: "redis".into(),
                        message: format!("DUMP: {message}"),
                        retryable: false,
                    });
                }
                other => return Err(TargetError::Unusable(format!("DUMP returned {other:?}"))),
            };
            let pttl = pair[1].as_int().unwrap_or(-1);
            if pttl == -2 {
                continue; // expired between DUMP and PTTL
            }
            batch.push(KeyRecord {
                db: self.db,
                key,
                pttl: (pttl >= 0).then_some(pttl.max(1)),
                payload,
            });
        }
        Ok(Some(batch))
    }
}

#[derive(Default)]
struct Counts {
    restored: u64,
    skipped: u64,
    expired: u64,
}

/// RESTOREs records onto the target in pipelined batches.
struct Applier {
    conn: Connection,
    replace: bool,
    selected: Option<u32>,
    batch: Vec<KeyRecord>,
    counts: Counts,
}

impl Applier {
    fn new(conn: Connection, replace: bool) -> Self {
        Applier {
            conn,
            replace,
            selected: None,
            batch: Vec::new(),
            counts: Counts::default(),
        }
    }

    async fn push(&mut self, record: KeyRecord) -> Result<(), TargetError> {
        if self.batch.last().is_some_and(|last| last.db != record.db) {
            self.flush().await?;
        }
        self.batch.push(record);
        if self.batch.len() >= BATCH {
            self.flush().await?;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<(), TargetError> {
        let Some(db) = self.batch.first().map(|r| r.db) else {
            return Ok(());
        };
        if self.selected != Some(db) {
            expect_ok(
                call(&mut self.conn, &[b"SELECT", db.to_string().as_bytes()]).await?,
                "SELECT",
            )?;
            self.selected = Some(db);
        }
        let batch = std::mem::take(&mut self.batch);
        let commands: Vec<Vec<Vec<u8>>> = batch
            .iter()
            .map(|record| {
                let mut command = vec![
                    b"RESTORE".to_vec(),
                    record.key.clone(),
                    record.pttl.unwrap_or(0).to_string().into_bytes(),
                    record.payload.clone(),
                ];
                if self.replace {
                    command.push(b"REPLACE".to_vec());
                }
                command
            })
            .collect();
        let replies = self.conn.pipeline(&commands).await.map_err(lost)?;
        for (record, reply) in batch.iter().zip(replies) {
            match reply {
                Reply::Error(message) if message.starts_with("BUSYKEY") => self.counts.skipped += 1,
                Reply::Error(message) => {
                    return Err(TargetError::Tool {
                        tool: "redis".into(),
                        message: format!(
                            "RESTORE of `{}` in db{}: {message}",
                            String::from_utf8_lossy(&record.key),
                            record.db
                        ),
                        retryable: false,
                    });
                }
                _ => self.counts.restored += 1,
            }
        }
        Ok(())
    }

    async fn finish(mut self) -> Result<Counts, TargetError> {
        self.flush().await?;
        Ok(self.counts)
    }
}

/// Streams the decoded RDB of `record` into a new file at `path`, checked on the way.
async fn write_rdb(
    source: &ArtifactSource,
    record: &ArtifactRecord,
    path: &Path,
) -> Result<u64, TargetError> {
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(|err| TargetError::Refused(format!("cannot create {}: {err}", path.display())))?;
    let decoded = source.open(record).await?;
    let mut reader = decoded.reader;
    let mut check = RdbCheck::default();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    let written = async {
        loop {
            let n = reader.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            check.update(&buf[..n]);
            file.write_all(&buf[..n]).await?;
            total += n as u64;
        }
        file.sync_all().await
    }
    .await;
    drop(reader);
    let verified = decoded.verification.result().await;
    let outcome = match (verified, written) {
        (Err(err), _) => Err(err.into()),
        (Ok(()), Err(err)) => Err(TargetError::Refused(format!(
            "writing {}: {err}",
            path.display()
        ))),
        (Ok(()), Ok(())) => check
            .finish()
            .map(|_| total)
            .map_err(|reason| TargetError::Unusable(format!("{}: {reason}", record.name))),
    };
    if outcome.is_err() {
        let _ = tokio::fs::remove_file(path).await;
    }
    outcome
}

/// A private redis-server on a Unix socket that loads an RDB for a live restore.
struct ScratchServer {
    child: tokio::process::Child,
    socket: PathBuf,
}

impl ScratchServer {
    async fn start(binary: &Path, dir: &Path) -> Result<Self, TargetError> {
        let socket = dir.join("redis.sock");
        let child = tokio::process::Command::new(binary)
            .args([
                "--port",
                "0",
                "--save",
                "",
                "--appendonly",
                "no",
                "--daemonize",
                "no",
            ])
            .arg("--unixsocket")
            .arg(&socket)
            .args(["--unixsocketperm", "700", "--dbfilename", "dump.rdb"])
            .arg("--dir")
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| TargetError::Tool {
                tool: "redis-server".into(),
                message: format!(
                    "cannot start {} to read the RDB (redis.server_binary): {err}",
                    binary.display()
                ),
                retryable: false,
            })?;
        Ok(ScratchServer { child, socket })
    }

    /// Connects once the server has loaded the RDB.
    async fn connect(&mut self) -> Result<Connection, TargetError> {
        for _ in 0..1200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(TargetError::Tool {
                    tool: "redis-server".into(),
                    message: format!(
                        "exited with {status} while loading the RDB (is it older than the source?)"
                    ),
                    retryable: false,
                });
            }
            if let Ok(mut conn) = Connection::unix(&self.socket).await
                && let Ok(Reply::Status(_)) = conn.command(&[b"PING"]).await
            {
                return Ok(conn);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(TargetError::Tool {
            tool: "redis-server".into(),
            message: "did not finish loading the RDB within 2 minutes".into(),
            retryable: false,
        })
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

#[async_trait]
impl Target for Redis {
    async fn backup(&self, options: &Value, sink: &mut ArtifactSink) -> Result<Facts, TargetError> {
        let options: BackupOptions = parse_options(KIND, options)?;
        let mut conn = connect(&self.source()).await?;
        let mut facts = self.facts(&mut conn).await?;
        drop(conn);
        facts.mode = options.mode.unwrap_or(self.mode);
        if facts.mode == RedisMode::Rdb {
            match self.backup_rdb(sink).await? {
                Ok(version) => facts.rdb_version = Some(version),
                Err(refusal) => {
                    tracing::warn!(reason = %refusal, "Redis refused SYNC: falling back to SCAN + DUMP");
                    facts.mode = RedisMode::Keys;
                    facts.fallback_reason = Some(format!("SYNC refused: {refusal}"));
                }
            }
        }
        if facts.mode == RedisMode::Keys {
            let dbs: Vec<u32> = facts
                .keyspace
                .keys()
                .filter_map(|db| db[2..].parse().ok())
                .collect();
            facts.keys_written = Some(self.backup_keys(sink, &dbs).await?);
        }
        Ok(Facts::of(&facts))
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &Value,
    ) -> Result<RestoreReport, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        match &options.to_file {
            Some(path) => self.restore_to_file(source, path).await,
            None => self.restore_live(source, &options).await,
        }
    }

    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        let facts: RedisFacts = source.facts()?;
        if let Ok(record) = source.record(KEYS_ARTIFACT) {
            // Keys mode: decode the whole stream; its records must add up to its end
            // record, and to what the manifest recorded.
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
        // RDB: loaded by a private redis-server; every database's key count must match
        // INFO keyspace at backup time, less at most the keys that had an expiry.
        let record = source.record(RDB_ARTIFACT)?;
        let scratch = tempfile::tempdir()
            .map_err(|err| TargetError::Unusable(format!("scratch directory: {err}")))?;
        write_rdb(source, record, &scratch.path().join("dump.rdb")).await?;
        let mut server = ScratchServer::start(&self.server_binary, scratch.path()).await?;
        let counted = async {
            let mut conn = server.connect().await?;
            let mut found = BTreeMap::new();
            for (db, expected) in &facts.keyspace {
                let index = db.trim_start_matches("db");
                expect_ok(
                    call(&mut conn, &[b"SELECT", index.as_bytes()]).await?,
                    "SELECT",
                )?;
                let keys = call(&mut conn, &[b"DBSIZE"]).await?.as_int().unwrap_or(0) as u64;
                if keys > expected.keys || keys + expected.expires < expected.keys {
                    return Err(TargetError::Mismatch(format!(
                        "{db}: {keys} keys loaded, the manifest recorded {} ({} with an expiry)",
                        expected.keys, expected.expires
                    )));
                }
                found.insert(db.clone(), keys);
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

    async fn check_artifact(
        &self,
        _manifest: &crate::storage::manifest::Manifest,
        record: &ArtifactRecord,
        mut reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        let unusable = |reason: String| TargetError::Unusable(format!("{}: {reason}", record.name));
        if record.format == RDB_FORMAT {
            let mut check = RdbCheck::default();
            for_each_chunk(&mut reader, |chunk| {
                check.update(chunk);
                Ok(())
            })
            .await
            .map_err(unusable)?;
            let version = check.finish().map_err(unusable)?;
            return Ok(format!("RDB version {version}, magic and CRC-64 valid"));
        }
        let records = KeyStream::new(reader).count().await?;
        Ok(format!("key stream: {records} keys"))
    }
}
