//! PostgreSQL: `pg_dump -Fc` streamed from stdout, with exact row counts from the same snapshot;
//! restore by streaming into `pg_restore`, beside the original unless told otherwise.
//!
//! Files: `dump` (the backup), `archive` (row counts read from the dump as it streams),
//! `restore` (restore, drill, `pg_restore --list`), `sql` (what runs over the target's own
//! connection: scopes, counts, creating, dropping and swapping databases). This file holds
//! the settings and the connection: the worker's own, and the environment of the tools.

use std::path::PathBuf;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio_postgres::Client;

pub mod archive;
mod connection;
mod dump;
mod restore;
mod sql;

use super::{ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, parse_options};
use crate::config::PostgresSettings;
use crate::model::TargetKind;
use crate::pipeline::ArtifactReader;
use crate::storage::manifest::Facts;
use crate::storage::manifest::{ArtifactRecord, Manifest};
use connection::{ConnectError, Endpoint};

const KIND: TargetKind = TargetKind::Postgres;
const DUMP_FORMAT: &str = "pg_dump-custom";
const GLOBALS_FORMAT: &str = "sql";
const GLOBALS_ARTIFACT: &str = "globals.sql";

pub struct Postgres {
    url: SecretString,
    restore_url: SecretString,
    /// Where CREATE/DROP/RENAME DATABASE run from (never the database being replaced).
    maintenance_database: String,
    bin_dir: PathBuf,
    default_schemas: Vec<String>,
    default_exclude_schemas: Vec<String>,
    default_globals: bool,
}

/// What the manifest records about a PostgreSQL backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PostgresFacts {
    pub server_version: String,
    pub pg_dump_version: String,
    pub database: String,
    /// Schemas in the dump.
    pub schemas: Vec<String>,
    /// The schema filter as requested (empty: all schemas).
    pub requested_schemas: Vec<String>,
    pub excluded_schemas: Vec<String>,
    /// Exact row counts, taken in the snapshot the dump used.
    pub tables: Vec<TableRows>,
    /// Where the counts come from: `archive` (counted in the dump's own data as it
    /// streamed) or `count(*)` (queried in the dump's snapshot, when the archive
    /// could not be read).
    pub row_count_source: String,
    pub table_count: usize,
    pub row_count: i64,
    /// Large objects in the dump (None when a schema filter leaves them out).
    pub large_objects: Option<i64>,
    pub snapshot: String,
    pub globals: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TableRows {
    pub schema: String,
    pub name: String,
    pub rows: i64,
}

impl Postgres {
    pub fn new(settings: &PostgresSettings) -> Self {
        Postgres {
            url: settings.database_url.clone(),
            restore_url: settings.restore_url.clone(),
            maintenance_database: settings.maintenance_database.clone(),
            bin_dir: settings.bin_dir.clone(),
            default_schemas: settings.schemas.clone(),
            default_exclude_schemas: settings.exclude_schemas.clone(),
            default_globals: settings.globals,
        }
    }

    fn tool(&self, name: &str) -> PathBuf {
        if self.bin_dir.as_os_str().is_empty() {
            PathBuf::from(name)
        } else {
            self.bin_dir.join(name)
        }
    }

    fn endpoint(&self) -> Result<Endpoint, TargetError> {
        Endpoint::parse(self.url.expose_secret()).map_err(|err| TargetError::InvalidOptions {
            target: KIND,
            message: format!("DATABASE_URL cannot be used: {err}"),
        })
    }

    /// Where restores run `pg_restore` as (`postgres.restore_url`); None: as `DATABASE_URL`.
    fn restorer(&self) -> Result<Option<Endpoint>, TargetError> {
        let url = self.restore_url.expose_secret();
        if url.is_empty() {
            return Ok(None);
        }
        Endpoint::parse(url)
            .map(Some)
            .map_err(|err| TargetError::InvalidOptions {
                target: KIND,
                message: format!("postgres.restore_url cannot be used: {err}"),
            })
    }

    async fn connect(&self, dbname: Option<&str>) -> Result<Client, TargetError> {
        self.endpoint()?
            .connect(dbname)
            .await
            .map_err(|err| match err {
                ConnectError::Tls(message) => TargetError::InvalidOptions {
                    target: KIND,
                    message: format!("DATABASE_URL: {message}"),
                },
                ConnectError::Server(err) => unreachable(&err),
            })
    }

