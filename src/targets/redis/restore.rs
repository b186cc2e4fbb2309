//! Redis restores: the RDB to a file (for a file swap), or live onto a running Redis with
//! a policy for keys that exist (an RDB through a private `redis-server`, a key stream
//! directly).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::format::RdbCheck;
use super::keys::{Applier, KeyStream, Scanner};
use super::scratch::ScratchServer;
use super::{
    Address, Endpoint, KEYS_ARTIFACT, KIND, RDB_ARTIFACT, Redis, RedisFacts, command_error, connect,
};
use crate::storage::manifest::ArtifactRecord;
use crate::targets::{ArtifactSource, DecodedArtifact, RestoreReport, TargetError};

/// `options` of a redis restore command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RestoreOptions {
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

pub(super) async fn run(
    redis: &Redis,
    source: &ArtifactSource,
    options: &RestoreOptions,
) -> Result<RestoreReport, TargetError> {
    check(redis, options)?;
    match &options.to_file {
        Some(path) => to_file(source, &rdb_path(redis, path)?).await,
        None => live(redis, source, options).await,
    }
}

/// Checks the options before anything runs (see `Target::check_restore`); true when the
/// restore changes the configured Redis.
pub(super) fn check(redis: &Redis, options: &RestoreOptions) -> Result<bool, TargetError> {
    let invalid = |message: &str| TargetError::InvalidOptions {
        target: KIND,
        message: message.to_string(),
    };
    let places = [
        options.to_file.is_some(),
        options.host.is_some(),
        options.in_place,
    ];
    if places.iter().filter(|given| **given).count() != 1 {
        return Err(invalid(
            "say where to restore, once: to_file, host (+port) of another Redis, or in_place",
        ));
    }
    if let Some(path) = &options.to_file {
        rdb_path(redis, path)?;
    }
    if let Some(host) = &options.host {
        let port = options.port.unwrap_or(6379);
        if host.eq_ignore_ascii_case(&redis.host) && port == redis.port {
            return Err(invalid(
                "that is the configured Redis: restoring into it is in place (in_place: true)",
            ));
        }
        redis.guard.destination(KIND, host, port)?;
        if let Some(name) = &options.password_env {
            redis.guard.check_password_env(KIND, name)?;
        }
    } else if options.password_env.is_some() || options.username.is_some() || options.port.is_some()
    {
        return Err(invalid("username, password_env and port go with host"));
    }
    // Flushing a database is destructive wherever it happens.
    Ok(options.in_place || options.existing == Some(ExistingKeys::FlushFirst))
}

/// Where `to_file` writes: below the restore root (default `restores/`).
fn rdb_path(redis: &Redis, path: &Path) -> Result<PathBuf, TargetError> {
    let default_root = Path::new("restores");
    if redis.guard.is_default_root() {
        std::fs::create_dir_all(default_root).map_err(|err| {
            TargetError::Refused(format!("cannot create {}: {err}", default_root.display()))
        })?;
    }
    redis.guard.file(KIND, path, default_root)
}

/// Where a live restore writes. Another Redis gets only the credentials the options name:
/// the configured password goes to the configured Redis alone.
fn destination(redis: &Redis, options: &RestoreOptions) -> Result<Endpoint, TargetError> {
    let Some(host) = &options.host else {
        return Ok(redis.source());
    };
    let password = match &options.password_env {
        Some(name) => redis.guard.password_env(KIND, name)?,
        None => String::new(),
    };
    Ok(Endpoint {
        address: Address::Tcp {
            host: host.clone(),
            port: options.port.unwrap_or(6379),
            tls: options.tls.unwrap_or(redis.tls),
        },
        username: options.username.clone().unwrap_or_default(),
        password,
        tls_ca_file: redis.tls_ca_file.clone(),
    })
}

