//! Retention: which backups to keep, as a pure function of (backups, policy, now).
//!
//! Grandfather-father-son with the semantics of `restic forget --keep-daily/weekly/monthly/
//! yearly`: walking one target's backups newest first, each rule keeps the newest backup of
//! each of its last `n` calendar units (UTC days, ISO weeks, months, years) *that have
//! backups*; `yearly = 0` keeps one per year forever. On top of the rules: everything newer
//! than `within_days`, anything with `retain_until` in the future, the newest backup of every
//! target, and the whole chain of every kept incremental backup. A backup kept for several
//! reasons lists them all; a backup no rule keeps is deleted.
//!
//! Only full backups count towards the calendar slots and "newest": a partial backup (a
//! PostgreSQL schema filter) never displaces a full one. Partial backups are kept for
//! `partial_days`, or by their `retain_until`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::Serialize;

use crate::model::TargetKind;

/// How many of each calendar unit to keep (DESIGN §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    /// `0` = one per year, forever.
    pub yearly: u32,
    /// Also keep everything newer than this many days (`0` = off).
    pub within_days: u32,
    /// Keep partial backups this many days.
    pub partial_days: u32,
}

/// What retention needs to know about one finished backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub id: String,
    pub target: TargetKind,
    pub time: DateTime<Utc>,
    pub retain_until: Option<DateTime<Utc>>,
    /// The backup an incremental backup builds on.
    pub parent: Option<String>,
    /// A backup of part of the source (it does not count towards the slots).
    pub partial: bool,
}

/// Why a backup is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "rule", content = "detail", rename_all = "snake_case")]
pub enum Reason {
    /// The newest backup of its target is never deleted.
    Newest,
    Daily(String),
    Weekly(String),
    Monthly(String),
    Yearly(String),
    /// Newer than `within_days`.
    Within(u32),
    /// Its `retain_until` is still in the future.
    RetainUntil(DateTime<Utc>),
    /// An incremental backup that is kept needs this one.
    ChainOf(String),
    /// A partial backup newer than `partial_days`.
    Partial(u32),
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::Newest => write!(f, "newest of its target"),
            Reason::Daily(day) => write!(f, "daily {day}"),
            Reason::Weekly(week) => write!(f, "weekly {week}"),
            Reason::Monthly(month) => write!(f, "monthly {month}"),
            Reason::Yearly(year) => write!(f, "yearly {year}"),
            Reason::Within(days) => write!(f, "within {days} days"),
            Reason::RetainUntil(until) => write!(f, "retain_until {}", until.to_rfc3339()),
            Reason::ChainOf(child) => write!(f, "parent of kept {child}"),
            Reason::Partial(days) => write!(f, "partial backup within {days} days"),
        }
    }
}

/// The plan for one backup: kept (with every reason) or deleted (no reasons).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: String,
    pub target: TargetKind,
    pub time: DateTime<Utc>,
    pub keep: bool,
    pub reasons: Vec<Reason>,
}

/// One calendar-unit rule: its name, how many units, and a backup's unit.
struct Rule {
    count: Option<u32>,
    bucket: fn(&DateTime<Utc>) -> String,
    reason: fn(String) -> Reason,
}

/// Decides every backup's fate; decisions come newest first within each target, targets
/// in their usual order.
pub fn plan(candidates: &[Candidate], policy: &Policy, now: DateTime<Utc>) -> Vec<Decision> {
    let mut by_target: BTreeMap<TargetKind, Vec<&Candidate>> = BTreeMap::new();
    for candidate in candidates {
        by_target
            .entry(candidate.target)
            .or_default()
            .push(candidate);
    }
    let mut decisions = Vec::with_capacity(candidates.len());
    for (_, mut backups) in by_target {
        backups.sort_by(|a, b| (b.time, &b.id).cmp(&(a.time, &a.id)));
        decisions.extend(plan_target(&backups, policy, now));
    }
    decisions
}

