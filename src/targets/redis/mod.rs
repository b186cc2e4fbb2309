//! Redis: a point-in-time RDB over the replication protocol (as `redis-cli --rdb`), or
//! SCAN + DUMP + PTTL where the server refuses SYNC; restored to a file or live onto a
//! running Redis with a policy for existing keys.
//!
//! Live restore of an RDB: the RDB is handed to a private, socket-only `redis-server`
//! started for the restore, and its keys are copied with DUMP/RESTORE onto the target.
//! This needs a local `redis-server` at least as new as the source and disk space for the
//! RDB, but no access to the target's host and no parser of every RDB encoding here; it
//! keeps TTLs and lets the policy decide key by key.
//!
//! Files: `backup` (RDB and key-stream backups), `restore` (to a file, or live),
//! `drill` (the drill and the structure check), `scratch` (the private `redis-server`),
//! `keys` (SCAN + DUMP batches, the key-stream reader and the RESTORE applier),
//! `replication` (the hand-framed `SYNC` handshake), `payload` (the RDB payload of its
//! reply), `format` (RDB check, key-stream encoding). Ordinary commands go through the
//! `redis` crate.

mod backup;
mod drill;
pub(crate) mod format;
mod keys;
pub(crate) mod payload;
pub(crate) mod replication;
mod restore;
mod scratch;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, parse_options};
use crate::config::{RedisMode, RedisSettings};
use crate::model::TargetKind;
use crate::pipeline::ArtifactReader;
use crate::storage::manifest::{ArtifactRecord, Facts, Manifest};

const KIND: TargetKind = TargetKind::Redis;
const RDB_ARTIFACT: &str = "dump.rdb";
const RDB_FORMAT: &str = "rdb";
const KEYS_ARTIFACT: &str = "keys.bin";
const KEYS_FORMAT: &str = "redis-keys";
/// Longest silence tolerated from a server streaming its RDB (it sends keep-alives).
const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the answer to one command (a DUMP of a large key, a RESTORE).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Redis {
    host: String,
    port: u16,
    username: String,
    password: SecretString,
    tls: bool,
    tls_ca_file: Option<PathBuf>,
    mode: RedisMode,
    scratch: scratch::Scratch,
    guard: super::RestoreGuard,
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

impl RedisFacts {
    /// The database numbers of the keyspace; a name that is not `db<number>` is an error
    /// (facts are read back from storage and are not trusted).
    fn databases(&self) -> Result<Vec<u32>, TargetError> {
        self.keyspace
            .keys()
            .map(|name| database_number(name))
            .collect()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DbKeys {
    pub keys: u64,
    pub expires: u64,
}

/// A Redis to connect to, with its credentials.
struct Endpoint {
    address: Address,
    username: String,
    password: String,
    tls_ca_file: Option<PathBuf>,
}

enum Address {
    Tcp {
        host: String,
        port: u16,
        tls: bool,
    },
    /// The scratch server's socket.
    Unix(PathBuf),
}

impl Endpoint {
    /// `host:port` or the socket's path, for messages.
    fn shown(&self) -> String {
        match &self.address {
            Address::Tcp { host, port, .. } => format!("{host}:{port}"),
            Address::Unix(path) => path.display().to_string(),
        }
    }
}

impl Redis {
    pub fn new(settings: &RedisSettings, guard: super::RestoreGuard) -> Self {
        Redis {
            host: settings.host.clone(),
            port: settings.port,
            username: settings.username.clone(),
            password: settings.password.clone(),
            tls: settings.tls,
            tls_ca_file: (!settings.tls_ca_file.as_os_str().is_empty())
                .then(|| settings.tls_ca_file.clone()),
            mode: settings.mode,
            scratch: scratch::Scratch::of(settings),
            guard,
        }
    }

    /// The configured Redis.
    fn source(&self) -> Endpoint {
        Endpoint {
            address: Address::Tcp {
                host: self.host.clone(),
                port: self.port,
                tls: self.tls,
            },
            username: self.username.clone(),
            password: self.password.expose_secret().to_string(),
            tls_ca_file: self.tls_ca_file.clone(),
        }
    }
}

#[async_trait]
impl Target for Redis {
    fn check_restore(&self, options: &Value) -> Result<bool, TargetError> {
        restore::check(self, &parse_options(KIND, options)?)
    }

    async fn backup(&self, options: &Value, sink: &mut ArtifactSink) -> Result<Facts, TargetError> {
        backup::run(self, &parse_options(KIND, options)?, sink).await
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &Value,
    ) -> Result<RestoreReport, TargetError> {
        restore::run(self, source, &parse_options(KIND, options)?).await
    }

    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        drill::run(self, source).await
    }

    async fn check_artifact(
        &self,
        _manifest: &Manifest,
        record: &ArtifactRecord,
        reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        drill::check_artifact(record, reader).await
    }
}

/// A connection for ordinary commands to database `db` of `endpoint`.
async fn connect(endpoint: &Endpoint, db: u32) -> Result<MultiplexedConnection, TargetError> {
    let mut settings = RedisConnectionInfo::default()
        .set_db(i64::from(db))
        .set_skip_set_lib_name();
    if !endpoint.username.is_empty() {
        settings = settings.set_username(&endpoint.username);
    }
    if !endpoint.password.is_empty() {
        settings = settings.set_password(&endpoint.password);
    }
    let address = match &endpoint.address {
        Address::Tcp {
            host,
            port,
            tls: false,
        } => ConnectionAddr::Tcp(host.clone(), *port),
        Address::Tcp {
            host,
            port,
            tls: true,
        } => ConnectionAddr::TcpTls {
            host: host.clone(),
            port: *port,
            insecure: false,
            tls_params: None,
        },
        Address::Unix(path) => ConnectionAddr::Unix(path.clone()),
    };
    let info = address
        .into_connection_info()
        .map_err(|err| command_error("connect", err))?
        .set_redis_settings(settings);
    let client = match (&endpoint.tls_ca_file, &endpoint.address) {
        (Some(ca), Address::Tcp { tls: true, .. }) => {
            let root_cert = std::fs::read(ca).map_err(|err| TargetError::InvalidOptions {
                target: KIND,
                message: format!("Redis TLS: {}: {err}", ca.display()),
            })?;
            let certificates = redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            };
            redis::Client::build_with_tls(info, certificates)
        }
        _ => redis::Client::open(info),
    }
    .map_err(|err| command_error("connect", err))?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|err| {
            let message = format!("{}: {err}", endpoint.shown());
            match err.kind() {
                redis::ErrorKind::AuthenticationFailed => TargetError::Tool {
                    tool: "redis".into(),
                    message: format!("authentication failed: {message}"),
                    retryable: false,
                },
                // A certificate that does not verify will not verify on the next try either.
                _ if err.to_string().contains("certificate") => TargetError::Tool {
                    tool: "redis TLS".into(),
                    message,
                    retryable: false,
                },
                _ => TargetError::Unreachable {
                    target: KIND,
                    message,
                },
            }
        })
}

