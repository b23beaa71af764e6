// SPDX-License-Identifier: Apache-2.0

//! MMDS V2 session tokens.
//!
//! A token is 32 bytes from the host's `getrandom(2)`, hex-encoded (64
//! characters, under Firecracker's 70-character limit on what it will even
//! look at). The authority remembers each token with its expiry; a guest
//! asking for tokens in a loop cannot grow that table past
//! [`MAX_TOKENS`]: expired tokens are dropped first, then the one closest to
//! expiry.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Shortest token lifetime a guest may ask for, in seconds (Firecracker's).
pub const MIN_TOKEN_TTL_SECONDS: u32 = 1;
/// Longest token lifetime a guest may ask for, in seconds (Firecracker's).
pub const MAX_TOKEN_TTL_SECONDS: u32 = 21600;
/// The path a guest `PUT`s to for a token.
pub const PATH_TO_TOKEN: &str = "/latest/api/token";
/// Most tokens alive at once.
pub const MAX_TOKENS: usize = 4096;
/// Longest string considered as a token (Firecracker's limit).
const TOKEN_LENGTH_LIMIT: usize = 70;
const TOKEN_BYTES: usize = 32;

/// Token errors, worded as Firecracker's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    /// The host's random source failed.
    #[error("Failed to generate a key")]
    KeyGeneration,
    /// The lifetime asked for is out of bounds.
    #[error(
        "Invalid time to live value provided for token: {0}. Please provide a value between {MIN_TOKEN_TTL_SECONDS} and {MAX_TOKEN_TTL_SECONDS}."
    )]
    InvalidTtlValue(u32),
}

/// Issues and checks session tokens.
#[derive(Debug, Default)]
pub struct TokenAuthority {
    tokens: HashMap<String, Instant>,
}

fn random_bytes(buf: &mut [u8]) -> Result<(), TokenError> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: the kernel writes at most `rest.len()` bytes into `rest`,
        // which is valid, writable memory of that length.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(TokenError::KeyGeneration);
        }
        filled += n as usize;
    }
    Ok(())
}

impl TokenAuthority {
    /// Issues a token valid for `ttl_seconds` from `now`.
    pub fn generate(&mut self, ttl_seconds: u32, now: Instant) -> Result<String, TokenError> {
        if !(MIN_TOKEN_TTL_SECONDS..=MAX_TOKEN_TTL_SECONDS).contains(&ttl_seconds) {
            return Err(TokenError::InvalidTtlValue(ttl_seconds));
        }
        let mut raw = [0u8; TOKEN_BYTES];
        random_bytes(&mut raw)?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        if self.tokens.len() >= MAX_TOKENS {
            self.tokens.retain(|_, expiry| *expiry > now);
        }
        if self.tokens.len() >= MAX_TOKENS {
            if let Some(oldest) = self
                .tokens
                .iter()
                .min_by_key(|(_, expiry)| **expiry)
                .map(|(t, _)| t.clone())
            {
                self.tokens.remove(&oldest);
            }
        }
        let expiry = now + Duration::from_secs(u64::from(ttl_seconds));
        self.tokens.insert(token.clone(), expiry);
        Ok(token)
    }

    /// Whether `token` was issued here and has not expired at `now`.
    pub fn is_valid(&self, token: &str, now: Instant) -> bool {
        if token.len() > TOKEN_LENGTH_LIMIT {
            return false;
        }
        self.tokens.get(token).is_some_and(|expiry| *expiry > now)
    }

    /// Tokens remembered (expired ones included until they are pruned).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.tokens.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_valid_until_they_expire() {
        let mut ta = TokenAuthority::default();
        let t0 = Instant::now();
        let token = ta.generate(2, t0).unwrap();
        assert_eq!(token.len(), 64);
        assert!(ta.is_valid(&token, t0));
        assert!(ta.is_valid(&token, t0 + Duration::from_millis(1999)));
        assert!(!ta.is_valid(&token, t0 + Duration::from_secs(2)));
        assert!(!ta.is_valid("deadbeef", t0));
        assert!(!ta.is_valid(&"a".repeat(100), t0));
        let other = ta.generate(1, t0).unwrap();
        assert_ne!(token, other);
    }

    #[test]
    fn ttl_bounds_are_firecrackers() {
        let mut ta = TokenAuthority::default();
        let now = Instant::now();
        assert_eq!(ta.generate(0, now), Err(TokenError::InvalidTtlValue(0)));
        assert_eq!(
            ta.generate(21601, now).unwrap_err().to_string(),
            "Invalid time to live value provided for token: 21601. Please provide a value between 1 and 21600."
        );
        assert!(ta.generate(21600, now).is_ok());
        assert!(ta.generate(1, now).is_ok());
    }

    #[test]
    fn the_table_is_bounded() {
        let mut ta = TokenAuthority::default();
        let now = Instant::now();
        let first = ta.generate(1, now).unwrap();
        for _ in 0..MAX_TOKENS + 10 {
            ta.generate(100, now).unwrap();
        }
        assert_eq!(ta.len(), MAX_TOKENS);
        // The token closest to expiry went first.
        assert!(!ta.is_valid(&first, now));
        // Expired tokens are pruned before live ones are evicted.
        let later = now + Duration::from_secs(200);
        let fresh = ta.generate(100, later).unwrap();
        assert!(ta.is_valid(&fresh, later));
        assert_eq!(ta.len(), 1);
    }
}
