//! Capped exponential backoff between retries, so a dead cluster (or coord) is not hammered
//! while a healthy one is retried quickly. Pure: it only computes delays; callers sleep.

use std::time::Duration;

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// The delay the next call to [`Backoff::next_delay`] returns.
    next: Duration,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        assert!(
            !initial.is_zero() && initial <= max,
            "invariant: 0 < initial backoff <= max backoff"
        );
        Backoff {
            initial,
            max,
            next: initial,
        }
    }

    /// The delay to wait now; doubles on every call up to the cap.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        delay
    }

    /// Back to the initial delay, after a success.
    pub(crate) fn reset(&mut self) {
        self.next = self.initial;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(50));
        let delays: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(delays, vec![ms(10), ms(20), ms(40), ms(50), ms(50)]);
        b.reset();
        assert_eq!(b.next_delay(), ms(10));
    }
}