fn plan_target(backups: &[&Candidate], policy: &Policy, now: DateTime<Utc>) -> Vec<Decision> {
    let limited = |n: u32| Some(n);
    let rules = [
        Rule {
            count: limited(policy.daily),
            bucket: |t| t.format("%Y-%m-%d").to_string(),
            reason: Reason::Daily,
        },
        Rule {
            count: limited(policy.weekly),
            bucket: |t| {
                let week = t.iso_week();
                format!("{}-W{:02}", week.year(), week.week())
            },
            reason: Reason::Weekly,
        },
        Rule {
            count: limited(policy.monthly),
            bucket: |t| t.format("%Y-%m").to_string(),
            reason: Reason::Monthly,
        },
        Rule {
            count: (policy.yearly > 0).then_some(policy.yearly),
            bucket: |t| t.format("%Y").to_string(),
            reason: Reason::Yearly,
        },
    ];
    let within = (policy.within_days > 0).then(|| now - Duration::days(policy.within_days.into()));
    let mut decisions: Vec<Decision> = backups
        .iter()
        .map(|b| Decision {
            id: b.id.clone(),
            target: b.target,
            time: b.time,
            keep: false,
            reasons: Vec::new(),
        })
        .collect();
    for rule in &rules {
        let mut left = rule.count;
        let mut last: Option<String> = None;
        for (decision, _) in decisions
            .iter_mut()
            .zip(backups)
            .filter(|(_, backup)| !backup.partial)
        {
            if left == Some(0) {
                break;
            }
            let bucket = (rule.bucket)(&decision.time);
            if last.as_ref() != Some(&bucket) {
                last = Some(bucket.clone());
                decision.reasons.push((rule.reason)(bucket));
                left = left.map(|n| n - 1);
            }
        }
    }
    let partial_limit = now - Duration::days(policy.partial_days.into());
    for (decision, backup) in decisions.iter_mut().zip(backups) {
        if let Some(limit) = within
            && backup.time > limit
        {
            decision.reasons.push(Reason::Within(policy.within_days));
        }
        if backup.partial && backup.time > partial_limit {
            decision.reasons.push(Reason::Partial(policy.partial_days));
        }
        if let Some(until) = backup.retain_until
            && until > now
        {
            decision.reasons.push(Reason::RetainUntil(until));
        }
    }
    // The newest full backup; a target with only partial ones keeps its newest.
    let newest = backups
        .iter()
        .position(|backup| !backup.partial)
        .or((!backups.is_empty()).then_some(0));
    if let Some(newest) = newest {
        decisions[newest].reasons.insert(0, Reason::Newest);
    }
    keep_chains(&mut decisions, backups);
    for decision in &mut decisions {
        decision.keep = !decision.reasons.is_empty();
    }
    decisions
}

