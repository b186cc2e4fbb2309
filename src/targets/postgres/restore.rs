//! PostgreSQL restores: `pg_restore` into a new database (beside the original), row counts
//! compared with the manifest, and for an in-place restore a swap of names; the drill
//! restores into a scratch database and drops it; the structure check is `pg_restore --list`.

use std::process::Stdio;

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_postgres::Client;

use super::connection::Endpoint;
use super::sql::{
    close_sessions, comment_database, compare_counts, count_rows, database_comment, database_owner,
    drop_database, quote_ident, staging_name, suffixed_name, swap_in,
};
use super::{DUMP_FORMAT, KIND, Postgres, PostgresFacts, plain_identifier};
use crate::pipeline::{ArtifactReader, DecodedArtifact};
use crate::storage::manifest::ArtifactRecord;
use crate::targets::process::{Pump, ToolProcess, pump};
use crate::targets::{ArtifactSource, RestoreReport, TargetError};

/// `options` of a postgres restore command.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RestoreOptions {
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

impl Postgres {
    /// Checks a restore's options (see `Target::check_restore`): true when in place.
    pub(super) fn check(&self, options: &RestoreOptions) -> Result<bool, TargetError> {
        if let Some(into) = &options.into {
            plain_identifier(into)?;
        }
        Ok(options.in_place)
    }

