//! The options each action takes, per target, with their types: the one table that types the
//! CLI's `--option key=value`, that names the valid keys in its errors, and that
//! `schemas/command.schema.json` follows. Each target still parses its options into a typed
//! struct of its own (unknown keys refused); a test checks that the two agree.

use crate::model::{Action, TargetKind, TargetSelector};

/// The JSON type of an option's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionType {
    Bool,
    /// A string, whatever it looks like (`vhost=123` is the vhost "123").
    Text,
    /// One of these strings.
    Choice(&'static [&'static str]),
    Integer,
    /// A list of strings: `a,b` or a JSON array on the command line.
    TextList,
}

/// `(action, target, option, type)`; a `None` target means every target.
const OPTIONS: &[(Action, Option<TargetKind>, &str, OptionType)] = {
    use Action::{Backup, Prune, Restore};
    use OptionType::{Bool, Choice, Integer, Text, TextList};
    use TargetKind::{Consul, Documents, Postgres, Rabbitmq, Redis};
    &[
        (Backup, Some(Postgres), "schemas", TextList),
        (Backup, Some(Postgres), "exclude_schemas", TextList),
        (Backup, Some(Postgres), "globals", Bool),
        (Backup, Some(Redis), "mode", Choice(&["rdb", "keys"])),
        (Backup, Some(Consul), "snapshot", Bool),
        (Backup, Some(Documents), "incremental", Bool),
        (Restore, Some(Postgres), "into", Text),
        (Restore, Some(Postgres), "in_place", Bool),
        (Restore, Some(Postgres), "no_owner", Bool),
        (Restore, Some(Redis), "to_file", Text),
        (Restore, Some(Redis), "host", Text),
        (Restore, Some(Redis), "port", Integer),
        (Restore, Some(Redis), "username", Text),
        (Restore, Some(Redis), "password_env", Text),
        (Restore, Some(Redis), "tls", Bool),
        (Restore, Some(Redis), "in_place", Bool),
        (
            Restore,
            Some(Redis),
            "existing",
            Choice(&["replace", "skip", "flush-first"]),
        ),
        (Restore, Some(Rabbitmq), "vhost", Text),
        (Restore, Some(Rabbitmq), "vhost_prefix", Text),
        (Restore, Some(Rabbitmq), "in_place", Bool),
        (Restore, Some(Rabbitmq), "management_url", Text),
        (Restore, Some(Rabbitmq), "user", Text),
        (Restore, Some(Rabbitmq), "password_env", Text),
        (Restore, Some(Consul), "prefix", Text),
        (Restore, Some(Consul), "in_place", Bool),
        (Restore, Some(Consul), "delete_absent", Bool),
        (Restore, Some(Consul), "snapshot", Bool),
        (Restore, Some(Documents), "to", Text),
        (Restore, Some(Documents), "in_place", Bool),
        (Prune, None, "dry_run", Bool),
    ]
};

/// The type of option `name` of `action` on `target`, if there is such an option.
pub fn option_type(action: Action, target: Option<TargetKind>, name: &str) -> Option<OptionType> {
    OPTIONS
        .iter()
        .find(|(a, t, n, _)| *a == action && (t.is_none() || *t == target) && *n == name)
        .map(|(_, _, _, kind)| *kind)
}

/// The options `action` takes on `target`, for messages.
pub fn option_names(action: Action, target: Option<TargetKind>) -> Vec<&'static str> {
    OPTIONS
        .iter()
        .filter(|(a, t, _, _)| *a == action && (t.is_none() || *t == target))
        .map(|(_, _, name, _)| *name)
        .collect()
}

