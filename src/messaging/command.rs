//! Commands on `backup.commands`: parsing and validation (`schemas/command.schema.json`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::model::{Action, TargetKind, TargetSelector};

pub const COMMAND_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Command {
    pub version: u32,
    /// Idempotency key: a command whose marker exists is not run again.
    pub id: String,
    pub action: Action,
    pub target: TargetSelector,
    #[serde(default)]
    pub options: serde_json::Value,
    /// For restore, verify, drill: an id or `latest`.
    #[serde(default)]
    pub backup_id: Option<String>,
    pub requested_by: String,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub retain_until: Option<DateTime<Utc>>,
    /// Set by the worker on the step commands of an `all` backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub set_id: Option<String>,
}

/// Why a message is not a usable command. Never retryable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("not valid JSON: {0}")]
    InvalidJson(String),
    #[error("not a valid command: {0}")]
    Schema(String),
}

impl CommandError {
    pub fn kind(&self) -> &'static str {
        match self {
            CommandError::InvalidJson(_) => "invalid_json",
            CommandError::Schema(_) => "schema_violation",
        }
    }
}

impl Command {
    /// A new command with a fresh id.
    pub fn new(action: Action, target: TargetSelector, requested_by: &str) -> Self {
        Command {
            version: COMMAND_VERSION,
            id: uuid::Uuid::new_v4().to_string(),
            action,
            target,
            options: serde_json::Value::Null,
            backup_id: None,
            requested_by: requested_by.to_string(),
            reason: None,
            retain_until: None,
            set_id: None,
        }
    }

    /// Parses and validates a message body.
    pub fn parse(body: &[u8]) -> Result<Self, CommandError> {
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|err| CommandError::InvalidJson(err.to_string()))?;
        let command: Command =
            serde_json::from_value(value).map_err(|err| CommandError::Schema(err.to_string()))?;
        command.validate()?;
        Ok(command)
    }

    fn validate(&self) -> Result<(), CommandError> {
        let fail = |reason: String| Err(CommandError::Schema(reason));
        if self.version != COMMAND_VERSION {
            return fail(format!(
                "version {} is not supported (expected 1)",
                self.version
            ));
        }
        if !valid_id(&self.id) {
            return fail(format!(
                "id `{}` must be 1 to 128 characters of A-Z a-z 0-9 . _ : -",
                self.id
            ));
        }
        if self.requested_by.trim().is_empty() {
            return fail("requested_by is empty".into());
        }
        if !(self.options.is_null() || self.options.is_object()) {
            return fail("options must be an object".into());
        }
        let needs_backup = matches!(
            self.action,
            Action::Restore | Action::Verify | Action::Drill
        );
        match (&self.backup_id, needs_backup) {
            (None, true) if self.action != Action::Drill => {
                return fail(format!(
                    "{} needs backup_id (an id or \"latest\")",
                    self.action
                ));
            }
            (Some(_), false) => {
                return fail(format!("{} takes no backup_id", self.action));
            }
            _ => {}
        }
        if let Some(backup_id) = &self.backup_id
            && backup_id != "latest"
            && backup_id.parse::<crate::model::BackupId>().is_err()
        {
            return fail(format!(
                "backup_id `{backup_id}` is neither a backup id nor \"latest\""
            ));
        }
        if self.action == Action::Restore && self.target == TargetSelector::All {
            return fail("restore needs one target, not all".into());
        }
        if let (TargetSelector::One(kind), Some(backup_id)) = (self.target, &self.backup_id)
            && let Ok(id) = backup_id.parse::<crate::model::BackupId>()
            && id.target() != kind
        {
            return fail(format!(
                "backup {id} is a {} backup, not {kind}",
                id.target()
            ));
        }
        crate::options::check_options(self.action, self.target, &self.options)
            .map_err(CommandError::Schema)
    }

    /// Whether a backup's options or `retain_until` change what it is (a schema filter, the
    /// roles, how long it is kept): that needs a permission of its own.
    pub fn changes_what_a_backup_is(&self) -> bool {
        let scoping = ["schemas", "exclude_schemas", "globals"];
        self.retain_until.is_some()
            || self.options.as_object().is_some_and(|options| {
                options.keys().any(|key| {
                    let name = key.rsplit_once('.').map_or(key.as_str(), |(_, name)| name);
                    scoping.contains(&name)
                })
            })
    }

    /// SHA-256 of what the command asks for and who asked: its action, target, options,
    /// backup and sender. Stored with the command's marker, so that another command under the
    /// same id is told apart.
    pub fn digest(&self, sender: Option<&str>) -> String {
        use sha2::Digest;
        let canonical = serde_json::json!([
            self.action,
            self.target,
            self.options,
            self.backup_id,
            sender
        ]);
        hex::encode(sha2::Sha256::digest(canonical.to_string().as_bytes()))
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command always serializes")
    }

    /// The step of an `all` command for one target: a deterministic id, so a
    /// redelivered fan-out publishes the same steps again rather than new ones; the options
    /// prefixed `<target>.`, without the prefix.
    pub fn step_for(&self, target: TargetKind) -> Command {
        let mut step = self.clone();
        step.id = format!("{}.{}", truncate(&self.id, 110), target);
        step.target = TargetSelector::One(target);
        step.set_id = Some(self.id.clone());
        let prefix = format!("{target}.");
        step.options = match &self.options {
            serde_json::Value::Object(options) => serde_json::Value::Object(
                options
                    .iter()
                    .filter_map(|(key, value)| {
                        Some((key.strip_prefix(&prefix)?.to_string(), value.clone()))
                    })
                    .collect(),
            ),
            _ => serde_json::Value::Null,
        };
        step
    }
}

