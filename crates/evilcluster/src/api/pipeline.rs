//! Pipelined calls: many requests in flight from one task, their results in
//! order ([`RemoteAddr::send_all`](crate::RemoteAddr::send_all)).
//!
//! Each call is a [`SendRequest`], started as soon as the window has room
//! and polled only once it is the oldest: the others' replies land in
//! their connection's table of pending calls and wait there, with no waker
//! registered, no timer started and no task of their own. One call at a
//! time waits (the oldest, whose deadline is the earliest), so a window of
//! calls costs one wake-up per batch of replies rather than one per reply.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use futures_util::Stream;
use serde::de::DeserializeOwned;

use crate::api::addr::{SendRequest, Target};
use crate::api::remote::RemoteMessage;
use crate::SendError;

/// The results of [`RemoteAddr::send_all`](crate::RemoteAddr::send_all),
/// in the order of its messages.
#[must_use = "streams do nothing unless polled"]
pub struct SendAll<M: RemoteMessage, I> {
    target: Target,
    messages: Option<I>,
    window: usize,
    calls: VecDeque<Call<M>>,
    /// The newest call could not be queued at once (its name was not
    /// resolved, its connection not up, or the connection was full): no
    /// later message is sent before it is, which keeps them in order.
    newest_waits: bool,
}

enum Call<M: RemoteMessage> {
    Running(SendRequest<M>),
    /// Ended before the calls ahead of it.
    Ended(Result<M::Result, SendError>),
}

// Calls are moved in and out of the queue, never pinned in place.
impl<M: RemoteMessage, I> Unpin for SendAll<M, I> {}

impl<M: RemoteMessage, I> std::fmt::Debug for SendAll<M, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SendAll")
            .field("actor", &self.target.actor)
            .field("message", &std::any::type_name::<M>())
            .field("window", &self.window)
            .field("in_flight", &self.calls.len())
            .finish()
    }
}

impl<M, I> SendAll<M, I>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
    I: Iterator<Item = M>,
{
    pub(super) fn new(target: Target, messages: I, window: usize) -> Self {
        let window = window.max(1);
        SendAll {
            target,
            messages: Some(messages),
            window,
            calls: VecDeque::with_capacity(window.min(4096)),
            newest_waits: false,
        }
    }

    /// Calls started and not yet yielded.
    pub fn in_flight(&self) -> usize {
        self.calls.len()
    }

    /// Starts calls until the window is full, the messages run out, or one
    /// could not be queued at once. Starts them in batches (once an eighth
    /// of the window is free): the calls of a batch share one clock read
    /// for their start, and their frames go out in one write.
    fn fill(&mut self) {
        let free = self.window - self.calls.len();
        if self.newest_waits || free == 0 || (free < self.window.div_ceil(8) && !self.calls.is_empty()) {
            return;
        }
        let now = Instant::now();
        while !self.newest_waits && self.calls.len() < self.window {
            let Some(message) = self.messages.as_mut().and_then(Iterator::next) else {
                self.messages = None;
                return;
            };
            self.calls
                .push_back(Call::Running(SendRequest::started(self.target, message, now)));
            self.newest_waits = !matches!(self.calls.back(), Some(Call::Running(call)) if call.queued());
        }
    }

    /// Drives the newest call while it waits to be queued (for a name, a
    /// connection or room), and notes when it is.
    fn drive_newest(&mut self, cx: &mut Context<'_>) {
        if !self.newest_waits {
            return;
        }
        let oldest = self.calls.len() == 1;
        match self.calls.back_mut() {
            Some(Call::Running(call)) if call.queued() => self.newest_waits = false,
            // The oldest is polled as such.
            Some(Call::Running(_)) if oldest => {}
            Some(Call::Running(call)) => {
                if let Poll::Ready(result) = Pin::new(call).poll(cx) {
                    *self.calls.back_mut().expect("just polled") = Call::Ended(result);
                    self.newest_waits = false;
                }
            }
            Some(Call::Ended(_)) | None => self.newest_waits = false,
        }
    }
}

impl<M, I> Stream for SendAll<M, I>
where
    M: RemoteMessage,
    M::Result: DeserializeOwned + Send,
    I: Iterator<Item = M>,
{
    type Item = Result<M::Result, SendError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        this.drive_newest(cx);
        this.fill();
        // A call just started that could not be queued at once starts
        // waiting (for its name, its connection or room) now, not once
        // the calls ahead of it are done.
        this.drive_newest(cx);
        let result = match this.calls.front_mut() {
            None => return Poll::Ready(None),
            Some(Call::Ended(_)) => match this.calls.pop_front() {
                Some(Call::Ended(result)) => result,
                _ => unreachable!("matched just above"),
            },
            Some(Call::Running(call)) => {
                let result = std::task::ready!(Pin::new(call).poll(cx));
                this.calls.pop_front();
                result
            }
        };
        if this.calls.is_empty() {
            this.newest_waits = false;
        }
        Poll::Ready(Some(result))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (low, high) = self.messages.as_ref().map_or((0, Some(0)), Iterator::size_hint);
        let in_flight = self.calls.len();
        (
            low.saturating_add(in_flight),
            high.and_then(|high| high.checked_add(in_flight)),
        )
    }
}
