//! The audit trail: one record per operation — a worker step, a refused command, a CLI
//! command — written to the log at any log level (target `audit`) and durably to storage
//! under `audit/<yyyy>/<mm>/<dd>/<hhmmss.mmm>Z-<id>.json`, so the history survives the
//! process that made it. `crm-backup history` reads it back; records older than
//! `audit.retention_days` are deleted by prune.

use chrono::{DateTime, Datelike, Duration as Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};

use crate::storage::manifest::Manifest;
use crate::storage::{Storage, StorageError};

/// The record format's version.
pub const VERSION: u32 = 1;
/// Where the records live, below the storage prefix.
pub const DIR: &str = "audit/";
/// A record read back larger than this is not one of ours.
const MAX_RECORD_BYTES: u64 = 64 * 1024;
/// A record larger than this is written without its details and options.
const MAX_WRITTEN_BYTES: usize = 32 * 1024;
/// Longest text (an error message) kept in a record.
const MAX_TEXT: usize = 2_000;

/// Where an operation ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Worker,
    Cli,
}

/// How an operation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Completed,
    Failed,
    /// Not run: not authorized, not a valid command, its id taken by another command.
    Refused,
    /// Stopped before its end (worker shutdown, lost lease): it runs again.
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Failed => "failed",
            Outcome::Refused => "refused",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub version: u32,
    pub id: String,
    /// When the operation ended.
    pub at: DateTime<Utc>,
    pub origin: Origin,
    /// The host that ran it.
    pub host: String,
    /// The verified identity: the broker-validated AMQP `user_id` of the command, or the
    /// operating-system user of the CLI.
    pub user: String,
    /// What the command says of its sender (self-declared).
    pub requested_by: String,
    /// `backup`, `restore`, `verify`, `drill`, `prune`, `enqueue`, `dlq-replay`, `setup`.
    pub action: String,
    #[serde(default)]
    pub target: Option<String>,
    #[serde(default)]
    pub command_id: Option<String>,
    #[serde(default)]
    pub backup_id: Option<String>,
    /// The command's options, secrets redacted.
    #[serde(default)]
    pub options: serde_json::Value,
    pub outcome: Outcome,
    #[serde(default)]
    pub error_kind: Option<String>,
    #[serde(default)]
    pub error: Option<String>,
    #[serde(default)]
    pub raw_bytes: Option<u64>,
    #[serde(default)]
    pub stored_bytes: Option<u64>,
    pub duration_ms: u64,
    #[serde(default)]
    pub attempt: Option<u32>,
    /// What else the operation reports (letters replayed, a restore's destination).
    #[serde(default)]
    pub details: Option<serde_json::Value>,
}

impl AuditRecord {
    /// A record of `action` by `user`, ended now; the caller fills in the rest.
    pub fn new(origin: Origin, user: &str, requested_by: &str, action: &str) -> Self {
        AuditRecord {
            version: VERSION,
            id: uuid::Uuid::new_v4().simple().to_string(),
            at: Utc::now(),
            origin,
            host: host_name(),
            user: user.to_string(),
            requested_by: requested_by.to_string(),
            action: action.to_string(),
            target: None,
            command_id: None,
            backup_id: None,
            options: serde_json::Value::Null,
            outcome: Outcome::Completed,
            error_kind: None,
            error: None,
            raw_bytes: None,
            stored_bytes: None,
            duration_ms: 0,
            attempt: None,
            details: None,
        }
    }

    /// Sets the options, with every value whose name says it is a secret, and every
    /// password in a URL, redacted.
    pub fn with_options(mut self, options: &serde_json::Value) -> Self {
        self.options = redact(options);
        self
    }

    /// The backup the operation made or used: its id and sizes.
    pub fn with_backup(mut self, manifest: &Manifest) -> Self {
        self.backup_id = Some(manifest.id.to_string());
        self.raw_bytes = Some(manifest.raw_size());
        self.stored_bytes = Some(manifest.stored_size());
        self
    }

    /// A failure: its kind and message (cut to a sane length).
    pub fn failed(mut self, outcome: Outcome, kind: &str, message: &str) -> Self {
        self.outcome = outcome;
        self.error_kind = Some(kind.to_string());
        self.error = Some(cut(message));
        self
    }

    /// The record's key in storage.
    pub fn key(&self) -> String {
        format!(
            "{DIR}{}/{}Z-{}.json",
            self.at.format("%Y/%m/%d"),
            self.at.format("%H%M%S%.3f"),
            self.id
        )
    }
}