/// A kept incremental backup keeps every ancestor back to its full backup.
fn keep_chains(decisions: &mut [Decision], backups: &[&Candidate]) {
    let position: HashMap<&str, usize> = backups
        .iter()
        .enumerate()
        .map(|(i, b)| (b.id.as_str(), i))
        .collect();
    // Newest first: a child is always visited before its parent, so chains propagate.
    for child in 0..backups.len() {
        if decisions[child].reasons.is_empty() {
            continue;
        }
        let Some(parent) = backups[child].parent.as_deref() else {
            continue;
        };
        if let Some(&p) = position.get(parent) {
            let reason = Reason::ChainOf(backups[child].id.clone());
            if !decisions[p].reasons.contains(&reason) {
                decisions[p].reasons.push(reason);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
    }

    fn backup(id: &str, time: DateTime<Utc>) -> Candidate {
        Candidate {
            id: id.into(),
            target: TargetKind::Postgres,
            time,
            retain_until: None,
            parent: None,
            partial: false,
        }
    }

    fn policy(daily: u32, weekly: u32, monthly: u32, yearly: u32) -> Policy {
        Policy {
            daily,
            weekly,
            monthly,
            yearly,
            within_days: 0,
            partial_days: 7,
        }
    }

    fn kept(decisions: &[Decision]) -> Vec<&str> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| d.id.as_str())
            .collect()
    }

    fn reasons<'a>(decisions: &'a [Decision], id: &str) -> &'a [Reason] {
        &decisions.iter().find(|d| d.id == id).unwrap().reasons
    }

    /// Nightly backups (02:00) plus a second one at 14:00 every day, for 70 days.
    fn twice_daily(days: u32) -> Vec<Candidate> {
        let start = at(2026, 9, 1, 0);
        (0..days)
            .flat_map(|d| {
                let day = start + Duration::days(d.into());
                [
                    backup(&format!("d{d:02}-a"), day + Duration::hours(2)),
                    backup(&format!("d{d:02}-b"), day + Duration::hours(14)),
                ]
            })
            .collect()
    }

    #[test]
    fn daily_keeps_the_newest_of_each_of_the_last_days_with_backups() {
        let backups = twice_daily(10);
        let decisions = plan(&backups, &policy(3, 0, 0, 1), at(2026, 9, 20, 0));
        // Newest first; the yearly rule also keeps the newest (same backup as daily 1).
        assert_eq!(kept(&decisions), vec!["d09-b", "d08-b", "d07-b"]);
        assert_eq!(
            reasons(&decisions, "d09-b"),
            &[
                Reason::Newest,
                Reason::Daily("2026-09-10".into()),
                Reason::Yearly("2026".into())
            ]
        );
        assert_eq!(decisions.len(), 20);
        assert!(
            decisions
                .iter()
                .filter(|d| !d.keep)
                .all(|d| d.reasons.is_empty())
        );
    }

    #[test]
    fn days_without_backups_do_not_use_up_the_daily_count() {
        // Backups on the 1st, 5th and 9th only: "last 3 days that have backups".
        let backups = vec![
            backup("a", at(2026, 3, 1, 2)),
            backup("b", at(2026, 3, 5, 2)),
            backup("c", at(2026, 3, 9, 2)),
        ];
        let decisions = plan(&backups, &policy(3, 0, 0, 1), at(2026, 3, 30, 0));
        assert_eq!(kept(&decisions), vec!["c", "b", "a"]);
    }

    #[test]
    fn weekly_monthly_and_yearly_use_iso_weeks_calendar_months_and_years() {
        let backups = twice_daily(70); // 2026-09-01 .. 2026-11-09
        let decisions = plan(&backups, &policy(2, 3, 2, 1), at(2026, 11, 10, 0));
        // 2026-11-09 is a Monday: ISO week 46 starts that day.
        assert_eq!(
            reasons(&decisions, "d69-b"),
            &[
                Reason::Newest,
                Reason::Daily("2026-11-09".into()),
                Reason::Weekly("2026-W46".into()),
                Reason::Monthly("2026-11".into()),
                Reason::Yearly("2026".into()),
            ]
        );
        assert_eq!(
            reasons(&decisions, "d68-b"),
            &[
                Reason::Daily("2026-11-08".into()),
                Reason::Weekly("2026-W45".into())
            ]
        );
        // The third week is W44, whose newest backup is Sunday 2026-11-01; the second month
        // is October, whose newest backup is 2026-10-31.
        assert_eq!(
            reasons(&decisions, "d61-b"),
            &[Reason::Weekly("2026-W44".into())]
        );
        assert_eq!(
            reasons(&decisions, "d60-b"),
            &[Reason::Monthly("2026-10".into())]
        );
        assert_eq!(kept(&decisions), vec!["d69-b", "d68-b", "d61-b", "d60-b"]);
    }

    #[test]
    fn yearly_zero_keeps_one_per_year_forever() {
        let backups: Vec<_> = (2015..2027)
            .map(|y| backup(&format!("y{y}"), at(y, 6, 1, 2)))
            .collect();
        let decisions = plan(&backups, &policy(0, 0, 0, 0), at(2026, 12, 1, 0));
        assert_eq!(decisions.iter().filter(|d| d.keep).count(), 12);
        let limited = plan(&backups, &policy(0, 0, 0, 3), at(2026, 12, 1, 0));
        assert_eq!(kept(&limited), vec!["y2026", "y2025", "y2024"]);
    }

    #[test]
    fn the_newest_backup_is_kept_even_when_no_rule_would() {
        let backups = vec![
            backup("old", at(2020, 1, 1, 2)),
            backup("older", at(2019, 1, 1, 2)),
        ];
        let decisions = plan(&backups, &policy(0, 0, 0, 1), at(2026, 1, 1, 0));
        assert_eq!(kept(&decisions), vec!["old"]);
        assert_eq!(
            reasons(&decisions, "old"),
            &[Reason::Newest, Reason::Yearly("2020".into())]
        );
    }

    #[test]
    fn within_days_keeps_everything_recent() {
        let backups = twice_daily(10); // last one 2026-09-10 14:00
        let decisions = Policy {
            within_days: 2,
            ..policy(1, 0, 0, 1)
        };
        let decisions = plan(&backups, &decisions, at(2026, 9, 11, 0));
        // Newer than 2026-09-09 00:00: the 9th and the 10th, both backups of each.
        assert_eq!(kept(&decisions), vec!["d09-b", "d09-a", "d08-b", "d08-a"]);
        assert!(reasons(&decisions, "d08-a").contains(&Reason::Within(2)));
    }

    #[test]
    fn retain_until_in_the_future_keeps_and_in_the_past_does_not() {
        let now = at(2026, 6, 1, 0);
        let mut before_migration = backup("pre-migration", at(2026, 1, 10, 2));
        before_migration.retain_until = Some(at(2026, 12, 31, 0));
        let mut expired = backup("expired", at(2026, 1, 5, 2));
        expired.retain_until = Some(at(2026, 3, 1, 0));
        let backups = vec![
            expired,
            before_migration,
            backup("latest", at(2026, 5, 31, 2)),
        ];
        let decisions = plan(&backups, &policy(1, 0, 0, 1), now);
        assert_eq!(kept(&decisions), vec!["latest", "pre-migration"]);
        assert_eq!(
            reasons(&decisions, "pre-migration"),
            &[Reason::RetainUntil(at(2026, 12, 31, 0))]
        );
    }

    #[test]
    fn a_kept_incremental_backup_keeps_its_whole_chain() {
        let mut full = backup("full", at(2026, 1, 1, 2));
        full.target = TargetKind::Documents;
        let mut inc1 = backup("inc1", at(2026, 1, 2, 2));
        inc1.target = TargetKind::Documents;
        inc1.parent = Some("full".into());
        let mut inc2 = backup("inc2", at(2026, 1, 3, 2));
        inc2.target = TargetKind::Documents;
        inc2.parent = Some("inc1".into());
        let mut other = backup("unrelated-full", at(2025, 12, 1, 2));
        other.target = TargetKind::Documents;
        let decisions = plan(
            &[full, inc1, inc2, other],
            &policy(1, 0, 0, 1),
            at(2026, 2, 1, 0),
        );
        assert_eq!(kept(&decisions), vec!["inc2", "inc1", "full"]);
        assert_eq!(
            reasons(&decisions, "inc1"),
            &[Reason::ChainOf("inc2".into())]
        );
        assert_eq!(
            reasons(&decisions, "full"),
            &[Reason::ChainOf("inc1".into())]
        );
    }

    #[test]
    fn each_target_is_planned_on_its_own() {
        let mut redis = backup("redis-old", at(2020, 1, 1, 2));
        redis.target = TargetKind::Redis;
        let backups = vec![
            backup("pg-1", at(2026, 1, 1, 2)),
            backup("pg-2", at(2026, 1, 2, 2)),
            redis,
        ];
        let decisions = plan(&backups, &policy(1, 0, 0, 1), at(2026, 2, 1, 0));
        // The only Redis backup is its target's newest, however old.
        assert_eq!(kept(&decisions), vec!["pg-2", "redis-old"]);
    }

    #[test]
    fn an_empty_catalog_plans_nothing() {
        assert!(plan(&[], &policy(7, 4, 12, 0), at(2026, 1, 1, 0)).is_empty());
    }

    #[test]
    fn partial_backups_never_displace_full_ones() {
        let now = at(2026, 11, 30, 12);
        // A full nightly every day at 02:00, a partial (one schema) every day at 23:00: the
        // partial one is each day's newest.
        let mut backups = Vec::new();
        for day in 1..=30 {
            backups.push(backup(&format!("full-{day:02}"), at(2026, 11, day, 2)));
            let mut partial = backup(&format!("part-{day:02}"), at(2026, 11, day, 23));
            partial.partial = true;
            backups.push(partial);
        }
        let decisions = plan(&backups, &policy(7, 4, 12, 0), now);
        let kept = kept(&decisions);
        // Every day's full backup the daily rule names is kept, and the newest of all.
        for day in 24..=30 {
            let id = format!("full-{day:02}");
            assert!(kept.contains(&id.as_str()), "{id} kept: {kept:?}");
        }
        assert_eq!(reasons(&decisions, "full-30")[0], Reason::Newest);
        assert!(reasons(&decisions, "full-30").contains(&Reason::Daily("2026-11-30".into())));
        // Partial backups are kept by their own rule only: the last 7 days.
        for day in 1..=30 {
            let id = format!("part-{day:02}");
            let expected = day >= 23; // 23:00 on the 23rd is within 7 days of the 30th, noon
            assert_eq!(kept.contains(&id.as_str()), expected, "{id}");
            if expected {
                assert_eq!(reasons(&decisions, &id), [Reason::Partial(7)]);
            }
        }
        // The same plan without the partial backups keeps the same full ones.
        let full: Vec<Candidate> = backups.iter().filter(|b| !b.partial).cloned().collect();
        let alone = plan(&full, &policy(7, 4, 12, 0), now);
        let full_kept: Vec<&str> = kept
            .iter()
            .copied()
            .filter(|id| id.starts_with("full"))
            .collect();
        assert_eq!(full_kept, super::tests::kept(&alone));
    }

    #[test]
    fn a_target_with_only_partial_backups_keeps_its_newest() {
        let now = at(2026, 11, 30, 12);
        let mut old = backup("part-old", at(2026, 1, 1, 2));
        old.partial = true;
        let decisions = plan(&[old], &policy(7, 4, 12, 0), now);
        assert_eq!(decisions[0].reasons, [Reason::Newest]);
    }
}
