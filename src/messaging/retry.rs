//! Retry policy: which delay tier a failed attempt goes to, or whether it is dead-lettered.
//!
//! Pure: the random jitter is a parameter, so every branch is table-tested.

use std::time::Duration;

use crate::config::{HumanDuration, MessagingSettings};

#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    pub delays: Vec<Duration>,
    pub max_attempts: u32,
    pub jitter: f64,
}

/// What happens to a command after attempt `attempt` ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish to retry tier `tier`; the message expires after `expiration` (≤ the tier's TTL).
    Retry {
        tier: usize,
        next_attempt: u32,
        expiration: Duration,
    },
    /// Give up: dead-letter.
    DeadLetter,
}

impl RetryPolicy {
    pub fn from_settings(settings: &MessagingSettings) -> Self {
        RetryPolicy {
            delays: settings.retry_delays.iter().map(|d| d.0).collect(),
            max_attempts: settings.max_attempts,
            jitter: settings.retry_jitter,
        }
    }

    /// After a failure of attempt `attempt` (1-based). `random` is uniform in [0, 1).
    pub fn after_failure(&self, attempt: u32, retryable: bool, random: f64) -> Decision {
        if !retryable || attempt >= self.max_attempts {
            return Decision::DeadLetter;
        }
        let tier = self.tier(attempt);
        Decision::Retry {
            tier,
            next_attempt: attempt + 1,
            expiration: self.jittered(tier, random),
        }
    }

    /// A target was busy: wait in the first tier; the attempt does not count.
    pub fn when_busy(&self, attempt: u32, random: f64) -> Decision {
        Decision::Retry {
            tier: 0,
            next_attempt: attempt,
            expiration: self.jittered(0, random),
        }
    }

    /// Attempt n waits `delays[n-1]`; past the last tier, the last delay repeats.
    fn tier(&self, attempt: u32) -> usize {
        (attempt.max(1) as usize - 1).min(self.delays.len() - 1)
    }

    /// Takes up to `jitter` of the delay off at random: the queue's TTL stays the
    /// upper bound, so a message never waits longer than its tier.
    fn jittered(&self, tier: usize, random: f64) -> Duration {
        let delay = self.delays[tier];
        let cut = delay.as_secs_f64() * self.jitter * random.clamp(0.0, 1.0);
        let expiration = delay.saturating_sub(Duration::from_secs_f64(cut));
        expiration.max(Duration::from_millis(1))
    }

    /// Name of the queue of tier `tier`, e.g. `backup.retry.30s`.
    pub fn queue_name(&self, prefix: &str, tier: usize) -> String {
        format!("{prefix}{}", HumanDuration(self.delays[tier]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            delays: [5, 30, 120, 600, 3600]
                .into_iter()
                .map(Duration::from_secs)
                .collect(),
            max_attempts: 6,
            jitter: 0.2,
        }
    }

    #[test]
    fn retryable_failures_climb_the_tiers_then_dead_letter() {
        let p = policy();
        let cases = [
            (1, Some((0, 2, 5))),
            (2, Some((1, 3, 30))),
            (3, Some((2, 4, 120))),
            (4, Some((3, 5, 600))),
            (5, Some((4, 6, 3600))),
            (6, None),
            (7, None),
        ];
        for (attempt, expected) in cases {
            let decision = p.after_failure(attempt, true, 0.0);
            match expected {
                Some((tier, next, secs)) => assert_eq!(
                    decision,
                    Decision::Retry {
                        tier,
                        next_attempt: next,
                        expiration: Duration::from_secs(secs)
                    },
                    "attempt {attempt}"
                ),
                None => assert_eq!(decision, Decision::DeadLetter, "attempt {attempt}"),
            }
        }
    }

    #[test]
    fn permanent_failures_are_never_retried() {
        for attempt in 1..=6 {
            assert_eq!(
                policy().after_failure(attempt, false, 0.5),
                Decision::DeadLetter
            );
        }
    }

    #[test]
    fn the_last_tier_repeats_when_attempts_outnumber_tiers() {
        let mut p = policy();
        p.max_attempts = 10;
        let Decision::Retry { tier, .. } = p.after_failure(8, true, 0.0) else {
            panic!("expected a retry");
        };
        assert_eq!(tier, 4);
    }

    #[test]
    fn jitter_shortens_but_never_lengthens() {
        let p = policy();
        let cases = [
            (0.0, 30_000),
            (0.5, 27_000),
            (0.999_999, 24_000),
            (7.0, 24_000),
        ];
        for (random, ms) in cases {
            let Decision::Retry { expiration, .. } = p.after_failure(2, true, random) else {
                panic!("expected a retry");
            };
            assert!(
                (expiration.as_millis() as i64 - ms).abs() <= 1,
                "random {random}: {expiration:?}"
            );
        }
    }

    #[test]
    fn busy_targets_wait_without_using_an_attempt() {
        assert_eq!(
            policy().when_busy(3, 0.0),
            Decision::Retry {
                tier: 0,
                next_attempt: 3,
                expiration: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn tier_queues_are_named_by_their_delay() {
        let p = policy();
        let names: Vec<String> = (0..5).map(|t| p.queue_name("backup.retry.", t)).collect();
        assert_eq!(
            names,
            [
                "backup.retry.5s",
                "backup.retry.30s",
                "backup.retry.2m",
                "backup.retry.10m",
                "backup.retry.1h"
            ]
        );
    }
}
