//! PostgreSQL: `pg_dump -Fc` streamed from stdout, with exact row counts from the same snapshot;
//! restore by streaming into `pg_restore`, beside the original unless told otherwise.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::{Client, Config, NoTls};

pub mod archive;

use super::process::{Pump, ToolProcess, output, pump};
use super::{ArtifactSink, ArtifactSource, RestoreReport, Target, TargetError, parse_options};
use crate::config::PostgresSettings;
use crate::model::TargetKind;
use crate::pipeline::ArtifactReader;
use crate::storage::manifest::ArtifactRecord;
use crate::storage::manifest::Facts;

const KIND: TargetKind = TargetKind::Postgres;
const DUMP_FORMAT: &str = "pg_dump-custom";
const GLOBALS_FORMAT: &str = "sql";
const GLOBALS_ARTIFACT: &str = "globals.sql";
const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

pub struct Postgres {
    url: SecretString,
    /// Where CREATE/DROP/RENAME DATABASE run from (never the database being replaced).
    maintenance_database: String,
    bin_dir: PathBuf,
    default_schemas: Vec<String>,
    default_exclude_schemas: Vec<String>,
    default_globals: bool,
}

/// `options` of a postgres backup command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupOptions {
    schemas: Option<Vec<String>>,
    exclude_schemas: Option<Vec<String>>,
    globals: Option<bool>,
}

/// `options` of a postgres restore command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RestoreOptions {
    /// Database to restore into (beside the original: it must not exist yet).
    into: Option<String>,
    /// Replace the original database (or `into`): restored beside it, checked, then
    /// swapped in by renaming; the replaced database is kept as `<name>_replaced_<time>`.
    #[serde(default)]
    in_place: bool,
    /// Skip ownership commands (for a server without the original roles).
    #[serde(default)]
    no_owner: bool,
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

/// What one dump wrote and read from its own archive.
struct Dumped {
    tables: Vec<TableRows>,
    /// `archive` (counted from the dump's stream) or `count(*)` (the fallback).
    row_count_source: &'static str,
    pg_dump_version: String,
}

