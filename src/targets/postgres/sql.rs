//! SQL the PostgreSQL target runs itself: scopes and row counts, creating, dropping and
//! swapping databases, and quoting.

use chrono::Utc;
use tokio_postgres::Client;

use super::{TableRows, unreachable};
use crate::targets::TargetError;

pub(super) const SYSTEM_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'";

/// Exact `count(*)` of each table, in the client's current transaction.
pub(super) async fn count_rows(
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

pub(super) fn compare_counts(
    expected: &[TableRows],
    actual: &[TableRows],
) -> Result<(), TargetError> {
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

pub(super) async fn query_string(client: &Client, query: &str) -> Result<String, TargetError> {
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

pub(super) async fn drop_database(admin: &Client, database: &str) {
    let statement = format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        quote_ident(database)
    );
    if let Err(err) = admin.batch_execute(&statement).await {
        tracing::warn!(database, error = %err, "could not drop a partly restored database");
    }
}

/// `crm_restore_20261126t031500`: a new database name derived from `database`, within
/// PostgreSQL's 63-byte limit.
pub(super) fn derived_name(database: &str, role: &str) -> String {
    suffixed_name(
        database,
        &format!("{role}_{}", Utc::now().format("%Y%m%dt%H%M%S")),
    )
}

/// Ends every session on `database` (the restore's own may still be closing: a rename needs
/// none). A failure shows as the rename's.
pub(super) async fn close_sessions(admin: &Client, database: &str) {
    let _ = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[&database],
        )
        .await;
}

/// The comment on `database` (`COMMENT ON DATABASE`), if it exists and has one.
pub(super) async fn database_comment(
    admin: &Client,
    database: &str,
) -> Result<Option<String>, TargetError> {
    Ok(admin
        .query_opt(
            "SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1",
            &[&database],
        )
        .await
        .map_err(|err| unreachable(&err))?
        .and_then(|row| row.get(0)))
}

/// Sets the comment on `database`. Only a marker: a failure is logged, not an error.
pub(super) async fn comment_database(admin: &Client, database: &str, comment: &str) {
    let statement = format!(
        "COMMENT ON DATABASE {} IS '{}'",
        quote_ident(database),
        comment.replace('\'', "''")
    );
    if let Err(err) = admin.batch_execute(&statement).await {
        tracing::warn!(database, error = %err, "could not mark the restored database");
    }
}

/// `crm_restoring`: where a restore into `destination` is filled before it takes that name;
/// the same for every attempt, so a retry finds what an interrupted one left.
pub(super) fn staging_name(destination: &str) -> String {
    suffixed_name(destination, "restoring")
}

/// `crm_drill`: `database` and `_<role>`, within PostgreSQL's 63-byte limit; the same every
/// time.
pub(super) fn suffixed_name(database: &str, role: &str) -> String {
    let suffix = format!("_{role}");
    let mut base = database.to_string();
    while base.len() + suffix.len() > 63 {
        base.pop();
    }
    format!("{base}{suffix}")
}

pub(super) async fn database_owner(
    admin: &Client,
    database: &str,
) -> Result<Option<String>, TargetError> {
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
/// Sessions on `original` are terminated: an in-place restore is an outage by nature. The two
/// renames are one statement batch, so one transaction: either both happen or neither, and
/// the name `original` always points at a complete database.
pub(super) async fn swap_in(
    admin: &Client,
    restored: &str,
    original: &str,
) -> Result<String, TargetError> {
    let failed = |at: &str, err: tokio_postgres::Error, left: &str| {
        TargetError::Refused(format!(
            "swapping the restored database `{restored}` in for `{original}` failed at {at}: \
             {err}; {left}"
        ))
    };
    if database_owner(admin, original).await?.is_none() {
        let rename = format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(restored),
            quote_ident(original)
        );
        admin
            .batch_execute(&rename)
            .await
            .map_err(|err| failed("the rename", err, "the restored database keeps its name"))?;
        return Ok(String::new());
    }
    let aside = derived_name(original, "replaced");
    let (original_q, aside_q, restored_q) = (
        quote_ident(original),
        quote_ident(&aside),
        quote_ident(restored),
    );
    let close = format!(
        "ALTER DATABASE {original_q} WITH ALLOW_CONNECTIONS false; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = '{}' AND pid <> pg_backend_pid()",
        original.replace('\'', "''")
    );
    admin.batch_execute(&close).await.map_err(|err| {
        failed(
            "closing the original",
            err,
            "both databases are as they were",
        )
    })?;
    let swap = format!(
        "ALTER DATABASE {original_q} RENAME TO {aside_q}; \
         ALTER DATABASE {restored_q} RENAME TO {original_q}; \
         ALTER DATABASE {aside_q} WITH ALLOW_CONNECTIONS true"
    );
    if let Err(err) = admin.batch_execute(&swap).await {
        let reopened = admin
            .batch_execute(&format!(
                "ALTER DATABASE {original_q} WITH ALLOW_CONNECTIONS true"
            ))
            .await;
        let left = match reopened {
            Ok(()) => format!(
                "`{original}` is the original database again, open for connections; the \
                 restored one is still `{restored}`"
            ),
            Err(_) => format!(
                "`{original}` is the original database, still closed to connections \
                 (ALTER DATABASE ... WITH ALLOW_CONNECTIONS true); the restored one is still \
                 `{restored}`"
            ),
        };
        return Err(failed("the renames (rolled back)", err, &left));
    }
    Ok(aside)
}

pub(super) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// pg_dump `-n` takes patterns; quoting makes the name match exactly.
pub(super) fn quote_pattern(name: &str) -> String {
    quote_ident(name)
}

#[cfg(test)]
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
        assert_eq!(staging_name("crm"), "crm_restoring");
        assert_eq!(staging_name(&long).len(), 63);
    }

    #[test]
    fn quoting_escapes_double_quotes() {
        assert_eq!(quote_ident(r#"we"ird"#), r#""we""ird""#);
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

    /// The PostgreSQL server of the test suite (scripts/test.sh), as tests/common uses it.
    async fn admin() -> Client {
        let url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let (client, connection) =
            tokio_postgres::connect(&format!("{url}/postgres"), tokio_postgres::NoTls)
                .await
                .expect("the test PostgreSQL answers");
        tokio::spawn(connection);
        client
    }

    #[tokio::test]
    async fn a_swap_that_fails_halfway_leaves_the_original_name_on_the_original() {
        let admin = admin().await;
        let suffix = std::process::id();
        let (original, restored) = (format!("swap_orig_{suffix}"), format!("swap_new_{suffix}"));
        for name in [&original, &restored] {
            drop_database(&admin, name).await;
            admin
                .batch_execute(&format!("CREATE DATABASE {}", quote_ident(name)))
                .await
                .unwrap();
        }
        // A session on the restored database makes its rename (the second) fail.
        let url = std::env::var("TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
        let (session, connection) =
            tokio_postgres::connect(&format!("{url}/{restored}"), tokio_postgres::NoTls)
                .await
                .unwrap();
        let connection = tokio::spawn(connection);
        session.batch_execute("SELECT 1").await.unwrap();
        let err = swap_in(&admin, &restored, &original)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("rolled back") && err.contains("original database again"),
            "{err}"
        );
        let names: Vec<String> = admin
            .query(
                "SELECT datname FROM pg_database WHERE datname LIKE $1 ORDER BY 1",
                &[&format!("swap_%_{suffix}%")],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        assert_eq!(
            names,
            [restored.clone(), original.clone()],
            "nothing renamed"
        );
        let open: bool = admin
            .query_one(
                "SELECT datallowconn FROM pg_database WHERE datname = $1",
                &[&original],
            )
            .await
            .unwrap()
            .get(0);
        assert!(open, "the original accepts connections again");
        drop(session);
        let _ = connection.await;
        // Without the session, the same swap goes through.
        let aside = swap_in(&admin, &restored, &original).await.unwrap();
        assert!(aside.starts_with(&format!("swap_orig_{suffix}_replaced_")));
        for name in [&original, &aside] {
            drop_database(&admin, name).await;
        }
    }
}