/// Checks a command's `options` object against the table: every key an option of `action` on
/// `target` (with `all`, `<target>.<option>` or an option of every target), every value of
/// its type. Strings are at most [`MAX_TEXT`] bytes.
pub fn check_options(
    action: Action,
    target: TargetSelector,
    options: &serde_json::Value,
) -> Result<(), String> {
    let Some(object) = options.as_object() else {
        return Ok(()); // null: no options
    };
    for (key, value) in object {
        let (on, name) = match (target, key.split_once('.')) {
            (TargetSelector::One(kind), _) => (Some(kind), key.as_str()),
            (TargetSelector::All, Some((kind, name))) => (
                Some(kind.parse::<TargetKind>().map_err(|err| err.to_string())?),
                name,
            ),
            (TargetSelector::All, None) => (None, key.as_str()),
        };
        let Some(kind) = option_type(action, on, name) else {
            let valid = option_names(action, on);
            let on = on.map_or_else(String::new, |t| format!(" on {t}"));
            return Err(format!(
                "`{key}` is not an option of {action}{on} (options: {})",
                if valid.is_empty() {
                    "none".to_string()
                } else {
                    valid.join(", ")
                }
            ));
        };
        check_value(kind, value).map_err(|expected| format!("option `{key}` takes {expected}"))?;
    }
    Ok(())
}

/// Longest string an option may hold.
pub const MAX_TEXT: usize = 4096;

/// Whether `value` is of type `kind`; the error says what was expected.
fn check_value(kind: OptionType, value: &serde_json::Value) -> Result<(), String> {
    fn text(value: &serde_json::Value) -> Option<&str> {
        value.as_str().filter(|s| s.len() <= MAX_TEXT)
    }
    let ok = match kind {
        OptionType::Bool => value.is_boolean(),
        OptionType::Text => text(value).is_some(),
        OptionType::Integer => value.is_i64(),
        OptionType::Choice(choices) => text(value).is_some_and(|s| choices.contains(&s)),
        OptionType::TextList => value.as_array().is_some_and(|items| {
            items.len() <= 1000 && items.iter().all(|item| text(item).is_some())
        }),
    };
    if ok {
        return Ok(());
    }
    Err(match kind {
        OptionType::Bool => "true or false".to_string(),
        OptionType::Text => format!("a string of at most {MAX_TEXT} bytes"),
        OptionType::Integer => "a whole number".to_string(),
        OptionType::Choice(choices) => format!("one of {}", choices.join(", ")),
        OptionType::TextList => "a list of strings".to_string(),
    })
}

/// `value` of option `name` as its JSON value, typed by the table above.
pub fn typed_value(
    action: Action,
    target: Option<TargetKind>,
    name: &str,
    value: &str,
) -> Result<serde_json::Value, String> {
    let Some(kind) = option_type(action, target, name) else {
        let valid = option_names(action, target);
        let on = target.map_or_else(String::new, |t| format!(" on {t}"));
        return Err(if valid.is_empty() {
            format!("{action}{on} takes no options (`{name}` given)")
        } else {
            format!(
                "`{name}` is not an option of {action}{on} (options: {})",
                valid.join(", ")
            )
        });
    };
    let wrong = |expected: &str| format!("option `{name}` takes {expected}, not `{value}`");
    Ok(match kind {
        OptionType::Text => serde_json::Value::String(value.to_string()),
        OptionType::Choice(choices) if choices.contains(&value) => value.into(),
        OptionType::Choice(choices) => {
            return Err(wrong(&format!("one of {}", choices.join(", "))));
        }
        OptionType::Bool => match value {
            "true" => true.into(),
            "false" => false.into(),
            _ => return Err(wrong("true or false")),
        },
        OptionType::Integer => value
            .parse::<i64>()
            .map_err(|_| wrong("a whole number"))?
            .into(),
        OptionType::TextList if value.trim_start().starts_with('[') => {
            serde_json::from_str::<Vec<String>>(value)
                .map_err(|_| wrong("a list of strings (a,b or [\"a\",\"b\"])"))?
                .into()
        }
        OptionType::TextList => value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .collect::<Vec<_>>()
            .into(),
    })
}