impl Postgres {
    pub fn new(settings: &PostgresSettings) -> Self {
        Postgres {
            url: settings.database_url.clone(),
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

    fn config(&self) -> Result<Config, TargetError> {
        let mut config: Config =
            self.url
                .expose_secret()
                .parse()
                .map_err(|err| TargetError::InvalidOptions {
                    target: KIND,
                    message: format!("DATABASE_URL cannot be used: {err}"),
                })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        Ok(config)
    }

    fn password(&self) -> Option<String> {
        self.config()
            .ok()?
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
    }

    async fn connect(&self, dbname: Option<&str>) -> Result<Client, TargetError> {
        let mut config = self.config()?;
        if let Some(dbname) = dbname {
            config.dbname(dbname);
        }
        let (client, connection) = config
            .connect(NoTls)
            .await
            .map_err(|err| unreachable(&err))?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "postgres connection closed");
            }
        });
        Ok(client)
    }

    /// libpq environment for child tools: the password never appears on a command line.
    fn tool_env(&self, dbname: &str) -> Result<Vec<(&'static str, String)>, TargetError> {
        let config = self.config()?;
        let hosts: Vec<String> = config
            .get_hosts()
            .iter()
            .map(|host| match host {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let ports: Vec<String> = config.get_ports().iter().map(u16::to_string).collect();
        let mut env = vec![
            ("PGDATABASE", dbname.to_string()),
            ("PGAPPNAME", "crm-backup".to_string()),
            ("PGCONNECT_TIMEOUT", "10".to_string()),
        ];
        if !hosts.is_empty() {
            env.push(("PGHOST", hosts.join(",")));
        }
        if !ports.is_empty() {
            env.push(("PGPORT", ports.join(",")));
        }
        if let Some(user) = config.get_user() {
            env.push(("PGUSER", user.to_string()));
        }
        if let Some(password) = self.password() {
            env.push(("PGPASSWORD", password));
        }
        let sslmode = match config.get_ssl_mode() {
            SslMode::Disable => "disable",
            SslMode::Require => "require",
            _ => "prefer",
        };
        env.push(("PGSSLMODE", sslmode.to_string()));
        Ok(env)
    }

    fn secrets(&self) -> Vec<String> {
        self.password().into_iter().collect()
    }

    /// Streams `pg_dump` into one artifact; row counts run meanwhile in the exporting transaction.
    async fn dump(
        &self,
        sink: &mut ArtifactSink,
        client: &Client,
        database: &str,
        snapshot: &str,
        scope: &Scope,
    ) -> Result<Dumped, TargetError> {
        let mut args = vec![
            "--format=custom".to_string(),
            "--compress=0".to_string(),
            "--no-password".to_string(),
            format!("--snapshot={snapshot}"),
        ];
        if !scope.requested.is_empty() {
            args.push("--strict-names".into());
        }
        for schema in &scope.requested {
            args.push(format!("--schema={}", quote_pattern(schema)));
        }
        for schema in &scope.excluded {
            args.push(format!("--exclude-schema={}", quote_pattern(schema)));
        }
        let (process, stdout) = ToolProcess::spawn_to_pipe(
            &self.tool("pg_dump"),
            &args,
            &self.tool_env(database)?,
            Stdio::null(),
        )?;
        let streamed = sink
            .stream(
                &format!("{}.dump", key_safe(database)),
                DUMP_FORMAT,
                stdout,
                archive::ArchiveCounter::default(),
            )
            .await;
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let streamed = match streamed {
            Ok(streamed) => streamed,
            Err(err) => {
                // The artifact was never finished: its upload is aborted.
                process.kill().await;
                return Err(err.into());
            }
        };
        // Fail closed: only a pg_dump that exited 0 can produce an artifact.
        process.wait(&secrets).await?;
        // The rows are counted from the archive as it streamed past: the counts are those
        // of exactly what was dumped, and the database is not scanned a second time.
        let counted = streamed.inspector.finish();
        let dumped = match counted {
            Ok(summary) => {
                let counts = summary.rows;
                let mut tables = Vec::with_capacity(scope.tables.len());
                let mut missing = Vec::new();
                for (schema, name) in &scope.tables {
                    match counts.get(&(schema.clone(), name.clone())) {
                        Some(rows) => tables.push(TableRows {
                            schema: schema.clone(),
                            name: name.clone(),
                            rows: *rows,
                        }),
                        None => missing.push((schema.clone(), name.clone())),
                    }
                }
                // Tables without a data entry (none expected): count them in the snapshot.
                tables.extend(count_rows(client, &missing).await?);
                tables.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
                Dumped {
                    tables,
                    row_count_source: "archive",
                    pg_dump_version: summary.pg_dump_version,
                }
            }
            Err(reason) => {
                tracing::warn!(%reason, "could not read the archive's row counts; counting in the dump's snapshot");
                Dumped {
                    tables: count_rows(client, &scope.tables).await?,
                    row_count_source: "count(*)",
                    pg_dump_version: output(&self.tool("pg_dump"), &["--version"]).await?,
                }
            }
        };
        sink.commit(streamed.artifact).await?;
        Ok(dumped)
    }

    async fn dump_globals(
        &self,
        sink: &mut ArtifactSink,
        database: &str,
    ) -> Result<(), TargetError> {
        let (process, stdout) = ToolProcess::spawn_to_pipe(
            &self.tool("pg_dumpall"),
            ["--globals-only", "--no-password", "-l", database],
            &self.tool_env(database)?,
            Stdio::null(),
        )?;
        let streamed = match sink
            .stream(GLOBALS_ARTIFACT, GLOBALS_FORMAT, stdout, ())
            .await
        {
            Ok(streamed) => streamed,
            Err(err) => {
                process.kill().await;
                return Err(err.into());
            }
        };
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        process.wait(&secrets).await?;
        sink.commit(streamed.artifact).await
    }

    /// Streams the dump into `pg_restore`; returns an error if either side failed.
    async fn pg_restore(
        &self,
        source: &ArtifactSource,
        record: &ArtifactRecord,
        database: &str,
        options: &RestoreOptions,
    ) -> Result<(), TargetError> {
        let mut args = vec![
            "--no-password",
            "--exit-on-error",
            "--single-transaction",
            "--dbname",
            database,
        ];
        if options.no_owner {
            args.push("--no-owner");
        }
        let mut process = ToolProcess::spawn(
            &self.tool("pg_restore"),
            &args,
            &self.tool_env(database)?,
            Stdio::piped(),
            Stdio::null(),
        )?;
        let mut stdin = process.take_stdin()?;
        let decoded = source.open(record).await?;
        let mut reader = decoded.reader;
        let pumped = pump(&mut reader, &mut stdin).await;
        drop(stdin);
        if let Pump::ReaderFailed(err) = pumped {
            // Corrupt or unreadable backup: stop pg_restore before it can commit.
            process.kill().await;
            drop(reader);
            return Err(match decoded.verification.result().await {
                Err(verify_err) => verify_err.into(),
                Ok(()) => TargetError::Unusable(format!("{}: {err}", record.name)),
            });
        }
        drop(reader);
        let secrets = self.secrets();
        let secrets: Vec<&str> = secrets.iter().map(String::as_str).collect();
        let restored = process.wait(&secrets).await;
        decoded.verification.result().await?;
        restored.map(|_| ())
    }
}

#[async_trait]
impl Target for Postgres {
    async fn backup(
        &self,
        options: &serde_json::Value,
        sink: &mut ArtifactSink,
    ) -> Result<Facts, TargetError> {
        let options: BackupOptions = parse_options(KIND, options)?;
        let requested = options
            .schemas
            .unwrap_or_else(|| self.default_schemas.clone());
        let excluded = options
            .exclude_schemas
            .unwrap_or_else(|| self.default_exclude_schemas.clone());
        let globals = options.globals.unwrap_or(self.default_globals);
        if let Some(bad) = requested.iter().chain(&excluded).find(|s| s.is_empty()) {
            return Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!("empty schema name `{bad}`"),
            });
        }
        let client = self.connect(None).await?;
        let server_version = query_string(&client, "SHOW server_version").await?;
        let database = query_string(&client, "SELECT current_database()").await?;

        client
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(|err| unreachable(&err))?;
        let snapshot = query_string(&client, "SELECT pg_export_snapshot()").await?;
        let scope = Scope::resolve(&client, requested, excluded).await?;
        let large_objects = if scope.requested.is_empty() {
            Some(
                client
                    .query_one("SELECT count(*) FROM pg_largeobject_metadata", &[])
                    .await
                    .map_err(|err| unreachable(&err))?
                    .get::<_, i64>(0),
            )
        } else {
            None
        };
        let Dumped {
            tables,
            row_count_source,
            pg_dump_version,
        } = self
            .dump(sink, &client, &database, &snapshot, &scope)
            .await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(|err| unreachable(&err))?;
        if globals {
            self.dump_globals(sink, &database).await?;
        }
        let facts = PostgresFacts {
            server_version,
            pg_dump_version,
            database,
            schemas: scope.schemas,
            requested_schemas: scope.requested,
            excluded_schemas: scope.excluded,
            table_count: tables.len(),
            row_count: tables.iter().map(|t| t.rows).sum(),
            tables,
            row_count_source: row_count_source.to_string(),
            large_objects,
            snapshot,
            globals,
        };
        Ok(Facts::of(&facts))
    }

    async fn restore(
        &self,
        source: &ArtifactSource,
        options: &serde_json::Value,
    ) -> Result<RestoreReport, TargetError> {
        let options: RestoreOptions = parse_options(KIND, options)?;
        let facts: PostgresFacts = source.facts()?;
        let record = source
            .manifest
            .artifacts
            .iter()
            .find(|a| a.format == DUMP_FORMAT)
            .ok_or_else(|| TargetError::Unusable("the backup has no pg_dump artifact".into()))?;
        // In place means: restore beside, check, then swap names. The database being
        // replaced is kept (renamed), so nothing is lost if the backup was the wrong one.
        let replaced = options.in_place.then(|| {
            options
                .into
                .clone()
                .unwrap_or_else(|| facts.database.clone())
        });
        let database = match (&replaced, &options.into) {
            (Some(original), _) => derived_name(original, "restore"),
            (None, Some(name)) => name.clone(),
            (None, None) => derived_name(&facts.database, "restore"),
        };
        if database.is_empty() || database.len() > 63 || database.contains('\0') {
            return Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!("`{database}` is not a usable database name (1 to 63 bytes)"),
            });
        }
        let admin = self.connect(Some(&self.maintenance_database)).await?;
        if database_owner(&admin, &database).await?.is_some() {
            return Err(TargetError::Refused(format!(
                "database `{database}` already exists; restore into a new name, \
                 or restore in place explicitly (in_place)"
            )));
        }
        let owner = match &replaced {
            Some(original) => database_owner(&admin, original).await?,
            None => None,
        };
        let owner_clause = owner
            .map(|owner| format!(" OWNER {}", quote_ident(&owner)))
            .unwrap_or_default();
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE template0{owner_clause}",
                quote_ident(&database)
            ))
            .await
            .map_err(|err| TargetError::Refused(format!("cannot create `{database}`: {err}")))?;
        let outcome = async {
            self.pg_restore(source, record, &database, &options).await?;
            let restored = self.connect(Some(&database)).await?;
            let scope_tables = facts
                .tables
                .iter()
                .map(|t| (t.schema.clone(), t.name.clone()))
                .collect::<Vec<_>>();
            let counts = count_rows(&restored, &scope_tables).await?;
            compare_counts(&facts.tables, &counts)
        }
        .await;
        if let Err(err) = outcome {
            // A half-restored new database is worse than none.
            drop_database(&admin, &database).await;
            return Err(err);
        }
        let mut details = serde_json::json!({
            "database": database,
            "in_place": options.in_place,
            "tables": facts.table_count,
            "rows": facts.row_count,
            "globals_skipped": facts.globals,
        });
        if let Some(original) = replaced {
            let previous = swap_in(&admin, &database, &original).await?;
            details["database"] = serde_json::json!(original);
            details["previous_database"] = serde_json::json!(previous);
            return Ok(RestoreReport {
                destination: format!(
                    "postgres database {original} (the replaced database was renamed to {previous})"
                ),
                details,
            });
        }
        Ok(RestoreReport {
            destination: format!("postgres database {database}"),
            details,
        })
    }

    async fn drill(&self, source: &ArtifactSource) -> Result<RestoreReport, TargetError> {
        let facts: PostgresFacts = source.facts()?;
        let scratch = derived_name(&facts.database, "drill");
        // The restore itself compares every table's row count with the manifest.
        let restored = self
            .restore(source, &serde_json::json!({ "into": scratch }))
            .await;
        match self.connect(Some(&self.maintenance_database)).await {
            Ok(admin) => drop_database(&admin, &scratch).await,
            Err(err) => {
                tracing::warn!(database = %scratch, error = %err, "could not drop the drill database")
            }
        }
        let mut report = restored?;
        report.destination = format!("scratch database {scratch} (dropped)");
        Ok(report)
    }

    async fn check_artifact(
        &self,
        _manifest: &crate::storage::manifest::Manifest,
        record: &ArtifactRecord,
        mut reader: ArtifactReader,
    ) -> Result<String, TargetError> {
        if record.format != DUMP_FORMAT {
            let bytes = tokio::io::copy(&mut reader, &mut tokio::io::sink())
                .await
                .map_err(|err| TargetError::Unusable(format!("{}: {err}", record.name)))?;
            return Ok(format!("{bytes} bytes of {}", record.format));
        }
        let mut process = ToolProcess::spawn(
            &self.tool("pg_restore"),
            ["--list"],
            &[],
            Stdio::piped(),
            Stdio::piped(),
        )?;
        let mut stdin = process.take_stdin()?;
        let stdout = process.take_stdout()?;
        // pg_restore stops reading after the table of contents; that is fine.
        let feed = pump(&mut reader, &mut stdin);
        let list = async {
            let mut entries = 0usize;
            let mut table_data = 0usize;
            let mut custom_format = false;
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                if line.starts_with(";     Format: CUSTOM") {
                    custom_format = true;
                } else if !line.starts_with(';') && !line.trim().is_empty() {
                    entries += 1;
                    if line.contains(" TABLE DATA ") {
                        table_data += 1;
                    }
                }
            }
            (custom_format, entries, table_data)
        };
        let (fed, (custom_format, entries, table_data)) = tokio::join!(feed, list);
        drop(stdin);
        if let Pump::ReaderFailed(err) = fed {
            process.kill().await;
            return Err(TargetError::Unusable(format!("{}: {err}", record.name)));
        }
        process.wait(&[]).await?;
        if !custom_format {
            return Err(TargetError::Unusable(format!(
                "{}: pg_restore --list does not see a custom-format archive",
                record.name
            )));
        }
        Ok(format!(
            "pg_restore --list: {entries} entries, {table_data} with table data"
        ))
    }
}