fn truncate(s: &str, max: usize) -> &str {
    &s[..s.len().min(max)]
}

fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._:-".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> serde_json::Value {
        json!({
            "version": 1,
            "id": "3c0e1f7e-2d0b-4c83-9a53-0a6f4f0e8b11",
            "action": "backup",
            "target": "postgres",
            "options": { "schemas": ["crm"] },
            "backup_id": null,
            "requested_by": "crm-api",
            "reason": "before migration 0042",
            "retain_until": null
        })
    }

    fn parse(value: serde_json::Value) -> Result<Command, CommandError> {
        Command::parse(value.to_string().as_bytes())
    }

    #[test]
    fn the_design_example_parses() {
        let command = parse(base()).unwrap();
        assert_eq!(command.action, Action::Backup);
        assert_eq!(command.target, TargetSelector::One(TargetKind::Postgres));
        assert_eq!(command.options["schemas"][0], "crm");
        let again = Command::parse(&command.to_json()).unwrap();
        assert_eq!(again, command);
    }

    #[test]
    fn bad_commands_say_why() {
        let with = |key: &str, value: serde_json::Value| {
            let mut v = base();
            v[key] = value;
            v
        };
        let without = |key: &str| {
            let mut v = base();
            v.as_object_mut().unwrap().remove(key);
            v
        };
        let cases: Vec<(serde_json::Value, &str)> = vec![
            (with("colour", json!("red")), "unknown field `colour`"),
            (
                with("action", json!("explode")),
                "unknown variant `explode`",
            ),
            (with("target", json!("mysql")), "unknown target `mysql`"),
            (with("version", json!(2)), "version 2"),
            (with("id", json!("a/b")), "id `a/b`"),
            (with("options", json!([1])), "options must be an object"),
            (without("requested_by"), "missing field `requested_by`"),
            (
                with("backup_id", json!("latest")),
                "backup takes no backup_id",
            ),
        ];
        for (value, expected) in cases {
            let err = parse(value.clone()).unwrap_err();
            assert_eq!(err.kind(), "schema_violation");
            assert!(err.to_string().contains(expected), "{value}: {err}");
        }
        let mut restore = base();
        restore["action"] = json!("restore");
        assert!(
            parse(restore.clone())
                .unwrap_err()
                .to_string()
                .contains("needs backup_id")
        );
        restore["backup_id"] = json!("20261126T023000Z-redis-k3f9");
        assert!(
            parse(restore.clone())
                .unwrap_err()
                .to_string()
                .contains("not postgres")
        );
        restore["backup_id"] = json!("latest");
        let err = parse(restore.clone()).unwrap_err().to_string();
        assert!(
            err.contains("`schemas` is not an option of restore on postgres"),
            "{err}"
        );
        restore["options"] = json!({"into": "crm_copy"});
        assert!(parse(restore.clone()).is_ok());
        restore["target"] = json!("all");
        assert!(
            parse(restore)
                .unwrap_err()
                .to_string()
                .contains("one target")
        );

        let err = Command::parse(b"{not json").unwrap_err();
        assert_eq!(err.kind(), "invalid_json");
    }

    #[test]
    fn steps_of_all_have_stable_ids() {
        let mut all = parse(base()).unwrap();
        all.target = TargetSelector::All;
        let step = all.step_for(TargetKind::Redis);
        assert_eq!(step.id, format!("{}.redis", all.id));
        assert_eq!(step.set_id.as_deref(), Some(all.id.as_str()));
        assert_eq!(step.target, TargetSelector::One(TargetKind::Redis));
        assert_eq!(all.step_for(TargetKind::Redis), step);
        assert!(Command::parse(&step.to_json()).is_ok());
    }
}
