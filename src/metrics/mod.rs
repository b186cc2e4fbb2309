//! The worker's state as the outside sees it: whether it consumes, and its Prometheus metrics.
//!
//! Metrics are recorded with the `metrics` crate into a recorder of this worker's own (not the
//! process-wide one, so that several workers in one process, as in the tests, keep theirs
//! apart) and rendered by `metrics-exporter-prometheus`.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `crm_backup_steps_total` | counter | action, target, outcome (`completed`, `failed`, `cancelled`) |
//! | `crm_backup_step_duration_seconds` | histogram | action, target |
//! | `crm_backup_last_success_timestamp_seconds` | gauge | action, target |
//! | `crm_backup_last_duration_seconds` | gauge | action, target (of the last success) |
//! | `crm_backup_last_raw_bytes` | gauge | target (the last backup's raw size) |
//! | `crm_backup_last_stored_bytes` | gauge | target (the last backup's stored size) |
//! | `crm_backup_storage_bytes` | gauge | target (everything stored under the target) |
//! | `crm_backup_storage_capacity_bytes`, `crm_backup_storage_free_bytes` | gauge | (the local directory's file system, or the bucket's `storage.quota_bytes`) |
//! | `crm_backup_last_backup_warning` | gauge | target, warning (`size_drop`, `size_jump`): 1 when the last backup has it |
//! | `crm_backup_dead_lettered_total` | counter | reason (error kind) |
//! | `crm_backup_dead_letters` | gauge | (letters waiting in the dead-letter queue) |
//! | `crm_backup_commands_waiting` | gauge | target (commands waiting for their busy target) |
//! | `crm_backup_steps_running` | gauge | |
//! | `crm_backup_step_bytes_done` | gauge | action, target (bytes the running step has moved; 0 once it ends) |
//! | `crm_backup_consuming` | gauge | 1 while consuming `backup.commands` |
//! | `crm_backup_build_info` | gauge | version (always 1) |
//!
//! The last-success, duration and size gauges come from storage too (`from_storage`): what a
//! CLI run or another worker did shows here, and a restart forgets nothing.

pub mod from_storage;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use metrics::{Key, Label, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

const STEPS: &str = "crm_backup_steps_total";
const STEP_DURATION: &str = "crm_backup_step_duration_seconds";
const LAST_SUCCESS: &str = "crm_backup_last_success_timestamp_seconds";
const LAST_DURATION: &str = "crm_backup_last_duration_seconds";
const LAST_RAW_BYTES: &str = "crm_backup_last_raw_bytes";
const LAST_STORED_BYTES: &str = "crm_backup_last_stored_bytes";
const STORAGE_BYTES: &str = "crm_backup_storage_bytes";
const STORAGE_CAPACITY: &str = "crm_backup_storage_capacity_bytes";
const STORAGE_FREE: &str = "crm_backup_storage_free_bytes";
const LAST_WARNING: &str = "crm_backup_last_backup_warning";
const DEAD_LETTERED: &str = "crm_backup_dead_lettered_total";
const DEAD_LETTERS: &str = "crm_backup_dead_letters";
const WAITING: &str = "crm_backup_commands_waiting";
const BUILD_INFO: &str = "crm_backup_build_info";
const RUNNING: &str = "crm_backup_steps_running";
const STEP_BYTES: &str = "crm_backup_step_bytes_done";
const CONSUMING: &str = "crm_backup_consuming";

/// Step durations span a verify of a small artifact to a many-hour backup.
const DURATION_BUCKETS: [f64; 10] = [
    1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14_400.0, 43_200.0,
];

static METADATA: Metadata<'static> =
    Metadata::new(module_path!(), metrics::Level::INFO, Some(module_path!()));

/// What the worker's HTTP endpoint shows: readiness and metrics.
pub struct WorkerState {
    /// True while consuming from the broker.
    pub consuming: AtomicBool,
    pub metrics: Arc<Metrics>,
}

impl Default for WorkerState {
    fn default() -> Self {
        WorkerState {
            consuming: AtomicBool::new(false),
            metrics: Arc::new(Metrics::new()),
        }
    }
}

impl WorkerState {
    pub fn is_consuming(&self) -> bool {
        self.consuming.load(Ordering::SeqCst)
    }