/// The schemas and tables one backup covers.
struct Scope {
    requested: Vec<String>,
    excluded: Vec<String>,
    schemas: Vec<String>,
    tables: Vec<(String, String)>,
}

impl Scope {
    async fn resolve(
        client: &Client,
        requested: Vec<String>,
        excluded: Vec<String>,
    ) -> Result<Self, TargetError> {
        let query =
            format!("SELECT n.nspname FROM pg_namespace n WHERE {SYSTEM_SCHEMAS} ORDER BY 1");
        let existing: Vec<String> = client
            .query(&query, &[])
            .await
            .map_err(|err| unreachable(&err))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if let Some(missing) = requested.iter().find(|s| !existing.contains(s)) {
            return Err(TargetError::InvalidOptions {
                target: KIND,
                message: format!("schema `{missing}` does not exist"),
            });
        }
        let schemas: Vec<String> = existing
            .into_iter()
            .filter(|s| requested.is_empty() || requested.contains(s))
            .filter(|s| !excluded.contains(s))
            .collect();
        let query = format!(
            "SELECT n.nspname, c.relname FROM pg_class c \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND {SYSTEM_SCHEMAS} AND n.nspname = ANY($1) \
             AND NOT EXISTS (SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_class'::regclass \
                 AND d.objid = c.oid AND d.deptype = 'e') \
             ORDER BY 1, 2"
        );
        let tables = client
            .query(&query, &[&schemas])
            .await
            .map_err(|err| unreachable(&err))?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        Ok(Scope {
            requested,
            excluded,
            schemas,
            tables,
        })
    }
}

