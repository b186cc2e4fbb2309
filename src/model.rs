//! The words every layer shares: what is backed up ([`TargetKind`], or a [`TargetSelector`]
//! that may say `all`), which backup ([`BackupId`]) and what is asked ([`Action`]).
//!
//! They live here, below every other module, so that configuration, retention, the
//! pipeline and messaging can name a target without depending on storage or the broker.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, NaiveDateTime, Utc};
use rand::Rng;
use serde::{Deserialize, Serialize};

/// What a backup captures. `all` is not a kind: it expands into every enabled kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Postgres,
    Redis,
    Rabbitmq,
    Consul,
    Documents,
}

impl TargetKind {
    pub const ALL: [TargetKind; 5] = [
        TargetKind::Postgres,
        TargetKind::Redis,
        TargetKind::Rabbitmq,
        TargetKind::Consul,
        TargetKind::Documents,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Postgres => "postgres",
            TargetKind::Redis => "redis",
            TargetKind::Rabbitmq => "rabbitmq",
            TargetKind::Consul => "consul",
            TargetKind::Documents => "documents",
        }
    }
}

impl fmt::Display for TargetKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown target `{0}` (expected one of postgres, redis, rabbitmq, consul, documents)")]
pub struct UnknownTarget(pub String);

impl FromStr for TargetKind {
    type Err = UnknownTarget;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TargetKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s)
            .ok_or_else(|| UnknownTarget(s.to_string()))
    }
}

/// Crockford base32, lower case: no i, l, o, u to misread.
const BASE32: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
const TIME_FORMAT: &str = "%Y%m%dT%H%M%SZ";

/// `<UTC YYYYMMDDTHHMMSSZ>-<target>-<random base32>`: lexicographic order is time order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct BackupId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a backup id (expected YYYYMMDDTHHMMSSZ-<target>-<suffix>)")]
pub struct InvalidBackupId(pub String);

impl BackupId {
    /// A fresh id for a backup of `target` started at `at`.
    pub fn generate(target: TargetKind, at: DateTime<Utc>) -> Self {
        let mut rng = rand::rng();
        let suffix: String = (0..6)
            .map(|_| BASE32[rng.random_range(0..BASE32.len())] as char)
            .collect();
        BackupId(format!("{}-{}-{}", at.format(TIME_FORMAT), target, suffix))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn target(&self) -> TargetKind {
        // Checked at construction.
        self.parts().1
    }

    /// The start time encoded in the id.
    pub fn started_at(&self) -> DateTime<Utc> {
        self.parts().0
    }

    fn parts(&self) -> (DateTime<Utc>, TargetKind) {
        parse_parts(&self.0).expect("BackupId is validated when constructed")
    }
}

fn parse_parts(s: &str) -> Option<(DateTime<Utc>, TargetKind)> {
    let mut parts = s.splitn(3, '-');
    let time = parts.next()?;
    let target = parts.next()?.parse().ok()?;
    let suffix = parts.next()?;
    let lower_alphanumeric = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if suffix.len() < 4 || !suffix.bytes().all(lower_alphanumeric) {
        return None;
    }
    let time = NaiveDateTime::parse_from_str(time, TIME_FORMAT)
        .ok()?
        .and_utc();
    Some((time, target))
}

impl FromStr for BackupId {
    type Err = InvalidBackupId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match parse_parts(s) {
            Some(_) => Ok(BackupId(s.to_string())),
            None => Err(InvalidBackupId(s.to_string())),
        }
    }
}

impl TryFrom<String> for BackupId {
    type Error = InvalidBackupId;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<BackupId> for String {
    fn from(id: BackupId) -> String {
        id.0
    }
}

impl fmt::Display for BackupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Backup,
    Restore,
    Verify,
    Drill,
    Prune,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Backup => "backup",
            Action::Restore => "restore",
            Action::Verify => "verify",
            Action::Drill => "drill",
            Action::Prune => "prune",
        }
    }
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Action {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!("unknown action `{s}` (expected backup, restore, verify, drill or prune)")
        })
    }
}

/// A target or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum TargetSelector {
    One(TargetKind),
    All,
}

impl TryFrom<String> for TargetSelector {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl std::str::FromStr for TargetSelector {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "all" {
            Ok(TargetSelector::All)
        } else {
            s.parse::<TargetKind>()
                .map(TargetSelector::One)
                .map_err(|err| format!("{err} or all"))
        }
    }
}

impl From<TargetSelector> for String {
    fn from(selector: TargetSelector) -> String {
        selector.to_string()
    }
}

impl std::fmt::Display for TargetSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TargetSelector::One(kind) => f.write_str(kind.as_str()),
            TargetSelector::All => f.write_str("all"),
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn generated_ids_parse_back_and_sort_by_time() {
        let early = Utc.with_ymd_and_hms(2026, 11, 26, 2, 30, 0).unwrap();
        let late = Utc.with_ymd_and_hms(2026, 11, 26, 2, 30, 1).unwrap();
        let a = BackupId::generate(TargetKind::Postgres, early);
        let b = BackupId::generate(TargetKind::Postgres, late);
        assert!(a.as_str().starts_with("20261126T023000Z-postgres-"));
        assert_eq!(a.as_str().parse::<BackupId>().unwrap(), a);
        assert_eq!(a.target(), TargetKind::Postgres);
        assert_eq!(a.started_at(), early);
        assert!(a < b);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in [
            "",
            "latest",
            "20261126T023000Z-postgres",
            "20261126T023000Z-mysql-abcd",
            "20261126T023000Z-postgres-ab",
            "20261126T023000Z-postgres-AB!D",
            "2026-11-26-postgres-abcd",
            "20261126T023000Z-postgres-abcd/../x",
        ] {
            assert!(bad.parse::<BackupId>().is_err(), "{bad}");
        }
    }
}
