//! Supervision policy, apart from the engine that applies it: which
//! children a strategy restarts, which exits a restart type restarts, the
//! backoff between restarts, the intensity window, auto-shutdown. Pure
//! decisions, unit-tested here.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::lifecycle::ExitReason;

/// Which children a supervisor restarts when one of them is to be restarted
/// (OTP's strategies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Only the child that exited.
    #[default]
    OneForOne,
    /// Every child: the others are stopped (in reverse order), then all are
    /// started again in declaration order.
    OneForAll,
    /// The child that exited and every child declared after it: those are
    /// stopped (in reverse order), then started again in declaration order.
    RestForOne,
}

impl Strategy {
    /// Which children (by declaration index) are restarted when child
    /// `index` of `len` is to be restarted: the child itself and, by
    /// strategy, its siblings. Pure, so the policy is unit tested apart
    /// from the processes.
    pub(crate) fn affected(self, index: usize, len: usize) -> std::ops::Range<usize> {
        match self {
            Strategy::OneForOne => index..index + 1,
            Strategy::OneForAll => 0..len,
            Strategy::RestForOne => index..len,
        }
    }
}

/// When a supervisor ends by itself, normally, because its *significant*
/// children have ended (OTP's `auto_shutdown`).
///
/// A significant child ends for good when its restart type says it is not
/// restarted: a [`Restart::Transient`] child after exit code 0, a
/// [`Restart::Temporary`] child after any exit. A [`Restart::Permanent`]
/// child is always restarted, so it cannot be significant (the declaration
/// is refused).
///
/// - For a spawn's forks ([`Worker::fork_auto_shutdown`](crate::Worker::fork_auto_shutdown)):
///   the forks are the significant children; when the spawn's supervisor
///   ends, the spawn stops its other forks and exits with code 0.
/// - For the master ([`Cluster::auto_shutdown`](crate::Cluster::auto_shutdown)):
///   spawns marked [`Worker::significant`](crate::Worker::significant); the
///   master stops the rest of the tree and [`Cluster::run`](crate::Cluster::run)
///   returns `Ok`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoShutdown {
    /// Never: the supervisor runs until it is stopped or gives up, even
    /// with no child left running (OTP's default).
    #[default]
    Never,
    /// As soon as any significant child has ended for good.
    AnySignificant,
    /// Once every significant child has ended for good.
    AllSignificant,
}

impl AutoShutdown {
    /// Whether the supervisor ends now. `ended_significant`: the child that
    /// just exited is significant and is not restarted; `all_significant_down`:
    /// no significant child is running or waiting to restart any more.
    pub(crate) fn ends(self, ended_significant: bool, all_significant_down: bool) -> bool {
        match self {
            AutoShutdown::Never => false,
            AutoShutdown::AnySignificant => ended_significant,
            AutoShutdown::AllSignificant => ended_significant && all_significant_down,
        }
    }
}

/// When a child is restarted after it exits (OTP's restart types).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Restart {
    /// Always.
    #[default]
    Permanent,
    /// Only after an abnormal exit (non-zero code, a signal, a failed start).
    Transient,
    /// Never.
    Temporary,
}

impl Restart {
    /// Whether a child of this type is restarted after exiting for `reason`.
    pub fn applies_to(self, reason: &ExitReason) -> bool {
        match self {
            Restart::Permanent => true,
            Restart::Transient => !reason.is_normal(),
            Restart::Temporary => false,
        }
    }
}

/// The delay before each restart of a child: capped exponential, reset once
/// the child has run for a while (pm2's `exp_backoff_restart_delay`).
///
/// The first restart waits `initial`, each following one `factor` times
/// longer, never more than `max`. A child that ran `reset_after` or longer
/// before exiting starts over from `initial`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    factor: f64,
    reset_after: Duration,
}

