//! Capped exponential backoff with full jitter between retries, so a dead cluster (or coord)
//! is not hammered while a healthy one is retried quickly, and clients that failed together
//! (every client of a leader that just crashed) do not retry together.
//!
//! ```text
//!   call:   1        2         3          4 ...
//!   cap:    initial  2*initial 4*initial  ... max, max
//!   delay:  uniform in [0, cap]   (full jitter)
//! ```
//!
//! Pure: it only computes delays; callers sleep. The randomness is a small seeded generator
//! ([`SplitMix64`]), so a seeded backoff ([`Backoff::with_seed`]) repeats its delays exactly;
//! [`Backoff::new`] seeds from the clock, the process id and a per-process counter, so two
//! clients (or two retry loops of one client) draw different delays.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    /// Upper bound of the delay the next call to [`Backoff::next_delay`] returns; doubles on
    /// every call up to `max`.
    cap: Duration,
    rng: SplitMix64,
}

impl Backoff {
    /// A backoff seeded differently on every call (see the module docs).
    pub(crate) fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_seed(initial, max, process_unique_seed())
    }

    /// A backoff whose delays are a function of `seed` alone.
    pub(crate) fn with_seed(initial: Duration, max: Duration, seed: u64) -> Backoff {
        assert!(
            !initial.is_zero() && initial <= max,
            "invariant: 0 < initial backoff <= max backoff"
        );
        Backoff {
            initial,
            max,
            cap: initial,
            rng: SplitMix64(seed),
        }
    }

    /// The delay to wait now: uniform in `[0, cap]`; the cap doubles on every call up to
    /// `max`.
    pub(crate) fn next_delay(&mut self) -> Duration {
        let cap = self.cap;
        self.cap = cap.saturating_mul(2).min(self.max);
        let cap_ns = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
        let delay = Duration::from_nanos(self.rng.up_to(cap_ns));
        assert!(delay <= cap, "invariant: jittered delay within its cap");
        delay
    }

    /// Back to the initial cap, after a success.
    pub(crate) fn reset(&mut self) {
        self.cap = self.initial;
    }
}

/// A seed no other [`Backoff::new`] of this process gets, and unlikely in another process.
fn process_unique_seed() -> u64 {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let call = CALLS.fetch_add(1, Ordering::Relaxed);
    let now_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    // Each input spread over the word before mixing, so nearby values give distant seeds.
    now_ns ^ u64::from(std::process::id()).rotate_left(32) ^ call.wrapping_mul(GOLDEN_GAMMA)
}

/// 2^64 / the golden ratio: SplitMix64's increment.
const GOLDEN_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, fast generator with good statistical quality
/// for jitter. Not cryptographic, which a retry delay does not need.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GOLDEN_GAMMA);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, bound]` (multiply-shift; the bias is below 2^-64 * bound, nothing for
    /// delays of a few seconds in nanoseconds).
    fn up_to(&mut self, bound: u64) -> u64 {
        let span = u128::from(bound) + 1;
        ((u128::from(self.next_u64()) * span) >> 64) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delays_stay_within_a_cap_that_doubles_and_saturates() {
        let mut b = Backoff::with_seed(ms(10), ms(50), 7);
        let caps = [10, 20, 40, 50, 50, 50];
        for cap in caps {
            assert_eq!(b.cap, ms(cap));
            let delay = b.next_delay();
            assert!(delay <= ms(cap), "{delay:?} above cap {cap} ms");
        }
        assert_eq!(b.cap, ms(50));
    }

    #[test]
    fn delays_are_spread_over_the_whole_range() {
        // Full jitter: at the cap, draws land in every tenth of [0, cap].
        let mut b = Backoff::with_seed(ms(100), ms(100), 42);
        let mut tenths = [0u32; 10];
        for _ in 0..1_000 {
            let delay = b.next_delay();
            assert!(delay <= ms(100));
            let tenth = (delay.as_nanos() * 10 / ms(100).as_nanos()).min(9) as usize;
            tenths[tenth] += 1;
        }
        assert!(tenths.iter().all(|&n| n > 50), "{tenths:?}");
    }

    #[test]
    fn the_same_seed_gives_the_same_delays() {
        let draw = |seed| {
            let mut b = Backoff::with_seed(ms(20), ms(250), seed);
            (0..20).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        assert_ne!(draw(3), draw(4), "clients with different seeds retry apart");
    }

    #[test]
    fn unseeded_backoffs_differ() {
        let draw = || {
            let mut b = Backoff::new(ms(20), ms(250));
            (0..8).map(|_| b.next_delay()).collect::<Vec<_>>()
        };
        assert_ne!(draw(), draw());
    }

    #[test]
    fn reset_returns_to_the_initial_cap() {
        let mut b = Backoff::with_seed(ms(10), ms(50), 1);
        for _ in 0..5 {
            b.next_delay();
        }
        assert_eq!(b.cap, ms(50));
        b.reset();
        assert_eq!(b.cap, ms(10));
        assert!(b.next_delay() <= ms(10));
        assert_eq!(b.cap, ms(20));
    }

    #[test]
    #[should_panic(expected = "invariant")]
    fn a_zero_initial_delay_is_refused() {
        Backoff::with_seed(Duration::ZERO, ms(10), 0);
    }
}
