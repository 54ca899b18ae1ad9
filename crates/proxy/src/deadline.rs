//! The proxy's one way to wait for a deadline that moves: a timer made
//! lazily and reused, moved only when it would fire too late or fired
//! early, so that a deadline pushed back on every request or read costs no
//! timer re-registration.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;
use tokio::time::{Instant, Sleep};

/// Whether `deadline` has passed; otherwise `timer` (made on first use)
/// will wake `cx` by then.
pub(crate) fn passed(timer: &mut Option<Pin<Box<Sleep>>>, deadline: Instant, cx: &mut Context<'_>) -> bool {
    let sleep = timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
    if sleep.deadline() > deadline {
        sleep.as_mut().reset(deadline);
    }
    while sleep.as_mut().poll(cx).is_ready() {
        if Instant::now() >= deadline {
            return true;
        }
        // Fired for an earlier deadline that has since moved on.
        sleep.as_mut().reset(deadline);
    }
    false
}
