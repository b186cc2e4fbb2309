//! A CLI operation's progress on stderr: a bar on a terminal (bytes, rate, and time left
//! from the expected size), otherwise a log line every `pipeline.progress_every`.

use std::io::IsTerminal;
use std::time::Duration;

use crm_backup::jobs::JobContext;
use crm_backup::model::{Action, TargetKind};
use crm_backup::progress::{self, Ticker, Tracker};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often the bar is redrawn.
const DRAW_EVERY: Duration = Duration::from_millis(200);

/// Progress being shown; [`Shown::finish`] draws the last state.
struct Shown {
    bar: Option<(ProgressBar, Tracker)>,
    ticker: Ticker,
}

/// Runs `work`, showing the progress of `action` on `target` (expected to move `expected`
/// bytes) until it ends.
pub async fn watched<T>(
    ctx: &JobContext,
    action: Action,
    target: TargetKind,
    expected: Option<u64>,
    work: impl Future<Output = T>,
) -> T {
    let shown = show(ctx, action, target, expected);
    let result = work.await;
    shown.finish().await;
    result
}

/// Starts showing the progress of `action` on `target`, expected to move `expected` bytes.
fn show(ctx: &JobContext, action: Action, target: TargetKind, expected: Option<u64>) -> Shown {
    let tracker = Tracker::start(action, target, expected);
    if !std::io::stderr().is_terminal() {
        let every = ctx.settings.pipeline.progress_every.0;
        return Shown {
            bar: None,
            ticker: Ticker::start(tracker, every, progress::log),
        };
    }
    let bar = ProgressBar::with_draw_target(expected, ProgressDrawTarget::stderr());
    let template = match expected {
        Some(_) => "{msg} [{bar:30}] {bytes} of ~{total_bytes}, {binary_bytes_per_sec}, {eta} left",
        None => "{msg} {spinner} {bytes}, {binary_bytes_per_sec}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(format!("{action} {target}"));
    let drawn = bar.clone();
    let ticker = Ticker::start(tracker.clone(), DRAW_EVERY, move |tracker| {
        update(&drawn, tracker);
    });
    Shown {
        bar: Some((bar, tracker)),
        ticker,
    }
}

fn update(bar: &ProgressBar, tracker: &Tracker) {
    let done = tracker.done();
    if let Some(length) = bar.length()
        && done > length
    {
        bar.set_length(done);
    }
    bar.set_position(done);
}

impl Shown {
    /// Stops the updates, then draws the final state (the bar stays on screen), or nothing
    /// for log lines.
    async fn finish(self) {
        self.ticker.stop().await;
        if let Some((bar, tracker)) = &self.bar {
            update(bar, tracker);
            bar.set_length(tracker.done());
            bar.finish();
        }
    }
}