/// A command that failed: the connection is gone (retryable) or the server said no.
fn command_error(what: &str, err: redis::RedisError) -> TargetError {
    if err.is_io_error() || err.is_timeout() || err.is_connection_dropped() {
        return TargetError::Unreachable {
            target: KIND,
            message: format!("{what}: {err}"),
        };
    }
    let message = err.to_string();
    TargetError::Tool {
        tool: "redis".into(),
        retryable: message.contains("LOADING") || message.contains("BUSY "),
        message: format!("{what}: {message}"),
    }
}

/// `INFO <section>` as key/value pairs.
async fn info(
    conn: &mut MultiplexedConnection,
    section: &str,
) -> Result<Vec<(String, String)>, TargetError> {
    let text: String = redis::cmd("INFO")
        .arg(section)
        .query_async(conn)
        .await
        .map_err(|err| command_error("INFO", err))?;
    Ok(parse_info(&text))
}

/// `INFO` text as key/value pairs (section headers and blank lines skipped).
fn parse_info(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.trim_end().split_once(':'))
        .map(|(key, value)| (key.to_string(), value.to_string()))
        .collect()
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

/// `db3` → 3.
fn database_number(name: &str) -> Result<u32, TargetError> {
    name.strip_prefix("db")
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| TargetError::Unusable(format!("`{name}` is not a Redis database name")))
}

fn lost(err: std::io::Error) -> TargetError {
    TargetError::Unreachable {
        target: KIND,
        message: err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_options_structs_accept_what_the_options_table_lists() {
        use crate::model::Action;
        use crate::targets::tests::accepts_listed_options;
        accepts_listed_options::<backup::BackupOptions>(Action::Backup, KIND);
        accepts_listed_options::<restore::RestoreOptions>(Action::Restore, KIND);
    }

    #[test]
    fn info_and_keyspace_lines_parse() {
        let info = parse_info(
            "# Keyspace\r\ndb0:keys=3,expires=1,avg_ttl=0\r\n\r\ndb12:keys=7,expires=0\r\n",
        );
        assert_eq!(info.len(), 2);
        assert_eq!(info[0].0, "db0");
        assert_eq!(
            parse_keyspace(&info[0].1),
            DbKeys {
                keys: 3,
                expires: 1
            }
        );
        assert_eq!(database_number(&info[1].0).unwrap(), 12);
    }

    #[test]
    fn a_database_name_that_is_not_db_number_is_refused_not_a_panic() {
        for bad in ["x", "", "db", "dbx", "db-1", "d"] {
            assert!(database_number(bad).is_err(), "{bad}");
        }
    }
}
