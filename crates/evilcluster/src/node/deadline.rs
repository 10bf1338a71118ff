//! Call deadlines, one timer per millisecond instead of one per call.
//!
//! A pipelined caller starts thousands of calls a millisecond, each with a
//! deadline that must fire on the caller's own runtime (its connection's
//! thread may be busy). A tokio timer per call costs an allocation, a
//! registration and a cancellation under the timer driver's lock — about a
//! tenth of a small call. Calls whose deadlines fall in the same
//! millisecond share one [`Batch`] instead: one timer, and a slab of the
//! wakers of the calls still waiting. A deadline fires at most a
//! millisecond late (it is rounded up, never down).

use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

/// How finely deadlines are grouped.
const GRAIN: Duration = Duration::from_millis(1);
/// Batches a thread keeps at hand to join (calls with a few different
/// timeouts, interleaved, each find theirs).
const RECENT: usize = 4;

/// One call's deadline. Dropping it forgets the call.
pub(crate) struct Deadline {
    batch: Arc<Batch>,
    /// This call's place among the batch's wakers, once it waited.
    slot: Option<usize>,
}

struct Batch {
    state: Mutex<State>,
    /// The task that fires the batch; stopped when nobody waits any more.
    timer: Mutex<Option<tokio::task::AbortHandle>>,
}

struct State {
    fired: bool,
    waiting: Slab<Waker>,
}

/// A batch a thread started lately, by its deadline. Held (not only
/// referred to) so that calls made one after another, each done before the
/// next starts, share it too: without a caller it would be dropped, and
/// its timer stopped, between any two of them.
///
/// Kept with the span of deadlines it takes, `(at - GRAIN, at]`, so that a
/// call finds its batch without rounding its deadline first.
type Recent = Option<(Span, Arc<Batch>)>;

/// The deadlines that round up to one batch's: after `after`, up to `at`.
#[derive(Clone, Copy)]
struct Span {
    after: Instant,
    at: Instant,
}

thread_local! {
    static RECENT_BATCHES: std::cell::RefCell<[Recent; RECENT]> = const {
        std::cell::RefCell::new([const { None }; RECENT])
    };
}

impl Deadline {
    /// A deadline at `at` (rounded up to the grain). Must be called inside a
    /// tokio runtime with timers, as `tokio::time::sleep` must.
    pub fn new(at: Instant) -> Deadline {
        let joined = RECENT_BATCHES.with(|recent| {
            let mut recent = recent.borrow_mut();
            let known = recent
                .iter()
                .flatten()
                .find(|(span, _)| span.after < at && at <= span.at);
            if let Some((_, batch)) = known {
                return batch.clone();
            }
            let at = round_up(at);
            let batch = Batch::start(at);
            // Replace an empty place, or the earliest deadline: deadlines
            // mostly move forward.
            let oldest = recent
                .iter()
                .enumerate()
                .min_by_key(|(_, known)| known.as_ref().map(|(span, _)| span.at))
                .map_or(0, |(index, _)| index);
            let after = at.checked_sub(GRAIN).unwrap_or(at);
            recent[oldest] = Some((Span { after, at }, batch.clone()));
            batch
        });
        Deadline {
            batch: joined,
            slot: None,
        }
    }

    /// Ready once the deadline has passed; until then `cx` is woken when it
    /// does.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.batch.lock();
        if state.fired {
            return Poll::Ready(());
        }
        match self.slot {
            Some(slot) => {
                let waker = &mut state.waiting[slot];
                if !waker.will_wake(cx.waker()) {
                    *waker = cx.waker().clone();
                }
            }
            None => self.slot = Some(state.waiting.insert(cx.waker().clone())),
        }
        Poll::Pending
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        if let Some(slot) = self.slot {
            let mut state = self.batch.lock();
            if !state.fired {
                state.waiting.try_remove(slot);
            }
        }
    }
}

