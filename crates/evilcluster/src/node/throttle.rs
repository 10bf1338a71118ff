//! Rate limits for warnings a peer can cause, and clipping of the strings
//! it sends: a peer must not be able to turn the logs into its megaphone
//! (3 million bad messages once gave 3 million lines; a 1 MB name a 1 MB line).

use std::borrow::Cow;
use std::time::{Duration, Instant};

use tracing::warn;

/// Warnings one source may cause per [`WINDOW`]; the rest are counted.
pub(crate) const PER_WINDOW: u32 = 10;
const WINDOW: Duration = Duration::from_secs(1);
/// Characters of a peer's string that make it into a log line or a refusal.
pub(crate) const CLIP: usize = 128;

/// Counts warnings from one source (a connection, the accept loop).
#[derive(Debug)]
pub(crate) struct Throttle {
    window: Instant,
    shown: u32,
    suppressed: u64,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            window: Instant::now(),
            shown: 0,
            suppressed: 0,
        }
    }
}

impl Throttle {
    /// Whether one more warning from `source` may be logged now. The first
    /// one of a new window first reports how many were held back.
    pub fn allow(&mut self, source: &str) -> bool {
        let now = Instant::now();
        if now.duration_since(self.window) >= WINDOW {
            self.flush(source);
            self.window = now;
            self.shown = 0;
        }
        if self.shown < PER_WINDOW {
            self.shown += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// Reports the warnings held back, if any (also when the source goes
    /// away, so that the count is never lost).
    pub fn flush(&mut self, source: &str) {
        if self.suppressed > 0 {
            warn!(
                source = %clip(source),
                "suppressed {} more warnings like the ones above (at most {PER_WINDOW} a second are logged)",
                self.suppressed
            );
            self.suppressed = 0;
        }
    }
}

/// `text`, cut to [`CLIP`] characters with an ellipsis when longer.
pub(crate) fn clip(text: &str) -> Cow<'_, str> {
    match text.char_indices().nth(CLIP) {
        None => Cow::Borrowed(text),
        Some((end, _)) => Cow::Owned(format!("{}… ({} bytes)", &text[..end], text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_strings_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("short"), "short");
        let long = "é".repeat(1000);
        let clipped = clip(&long);
        assert!(
            clipped.starts_with(&"é".repeat(CLIP)) && clipped.ends_with("… (2000 bytes)"),
            "{clipped}"
        );
    }

    #[test]
    fn at_most_a_window_of_warnings_then_a_count() {
        let mut throttle = Throttle::default();
        let allowed = (0..1000).filter(|_| throttle.allow("peer")).count();
        assert_eq!(allowed, PER_WINDOW as usize);
        assert_eq!(throttle.suppressed, 1000 - u64::from(PER_WINDOW));
        throttle.flush("peer");
        assert_eq!(throttle.suppressed, 0);
    }
}
