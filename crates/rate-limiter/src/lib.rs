// SPDX-License-Identifier: Apache-2.0

//! Firecracker's rate limiter: a `bandwidth` bucket of bytes and an `ops`
//! bucket of operations, each refilled continuously up to its `size` over
//! `refill_time` milliseconds, with an optional `one_time_burst` spent
//! first.
//!
//! A device asks [`RateLimiter::consume`] before each request. When a
//! bucket has too few tokens the limiter is *blocked*: it arms its timerfd
//! for the moment enough tokens will have been refilled and refuses every
//! request until the device's event loop sees the timer fire and calls
//! [`RateLimiter::event_handler`]. The device stops processing its queue
//! meanwhile and carries on where it stopped: nothing is dropped, nothing
//! is reordered, nothing spins. Firecracker wakes every 100 ms to retry;
//! this limiter computes the wait from the deficit, so a throttled device
//! wakes once, when it can go on.
//!
//! A bucket with `size` or `refill_time` 0 is no bucket (unlimited), as in
//! Firecracker. A limiter without buckets costs one branch per request.
//!
//! # Example
//!
//! ```
//! use std::time::{Duration, Instant};
//!
//! use ember_rate_limiter::{BucketSpec, Reduction, TokenBucket};
//!
//! // 1000 bytes per 100 ms.
//! let start = Instant::now();
//! let spec = BucketSpec { size: 1000, one_time_burst: 0, refill_time_ms: 100 };
//! let mut bucket = TokenBucket::new(spec, start).unwrap();
//! assert_eq!(bucket.reduce(600, start), Reduction::Success);
//! // 400 left: 500 more must wait for 100 bytes, 10 ms of refill.
//! assert_eq!(
//!     bucket.reduce(500, start),
//!     Reduction::Failure { wait: Duration::from_millis(10) }
//! );
//! assert_eq!(bucket.reduce(500, start + Duration::from_millis(10)), Reduction::Success);
//! ```

#![deny(missing_docs)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

/// The shortest wait the limiter arms its timer for, so that a tiny deficit
/// does not wake the event loop thousands of times a second.
pub const MIN_WAIT: Duration = Duration::from_millis(1);

const NS_PER_MS: u128 = 1_000_000;

/// One bucket's parameters, as Firecracker's `TokenBucket` object gives
/// them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BucketSpec {
    /// Tokens the bucket holds when full.
    pub size: u64,
    /// Tokens spent before the bucket itself, once.
    pub one_time_burst: u64,
    /// Milliseconds to refill an empty bucket.
    pub refill_time_ms: u64,
}

/// A limiter's parameters: its two buckets, either of which may be absent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimiterConfig {
    /// The `bandwidth` bucket, in bytes.
    pub bandwidth: Option<BucketSpec>,
    /// The `ops` bucket, in operations.
    pub ops: Option<BucketSpec>,
}

impl RateLimiterConfig {
    /// The limiter these parameters describe.
    pub fn build(&self) -> Result<RateLimiter, Error> {
        RateLimiter::new(self.bandwidth, self.ops)
    }
}

/// What [`TokenBucket::reduce`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were taken.
    Success,
    /// Too few tokens: nothing was taken; enough will be there after
    /// `wait`.
    Failure {
        /// Time until the bucket holds the tokens asked for.
        wait: Duration,
    },
    /// More tokens than the bucket holds were asked for: the request goes
    /// through, the bucket is emptied, and the excess is paid by blocking
    /// for `wait` (Firecracker's over-consumption).
    OverConsumption {
        /// Time the excess takes to refill.
        wait: Duration,
    },
}

/// A token bucket refilled continuously: `size` tokens per
/// `refill_time_ms`.
///
/// Time is passed in, so the bucket is plain arithmetic and tests can use
/// any clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    spec: BucketSpec,
    /// Burst tokens not spent yet.
    one_time_burst: u64,
    /// Tokens in the bucket.
    budget: u64,
    /// The time up to which refills have been credited.
    last_update: Instant,
}

