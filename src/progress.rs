//! How far running operations have got: the bytes the pipeline has moved for each target
//! (raw bytes read for a backup, stored bytes downloaded for a restore, verify or drill).
//!
//! The pipeline adds to one counter per target; an operation remembers the counter at its
//! start and reports the difference. One step per target runs at a time (the worker's lease,
//! the CLI's one operation), so a target's counter moves for one operation only. Who shows
//! it: the CLI as a progress bar on a terminal, or a log line now and then; the worker as a
//! log line and the `crm_backup_step_bytes_done` gauge.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::model::{Action, TargetKind};

static MOVED: [AtomicU64; TargetKind::ALL.len()] =
    [const { AtomicU64::new(0) }; TargetKind::ALL.len()];

fn counter(target: TargetKind) -> &'static AtomicU64 {
    let index = TargetKind::ALL
        .iter()
        .position(|t| *t == target)
        .unwrap_or_default();
    &MOVED[index]
}

/// Where the bytes of one artifact are counted: its target's counter, found once from the
/// key, not for every chunk.
#[derive(Debug, Clone, Copy)]
pub struct Meter(Option<&'static AtomicU64>);

impl Meter {
    /// The meter of the artifact stored at `key` (`<target>/<backup id>/…`); a key that
    /// names no target counts nowhere.
    pub fn of_key(key: &str) -> Self {
        Meter(
            key.split('/')
                .next()
                .and_then(|target| target.parse().ok())
                .map(counter),
        )
    }

    /// Counts `bytes` moved.
    pub fn add(self, bytes: usize) {
        if let Some(counter) = self.0 {
            counter.fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }
}

/// One operation's progress, from its start.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub action: Action,
    pub target: TargetKind,
    /// What the operation is expected to move (a backup: the previous one's raw size).
    pub expected: Option<u64>,
    base: u64,
    started: Instant,
}

impl Tracker {
    pub fn start(action: Action, target: TargetKind, expected: Option<u64>) -> Self {
        Tracker {
            action,
            target,
            expected,
            base: counter(target).load(Ordering::Relaxed),
            started: Instant::now(),
        }
    }

    /// Bytes moved since the start.
    pub fn done(&self) -> u64 {
        counter(self.target)
            .load(Ordering::Relaxed)
            .saturating_sub(self.base)
    }

    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// One line: what, how much, how fast, and when it should end.
    pub fn line(&self) -> String {
        let done = self.done();
        let elapsed = self.elapsed();
        let mut line = format!(
            "{} {}: {} in {}s, {}/s",
            self.action,
            self.target,
            human(done),
            elapsed.as_secs(),
            human(rate(done, elapsed))
        );
        if let Some(expected) = self.expected {
            line.push_str(&format!(" (about {} expected", human(expected)));
            match eta(done, expected, elapsed) {
                Some(left) => line.push_str(&format!(", {}s left)", left.as_secs())),
                None => line.push(')'),
            }
        }
        line
    }
}

/// Bytes per second.
pub fn rate(done: u64, elapsed: Duration) -> u64 {
    let seconds = elapsed.as_secs_f64();
    if seconds <= 0.0 {
        return 0;
    }
    (done as f64 / seconds) as u64
}

/// Time left at the rate so far, when anything has moved and less than `expected` has.
pub fn eta(done: u64, expected: u64, elapsed: Duration) -> Option<Duration> {
    if done == 0 || done >= expected {
        return None;
    }
    let per_byte = elapsed.as_secs_f64() / done as f64;
    Some(Duration::from_secs_f64(per_byte * (expected - done) as f64))
}

/// `1.5 GiB`-style sizes.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Calls `report` every `every` until stopped or dropped.
pub struct Ticker(tokio_util::task::AbortOnDropHandle<()>);

impl Ticker {
    pub fn start(
        tracker: Tracker,
        every: Duration,
        report: impl Fn(&Tracker) + Send + 'static,
    ) -> Self {
        Ticker(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
            async move {
                let mut interval = tokio::time::interval(every);
                interval.tick().await;
                loop {
                    interval.tick().await;
                    report(&tracker);
                }
            },
        )))
    }

    /// Stops, and returns once no report runs any more (dropping only asks it to stop: a
    /// report running on another thread may still end after the drop).
    pub async fn stop(mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

/// The log line of a running operation (target `progress`, shown at every log level).
pub fn log(tracker: &Tracker) {
    tracing::info!(
        target: "progress",
        action = %tracker.action,
        target_name = %tracker.target,
        bytes_done = tracker.done(),
        "{}",
        tracker.line()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_counted_per_target_from_the_trackers_start() {
        let consul = Meter::of_key("consul/20260101T000000Z-consul-abcd/kv.json.zst");
        consul.add(10);
        let tracker = Tracker::start(Action::Backup, TargetKind::Consul, Some(100));
        consul.add(25);
        Meter::of_key("redis/20260101T000000Z-redis-abcd/dump.rdb.zst").add(1000);
        Meter::of_key("not-a-target/x").add(1000);
        assert_eq!(tracker.done(), 25);
        assert!(
            tracker.line().starts_with("backup consul: 25 B in "),
            "{}",
            tracker.line()
        );
        assert!(
            tracker.line().contains("about 100 B expected"),
            "{}",
            tracker.line()
        );
    }

    #[test]
    fn time_left_follows_the_rate_so_far() {
        let ten = Duration::from_secs(10);
        assert_eq!(eta(25, 100, ten), Some(Duration::from_secs(30)));
        assert_eq!(eta(0, 100, ten), None);
        assert_eq!(eta(100, 100, ten), None);
        assert_eq!(eta(150, 100, ten), None);
        assert_eq!(rate(100, ten), 10);
        assert_eq!(rate(100, Duration::ZERO), 0);
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(3 * 1024 * 1024 * 1024), "3.0 GiB");
        assert_eq!(human(12), "12 B");
    }
}