    /// Restores into a new database, or in place by a swap of names.
    pub(super) async fn restore_into(
        &self,
        source: &ArtifactSource,
        options: RestoreOptions,
    ) -> Result<RestoreReport, TargetError> {
        self.check(&options)?;
        let facts: PostgresFacts = source.facts()?;
        // Read back from storage: as untrusted as a command's option.
        plain_identifier(&facts.database)?;
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
        // The name the restored database ends up with.
        let destination = match (&replaced, &options.into) {
            (Some(original), _) => original.clone(),
            (None, Some(name)) => name.clone(),
            // One name per backup (`crm_restore_20261204t083306z_dfgbe6`), so a redelivery
            // finds what its first attempt restored.
            (None, None) => suffixed_name(
                &facts.database,
                &format!(
                    "restore_{}",
                    source
                        .manifest
                        .id
                        .as_str()
                        .replace(&format!("-{KIND}-"), "_")
                        .to_ascii_lowercase()
                ),
            ),
        };
        plain_identifier(&destination)?;
        let admin = self.connect(Some(&self.maintenance_database)).await?;
        let mark = restore_mark(source);
        let mut details = serde_json::json!({
            "database": destination,
            "in_place": options.in_place,
            "tables": facts.table_count,
            "rows": facts.row_count,
            "globals_skipped": facts.globals,
        });
        if database_owner(&admin, &destination).await?.is_some() {
            // The redelivery of a restore whose worker was killed after the swap, before the
            // command was marked done: its database is in place, marked with this command.
            if source.command_id().is_some()
                && database_comment(&admin, &destination).await?.as_deref() == Some(&mark)
            {
                details["already_restored"] = serde_json::json!(true);
                return Ok(RestoreReport {
                    destination: format!(
                        "postgres database {destination} (restored by an earlier attempt of \
                         this command)"
                    ),
                    details,
                });
            }
            if replaced.is_none() {
                return Err(TargetError::Refused(format!(
                    "database `{destination}` already exists; restore into a new name, \
                     or restore in place explicitly (in_place)"
                )));
            }
        }
        // Filled under a name of its own and renamed only once complete and counted, so the
        // destination never names a partial database. A worker killed mid-restore leaves
        // that name behind; the command's redelivery finds it and starts afresh.
        let database = staging_name(&destination);
        if database_owner(&admin, &database).await?.is_some() {
            tracing::warn!(
                database,
                "an interrupted restore left this database: dropping it"
            );
            drop_database(&admin, &database).await;
        }
        let restorer = self.restorer()?;
        let owner = match (&restorer, &replaced) {
            // pg_restore connects as this role: the database is its own to fill.
            (Some(restorer), _) => Some(restore_role(&admin, restorer).await?),
            (None, Some(original)) => database_owner(&admin, original).await?,
            (None, None) => None,
        };
        let owner_clause = owner
            .map(|owner| format!(" OWNER {}", quote_ident(&owner)))
            .unwrap_or_default();
        // With restore.verify_first, this proves the stored bytes before anything is created.
        let decoded = source.open(record).await?;
        admin
            .batch_execute(&format!(
                "CREATE DATABASE {} TEMPLATE template0{owner_clause}",
                quote_ident(&database)
            ))
            .await
            .map_err(|err| cannot_create(&database, &err))?;
        let outcome = async {
            self.pg_restore(decoded, record, &database, &options, restorer.as_ref())
                .await?;
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
        comment_database(&admin, &database, &mark).await;
        close_sessions(&admin, &database).await;
        let previous = swap_in(&admin, &database, &destination).await?;
        if replaced.is_some() {
            details["previous_database"] = serde_json::json!(previous);
            return Ok(RestoreReport {
                destination: format!(
                    "postgres database {destination} (the replaced database was renamed to {previous})"
                ),
                details,
            });
        }
        Ok(RestoreReport {
            destination: format!("postgres database {destination}"),
            details,
        })
    }

    /// Streams the dump into `pg_restore`; returns an error if either side failed.
    async fn pg_restore(
        &self,
        decoded: DecodedArtifact,
        record: &ArtifactRecord,
        database: &str,
        options: &RestoreOptions,
        restorer: Option<&Endpoint>,
    ) -> Result<(), TargetError> {
        // A plain identifier (checked), given as a connection string with nothing else in it:
        // pg_restore reads --dbname as one when it holds `=`.
        let dbname = format!("--dbname=dbname='{}'", plain_identifier(database)?);
        let mut args = vec![
            "--no-password",
            "--exit-on-error",
            "--single-transaction",
            dbname.as_str(),
        ];
        // As the restore role, ownership stays with it: it may not give objects away.
        if options.no_owner || restorer.is_some() {
            args.push("--no-owner");
        }
        let env = match restorer {
            Some(restorer) => restorer.tool_env(database),
            None => self.tool_env(database)?,
        };
        let mut process = ToolProcess::spawn(
            &self.tool("pg_restore"),
            &args,
            &env,
            Stdio::piped(),
            Stdio::null(),
        )?;
        let mut stdin = process.take_stdin()?;
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

    /// Restores into a scratch database (the restore compares the counts), then drops it.
    pub(super) async fn drill_into_scratch(
        &self,
        source: &ArtifactSource,
    ) -> Result<RestoreReport, TargetError> {
        let facts: PostgresFacts = source.facts()?;
        // One name per source database, so that what an interrupted drill left (its worker
        // killed) is found and dropped by the next; steps on one target never run at once.
        let scratch = suffixed_name(plain_identifier(&facts.database)?, "drill");
        let admin = self.connect(Some(&self.maintenance_database)).await?;
        if database_owner(&admin, &scratch).await?.is_some() {
            tracing::warn!(database = %scratch, "an interrupted drill left this database: dropping it");
            drop_database(&admin, &scratch).await;
        }
        drop(admin);
        // The restore itself compares every table's row count with the manifest.
        let options = RestoreOptions {
            into: Some(scratch.clone()),
            ..RestoreOptions::default()
        };
        let restored = self.restore_into(source, options).await;
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

    /// `pg_restore --list` of a dump; other artifacts are only read through.
    pub(super) async fn check_dump(
        &self,
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
        // pg_restore stops reading after the table of contents; that is fine. Its input is
        // closed as soon as the feed ends, whatever the reason: pg_restore then finishes its
        // listing (or fails on a damaged one) instead of waiting for more.
        let feed = async move {
            let fed = pump(&mut reader, &mut stdin).await;
            drop(stdin);
            fed
        };
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

/// Why the staging database could not be created. It exists (42P04, or 23505 when both
/// creations race), or its template is in use (55006), when the backend of an interrupted
/// attempt is still finishing its `CREATE DATABASE`: the next attempt finds and drops it, so
/// that is worth a retry.
fn cannot_create(database: &str, err: &tokio_postgres::Error) -> TargetError {
    match err.as_db_error() {
        Some(db) if matches!(db.code().code(), "42P04" | "23505" | "55006") => TargetError::Tool {
            tool: "postgres".into(),
            message: format!("cannot create `{database}`: {}", db.message()),
            retryable: true,
        },
        Some(db) => TargetError::Refused(format!("cannot create `{database}`: {}", db.message())),
        None => super::unreachable(err),
    }
}

/// The user of `postgres.restore_url`, once the server confirms it exists and is no superuser
/// (what a restored dump runs must not be able to reach beyond it).
async fn restore_role(admin: &Client, restorer: &Endpoint) -> Result<String, TargetError> {
    let invalid = |message: String| TargetError::InvalidOptions {
        target: super::KIND,
        message,
    };
    let user = restorer
        .config()
        .get_user()
        .ok_or_else(|| invalid("postgres.restore_url names no user".into()))?
        .to_string();
    let row = admin
        .query_opt("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&user])
        .await
        .map_err(|err| super::unreachable(&err))?;
    match row.map(|row| row.get::<_, bool>(0)) {
        None => Err(invalid(format!(
            "postgres.restore_url: role `{user}` does not exist"
        ))),
        Some(true) => Err(invalid(format!(
            "postgres.restore_url: role `{user}` is a superuser; restores must run as a role \
             without SUPERUSER"
        ))),
        Some(false) => Ok(user),
    }
}

/// The comment a restored database carries: the backup, and the command the restore ran for
/// (how that command's redelivery recognizes it).
fn restore_mark(source: &ArtifactSource) -> String {
    match source.command_id() {
        Some(command) => format!(
            "crm-backup: restored from {} by command {command}",
            source.manifest.id
        ),
        None => format!("crm-backup: restored from {}", source.manifest.id),
    }
}