/// Exact `count(*)` of each table, in the client's current transaction.
async fn count_rows(
    client: &Client,
    tables: &[(String, String)],
) -> Result<Vec<TableRows>, TargetError> {
    let mut counts = Vec::with_capacity(tables.len());
    for (schema, name) in tables {
        let query = format!(
            "SELECT count(*) FROM {}.{}",
            quote_ident(schema),
            quote_ident(name)
        );
        let rows: i64 = client
            .query_one(&query, &[])
            .await
            .map_err(|err| TargetError::Mismatch(format!("counting {schema}.{name}: {err}")))?
            .get(0);
        counts.push(TableRows {
            schema: schema.clone(),
            name: name.clone(),
            rows,
        });
    }
    Ok(counts)
}

fn compare_counts(expected: &[TableRows], actual: &[TableRows]) -> Result<(), TargetError> {
    let differences: Vec<String> = expected
        .iter()
        .zip(actual)
        .filter(|(e, a)| e.rows != a.rows)
        .map(|(e, a)| {
            format!(
                "{}.{}: {} rows, expected {}",
                e.schema, e.name, a.rows, e.rows
            )
        })
        .collect();
    if differences.is_empty() {
        Ok(())
    } else {
        Err(TargetError::Mismatch(differences.join("; ")))
    }
}