/// Logs `record` (at any log level) and stores it. A record that cannot be stored is
/// logged as such; the operation it describes has happened either way.
pub async fn write(storage: &Storage, record: &AuditRecord) {
    let mut json = serde_json::to_string(record).unwrap_or_default();
    if json.len() > MAX_WRITTEN_BYTES {
        // Details (a prune's list of deleted backups) and options give way; the record stays.
        let mut shorter = record.clone();
        shorter.details = Some(serde_json::json!({"omitted": "too large for an audit record"}));
        shorter.options = serde_json::Value::Null;
        json = serde_json::to_string(&shorter).unwrap_or_default();
    }
    tracing::info!(
        target: "audit",
        action = %record.action,
        target_name = record.target.as_deref().unwrap_or(""),
        outcome = record.outcome.as_str(),
        user = %record.user,
        requested_by = %record.requested_by,
        command_id = record.command_id.as_deref().unwrap_or(""),
        backup_id = record.backup_id.as_deref().unwrap_or(""),
        raw_bytes = record.raw_bytes.unwrap_or(0),
        duration_ms = record.duration_ms,
        error = record.error.as_deref().unwrap_or(""),
        key = %record.key(),
        "audit"
    );
    if let Err(err) = storage.put_bytes(&record.key(), json.into()).await {
        tracing::error!(error = %err, key = %record.key(), "could not store the audit record");
    }
}

/// What [`read`] found: records newest first, and the keys it could not use.
#[derive(Debug, Default)]
pub struct History {
    pub records: Vec<AuditRecord>,
    pub unreadable: Vec<(String, String)>,
}

/// The records of operations that ended at or after `since`, newest first, at most `limit`
/// of them, those of `target` only when given.
pub async fn read(
    storage: &Storage,
    since: DateTime<Utc>,
    target: Option<&str>,
    limit: usize,
) -> Result<History, StorageError> {
    let mut history = History::default();
    let mut days: Vec<NaiveDate> = days(storage)
        .await?
        .into_iter()
        .filter(|day| *day >= since.date_naive())
        .collect();
    days.sort_unstable_by(|a, b| b.cmp(a));
    for day in days {
        if history.records.len() >= limit {
            break;
        }
        let mut objects = storage.list(&day_dir(day)).await?;
        objects.sort_by(|a, b| b.key.cmp(&a.key));
        for object in objects {
            if history.records.len() >= limit {
                break;
            }
            // The key says when the record was written: older ones are not read at all.
            if key_time(&object.key).is_some_and(|at| at < since - Days::seconds(1)) {
                continue;
            }
            if object.size > MAX_RECORD_BYTES {
                history
                    .unreadable
                    .push((object.key, format!("larger than {MAX_RECORD_BYTES} bytes")));
                continue;
            }
            let bytes = match storage.get_bytes(&object.key, MAX_RECORD_BYTES).await {
                Ok(bytes) => bytes,
                // Pruned since it was listed.
                Err(StorageError::NotFound { .. }) => continue,
                Err(err) => return Err(err),
            };
            match serde_json::from_slice::<AuditRecord>(&bytes) {
                Ok(record) if record.version != VERSION => history
                    .unreadable
                    .push((object.key, format!("record version {}", record.version))),
                Ok(record) => {
                    if record.at >= since
                        && target.is_none_or(|t| record.target.as_deref() == Some(t))
                    {
                        history.records.push(record);
                    }
                }
                Err(err) => history.unreadable.push((object.key, err.to_string())),
            }
        }
    }
    history
        .records
        .sort_by_key(|record| std::cmp::Reverse(record.at));
    Ok(history)
}

/// Deletes the records of the days older than `keep_days` before `today` (0: keeps them all);
/// returns how many records it deleted.
pub async fn prune(
    storage: &Storage,
    keep_days: u32,
    today: NaiveDate,
) -> Result<u64, StorageError> {
    if keep_days == 0 {
        return Ok(0);
    }
    let mut deleted = 0;
    for day in expired_days(&days(storage).await?, keep_days, today) {
        for object in storage.list(&day_dir(day)).await? {
            storage.delete(&object.key).await?;
            deleted += 1;
        }
    }
    Ok(deleted)
}

/// The days that have records (`audit/<yyyy>/<mm>/<dd>/`); other directories are ignored.
async fn days(storage: &Storage) -> Result<Vec<NaiveDate>, StorageError> {
    let mut days = Vec::new();
    for year in storage.list_dirs(DIR).await? {
        for month in storage.list_dirs(&year).await? {
            for day in storage.list_dirs(&month).await? {
                if let Some(date) = parse_day_dir(&day) {
                    days.push(date);
                }
            }
        }
    }
    Ok(days)
}

/// The days whose records are past their retention: older than `keep_days` before `today`.
pub fn expired_days(days: &[NaiveDate], keep_days: u32, today: NaiveDate) -> Vec<NaiveDate> {
    let oldest_kept = today - Days::days(i64::from(keep_days));
    days.iter()
        .copied()
        .filter(|day| *day < oldest_kept)
        .collect()
}

