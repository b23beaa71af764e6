// SPDX-License-Identifier: Apache-2.0

//! A token bucket with Firecracker's semantics, for the serial console's
//! output limit (`PUT /serial` `rate_limiter`).
//!
//! The bucket holds up to `size` tokens and refills from empty to full in
//! `refill_time` milliseconds, continuously; `one_time_burst` tokens are
//! spent first and never come back. A bucket starts full.

use std::time::{Duration, Instant};

const NANOS_PER_MILLI: u128 = 1_000_000;

/// A token bucket: [`reduce`](Self::reduce) takes tokens if there are
/// enough, after topping the bucket up for the time that passed.
#[derive(Clone, Debug)]
pub struct TokenBucket {
    size: u64,
    /// Nanoseconds to refill from empty to full.
    refill_ns: u128,
    one_time_burst: u64,
    budget: u64,
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket of `size` tokens refilled in `refill_time_ms`, with
    /// `one_time_burst` extra tokens; `None` when `size` or
    /// `refill_time_ms` is 0, which Firecracker takes as "no limit".
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<Self> {
        if size == 0 || refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_ns: u128::from(refill_time_ms) * NANOS_PER_MILLI,
            one_time_burst,
            budget: size,
            last_update: Instant::now(),
        })
    }

    /// Takes `tokens` if the burst and the budget hold them, and says
    /// whether it did. A request larger than the whole bucket empties it and
    /// fails, as Firecracker's over-consumption does for the console.
    pub fn reduce(&mut self, tokens: u64) -> bool {
        self.reduce_at(tokens, Instant::now())
    }

    fn reduce_at(&mut self, mut tokens: u64, now: Instant) -> bool {
        if self.one_time_burst > 0 {
            if self.one_time_burst >= tokens {
                self.one_time_burst -= tokens;
                self.last_update = now;
                return true;
            }
            tokens -= self.one_time_burst;
            self.one_time_burst = 0;
        }
        if tokens > self.budget {
            self.replenish(now);
            if tokens > self.size {
                self.budget = 0;
                return false;
            }
            if tokens > self.budget {
                return false;
            }
        }
        self.budget -= tokens;
        true
    }

    /// Adds the tokens earned since the last update, keeping the fraction of
    /// a token not yet earned for the next time.
    fn replenish(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        if elapsed >= self.refill_ns {
            self.budget = self.size;
            self.last_update = now;
            return;
        }
        // elapsed < refill_ns <= u64::MAX * 10^6, so the product fits.
        let size = u128::from(self.size);
        let tokens = elapsed * size / self.refill_ns;
        // The time those tokens took, rounded up.
        let used = (tokens * self.refill_ns).div_ceil(size);
        self.last_update += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        let tokens = u64::try_from(tokens).unwrap_or(u64::MAX);
        self.budget = self.budget.saturating_add(tokens).min(self.size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_size_or_refill_time_means_no_limit() {
        assert!(TokenBucket::new(0, 0, 100).is_none());
        assert!(TokenBucket::new(100, 0, 0).is_none());
        assert!(TokenBucket::new(1, 0, 1).is_some());
    }

    #[test]
    fn a_full_bucket_then_the_burst_then_nothing_until_refilled() {
        let mut b = TokenBucket::new(10, 5, 1000).unwrap();
        let t0 = b.last_update;
        // The burst goes first, then the budget.
        for _ in 0..15 {
            assert!(b.reduce_at(1, t0));
        }
        assert!(!b.reduce_at(1, t0));
        // A tenth of the refill time earns a tenth of the bucket.
        let t1 = t0 + Duration::from_millis(100);
        assert!(b.reduce_at(1, t1));
        assert!(!b.reduce_at(1, t1));
        // A whole refill time fills it, never beyond its size.
        let t2 = t1 + Duration::from_secs(5);
        for _ in 0..10 {
            assert!(b.reduce_at(1, t2));
        }
        assert!(!b.reduce_at(1, t2));
    }

    #[test]
    fn fractions_of_a_token_are_carried_over() {
        // One token every 100 ms.
        let mut b = TokenBucket::new(10, 0, 1000).unwrap();
        let t0 = b.last_update;
        assert!(b.reduce_at(10, t0));
        let t1 = t0 + Duration::from_millis(150);
        assert!(b.reduce_at(1, t1));
        assert!(!b.reduce_at(1, t1));
        // 150 + 50 ms: the half token of the first wait counts.
        assert!(b.reduce_at(1, t1 + Duration::from_millis(50)));
    }

    #[test]
    fn more_than_the_bucket_holds_empties_it_and_fails() {
        let mut b = TokenBucket::new(10, 0, 1000).unwrap();
        let t0 = b.last_update;
        assert!(!b.reduce_at(11, t0));
        assert!(!b.reduce_at(1, t0));
    }
}