async fn query_string(client: &Client, query: &str) -> Result<String, TargetError> {
    let rows = client
        .simple_query(query)
        .await
        .map_err(|err| unreachable(&err))?;
    rows.iter()
        .find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(String::from),
            _ => None,
        })
        .ok_or_else(|| TargetError::Unusable(format!("`{query}` returned no row")))
}

async fn drop_database(admin: &Client, database: &str) {
    let statement = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(database)
    );
    if let Err(err) = admin.batch_execute(&statement).await {
        tracing::warn!(database, error = %err, "could not drop a partly restored database");
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
    TargetError::Unreachable {
        target: KIND,
        message: err.to_string(),
    }
}

/// `crm_restore_20261126t031500`: a new database name derived from `database`, within
/// PostgreSQL's 63-byte limit.
fn derived_name(database: &str, role: &str) -> String {
    let suffix = format!("_{role}_{}", Utc::now().format("%Y%m%dt%H%M%S"));
    let mut base = database.to_string();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

async fn database_owner(admin: &Client, database: &str) -> Result<Option<String>, TargetError> {
    Ok(admin
        .query_opt(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .map_err(|err| unreachable(&err))?
        .map(|row| row.get(0)))
}

/// Renames `original` aside and `restored` into its place; returns the aside name.
/// Sessions on `original` are terminated: an in-place restore is an outage by nature.
async fn swap_in(admin: &Client, restored: &str, original: &str) -> Result<String, TargetError> {
    let aside = derived_name(original, "replaced");
    let exists = database_owner(admin, original).await?.is_some();
    let mut statements = Vec::new();
    if exists {
        statements.push(format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS false",
            quote_ident(original)
        ));
        statements.push(format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = '{}' AND pid <> pg_backend_pid()",
            original.replace('\'', "''")
        ));
        statements.push(format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(original),
            quote_ident(&aside)
        ));
        statements.push(format!(
            "ALTER DATABASE {} WITH ALLOW_CONNECTIONS true",
            quote_ident(&aside)
        ));
    }
    statements.push(format!(
        "ALTER DATABASE {} RENAME TO {}",
        quote_ident(restored),
        quote_ident(original)
    ));
    for statement in statements {
        admin.batch_execute(&statement).await.map_err(|err| {
            TargetError::Refused(format!(
                "swapping the restored database `{restored}` in for `{original}` failed at \
                 `{statement}`: {err}; both databases are left as they are"
            ))
        })?;
    }
    Ok(if exists { aside } else { String::new() })
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// pg_dump `-n` takes patterns; quoting makes the name match exactly.
fn quote_pattern(name: &str) -> String {
    quote_ident(name)
}

/// A database name as part of a storage key.
fn key_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_names_fit_postgres_identifiers() {
        let long = "x".repeat(80);
        let name = derived_name(&long, "restore");
        assert_eq!(name.len(), 63, "{name}");
        assert!(derived_name("crm", "restore").starts_with("crm_restore_"));
        assert!(derived_name("crm", "replaced").starts_with("crm_replaced_"));
    }

    #[test]
    fn quoting_escapes_double_quotes() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
        assert_eq!(key_safe("crm db/ü"), "crm_db__");
    }

    #[test]
    fn count_differences_are_listed() {
        let t = |name: &str, rows| TableRows {
            schema: "crm".into(),
            name: name.into(),
            rows,
        };
        assert!(compare_counts(&[t("a", 1)], &[t("a", 1)]).is_ok());
        let err = compare_counts(&[t("a", 1), t("b", 2)], &[t("a", 1), t("b", 3)]).unwrap_err();
        assert!(
            err.to_string().contains("crm.b: 3 rows, expected 2"),
            "{err}"
        );
    }
}