fn day_dir(day: NaiveDate) -> String {
    format!(
        "{DIR}{:04}/{:02}/{:02}/",
        day.year(),
        day.month(),
        day.day()
    )
}

/// When the record under `key` ended, as its key says (`audit/<date>/<hhmmss.mmm>Z-…`).
fn key_time(key: &str) -> Option<DateTime<Utc>> {
    let (dir, name) = key.rsplit_once('/')?;
    let day = parse_day_dir(&format!("{dir}/"))?;
    let time = chrono::NaiveTime::parse_from_str(name.get(..10)?, "%H%M%S%.3f").ok()?;
    Some(day.and_time(time).and_utc())
}

/// `audit/2026/12/04/` → 2026-12-04; anything else → None.
fn parse_day_dir(dir: &str) -> Option<NaiveDate> {
    let rest = dir.strip_prefix(DIR)?.trim_end_matches('/');
    let mut parts = rest.split('/');
    let (year, month, day) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    NaiveDate::from_ymd_opt(year.parse().ok()?, month.parse().ok()?, day.parse().ok()?)
}

/// Options as they may be recorded: values under a name that says "secret" become `***`,
/// passwords in URL-like strings are removed.
fn redact(options: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    match options {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(name, value)| {
                    let value = if crate::telemetry::names_a_secret(name) && !value.is_boolean() {
                        Value::String("***".into())
                    } else {
                        redact(value)
                    };
                    (name.clone(), value)
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::String(text) => Value::String(cut(&crate::telemetry::redact_url(text))),
        other => other.clone(),
    }
}

fn cut(text: &str) -> String {
    match text.char_indices().nth(MAX_TEXT) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_string(),
    }
}

fn host_name() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn day(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    #[test]
    fn days_past_retention_expire_and_the_rest_stay() {
        let days = [
            day("2025-01-01"),
            day("2026-11-02"),
            day("2026-11-03"),
            day("2026-12-04"),
        ];
        // 31 days kept: 2026-11-03 is 31 days old, the last day kept.
        assert_eq!(
            expired_days(&days, 31, day("2026-12-04")),
            vec![day("2025-01-01"), day("2026-11-02")]
        );
        assert!(expired_days(&days, 10_000, day("2026-12-04")).is_empty());
    }

    #[test]
    fn day_directories_parse_and_strangers_are_ignored() {
        assert_eq!(parse_day_dir("audit/2026/12/04/"), Some(day("2026-12-04")));
        for stranger in [
            "audit/2026/13/04/",
            "audit/x/12/04/",
            "audit/2026/12/",
            "other/2026/12/04/",
            "audit/2026/12/04/x/",
        ] {
            assert_eq!(parse_day_dir(stranger), None, "{stranger}");
        }
        assert_eq!(day_dir(day("2026-02-03")), "audit/2026/02/03/");
    }

    #[test]
    fn keys_say_when_their_record_ended() {
        let mut record = AuditRecord::new(Origin::Cli, "ops", "cli:ops", "backup");
        record.at = "2026-12-04T09:05:01.002Z".parse().unwrap();
        assert_eq!(key_time(&record.key()), Some(record.at));
        assert_eq!(key_time("audit/2026/12/04/garbage.json"), None);
        assert_eq!(key_time("audit/2026/12/04/"), None);
    }

    #[test]
    fn keys_sort_by_time_within_their_day() {
        let mut early = AuditRecord::new(Origin::Cli, "ops", "cli:ops", "backup");
        early.at = "2026-12-04T09:05:01.002Z".parse().unwrap();
        let mut late = early.clone();
        late.at = "2026-12-04T10:00:00Z".parse().unwrap();
        assert!(early.key().starts_with("audit/2026/12/04/090501.002Z-"));
        assert!(early.key() < late.key());
    }

    #[test]
    fn secrets_in_options_are_redacted() {
        let record = AuditRecord::new(Origin::Worker, "ops", "x", "restore").with_options(&json!({
            "password": "hunter2",
            "in_place": true,
            "management_url": "http://u:pw@host/?token=abc",
            "schemas": ["public"],
        }));
        assert_eq!(
            record.options,
            json!({
                "password": "***",
                "in_place": true,
                "management_url": "http://u:***@host/?token=***",
                "schemas": ["public"],
            })
        );
    }

    #[test]
    fn long_errors_are_cut() {
        let record = AuditRecord::new(Origin::Cli, "ops", "x", "backup").failed(
            Outcome::Failed,
            "tool",
            &"é".repeat(10_000),
        );
        assert_eq!(record.error.unwrap().chars().count(), MAX_TEXT + 1);
    }
}