    /// The Prometheus text exposition of the metrics, readiness included.
    pub fn render(&self) -> String {
        self.metrics
            .gauge(CONSUMING, Vec::new())
            .set(f64::from(u8::from(self.is_consuming())));
        self.metrics.handle.render()
    }
}

/// What the metrics show of a completed backup.
#[derive(Debug, Clone, Default)]
pub struct BackupFacts {
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    /// Size-check warnings (`size_drop`, `size_jump`).
    pub warnings: Vec<String>,
}

/// The worker's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Last success per (action, target): a seed from storage never moves it backwards.
    last_success: Mutex<BTreeMap<(String, String), DateTime<Utc>>>,
    /// When the last backup's sizes were recorded, per target.
    last_sizes: Mutex<BTreeMap<String, DateTime<Utc>>>,
}

impl Metrics {
    pub fn new() -> Self {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full(STEP_DURATION.into()), &DURATION_BUCKETS)
            .map(PrometheusBuilder::build_recorder)
            // Only empty bucket lists are refused; these are constant and not empty.
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
        let describe = [
            (
                STEPS,
                Unit::Count,
                "Steps run, by action, target and outcome.",
            ),
            (
                STEP_DURATION,
                Unit::Seconds,
                "Time spent in steps, by action and target.",
            ),
            (
                LAST_SUCCESS,
                Unit::Seconds,
                "Unix time of the last completed step, by action and target.",
            ),
            (
                LAST_DURATION,
                Unit::Seconds,
                "How long the last completed step took, by action and target.",
            ),
            (
                LAST_RAW_BYTES,
                Unit::Bytes,
                "Raw size of the last completed backup, by target.",
            ),
            (
                LAST_STORED_BYTES,
                Unit::Bytes,
                "Stored size of the last completed backup, by target.",
            ),
            (
                STORAGE_BYTES,
                Unit::Bytes,
                "Bytes stored under each target in storage (every backup kept).",
            ),
            (
                STORAGE_CAPACITY,
                Unit::Bytes,
                "Size of the storage: the local directory's file system, or the bucket's quota.",
            ),
            (
                STORAGE_FREE,
                Unit::Bytes,
                "Free bytes in the storage (local file system, or quota minus what is stored).",
            ),
            (
                LAST_WARNING,
                Unit::Count,
                "1 when the last backup of the target has the size-check warning.",
            ),
            (
                DEAD_LETTERS,
                Unit::Count,
                "Commands waiting in the dead-letter queue.",
            ),
            (
                WAITING,
                Unit::Count,
                "Commands waiting for their target, busy with another step.",
            ),
            (
                BUILD_INFO,
                Unit::Count,
                "Always 1; the version of crm-backup in its label.",
            ),
            (
                DEAD_LETTERED,
                Unit::Count,
                "Commands dead-lettered, by error kind.",
            ),
            (RUNNING, Unit::Count, "Steps running now."),
            (
                STEP_BYTES,
                Unit::Bytes,
                "Bytes a running step has moved so far (0 once it ends).",
            ),
            (
                CONSUMING,
                Unit::Count,
                "1 while the worker consumes backup.commands.",
            ),
        ];
        for (name, unit, help) in describe {
            match name {
                STEPS | DEAD_LETTERED => {
                    recorder.describe_counter(name.into(), Some(unit), help.into())
                }
                STEP_DURATION => recorder.describe_histogram(name.into(), Some(unit), help.into()),
                _ => recorder.describe_gauge(name.into(), Some(unit), help.into()),
            }
        }
        let handle = recorder.handle();
        let metrics = Metrics {
            recorder,
            handle,
            last_success: Mutex::new(BTreeMap::new()),
            last_sizes: Mutex::new(BTreeMap::new()),
        };
        // Present from the start, at zero, so that dashboards and rules see them.
        metrics.gauge(RUNNING, Vec::new()).set(0.0);
        metrics.gauge(CONSUMING, Vec::new()).set(0.0);
        metrics
            .gauge(
                BUILD_INFO,
                vec![Label::new("version", env!("CARGO_PKG_VERSION"))],
            )
            .set(1.0);
        metrics
    }

    pub fn step_started(&self) {
        self.gauge(RUNNING, Vec::new()).increment(1.0);
    }

    /// A step ended: `outcome` is `completed`, `failed` or `cancelled` (by a shutdown);
    /// `backup` for a completed backup.
    pub fn step_finished(
        &self,
        action: &str,
        target: &str,
        outcome: &'static str,
        elapsed: Duration,
        backup: Option<&BackupFacts>,
    ) {
        self.gauge(RUNNING, Vec::new()).decrement(1.0);
        let step = step_labels(action, target);
        let mut with_outcome = step.clone();
        with_outcome.push(Label::new("outcome", outcome));
        self.counter(STEPS, with_outcome).increment(1);
        self.histogram(STEP_DURATION, step)
            .record(elapsed.as_secs_f64());
        if outcome == "completed" {
            let now = Utc::now();
            self.seed_success(action, target, now, Some(elapsed));
            if let (Some(backup), "backup") = (backup, action) {
                self.seed_backup(target, now, backup);
            }
        }
    }

    /// Records a success at `at` (and how long it took) unless a later one is known: from
    /// the worker's own steps, and from storage (manifests, audit records), so that a
    /// restarted worker does not report "never" for what happened before it.
    pub fn seed_success(
        &self,
        action: &str,
        target: &str,
        at: DateTime<Utc>,
        took: Option<Duration>,
    ) {
        if !is_newest(
            &self.last_success,
            (action.to_string(), target.to_string()),
            at,
        ) {
            return;
        }
        self.gauge(LAST_SUCCESS, step_labels(action, target))
            .set(at.timestamp() as f64);
        if let Some(took) = took {
            self.gauge(LAST_DURATION, step_labels(action, target))
                .set(took.as_secs_f64());
        }
    }

    /// The last backup of `target`, finished at `at`, unless a later one is known.
    pub fn seed_backup(&self, target: &str, at: DateTime<Utc>, backup: &BackupFacts) {
        if !is_newest(&self.last_sizes, target.to_string(), at) {
            return;
        }
        let labels = || vec![Label::new("target", target.to_string())];
        self.gauge(LAST_RAW_BYTES, labels())
            .set(backup.raw_bytes as f64);
        self.gauge(LAST_STORED_BYTES, labels())
            .set(backup.stored_bytes as f64);
        for warning in [crate::size_check::SIZE_DROP, crate::size_check::SIZE_JUMP] {
            let mut labels = labels();
            labels.push(Label::new("warning", warning));
            let has = backup.warnings.iter().any(|w| w == warning);
            self.gauge(LAST_WARNING, labels)
                .set(f64::from(u8::from(has)));
        }
    }

    /// Bytes stored under `target` now.
    pub fn set_storage_bytes(&self, target: &str, bytes: u64) {
        self.gauge(
            STORAGE_BYTES,
            vec![Label::new("target", target.to_string())],
        )
        .set(bytes as f64);
    }

    /// The storage's size and free bytes now.
    pub fn set_storage_space(&self, capacity: u64, free: u64) {
        self.gauge(STORAGE_CAPACITY, Vec::new())
            .set(capacity as f64);
        self.gauge(STORAGE_FREE, Vec::new()).set(free as f64);
    }

    /// Bytes the running step of `action` on `target` has moved.
    pub fn set_step_bytes(&self, action: &str, target: &str, bytes: u64) {
        self.gauge(STEP_BYTES, step_labels(action, target))
            .set(bytes as f64);
    }

    /// Letters waiting in the dead-letter queue now.
    pub fn set_dead_letters(&self, letters: u32) {
        self.gauge(DEAD_LETTERS, Vec::new()).set(f64::from(letters));
    }

    /// Commands waiting for `target` now.
    pub fn set_waiting(&self, target: &str, commands: u32) {
        self.gauge(WAITING, vec![Label::new("target", target.to_string())])
            .set(f64::from(commands));
    }

    pub fn dead_lettered(&self, reason: &str) {
        self.counter(
            DEAD_LETTERED,
            vec![Label::new("reason", reason.to_string())],
        )
        .increment(1);
    }

    fn counter(&self, name: &'static str, labels: Vec<Label>) -> metrics::Counter {
        self.recorder
            .register_counter(&Key::from_parts(name, labels), &METADATA)
    }

    fn gauge(&self, name: &'static str, labels: Vec<Label>) -> metrics::Gauge {
        self.recorder
            .register_gauge(&Key::from_parts(name, labels), &METADATA)
    }

    fn histogram(&self, name: &'static str, labels: Vec<Label>) -> metrics::Histogram {
        self.recorder
            .register_histogram(&Key::from_parts(name, labels), &METADATA)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Records `at` for `key` when nothing later is known; whether it did.
fn is_newest<K: Ord>(known: &Mutex<BTreeMap<K, DateTime<Utc>>>, key: K, at: DateTime<Utc>) -> bool {
    let Ok(mut known) = known.lock() else {
        return false;
    };
    let latest = known.entry(key).or_insert(at);
    if at < *latest {
        return false;
    }
    *latest = at;
    true
}

fn step_labels(action: &str, target: &str) -> Vec<Label> {
    vec![
        Label::new("action", action.to_string()),
        Label::new("target", target.to_string()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_render_as_counters_histograms_and_gauges() {
        let state = WorkerState::default();
        let metrics = &state.metrics;
        metrics.step_started();
        metrics.step_finished(
            "backup",
            "postgres",
            "completed",
            Duration::from_millis(1500),
            Some(&BackupFacts {
                raw_bytes: 100,
                stored_bytes: 42,
                warnings: vec!["size_drop".into()],
            }),
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
        state.consuming.store(true, Ordering::SeqCst);
        let text = state.render();
        for expected in [
            "# TYPE crm_backup_steps_total counter",
            "crm_backup_steps_total{action=\"backup\",target=\"postgres\",outcome=\"completed\"} 1",
            "crm_backup_steps_total{action=\"backup\",target=\"postgres\",outcome=\"failed\"} 1",
            "# TYPE crm_backup_step_duration_seconds histogram",
            "crm_backup_step_duration_seconds_bucket{action=\"backup\",target=\"postgres\",le=\"1\"} 1",
            "crm_backup_step_duration_seconds_bucket{action=\"backup\",target=\"postgres\",le=\"5\"} 2",
            "crm_backup_step_duration_seconds_sum{action=\"backup\",target=\"postgres\"} 2",
            "crm_backup_step_duration_seconds_count{action=\"backup\",target=\"postgres\"} 2",
            "crm_backup_last_stored_bytes{target=\"postgres\"} 42",
            "crm_backup_last_raw_bytes{target=\"postgres\"} 100",
            "crm_backup_last_duration_seconds{action=\"backup\",target=\"postgres\"} 1.5",
            "crm_backup_build_info{version=\"0.1.0\"} 1",
            "crm_backup_last_backup_warning{target=\"postgres\",warning=\"size_drop\"} 1",
            "crm_backup_last_backup_warning{target=\"postgres\",warning=\"size_jump\"} 0",
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
        let at: f64 = success.rsplit(' ').next().unwrap().parse().unwrap();
        assert!((Utc::now().timestamp() as f64 - at).abs() < 5.0);
    }

    #[test]
    fn a_seed_never_moves_the_last_success_backwards() {
        let metrics = Metrics::new();
        let early = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let late = DateTime::from_timestamp(2_000_000, 0).unwrap();
        metrics.seed_success("drill", "redis", late, Some(Duration::from_secs(7)));
        metrics.seed_success("drill", "redis", early, Some(Duration::from_secs(9)));
        let text = metrics.handle.render();
        assert!(
            text.lines().any(|l| l
                == "crm_backup_last_success_timestamp_seconds{action=\"drill\",target=\"redis\"} 2000000"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l
                    == "crm_backup_last_duration_seconds{action=\"drill\",target=\"redis\"} 7"),
            "{text}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        let metrics = Metrics::new();
        metrics.dead_lettered("a\"b\\c\nd");
        let text = metrics.handle.render();
        assert!(text.contains(r#"reason="a\"b\\c\nd""#), "{text}");
    }
}
