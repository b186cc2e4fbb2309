//! The worker's Prometheus metrics: counted in memory, rendered as the text exposition
//! format by a pure function. No metrics crate: a handful of counters and gauges.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `crm_backup_steps_total` | counter | action, target, outcome (`completed`, `failed`, `cancelled`) |
//! | `crm_backup_step_duration_seconds_sum` / `_count` | counter | action, target |
//! | `crm_backup_last_success_timestamp_seconds` | gauge | action, target |
//! | `crm_backup_last_stored_bytes` | gauge | target (the last backup's stored size) |
//! | `crm_backup_dead_lettered_total` | counter | reason (error kind) |
//! | `crm_backup_steps_running` | gauge | |
//! | `crm_backup_consuming` | gauge | 1 while consuming `backup.commands` |

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

/// `(action, target)` of a step, as the labels show them.
type StepKey = (String, String);

/// Everything the worker counts.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Snapshot {
    pub steps: BTreeMap<(String, String, &'static str), u64>,
    pub duration: BTreeMap<StepKey, (f64, u64)>,
    pub last_success: BTreeMap<StepKey, DateTime<Utc>>,
    pub last_stored_bytes: BTreeMap<String, u64>,
    pub dead_lettered: BTreeMap<String, u64>,
    pub running: i64,
    /// Set from the worker's state when rendering.
    pub consuming: bool,
}

/// Thread-safe counters, shared by the worker's steps and the HTTP endpoint.
#[derive(Debug, Default)]
pub struct Metrics(Mutex<Snapshot>);

impl Metrics {
    fn update(&self, change: impl FnOnce(&mut Snapshot)) {
        if let Ok(mut snapshot) = self.0.lock() {
            change(&mut snapshot);
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }

    pub fn step_started(&self) {
        self.update(|s| s.running += 1);
    }

    /// A step ended: `outcome` is `completed`, `failed` or `cancelled` (by a shutdown);
    /// `stored_bytes` for a completed backup.
    pub fn step_finished(
        &self,
        action: &str,
        target: &str,
        outcome: &'static str,
        elapsed: Duration,
        stored_bytes: Option<u64>,
    ) {
        let key = (action.to_string(), target.to_string());
        let completed = outcome == "completed";
        self.update(|s| {
            s.running -= 1;
            *s.steps
                .entry((key.0.clone(), key.1.clone(), outcome))
                .or_default() += 1;
            let duration = s.duration.entry(key.clone()).or_default();
            duration.0 += elapsed.as_secs_f64();
            duration.1 += 1;
            if completed {
                s.last_success.insert(key, Utc::now());
                if let (Some(bytes), "backup") = (stored_bytes, action) {
                    s.last_stored_bytes.insert(target.to_string(), bytes);
                }
            }
        });
    }

    /// Seeds a last-success time (at start, from the catalog), so that a restarted worker
    /// does not report "never" for backups taken before it started.
    pub fn seed_last_success(&self, action: &str, target: &str, at: DateTime<Utc>) {
        let key = (action.to_string(), target.to_string());
        self.update(|s| {
            let entry = s.last_success.entry(key).or_insert(at);
            *entry = (*entry).max(at);
        });
    }

    pub fn dead_lettered(&self, reason: &str) {
        self.update(|s| *s.dead_lettered.entry(reason.to_string()).or_default() += 1);
    }
}

/// Prometheus text exposition (version 0.0.4) of a snapshot.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let step = |action: &str, target: &str| {
        format!("action=\"{}\",target=\"{}\"", label(action), label(target))
    };
    family(
        &mut out,
        "crm_backup_steps_total",
        "counter",
        "Steps run, by action, target and outcome.",
        s.steps.iter().map(|((action, target, outcome), n)| {
            format!("{{{},outcome=\"{outcome}\"}} {n}", step(action, target))
        }),
    );
    family(
        &mut out,
        "crm_backup_step_duration_seconds",
        "summary",
        "Time spent in steps, by action and target.",
        s.duration
            .iter()
            .flat_map(|((action, target), (sum, count))| {
                let labels = step(action, target);
                [
                    format!("_sum{{{labels}}} {sum}"),
                    format!("_count{{{labels}}} {count}"),
                ]
            }),
    );
    family(
        &mut out,
        "crm_backup_last_success_timestamp_seconds",
        "gauge",
        "Unix time of the last completed step, by action and target.",
        s.last_success.iter().map(|((action, target), at)| {
            format!("{{{}}} {}", step(action, target), at.timestamp())
        }),
    );
    family(
        &mut out,
        "crm_backup_last_stored_bytes",
        "gauge",
        "Stored size of the last completed backup, by target.",
        s.last_stored_bytes
            .iter()
            .map(|(target, bytes)| format!("{{target=\"{}\"}} {bytes}", label(target))),
    );
    family(
        &mut out,
        "crm_backup_dead_lettered_total",
        "counter",
        "Commands dead-lettered, by error kind.",
        s.dead_lettered
            .iter()
            .map(|(reason, n)| format!("{{reason=\"{}\"}} {n}", label(reason))),
    );
    family(
        &mut out,
        "crm_backup_steps_running",
        "gauge",
        "Steps running now.",
        [format!(" {}", s.running)],
    );
    family(
        &mut out,
        "crm_backup_consuming",
        "gauge",
        "1 while the worker consumes backup.commands.",
        [format!(" {}", u8::from(s.consuming))],
    );
    out
}

/// One metric family: its HELP and TYPE lines, then each sample (the text after the name).
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = String>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for sample in samples {
        let _ = writeln!(out, "{name}{sample}");
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_render_in_the_exposition_format() {
        let metrics = Metrics::default();
        metrics.step_started();
        metrics.step_finished(
            "backup",
            "postgres",
            "completed",
            Duration::from_millis(1500),
            Some(42),
        );
        metrics.step_started();
        metrics.step_finished(
            "backup",
            "postgres",
            "failed",
            Duration::from_millis(500),
            None,
        );
        metrics.step_started();
        metrics.dead_lettered("invalid_json");
        let mut snapshot = metrics.snapshot();
        snapshot.consuming = true;
        let text = render(&snapshot);
        for expected in [
            "# TYPE crm_backup_steps_total counter",
            "crm_backup_steps_total{action=\"backup\",target=\"postgres\",outcome=\"completed\"} 1",
            "crm_backup_steps_total{action=\"backup\",target=\"postgres\",outcome=\"failed\"} 1",
            "crm_backup_step_duration_seconds_sum{action=\"backup\",target=\"postgres\"} 2",
            "crm_backup_step_duration_seconds_count{action=\"backup\",target=\"postgres\"} 2",
            "crm_backup_last_stored_bytes{target=\"postgres\"} 42",
            "crm_backup_dead_lettered_total{reason=\"invalid_json\"} 1",
            "crm_backup_steps_running 1",
            "crm_backup_consuming 1",
        ] {
            assert!(
                text.lines().any(|l| l == expected),
                "{expected} missing in\n{text}"
            );
        }
        let success = text
            .lines()
            .find(|l| l.starts_with("crm_backup_last_success_timestamp_seconds{"))
            .unwrap();
        let at: i64 = success.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((Utc::now().timestamp() - at).abs() < 5);
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
