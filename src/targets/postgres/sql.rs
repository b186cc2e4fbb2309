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
    let suffix = format!("_{role}_{}", Utc::now().format("%Y%m%dt%H%M%S"));
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
/// Sessions on `original` are terminated: an in-place restore is an outage by nature.
pub(super) async fn swap_in(
    admin: &Client,
    restored: &str,
    original: &str,
) -> Result<String, TargetError> {
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
}