impl Backoff {
    /// Starts at `initial`, grows 1.5 times per restart up to `max`, resets
    /// after 30 s of running.
    pub fn exponential(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            factor: 1.5,
            reset_after: Duration::from_secs(30),
        }
    }

    /// No delay: restart at once (OTP's behaviour).
    pub fn none() -> Self {
        Backoff::exponential(Duration::ZERO, Duration::ZERO)
    }

    /// Growth per restart (at least 1).
    pub fn factor(mut self, factor: f64) -> Self {
        self.factor = if factor.is_finite() { factor.max(1.0) } else { 1.0 };
        self
    }

    /// How long a child must run before its next restart waits `initial` again.
    pub fn reset_after(mut self, stable: Duration) -> Self {
        self.reset_after = stable;
        self
    }

    /// The delay after `previous` (None: the first restart, or after a reset).
    pub fn next(&self, previous: Option<Duration>) -> Duration {
        match previous {
            None => self.initial,
            Some(previous) => previous.mul_f64(self.factor).clamp(self.initial, self.max),
        }
    }

    /// The delay before the next restart of a child whose last delay was
    /// `previous` and that ran for `ran_for` (None: it never became ready)
    /// before exiting: it starts over from `initial` once it ran stably.
    pub(crate) fn after(&self, previous: Option<Duration>, ran_for: Option<Duration>) -> Duration {
        let stable = ran_for.is_some_and(|ran| ran >= self.reset_after);
        self.next(previous.filter(|_| !stable))
    }
}

impl Default for Backoff {
    /// 100 ms, growing 1.5 times per restart up to 15 s, reset after 30 s of running.
    fn default() -> Self {
        Backoff::exponential(Duration::from_millis(100), Duration::from_secs(15))
    }
}

/// How many restarts a supervisor allows in a period before it gives up:
/// stops its children and fails upward (OTP's intensity and period).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Intensity {
    /// At most this many restarts...
    pub max_restarts: u32,
    /// ...within this period.
    pub within: Duration,
}

/// When recent restarts happened, to tell when a limit ([`Intensity`]) is
/// passed: more than `max_restarts` within any period of `within`.
#[derive(Debug, Default)]
pub(crate) struct RestartWindow(VecDeque<Instant>);

impl RestartWindow {
    /// Records a restart at `now` and says whether it makes more than
    /// `limit.max_restarts` restarts within `limit.within`.
    pub fn exceeded(&mut self, now: Instant, limit: Intensity) -> bool {
        self.0.push_back(now);
        while self.0.front().is_some_and(|&at| now.duration_since(at) > limit.within) {
            self.0.pop_front();
        }
        self.0.len() > limit.max_restarts as usize
    }
}

