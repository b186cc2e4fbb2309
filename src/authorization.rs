//! Who may ask for what: the permission model the worker checks for every command, and the CLI
//! for `dlq replay`.
//!
//! Grants are configured per AMQP user (`authorization.grants`, entries `<user>=<grant>`);
//! a grant is `<what>` or `<what>:<target>`, where `<what>` is an action (`backup`,
//! `restore`, `verify`, `drill`, `prune`), `in-place` (a restore that changes the live
//! source), `scoped-backup` (a backup whose options change what it is: `schemas`,
//! `exclude_schemas`, `globals`, `retain_until`) or `*` (everything). No identity is trusted
//! implicitly, the worker's own included; a command without a `user_id` gets only the
//! `authorization.anonymous` grants (none by default). A pure function of the policy and the
//! request: table-tested below.

use std::collections::BTreeMap;

use crate::model::{Action, TargetKind, TargetSelector};

/// What a grant allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Capability {
    Action(Action),
    /// A restore that changes the live source.
    InPlace,
    /// A backup whose options change what it is.
    ScopedBackup,
    Everything,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Grant {
    capability: Capability,
    /// `None`: every target.
    target: Option<TargetKind>,
}

impl std::str::FromStr for Grant {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let (what, target) = match text.split_once(':') {
            Some((what, target)) => (
                what,
                Some(target.parse::<TargetKind>().map_err(|e| e.to_string())?),
            ),
            None => (text, None),
        };
        let capability = match what {
            "*" => Capability::Everything,
            "in-place" => Capability::InPlace,
            "scoped-backup" => Capability::ScopedBackup,
            action => Capability::Action(action.parse().map_err(|_| {
                format!(
                    "`{text}` is not a grant (backup, restore, verify, drill, prune, in-place, \
                     scoped-backup or *, optionally :<target>)"
                )
            })?),
        };
        Ok(Grant { capability, target })
    }
}

/// What one command asks for, as far as permissions go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub action: Action,
    pub target: TargetSelector,
    /// The restore changes the live source.
    pub in_place: bool,
    /// The backup's options change what it is.
    pub scoped: bool,
}

/// The configured grants.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    users: BTreeMap<String, Vec<Grant>>,
    anonymous: Vec<Grant>,
}

/// Why a command is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{who} may not {what}")]
pub struct Refusal {
    who: String,
    what: String,
}

impl Policy {
    /// Builds the policy from `<user>=<grant>` entries and the anonymous grants; an error
    /// names the entry.
    pub fn new(grants: &[String], anonymous: &[String]) -> Result<Self, String> {
        let mut users: BTreeMap<String, Vec<Grant>> = BTreeMap::new();
        for entry in grants {
            let (user, grant) = entry
                .split_once('=')
                .filter(|(user, _)| !user.is_empty())
                .ok_or_else(|| format!("`{entry}` is not <user>=<grant>"))?;
            users
                .entry(user.to_string())
                .or_default()
                .push(grant.parse()?);
        }
        let anonymous = anonymous
            .iter()
            .map(|grant| grant.parse())
            .collect::<Result<_, _>>()?;
        Ok(Policy { users, anonymous })
    }

