//! Per-process counters, kept cheap enough for the message path: relaxed
//! atomic increments, and a clock read for one request in sixteen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Buckets of the latency histogram: `< 1 µs`, `< 2 µs`, … `< 2^22 µs` (4 s), and the rest.
pub(crate) const LATENCY_BUCKETS: usize = 24;
const SAMPLE_EVERY: u64 = 16;

/// Name of the stats service every process hosts.
pub(crate) const STATS: &str = "evilcluster.stats";
pub(crate) const STATS_TAG: &str = "stats.get";

pub(crate) struct Stats {
    started: Instant,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    errors: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

/// What one process reports about itself.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct ProcessStats {
    pub uptime_ms: u64,
    pub messages_in: u64,
    pub messages_out: u64,
    pub errors: u64,
    pub rss_bytes: Option<u64>,
    #[serde(default)]
    pub pss_bytes: Option<u64>,
    pub latency_us: Vec<u64>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            started: Instant::now(),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Counts a request handled for another process; returns a start time
    /// when this one is sampled for the latency histogram.
    pub fn received(&self) -> Option<Instant> {
        let seen = self.messages_in.fetch_add(1, Ordering::Relaxed);
        seen.is_multiple_of(SAMPLE_EVERY).then(Instant::now)
    }

    pub fn handled(&self, started: Option<Instant>, failed: bool) {
        if failed {
            self.failed();
        }
        if let Some(started) = started {
            self.latency[bucket(started.elapsed())].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn sent(&self) {
        self.messages_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn failed(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ProcessStats {
        ProcessStats {
            uptime_ms: self.started.elapsed().as_millis() as u64,
            messages_in: self.messages_in.load(Ordering::Relaxed),
            messages_out: self.messages_out.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            rss_bytes: resident_memory(),
            pss_bytes: proportional_memory(),
            latency_us: self.latency.iter().map(|b| b.load(Ordering::Relaxed)).collect(),
        }
    }
}

fn bucket(elapsed: Duration) -> usize {
    let micros = elapsed.as_micros() as u64;
    // Bucket i holds durations below 2^i µs.
    let bits = (u64::BITS - micros.leading_zeros()) as usize;
    bits.min(LATENCY_BUCKETS - 1)
}

/// Resident set size from `/proc/self/statm` (Linux); `None` elsewhere.
fn resident_memory() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Proportional set size from `/proc/self/smaps_rollup` (Linux): resident
/// memory with each page shared by N processes counted 1/N — what a tree of
/// copies of one executable really costs, summed over its processes.
fn proportional_memory() -> Option<u64> {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").ok()?;
    let kib: u64 = rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        assert_eq!(bucket(Duration::from_nanos(500)), 0);
        assert_eq!(bucket(Duration::from_micros(1)), 1);
        assert_eq!(bucket(Duration::from_micros(3)), 2);
        assert_eq!(bucket(Duration::from_micros(1000)), 10);
        assert_eq!(bucket(Duration::from_secs(3600)), LATENCY_BUCKETS - 1);
    }

    #[test]
    fn counts_and_samples() {
        let stats = Stats::new();
        let sampled = (0..32).filter(|_| stats.received().is_some()).count();
        assert_eq!(sampled, 2);
        stats.sent();
        stats.handled(Some(Instant::now()), true);
        let snapshot = stats.snapshot();
        assert_eq!(
            (snapshot.messages_in, snapshot.messages_out, snapshot.errors),
            (32, 1, 1)
        );
        assert_eq!(snapshot.latency_us.iter().sum::<u64>(), 1);
        assert!(snapshot.rss_bytes.is_some_and(|rss| rss > 0));
        if cfg!(target_os = "linux") {
            let pss = snapshot.pss_bytes.expect("smaps_rollup on Linux");
            assert!(pss > 0 && pss <= snapshot.rss_bytes.unwrap() + 4096, "{snapshot:?}");
        }
    }
}