/// Writes the RDB of the backup to `path`.
async fn to_file(source: &ArtifactSource, path: &Path) -> Result<RestoreReport, TargetError> {
    let record = source.record(super::RDB_ARTIFACT).map_err(|_| {
        TargetError::Unusable(
            "this backup is a key stream (keys mode): it restores live only".into(),
        )
    })?;
    let report = |already: bool| {
        let mut details = json!({ "file": path, "bytes": record.raw_size });
        if already {
            details["already_restored"] = json!(true);
        }
        RestoreReport {
            destination: format!("RDB file {}", path.display()),
            details,
        }
    };
    // A file there that is this backup's RDB byte for byte is an earlier attempt's, its worker
    // killed before the command was marked done; anything else there is not ours.
    if let Ok(meta) = tokio::fs::symlink_metadata(path).await {
        if meta.is_file() && meta.len() == record.raw_size && same_sha256(path, record).await? {
            return Ok(report(true));
        }
        return Err(TargetError::Refused(format!(
            "{} exists; restore into a new file",
            path.display()
        )));
    }
    // Written under a name of its own and renamed once complete and checked, so `path` never
    // holds a partial RDB; what an interrupted attempt left under that name is removed.
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let staging = path.with_file_name(format!("{name}.restoring"));
    match tokio::fs::remove_file(&staging).await {
        Err(err) if err.kind() != std::io::ErrorKind::NotFound => {
            return Err(TargetError::Refused(format!(
                "cannot remove {} that an interrupted restore left: {err}",
                staging.display()
            )));
        }
        _ => {}
    }
    write_rdb(source, record, &staging).await?;
    // No replacing: a file that appeared at `path` meanwhile is not ours to overwrite.
    let renamed = rustix::fs::renameat_with(
        rustix::fs::CWD,
        &staging,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    );
    if let Err(err) = renamed {
        let _ = tokio::fs::remove_file(&staging).await;
        return Err(TargetError::Refused(format!(
            "moving {} to {} failed: {err}",
            staging.display(),
            path.display()
        )));
    }
    Ok(report(false))
}

/// True when the file at `path` has the SHA-256 of the raw artifact of `record`.
async fn same_sha256(path: &Path, record: &ArtifactRecord) -> Result<bool, TargetError> {
    let owned = path.to_path_buf();
    let digest = tokio::task::spawn_blocking(move || crate::pipeline::sha256::of_file(&owned))
        .await
        .map_err(|err| TargetError::Unusable(format!("hashing failed: {err}")))?
        .map_err(|err| TargetError::Refused(format!("{}: {err}", path.display())))?;
    Ok(digest == record.raw_sha256)
}

/// A backup ready to apply: its key stream, or its RDB file in a scratch directory.
enum Backup {
    Keys(DecodedArtifact),
    Rdb(tempfile::TempDir),
}

async fn live(
    redis: &Redis,
    source: &ArtifactSource,
    options: &RestoreOptions,
) -> Result<RestoreReport, TargetError> {
    let target = destination(redis, options)?;
    let facts: RedisFacts = source.facts()?;
    let dbs = facts.databases()?;
    // The backup is opened (with restore.verify_first: proven) or its RDB file written out and
    // checked before anything happens to the target's keys.
    let backup = match source.record(KEYS_ARTIFACT) {
        Ok(record) => Backup::Keys(source.open(record).await?),
        Err(_) => {
            let record = source.record(RDB_ARTIFACT)?;
            let scratch = tempfile::tempdir()
                .map_err(|err| TargetError::Unusable(format!("scratch directory: {err}")))?;
            write_rdb(source, record, &scratch.path().join("dump.rdb")).await?;
            Backup::Rdb(scratch)
        }
    };
    match options.existing {
        None => {
            for &db in &dbs {
                let mut conn = connect(&target, db).await?;
                let size: u64 = redis::cmd("DBSIZE")
                    .query_async(&mut conn)
                    .await
                    .map_err(|err| command_error("DBSIZE", err))?;
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
                let mut conn = connect(&target, db).await?;
                redis::cmd("FLUSHDB")
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|err| command_error("FLUSHDB", err))?;
            }
        }
        Some(_) => {}
    }
    let replace = options.existing == Some(ExistingKeys::Replace);
    let mut applier = Applier::new(&target, replace);
    match backup {
        Backup::Keys(decoded) => {
            let mut stream = KeyStream::new(decoded.reader);
            while let Some(record) = stream.next().await? {
                applier.push(record).await?;
            }
            let ended = stream.declared();
            drop(stream);
            decoded.verification.result().await?;
            ended?;
        }
        Backup::Rdb(scratch) => {
            let mut server = ScratchServer::start(&redis.scratch, scratch.path()).await?;
            let copied = async {
                let loaded = server.loaded().await?;
                for &db in &dbs {
                    let mut scanner = Scanner::new(connect(&loaded, db).await?, db);
                    while let Some(batch) = scanner.next_batch().await? {
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
    }
    let counts = applier.finish().await?;
    let (host, port) = match &target.address {
        Address::Tcp { host, port, .. } => (host.clone(), *port),
        Address::Unix(_) => (target.shown(), 0),
    };
    Ok(RestoreReport {
        destination: format!("Redis {}", target.shown()),
        details: json!({
            "host": host,
            "port": port,
            "restored": counts.restored,
            "skipped_existing": counts.skipped,
            "existing": options.existing,
        }),
    })
}

/// Streams the decoded RDB of `record` into a new file at `path`, checked on the way.
pub(super) async fn write_rdb(
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