/// Every option of `action` on `target` with a value of its type, as one options object:
/// what a target's options struct must accept.
#[cfg(test)]
pub(crate) fn sample_options(action: Action, target: TargetKind) -> serde_json::Value {
    let sample = |kind: OptionType| match kind {
        OptionType::Bool => serde_json::json!(false),
        OptionType::Text => serde_json::json!("x"),
        OptionType::Choice(choices) => serde_json::json!(choices[0]),
        OptionType::Integer => serde_json::json!(1),
        OptionType::TextList => serde_json::json!(["x"]),
    };
    OPTIONS
        .iter()
        .filter(|(a, t, _, _)| *a == action && *t == Some(target))
        .map(|(_, _, name, kind)| (name.to_string(), sample(*kind)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn values_are_typed_by_the_option_not_by_how_they_look() {
        let restore = |target, name, value| typed_value(Action::Restore, Some(target), name, value);
        assert_eq!(
            restore(TargetKind::Rabbitmq, "vhost", "123"),
            Ok(json!("123"))
        );
        assert_eq!(restore(TargetKind::Redis, "port", "6380"), Ok(json!(6380)));
        assert_eq!(restore(TargetKind::Redis, "tls", "true"), Ok(json!(true)));
        let backup =
            |name, value| typed_value(Action::Backup, Some(TargetKind::Postgres), name, value);
        assert_eq!(
            backup("schemas", "crm, billing"),
            Ok(json!(["crm", "billing"]))
        );
        assert_eq!(backup("schemas", r#"["a,b"]"#), Ok(json!(["a,b"])));
        assert_eq!(
            typed_value(Action::Prune, Some(TargetKind::Consul), "dry_run", "false"),
            Ok(json!(false))
        );
    }

    #[test]
    fn command_options_are_checked_against_the_table() {
        let one = |target: TargetKind| TargetSelector::One(target);
        let check =
            |action, target, options: serde_json::Value| check_options(action, target, &options);
        assert!(
            check(
                Action::Backup,
                one(TargetKind::Postgres),
                json!({"schemas": ["crm"]})
            )
            .is_ok()
        );
        assert!(check(Action::Backup, one(TargetKind::Postgres), json!(null)).is_ok());
        assert!(check(Action::Prune, TargetSelector::All, json!({"dry_run": true})).is_ok());
        assert!(
            check(
                Action::Backup,
                TargetSelector::All,
                json!({"documents.incremental": true})
            )
            .is_ok()
        );
        let err = check(
            Action::Backup,
            one(TargetKind::Postgres),
            json!({"schemas": "crm"}),
        )
        .unwrap_err();
        assert!(err.contains("`schemas` takes a list of strings"), "{err}");
        let err = check(
            Action::Restore,
            one(TargetKind::Redis),
            json!({"port": "6379"}),
        )
        .unwrap_err();
        assert!(err.contains("a whole number"), "{err}");
        let err = check(
            Action::Verify,
            one(TargetKind::Redis),
            json!({"deep": true}),
        )
        .unwrap_err();
        assert!(err.contains("options: none"), "{err}");
        let err = check(
            Action::Backup,
            TargetSelector::All,
            json!({"schemas": ["crm"]}),
        )
        .unwrap_err();
        assert!(err.contains("not an option of backup"), "{err}");
        let long = "x".repeat(MAX_TEXT + 1);
        assert!(
            check(
                Action::Restore,
                one(TargetKind::Postgres),
                json!({"into": long})
            )
            .is_err()
        );
    }

    #[test]
    fn a_wrong_value_or_an_unknown_option_names_the_problem() {
        let err = typed_value(Action::Restore, Some(TargetKind::Redis), "port", "x").unwrap_err();
        assert!(err.contains("whole number"), "{err}");
        let err = typed_value(Action::Restore, Some(TargetKind::Redis), "tls", "yes").unwrap_err();
        assert!(err.contains("true or false"), "{err}");
        let err = typed_value(Action::Restore, Some(TargetKind::Redis), "hots", "x").unwrap_err();
        assert!(
            err.contains("`hots` is not an option of restore on redis"),
            "{err}"
        );
        assert!(err.contains("host, port"), "{err}");
        let err = typed_value(Action::Backup, Some(TargetKind::Redis), "mode", "aof").unwrap_err();
        assert!(err.contains("one of rdb, keys"), "{err}");
        let err = typed_value(Action::Verify, Some(TargetKind::Redis), "x", "1").unwrap_err();
        assert!(err.contains("takes no options"), "{err}");
    }
}