impl TokenBucket {
    /// A full bucket, or `None` when `size` or `refill_time_ms` is 0 (no
    /// limit, as in Firecracker).
    pub fn new(spec: BucketSpec, now: Instant) -> Option<Self> {
        if spec.size == 0 || spec.refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            spec,
            one_time_burst: spec.one_time_burst,
            budget: spec.size,
            last_update: now,
        })
    }

    /// The parameters the bucket was built with.
    pub fn spec(&self) -> BucketSpec {
        self.spec
    }

    /// Tokens in the bucket, as of the last operation.
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Burst tokens not spent yet.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.spec.refill_time_ms) * NS_PER_MS
    }

    /// Nanoseconds the bucket takes to refill `tokens`, rounded up.
    fn time_for(&self, tokens: u64) -> u128 {
        (u128::from(tokens) * self.refill_ns()).div_ceil(u128::from(self.spec.size))
    }

    /// Credits the tokens refilled since `last_update`. Only the time those
    /// whole tokens account for is consumed, so no fraction of a token is
    /// ever lost to rounding.
    ///
    /// A full bucket accrues nothing: time spent full is not credited
    /// towards the tokens after it (Firecracker credits it, which lets a
    /// burst right after an idle spell go faster than the rate).
    fn replenish(&mut self, now: Instant) {
        if self.budget >= self.spec.size {
            if now > self.last_update {
                self.last_update = now;
            }
            return;
        }
        let elapsed = now.saturating_duration_since(self.last_update).as_nanos();
        let refill_ns = self.refill_ns();
        if elapsed >= refill_ns {
            self.budget = self.spec.size;
            self.last_update = now;
            return;
        }
        // elapsed < refill_ns, so tokens < size: fits in u64.
        let tokens = elapsed * u128::from(self.spec.size) / refill_ns;
        if tokens == 0 {
            return;
        }
        let used = tokens * refill_ns / u128::from(self.spec.size);
        self.last_update += Duration::from_nanos(u64::try_from(used).unwrap_or(u64::MAX));
        self.budget = self
            .budget
            .saturating_add(u64::try_from(tokens).unwrap_or(u64::MAX))
            .min(self.spec.size);
        if self.budget == self.spec.size {
            self.last_update = now;
        }
    }

    /// Takes `tokens` at time `now`.
    pub fn reduce(&mut self, mut tokens: u64, now: Instant) -> Reduction {
        if self.one_time_burst > 0 {
            if self.one_time_burst >= tokens {
                self.one_time_burst -= tokens;
                return Reduction::Success;
            }
            tokens -= self.one_time_burst;
            self.one_time_burst = 0;
        }
        self.replenish(now);
        if tokens > self.spec.size {
            let excess = tokens - self.budget;
            let wait = nanos(self.time_for(excess));
            self.budget = 0;
            // Refills count from the end of the wait: the excess is paid in
            // full.
            self.last_update = now.checked_add(wait).unwrap_or(now);
            return Reduction::OverConsumption { wait };
        }
        if tokens > self.budget {
            let deficit = tokens - self.budget;
            let credited = now.saturating_duration_since(self.last_update).as_nanos();
            // After an over-consumption refills start in the future.
            let owed = self.last_update.saturating_duration_since(now).as_nanos();
            let wait = (self.time_for(deficit) + owed).saturating_sub(credited);
            return Reduction::Failure { wait: nanos(wait) };
        }
        self.budget -= tokens;
        Reduction::Success
    }

    /// Gives back `tokens` taken for a request that did not go through
    /// (the burst first, as Firecracker does).
    pub fn force_replenish(&mut self, tokens: u64) {
        if self.one_time_burst > 0 {
            self.one_time_burst = self
                .one_time_burst
                .saturating_add(tokens)
                .min(self.spec.one_time_burst);
            return;
        }
        self.budget = self.budget.saturating_add(tokens).min(self.spec.size);
    }
}

fn nanos(ns: u128) -> Duration {
    Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
}

/// Which bucket a request draws on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// The `bandwidth` bucket, in bytes.
    Bytes,
    /// The `ops` bucket, in operations.
    Ops,
}

/// A change to one bucket of a live limiter (`PATCH /drives/{id}`,
/// `PATCH /network-interfaces/{id}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is.
    None,
    /// Remove the bucket: no limit.
    Disabled,
    /// Replace the bucket with a full new one.
    Update(BucketSpec),
}

