//! Schedules: cron expressions in a time zone, and the command each fire publishes.
//!
//! Pure: `now` is always a parameter. A fire's command id is derived from (schedule name,
//! fire time), so two schedulers, or one restarted, publish the same id for the same fire
//! and the worker's idempotency runs it once.

use std::str::FromStr;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::config::ScheduleSettings;
use crate::messaging::command::Command;
use crate::model::{Action, TargetSelector};

/// Namespace of the UUIDv5 command ids of scheduled fires.
const FIRE_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x6b1f_62d5_2c4e_4a47_9c1d_4f0e_8b11_3c0e);

#[derive(Debug, thiserror::Error)]
#[error("schedule `{name}`: {reason}")]
pub struct ScheduleError {
    pub name: String,
    pub reason: String,
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub name: String,
    cron: Cron,
    timezone: Tz,
    action: Action,
    target: TargetSelector,
    options: serde_json::Value,
}

impl Schedule {
    pub fn parse(settings: &ScheduleSettings) -> Result<Self, ScheduleError> {
        let error = |reason: String| ScheduleError {
            name: settings.name.clone(),
            reason,
        };
        if settings.name.trim().is_empty() {
            return Err(error("the name is empty".into()));
        }
        let cron = Cron::from_str(&settings.cron)
            .map_err(|err| error(format!("cron `{}`: {err}", settings.cron)))?;
        let timezone: Tz = settings
            .timezone
            .parse()
            .map_err(|_| error(format!("`{}` is not an IANA time zone", settings.timezone)))?;
        let action: Action = settings.action.parse().map_err(error)?;
        let target: TargetSelector = settings.target.parse().map_err(error)?;
        let schedule = Schedule {
            name: settings.name.clone(),
            cron,
            timezone,
            action,
            target,
            options: settings.options.clone(),
        };
        // The command it publishes must itself be valid.
        Command::parse(&schedule.command_for(Utc::now(), "").to_json())
            .map_err(|err| error(err.to_string()))?;
        Ok(schedule)
    }

    /// The first fire strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.timezone), false)
            .ok()
            .map(|fire| fire.with_timezone(&Utc))
    }

    /// Every fire in `(from, to]`.
    pub fn fires_between(&self, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<DateTime<Utc>> {
        let mut fires = Vec::new();
        let mut cursor = from;
        while let Some(fire) = self.next_after(cursor) {
            if fire > to {
                break;
            }
            fires.push(fire);
            cursor = fire;
        }
        fires
    }

    /// The command of the fire at `fire`, with an id derived from (salt, name, fire time).
    pub fn command_for(&self, fire: DateTime<Utc>, salt: &str) -> Command {
        let mut command = Command::new(
            self.action,
            self.target,
            &format!("scheduler:{}", self.name),
        );
        command.id = fire_id(salt, &self.name, fire);
        command.options = self.options.clone();
        if matches!(self.action, Action::Verify | Action::Restore) {
            command.backup_id = Some("latest".into());
        }
        command.reason = Some(format!("schedule {} at {}", self.name, fire.to_rfc3339()));
        command
    }
}

