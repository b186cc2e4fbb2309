//! PostgreSQL backups: `pg_dump -Fc` streamed from stdout in the snapshot the row counts are
//! read in, and optionally the roles (`pg_dumpall --globals-only`).

use std::process::Stdio;

use serde::Deserialize;
use tokio_postgres::Client;

use super::archive::ArchiveCounter;
use super::sql::{SYSTEM_SCHEMAS, count_rows, query_string, quote_pattern};
use super::{
    DUMP_FORMAT, GLOBALS_ARTIFACT, GLOBALS_FORMAT, KIND, Postgres, PostgresFacts, TableRows,
    unreachable,
};
use crate::storage::manifest::Facts;
use crate::targets::process::{ToolProcess, output};
use crate::targets::{ArtifactSink, TargetError};

/// `options` of a postgres backup command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackupOptions {
    schemas: Option<Vec<String>>,
    exclude_schemas: Option<Vec<String>>,
    globals: Option<bool>,
}

/// What one dump wrote and read from its own archive.
struct Dumped {
    tables: Vec<TableRows>,
    /// `archive` (counted from the dump's stream) or `count(*)` (the fallback).
    row_count_source: &'static str,
    pg_dump_version: String,
}

impl Postgres {
    /// Backs up the configured database; returns the facts for the manifest.
    pub(super) async fn back_up(
        &self,
        options: BackupOptions,
        sink: &mut ArtifactSink,
    ) -> Result<Facts, TargetError> {
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
        if !scope.requested.is_empty() || !scope.excluded.is_empty() {
            sink.set_partial();
        }
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
                ArchiveCounter::default(),
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
    fn database_names_become_key_safe() {
        assert_eq!(key_safe("crm db/ü"), "crm_db__");
        assert_eq!(key_safe("crm-2.x_y"), "crm-2.x_y");
    }
}