impl Batch {
    fn start(at: Instant) -> Arc<Batch> {
        let batch = Arc::new(Batch {
            state: Mutex::new(State {
                fired: false,
                waiting: Slab::new(),
            }),
            timer: Mutex::new(None),
        });
        let weak = Arc::downgrade(&batch);
        let timer = tokio::spawn(async move {
            tokio::time::sleep_until(at.into()).await;
            if let Some(batch) = weak.upgrade() {
                batch.fire();
            }
        });
        *batch.timer.lock().unwrap_or_else(|e| e.into_inner()) = Some(timer.abort_handle());
        batch
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn fire(&self) {
        let waiting = {
            let mut state = self.lock();
            state.fired = true;
            std::mem::take(&mut state.waiting)
        };
        for (_, waker) in waiting {
            waker.wake();
        }
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Nobody waits: the timer has nothing to do.
        if let Some(timer) = self.timer.get_mut().unwrap_or_else(|e| e.into_inner()).take() {
            timer.abort();
        }
    }
}

/// `at`, rounded up to the next multiple of [`GRAIN`] since a fixed
/// origin, so that calls a few microseconds apart share a batch.
fn round_up(at: Instant) -> Instant {
    static ORIGIN: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let origin = *ORIGIN.get_or_init(Instant::now);
    let Some(since) = at.checked_duration_since(origin) else {
        return at;
    };
    // In u64 nanoseconds (584 years from the origin): u128 division is a
    // library call, and this runs for every call.
    let grain = GRAIN.as_nanos() as u64;
    match u64::try_from(since.as_nanos()) {
        Ok(nanos) => origin + Duration::from_nanos(nanos.div_ceil(grain) * grain),
        Err(_) => at,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap()
    }

    /// Calls in the same millisecond share one batch; each fires, not before
    /// its deadline and at most a grain after it.
    #[test]
    fn deadlines_fire_on_time_and_share_batches() {
        runtime().block_on(async {
            let start = Instant::now();
            let at = start + Duration::from_millis(30);
            let mut deadlines: Vec<Deadline> = (0..100).map(|_| Deadline::new(at)).collect();
            assert!(deadlines.windows(2).all(|w| Arc::ptr_eq(&w[0].batch, &w[1].batch)));
            let fired = AtomicUsize::new(0);
            futures_util::future::join_all(deadlines.iter_mut().map(|deadline| {
                let fired = &fired;
                async move {
                    std::future::poll_fn(|cx| deadline.poll_expired(cx)).await;
                    fired.fetch_add(1, Ordering::Relaxed);
                }
            }))
            .await;
            assert_eq!(fired.load(Ordering::Relaxed), 100);
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(30), "fired early: {took:?}");
        });
    }

    /// A call that ends first leaves its batch; a batch nobody waits on is
    /// dropped with its timer.
    #[test]
    fn calls_that_end_leave_nothing_behind() {
        runtime().block_on(async {
            let at = Instant::now() + Duration::from_secs(3600);
            let mut deadline = Deadline::new(at);
            let waker = futures_util::task::noop_waker();
            let mut cx = Context::from_waker(&waker);
            assert!(deadline.poll_expired(&mut cx).is_pending());
            let batch = Arc::downgrade(&deadline.batch);
            assert_eq!(batch.upgrade().unwrap().lock().waiting.len(), 1);
            drop(deadline);
            assert_eq!(batch.upgrade().unwrap().lock().waiting.len(), 0, "its waker is gone");
            // The next call with that deadline, made after the first ended,
            // shares its batch (one timer per millisecond, not per call).
            let again = Deadline::new(at);
            assert!(std::ptr::eq(Arc::as_ptr(&again.batch), batch.as_ptr()));
            drop(again);
            // Batches of later deadlines take its place: it is dropped.
            for later in 1..=RECENT as u64 {
                drop(Deadline::new(at + Duration::from_millis(later)));
            }
            assert!(batch.upgrade().is_none(), "the batch outlived its place");
        });
    }

    #[test]
    fn rounding_is_up_and_within_a_grain() {
        let now = Instant::now();
        for offset in [0, 1, 999_999, 1_000_000, 1_000_001, 7_654_321] {
            let at = now + Duration::from_nanos(offset);
            let rounded = round_up(at);
            assert!(rounded >= at && rounded - at < GRAIN, "{offset}: {:?}", rounded - at);
        }
    }
}