    /// libpq environment for child tools: the password never appears on a command line.
    fn tool_env(&self, dbname: &str) -> Result<Vec<(&'static str, String)>, TargetError> {
        Ok(self.endpoint()?.tool_env(dbname))
    }

    /// Passwords that must never appear in a tool's reported output.
    fn secrets(&self) -> Vec<String> {
        let restorer = self.restorer().ok().flatten();
        let endpoints = self.endpoint().ok().into_iter().chain(restorer);
        endpoints
            .filter_map(|endpoint| endpoint.password())
            .collect()
    }
}

/// `name` when it is a plain database name: a letter or `_`, then up to 62 letters, digits,
/// `_` or `$`. Names given in commands and read from manifests must be: they reach the tools
/// quoted, and a plain name cannot be read as a connection string.
fn plain_identifier(name: &str) -> Result<&str, TargetError> {
    let mut bytes = name.bytes();
    let plain = name.len() <= 63
        && bytes
            .next()
            .is_some_and(|first| first.is_ascii_alphabetic() || first == b'_')
        && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$');
    if plain {
        Ok(name)
    } else {
        Err(TargetError::InvalidOptions {
            target: KIND,
            message: format!(
                "`{name}` is not a plain database name ([A-Za-z_][A-Za-z0-9_$]*, at most 63 bytes)"
            ),
        })
    }
}

#[async_trait]
impl Target for Postgres {
    fn check_restore(&self, options: &serde_json::Value) -> Result<bool, TargetError> {
        self.check(&parse_options(KIND, options)?)
    }

    async fn backup(
        &self,
        options: &serde_json::Value,
        sink: &mut ArtifactSink,
    ) -> Result<Facts, TargetError> {
        self.back_up(parse_options(KIND, options)?, sink).await
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &serde_json::Value,
    ) -> Result<RestoreReport, TargetError> {
        self.restore_into(source, parse_options(KIND, options)?)
            .await
    }

    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        self.drill_into_scratch(source).await
    }

    async fn check_artifact(
        &self,
        _manifest: &Manifest,
        record: &ArtifactRecord,
        reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        self.check_dump(record, reader).await
    }
}

fn unreachable(err: &tokio_postgres::Error) -> TargetError {
    // A server-side error (permission, missing object) is not a reachability problem.
    if let Some(db) = err.as_db_error() {
        return TargetError::Tool {
            tool: "postgres".into(),
            message: format!("{}: {}", db.code().code(), db.message()),
            retryable: matches!(db.code().code(), "57P01" | "57P03" | "53300" | "40001"),
        };
    }
    if let Some(reason) = rejected_certificate(err) {
        return TargetError::Tool {
            tool: "postgres".into(),
            message: format!("{err}: {reason} (check sslmode and sslrootcert in DATABASE_URL)"),
            retryable: false,
        };
    }
    TargetError::Unreachable {
        target: KIND,
        message: err.to_string(),
    }
}

/// Why the TLS handshake refused the server's certificate, if it did (no retry changes that).
fn rejected_certificate(err: &tokio_postgres::Error) -> Option<String> {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(current) = source {
        let inner = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .map(|inner| inner as &(dyn std::error::Error + 'static))
            .unwrap_or(current);
        if let Some(rejected @ rustls::Error::InvalidCertificate(_)) =
            inner.downcast_ref::<rustls::Error>()
        {
            return Some(rejected.to_string());
        }
        source = current.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_database_names_pass() {
        for good in [
            "crm",
            "_x",
            "crm_restore_20261126t031500",
            "a$1",
            &"x".repeat(63),
        ] {
            assert!(plain_identifier(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "1crm",
            "host=127.0.0.1 port=6391 dbname=x",
            "crm'; DROP",
            "crm-db",
            "crm db",
            &"x".repeat(64),
            "crm\0",
        ] {
            assert!(plain_identifier(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_options_structs_accept_what_the_options_table_lists() {
        use crate::model::Action;
        use crate::targets::tests::accepts_listed_options;
        accepts_listed_options::<dump::BackupOptions>(Action::Backup, KIND);
        accepts_listed_options::<restore::RestoreOptions>(Action::Restore, KIND);
    }
}