impl Default for Intensity {
    /// 10 restarts within 60 s.
    fn default() -> Self {
        Intensity {
            max_restarts: 10,
            within: Duration::from_secs(60),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A small deterministic generator: the cases are the same every run.
    fn cases(seed: u64, count: usize) -> impl Iterator<Item = u64> {
        let mut state = seed;
        std::iter::repeat_with(move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        })
        .take(count)
    }

    #[test]
    fn backoff_grows_by_its_factor_up_to_its_cap() {
        let backoff = Backoff::exponential(100 * MS, 1000 * MS);
        let mut delay = None;
        let delays: Vec<u128> = (0..8)
            .map(|_| {
                let next = backoff.after(delay, None);
                delay = Some(next);
                next.as_millis()
            })
            .collect();
        assert_eq!(delays, [100, 150, 225, 337, 506, 759, 1000, 1000]);
        assert_eq!(Backoff::none().after(Some(5 * MS), None), Duration::ZERO);
    }

    #[test]
    fn backoff_starts_over_after_a_stable_run() {
        let backoff = Backoff::exponential(100 * MS, 15_000 * MS).reset_after(30_000 * MS);
        let grown = Some(2_000 * MS);
        assert_eq!(backoff.after(grown, Some(30_000 * MS)), 100 * MS);
        assert_eq!(backoff.after(grown, Some(29_999 * MS)), 3_000 * MS);
        // A failed start never ran: no reset.
        assert_eq!(backoff.after(grown, None), 3_000 * MS);
    }

    #[test]
    fn backoff_stays_between_initial_and_max_and_never_shrinks_while_failing() {
        for case in cases(0x5eed, 500) {
            let initial = Duration::from_millis(case % 500);
            let max = initial + Duration::from_millis((case >> 9) % 20_000);
            let factor = 1.05 + ((case >> 24) % 300) as f64 / 100.0;
            let backoff = Backoff::exponential(initial, max).factor(factor);
            let mut previous = None;
            for _ in 0..400 {
                let next = backoff.after(previous, Some(Duration::ZERO));
                assert!(initial <= next && next <= max, "{backoff:?}: {next:?}");
                if let Some(previous) = previous {
                    assert!(next >= previous, "{backoff:?}: {previous:?} then {next:?}");
                }
                previous = Some(next);
            }
            // From zero it cannot grow (zero times any factor is zero).
            if !initial.is_zero() {
                assert_eq!(previous, Some(max), "{backoff:?} reaches its cap");
            }
        }
    }

    #[test]
    fn the_intensity_window_allows_max_restarts_within_the_period_and_not_one_more() {
        let limit = Intensity {
            max_restarts: 3,
            within: 1000 * MS,
        };
        let start = Instant::now();
        let mut window = RestartWindow::default();
        let verdicts: Vec<bool> = [0, 100, 200, 300]
            .map(|ms| window.exceeded(start + ms * MS, limit))
            .to_vec();
        assert_eq!(verdicts, [false, false, false, true]);
        // Restarts older than the period no longer count.
        let mut window = RestartWindow::default();
        for ms in [0, 100, 200] {
            assert!(!window.exceeded(start + ms * MS, limit));
        }
        assert!(!window.exceeded(start + 1101 * MS, limit));
        // A period boundary: exactly `within` apart still counts.
        let mut window = RestartWindow::default();
        for ms in [0, 400, 800] {
            assert!(!window.exceeded(start + ms * MS, limit));
        }
        assert!(window.exceeded(start + 1000 * MS, limit));
    }

    #[test]
    fn the_intensity_window_agrees_with_counting_by_hand() {
        let start = Instant::now();
        for case in cases(0xfeed, 300) {
            let limit = Intensity {
                max_restarts: (case % 6) as u32,
                within: Duration::from_millis(50 + (case >> 3) % 500),
            };
            let mut window = RestartWindow::default();
            let mut at = 0u64;
            let mut times = Vec::new();
            for step in cases(case | 1, 30) {
                at += step % 120;
                times.push(at);
                let expected = times
                    .iter()
                    .filter(|&&t| Duration::from_millis(at - t) <= limit.within)
                    .count()
                    > limit.max_restarts as usize;
                assert_eq!(
                    window.exceeded(start + Duration::from_millis(at), limit),
                    expected,
                    "{limit:?} at {at} after {times:?}"
                );
                if expected {
                    // The supervisor gives up here; nothing follows.
                    break;
                }
            }
        }
    }

    #[test]
    fn each_strategy_restarts_the_children_it_says() {
        assert_eq!(Strategy::OneForOne.affected(1, 3), 1..2);
        assert_eq!(Strategy::OneForAll.affected(1, 3), 0..3);
        assert_eq!(Strategy::RestForOne.affected(1, 3), 1..3);
        for len in 1..8 {
            for index in 0..len {
                for strategy in [Strategy::OneForOne, Strategy::OneForAll, Strategy::RestForOne] {
                    let affected = strategy.affected(index, len);
                    // Always the child itself, never past the end, in order.
                    assert!(affected.contains(&index), "{strategy:?} {index}/{len}");
                    assert!(affected.end <= len);
                    let expected: Vec<usize> = (0..len)
                        .filter(|&i| match strategy {
                            Strategy::OneForOne => i == index,
                            Strategy::OneForAll => true,
                            Strategy::RestForOne => i >= index,
                        })
                        .collect();
                    assert_eq!(affected.collect::<Vec<_>>(), expected, "{strategy:?} {index}/{len}");
                }
            }
        }
    }

    #[test]
    fn restart_types_decide_by_the_exit() {
        let reasons = [
            ExitReason::Normal,
            ExitReason::Code(3),
            ExitReason::Signal(9),
            ExitReason::StartFailed("x".into()),
            ExitReason::Failed {
                code: 101,
                message: "panicked".into(),
            },
        ];
        for reason in &reasons {
            assert!(Restart::Permanent.applies_to(reason));
            assert_eq!(Restart::Transient.applies_to(reason), !reason.is_normal(), "{reason:?}");
            assert!(!Restart::Temporary.applies_to(reason));
        }
    }

    #[test]
    fn auto_shutdown_ends_the_supervisor_only_when_it_says() {
        for ended in [false, true] {
            for all_down in [false, true] {
                assert!(!AutoShutdown::Never.ends(ended, all_down));
                assert_eq!(AutoShutdown::AnySignificant.ends(ended, all_down), ended);
                assert_eq!(AutoShutdown::AllSignificant.ends(ended, all_down), ended && all_down);
            }
        }
    }
}