/// `uuidv5(uuidv5(namespace, salt), "<name>@<fire time, RFC 3339 UTC>")`: every replica of
/// the scheduler derives the same id, and without the installation's secret salt nobody can
/// tell a future fire's id (and publish something else under it first).
pub fn fire_id(salt: &str, name: &str, fire: DateTime<Utc>) -> String {
    let installation = uuid::Uuid::new_v5(&FIRE_NAMESPACE, salt.as_bytes());
    let key = format!(
        "{name}@{}",
        fire.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    uuid::Uuid::new_v5(&installation, key.as_bytes()).to_string()
}

/// The earliest next fire over all schedules after `now`, with every schedule due then.
pub fn next_fire(
    schedules: &[Schedule],
    now: DateTime<Utc>,
) -> Option<(DateTime<Utc>, Vec<&Schedule>)> {
    let fires: Vec<(DateTime<Utc>, &Schedule)> = schedules
        .iter()
        .filter_map(|s| s.next_after(now).map(|fire| (fire, s)))
        .collect();
    let earliest = fires.iter().map(|(fire, _)| *fire).min()?;
    Some((
        earliest,
        fires
            .into_iter()
            .filter(|(fire, _)| *fire == earliest)
            .map(|(_, s)| s)
            .collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn schedule(cron: &str, timezone: &str) -> Schedule {
        Schedule::parse(&ScheduleSettings {
            name: "nightly".into(),
            cron: cron.into(),
            timezone: timezone.into(),
            action: "backup".into(),
            target: "all".into(),
            options: serde_json::Value::Null,
        })
        .unwrap()
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
    }

    #[test]
    fn next_fires_in_utc_and_in_zones() {
        let cases = [
            (
                "30 2 * * *",
                "UTC",
                utc(2026, 11, 26, 1, 0, 0),
                utc(2026, 11, 26, 2, 30, 0),
            ),
            (
                "30 2 * * *",
                "UTC",
                utc(2026, 11, 26, 2, 30, 0),
                utc(2026, 11, 27, 2, 30, 0),
            ),
            (
                "0 6 * * SUN",
                "UTC",
                utc(2026, 11, 26, 0, 0, 0),
                utc(2026, 11, 29, 6, 0, 0),
            ),
            // 02:30 in Berlin is 01:30 UTC in winter…
            (
                "30 2 * * *",
                "Europe/Berlin",
                utc(2026, 11, 26, 0, 0, 0),
                utc(2026, 11, 26, 1, 30, 0),
            ),
            // …and 00:30 UTC in summer.
            (
                "30 2 * * *",
                "Europe/Berlin",
                utc(2026, 7, 1, 0, 0, 0),
                utc(2026, 7, 1, 0, 30, 0),
            ),
            // 31 Dec → 1 Jan across the year boundary.
            (
                "0 0 1 1 *",
                "UTC",
                utc(2026, 12, 31, 23, 0, 0),
                utc(2027, 1, 1, 0, 0, 0),
            ),
            // Seconds are allowed (six fields).
            (
                "*/10 * * * * *",
                "UTC",
                utc(2026, 11, 26, 1, 0, 3),
                utc(2026, 11, 26, 1, 0, 10),
            ),
        ];
        for (cron, tz, now, expected) in cases {
            assert_eq!(
                schedule(cron, tz).next_after(now),
                Some(expected),
                "{cron} {tz} after {now}"
            );
        }
    }

    #[test]
    fn a_fire_that_dst_skips_is_not_lost() {
        // 2026-03-29: Berlin clocks jump from 02:00 to 03:00; 02:30 does not exist that day.
        let fire = schedule("30 2 * * *", "Europe/Berlin")
            .next_after(utc(2026, 3, 28, 23, 0, 0))
            .unwrap();
        assert!(fire <= utc(2026, 3, 30, 0, 30, 0), "{fire}");
    }

    #[test]
    fn missed_fires_are_listed_in_order() {
        let s = schedule("0 * * * *", "UTC");
        let fires = s.fires_between(utc(2026, 11, 26, 0, 30, 0), utc(2026, 11, 26, 3, 0, 0));
        assert_eq!(
            fires,
            vec![
                utc(2026, 11, 26, 1, 0, 0),
                utc(2026, 11, 26, 2, 0, 0),
                utc(2026, 11, 26, 3, 0, 0)
            ]
        );
    }

    #[test]
    fn fire_ids_are_deterministic_and_distinct() {
        let s = schedule("30 2 * * *", "UTC");
        let salt = "a secret of this installation";
        let a = s.command_for(utc(2026, 11, 26, 2, 30, 0), salt);
        let b = s.command_for(utc(2026, 11, 26, 2, 30, 0), salt);
        let c = s.command_for(utc(2026, 11, 27, 2, 30, 0), salt);
        let other = s.command_for(utc(2026, 11, 26, 2, 30, 0), "another installation's");
        assert_eq!(a.id, b.id);
        assert_ne!(a.id, c.id);
        assert_ne!(a.id, other.id, "the salt changes every id");
        assert_eq!(a.requested_by, "scheduler:nightly");
        assert!(Command::parse(&a.to_json()).is_ok());
    }

    #[test]
    fn bad_schedules_name_themselves() {
        let bad = |cron: &str, tz: &str, action: &str, target: &str| {
            Schedule::parse(&ScheduleSettings {
                name: "broken".into(),
                cron: cron.into(),
                timezone: tz.into(),
                action: action.into(),
                target: target.into(),
                options: serde_json::Value::Null,
            })
            .unwrap_err()
            .to_string()
        };
        assert!(bad("61 * * * *", "UTC", "backup", "all").contains("schedule `broken`: cron"));
        assert!(bad("0 * * * *", "Mars/Olympus", "backup", "all").contains("time zone"));
        assert!(bad("0 * * * *", "UTC", "explode", "all").contains("unknown action"));
        assert!(bad("0 * * * *", "UTC", "backup", "mysql").contains("unknown target"));
        assert!(bad("0 * * * *", "UTC", "restore", "all").contains("one target"));
    }

    #[test]
    fn next_fire_groups_schedules_due_together() {
        let hourly = schedule("0 * * * *", "UTC");
        let mut daily = schedule("0 3 * * *", "UTC");
        daily.name = "daily".into();
        let all = [hourly, daily];
        let (fire, due) = next_fire(&all, utc(2026, 11, 26, 2, 10, 0)).unwrap();
        assert_eq!(fire, utc(2026, 11, 26, 3, 0, 0));
        assert_eq!(due.len(), 2);
        let (fire, due) = next_fire(&all, utc(2026, 11, 26, 3, 0, 0)).unwrap();
        assert_eq!(fire, utc(2026, 11, 26, 4, 0, 0));
        assert_eq!(due.len(), 1);
    }
}