    /// Whether `sender` (the broker-verified AMQP user, `None` without a `user_id`) may make
    /// `request`.
    pub fn check(&self, sender: Option<&str>, request: &Request) -> Result<(), Refusal> {
        let grants = match sender {
            Some(user) => self.users.get(user).map(Vec::as_slice).unwrap_or_default(),
            None => &self.anonymous,
        };
        let who = match sender {
            Some(user) => format!("AMQP user `{user}`"),
            None => "a command without a user_id".to_string(),
        };
        let mut needed = vec![Capability::Action(request.action)];
        if request.in_place {
            needed.push(Capability::InPlace);
        }
        if request.scoped {
            needed.push(Capability::ScopedBackup);
        }
        for capability in needed {
            let allowed = grants.iter().any(|grant| {
                (grant.capability == Capability::Everything || grant.capability == capability)
                    && match (grant.target, request.target) {
                        (None, _) => true,
                        (Some(granted), TargetSelector::One(asked)) => granted == asked,
                        (Some(_), TargetSelector::All) => false,
                    }
            });
            if !allowed {
                let what = match capability {
                    Capability::Action(action) => format!("{action} {}", request.target),
                    Capability::InPlace => format!("restore {} in place", request.target),
                    Capability::ScopedBackup => format!(
                        "change what a backup of {} is (schemas, exclude_schemas, globals, retain_until)",
                        request.target
                    ),
                    Capability::Everything => "do everything".to_string(),
                };
                return Err(Refusal { who, what });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        let grants: Vec<String> = [
            "crm-api=backup",
            "crm-api=verify",
            "ops=*",
            "scheduler=backup",
            "scheduler=prune",
            "scheduler=drill",
            "scheduler=verify",
            "dba=restore:postgres",
            "dba=in-place:postgres",
            "migrations=backup:postgres",
            "migrations=scoped-backup:postgres",
        ]
        .map(String::from)
        .to_vec();
        Policy::new(&grants, &["verify".to_string()]).unwrap()
    }

    fn request(action: Action, target: &str) -> Request {
        Request {
            action,
            target: target.parse().unwrap(),
            in_place: false,
            scoped: false,
        }
    }

    #[test]
    fn the_permission_matrix() {
        use Action::*;
        let policy = policy();
        let in_place = |target: &str| Request {
            in_place: true,
            ..request(Restore, target)
        };
        let scoped = |target: &str| Request {
            scoped: true,
            ..request(Backup, target)
        };
        let cases: Vec<(Option<&str>, Request, bool)> = vec![
            (Some("crm-api"), request(Backup, "postgres"), true),
            (Some("crm-api"), request(Backup, "all"), true),
            (Some("crm-api"), request(Verify, "redis"), true),
            (Some("crm-api"), request(Restore, "postgres"), false),
            (Some("crm-api"), request(Prune, "all"), false),
            (Some("crm-api"), scoped("postgres"), false),
            (Some("ops"), in_place("redis"), true),
            (Some("ops"), scoped("postgres"), true),
            (Some("scheduler"), request(Drill, "all"), true),
            (Some("scheduler"), request(Restore, "redis"), false),
            (Some("dba"), request(Restore, "postgres"), true),
            (Some("dba"), in_place("postgres"), true),
            (Some("dba"), request(Restore, "redis"), false),
            (Some("dba"), request(Restore, "all"), false),
            (Some("migrations"), scoped("postgres"), true),
            (Some("migrations"), scoped("all"), false),
            (Some("migrations"), request(Backup, "redis"), false),
            (Some("stranger"), request(Verify, "postgres"), false),
            (Some("guest"), request(Backup, "postgres"), false),
            (None, request(Verify, "postgres"), true),
            (None, request(Backup, "postgres"), false),
        ];
        for (sender, request, allowed) in cases {
            assert_eq!(
                policy.check(sender, &request).is_ok(),
                allowed,
                "{sender:?} {request:?}"
            );
        }
    }

    #[test]
    fn a_refusal_says_who_and_what() {
        let err = policy()
            .check(
                Some("dba"),
                &Request {
                    in_place: true,
                    ..request(Action::Restore, "redis")
                },
            )
            .unwrap_err();
        assert_eq!(err.to_string(), "AMQP user `dba` may not restore redis");
        let err = policy()
            .check(
                Some("crm-api"),
                &Request {
                    scoped: true,
                    ..request(Action::Backup, "postgres")
                },
            )
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("may not change what a backup of postgres is"),
            "{err}"
        );
    }

    #[test]
    fn bad_grants_are_named() {
        assert!(
            Policy::new(&["crm-api".into()], &[])
                .unwrap_err()
                .contains("<user>=<grant>")
        );
        assert!(
            Policy::new(&["x=explode".into()], &[])
                .unwrap_err()
                .contains("`explode`")
        );
        assert!(
            Policy::new(&["x=backup:mysql".into()], &[])
                .unwrap_err()
                .contains("mysql")
        );
        assert!(Policy::new(&[], &["restore:nope".into()]).is_err());
    }
}