impl BucketUpdate {
    /// Firecracker's reading of a bucket object in a PATCH body: absent
    /// changes nothing, a size or refill time of 0 removes the bucket, any
    /// other replaces it.
    pub fn from_spec(spec: Option<BucketSpec>) -> Self {
        match spec {
            None => BucketUpdate::None,
            Some(s) if s.size == 0 || s.refill_time_ms == 0 => BucketUpdate::Disabled,
            Some(s) => BucketUpdate::Update(s),
        }
    }
}

/// Errors of the limiter's timer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The timerfd could not be created, set non-blocking or armed.
    #[error("rate limiter timer: {0}")]
    Timer(#[source] io::Error),
}

/// A device's rate limiter: up to two buckets and the timer that ends a
/// block.
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    blocked: bool,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked", &self.blocked)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter with the given buckets (a bucket with size or refill time
    /// 0, or none, does not limit).
    pub fn new(bandwidth: Option<BucketSpec>, ops: Option<BucketSpec>) -> Result<Self, Error> {
        let timer = TimerFd::new().map_err(|e| Error::Timer(e.into()))?;
        // Non-blocking: a read after the timer was re-armed must not stall
        // the event loop.
        // SAFETY: F_GETFL/F_SETFL on a descriptor this limiter owns.
        let ok = unsafe {
            let fd = timer.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        if !ok {
            return Err(Error::Timer(io::Error::last_os_error()));
        }
        let now = Instant::now();
        Ok(RateLimiter {
            bandwidth: bandwidth.and_then(|s| TokenBucket::new(s, now)),
            ops: ops.and_then(|s| TokenBucket::new(s, now)),
            timer,
            blocked: false,
        })
    }

    /// A limiter that limits nothing (until updated).
    pub fn unlimited() -> Result<Self, Error> {
        Self::new(None, None)
    }

    /// Whether no bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// The bandwidth bucket.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The operations bucket.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// Whether the limiter waits for its timer; every `consume` fails
    /// meanwhile.
    pub fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Takes `tokens` from the bucket of `kind`; `false` when the request
    /// must wait (the limiter is then blocked until its timer fires).
    #[inline]
    pub fn consume(&mut self, tokens: u64, kind: TokenType) -> bool {
        if self.blocked {
            return false;
        }
        let bucket = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let Some(bucket) = bucket else {
            return true;
        };
        match bucket.reduce(tokens, Instant::now()) {
            Reduction::Success => true,
            Reduction::Failure { wait } => {
                self.block(wait);
                false
            }
            Reduction::OverConsumption { wait } => {
                self.block(wait);
                true
            }
        }
    }

    fn block(&mut self, wait: Duration) {
        // A zero duration would disarm the timer.
        match self.timer.reset(wait.max(MIN_WAIT), None) {
            Ok(()) => self.blocked = true,
            // Without a timer nothing would unblock: let the request
            // through rather than stall the device forever.
            Err(e) => log::error!("rate limiter: cannot arm the timer: {e}"),
        }
    }

    /// Gives back `tokens` of `kind` taken for a request that could not go
    /// through because the other bucket refused it.
    pub fn manual_replenish(&mut self, tokens: u64, kind: TokenType) {
        let bucket = match kind {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(b) = bucket {
            b.force_replenish(tokens);
        }
    }

    /// Handles the timer firing: the limiter is unblocked. Returns whether
    /// it had been blocked (a device then resumes its queue).
    pub fn event_handler(&mut self) -> bool {
        let mut count = [0u8; 8];
        // SAFETY: reads 8 bytes into a local buffer of 8 bytes from a
        // descriptor this limiter owns; the result is checked.
        let n = unsafe {
            libc::read(
                self.timer.as_raw_fd(),
                count.as_mut_ptr().cast(),
                count.len(),
            )
        };
        if n != 8 {
            // Spurious: the timer was re-armed or cleared since it fired.
            return false;
        }
        std::mem::replace(&mut self.blocked, false)
    }

    /// Changes the buckets of a live limiter. A new bucket starts full; a
    /// removed one stops limiting at once. A blocked limiter has its timer
    /// brought forward to [`MIN_WAIT`], so the device retries under the new
    /// buckets instead of waiting out a wait the old ones computed.
    pub fn update_buckets(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let now = Instant::now();
        let mut changed = false;
        for (slot, update) in [(&mut self.bandwidth, bandwidth), (&mut self.ops, ops)] {
            match update {
                BucketUpdate::None => {}
                BucketUpdate::Disabled => {
                    *slot = None;
                    changed = true;
                }
                BucketUpdate::Update(spec) => {
                    *slot = TokenBucket::new(spec, now);
                    changed = true;
                }
            }
        }
        if changed && self.blocked {
            if let Err(e) = self.timer.reset(MIN_WAIT, None) {
                log::error!("rate limiter: cannot re-arm the timer: {e}");
            }
        }
    }
}

impl AsRawFd for RateLimiter {
    /// The timerfd to watch (readable when a block ends).
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn spec(size: u64, burst: u64, refill_time_ms: u64) -> BucketSpec {
        BucketSpec {
            size,
            one_time_burst: burst,
            refill_time_ms,
        }
    }

    #[test]
    fn zero_size_or_refill_time_is_no_bucket() {
        let t = Instant::now();
        assert!(TokenBucket::new(spec(0, 0, 100), t).is_none());
        assert!(TokenBucket::new(spec(100, 0, 0), t).is_none());
        let mut l = RateLimiter::new(Some(spec(0, 0, 100)), Some(spec(10, 0, 0))).unwrap();
        assert!(l.is_unlimited());
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX, TokenType::Bytes));
            assert!(l.consume(1, TokenType::Ops));
        }
        assert!(!l.is_blocked());
    }

    #[test]
    fn refill_is_continuous_and_loses_no_fraction() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one token every 3.33 ms.
        let mut b = TokenBucket::new(spec(3, 0, 10), t0).unwrap();
        assert_eq!(b.reduce(3, t0), Reduction::Success);
        // 3 ms: not a whole token yet.
        assert!(matches!(
            b.reduce(1, t0 + 3 * MS),
            Reduction::Failure { .. }
        ));
        // 3.34 ms: one token.
        assert_eq!(
            b.reduce(1, t0 + Duration::from_micros(3334)),
            Reduction::Success
        );
        // Over 30 ms in steps of 1 ms, exactly 9 more tokens come in.
        let mut got = 0;
        for ms in 4..=33u64 {
            while b.reduce(
                1,
                t0 + Duration::from_millis(ms) + Duration::from_micros(334),
            ) == Reduction::Success
            {
                got += 1;
            }
        }
        assert_eq!(got, 9);
    }

    #[test]
    fn a_failure_says_how_long_to_wait_and_takes_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(spec(1000, 0, 1000), t0).unwrap();
        assert_eq!(b.reduce(1000, t0), Reduction::Success);
        assert_eq!(b.reduce(250, t0), Reduction::Failure { wait: 250 * MS });
        assert_eq!(b.budget(), 0);
        // 100 ms later: 100 tokens in, 150 ms to go.
        assert_eq!(
            b.reduce(250, t0 + 100 * MS),
            Reduction::Failure { wait: 150 * MS }
        );
        assert_eq!(b.budget(), 100);
        assert_eq!(b.reduce(250, t0 + 250 * MS), Reduction::Success);
        assert_eq!(b.budget(), 0);
        // Full after a whole refill time, never more.
        assert_eq!(b.reduce(0, t0 + 10_000 * MS), Reduction::Success);
        assert_eq!(
            b.reduce(1001, t0 + 10_000 * MS),
            Reduction::OverConsumption { wait: MS }
        );
    }

    #[test]
    fn a_full_bucket_accrues_nothing() {
        let t0 = Instant::now();
        // 10 tokens per 100 ms, idle and full for a whole second.
        let mut b = TokenBucket::new(spec(10, 0, 100), t0).unwrap();
        let t1 = t0 + 1000 * MS;
        assert_eq!(b.reduce(10, t1), Reduction::Success);
        // The next token is 10 ms after the bucket was emptied, not before.
        assert_eq!(
            b.reduce(1, t1 + 5 * MS),
            Reduction::Failure { wait: 5 * MS }
        );
        assert_eq!(b.reduce(1, t1 + 10 * MS), Reduction::Success);
    }

    #[test]
    fn the_one_time_burst_goes_first_and_once() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(spec(100, 500, 1000), t0).unwrap();
        assert_eq!(b.reduce(400, t0), Reduction::Success);
        assert_eq!(b.one_time_burst(), 100);
        assert_eq!(b.budget(), 100);
        // 150: 100 from the burst, 50 from the bucket.
        assert_eq!(b.reduce(150, t0), Reduction::Success);
        assert_eq!(b.one_time_burst(), 0);
        assert_eq!(b.budget(), 50);
        assert!(matches!(b.reduce(100, t0), Reduction::Failure { .. }));
    }

    #[test]
    fn over_consumption_passes_and_blocks_for_the_excess() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(spec(100, 0, 100), t0).unwrap();
        assert_eq!(
            b.reduce(350, t0),
            Reduction::OverConsumption { wait: 250 * MS }
        );
        assert_eq!(b.budget(), 0);
        // The excess was paid: after 250 ms the bucket starts refilling
        // from empty.
        assert!(matches!(
            b.reduce(1, t0 + 250 * MS),
            Reduction::Failure { .. }
        ));
        assert_eq!(b.reduce(100, t0 + 350 * MS), Reduction::Success);
    }

    #[test]
    fn force_replenish_gives_back_up_to_the_size() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(spec(100, 0, 1000), t0).unwrap();
        assert_eq!(b.reduce(60, t0), Reduction::Success);
        b.force_replenish(30);
        assert_eq!(b.budget(), 70);
        b.force_replenish(1000);
        assert_eq!(b.budget(), 100);
    }

    #[test]
    fn bucket_updates_read_as_firecracker_reads_them() {
        assert_eq!(BucketUpdate::from_spec(None), BucketUpdate::None);
        assert_eq!(
            BucketUpdate::from_spec(Some(spec(0, 0, 100))),
            BucketUpdate::Disabled
        );
        assert_eq!(
            BucketUpdate::from_spec(Some(spec(5, 0, 100))),
            BucketUpdate::Update(spec(5, 0, 100))
        );
    }

    fn wait_readable(fd: RawFd, timeout_ms: i32) -> bool {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its length 1.
        unsafe { libc::poll(&mut p, 1, timeout_ms) == 1 }
    }

    #[test]
    fn a_blocked_limiter_refuses_until_its_timer_fires() {
        // 1000 ops per second.
        let mut l = RateLimiter::new(None, Some(spec(10, 0, 10))).unwrap();
        let start = Instant::now();
        for _ in 0..10 {
            assert!(l.consume(1, TokenType::Ops));
        }
        // Bytes are not limited, and do not block.
        assert!(l.consume(1 << 30, TokenType::Bytes));
        assert!(!l.consume(1, TokenType::Ops));
        assert!(l.is_blocked());
        // Blocked: even the unlimited bucket waits, as in Firecracker.
        assert!(!l.consume(1, TokenType::Bytes));
        // Not readable before the refill, readable after: no polling.
        assert!(!l.event_handler());
        assert!(wait_readable(l.as_raw_fd(), 1000));
        assert!(start.elapsed() >= MS);
        assert!(l.event_handler());
        assert!(!l.is_blocked());
        assert!(l.consume(1, TokenType::Ops));
        // The timer fired once: nothing more to read.
        assert!(!wait_readable(l.as_raw_fd(), 20));
    }

    #[test]
    fn updates_change_a_live_limiter() {
        let mut l = RateLimiter::unlimited().unwrap();
        assert!(l.consume(1 << 20, TokenType::Bytes));
        l.update_buckets(BucketUpdate::Update(spec(100, 0, 1000)), BucketUpdate::None);
        assert!(!l.is_unlimited());
        assert!(l.consume(100, TokenType::Bytes));
        assert!(!l.consume(100, TokenType::Bytes));
        assert!(wait_readable(l.as_raw_fd(), 2000));
        assert!(l.event_handler());
        // Blocked for 1 s; an update brings the end of the block forward.
        assert!(l.consume(100, TokenType::Bytes));
        assert!(!l.consume(100, TokenType::Bytes));
        let blocked_at = Instant::now();
        l.update_buckets(BucketUpdate::Disabled, BucketUpdate::None);
        assert!(wait_readable(l.as_raw_fd(), 2000));
        assert!(blocked_at.elapsed() < Duration::from_millis(500));
        assert!(l.event_handler());
        assert!(l.is_unlimited());
        assert!(l.consume(1 << 30, TokenType::Bytes));
        // Manual replenish on a missing bucket does nothing.
        l.manual_replenish(5, TokenType::Ops);
        assert_eq!(l.bandwidth(), None);
    }
}
