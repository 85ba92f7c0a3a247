//! When to try again: exponential with full jitter, or fixed; a server's
//! `Retry-After` is honoured, capped by `max_delay`.

use std::time::Duration;

use crate::workflow::{Backoff, RetryPolicy};

/// The delay before attempt `failed_attempts + 1`, after `failed_attempts` failures.
/// `unit` is a uniform random number in [0, 1) (full jitter).
pub fn delay(
    policy: &RetryPolicy,
    failed_attempts: u32,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    if let Some(server) = retry_after {
        return server.min(policy.max_delay);
    }
    match policy.backoff {
        Backoff::Fixed => policy.initial_delay.min(policy.max_delay),
        Backoff::Exponential => {
            let exp = failed_attempts.saturating_sub(1).min(32);
            let ceiling = policy
                .initial_delay
                .checked_mul(1u32 << exp.min(31))
                .unwrap_or(policy.max_delay)
                .min(policy.max_delay);
            ceiling.mul_f64(unit.clamp(0.0, 1.0))
        }
    }
}

/// Parses `Retry-After`: delay-seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    (at.with_timezone(&chrono::Utc) - now).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(backoff: Backoff) -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            backoff,
            initial_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(10),
        }
    }

    #[test]
    fn exponential_full_jitter_is_bounded_by_the_doubling_ceiling() {
        let p = policy(Backoff::Exponential);
        assert_eq!(delay(&p, 1, None, 0.999_999).as_millis(), 999);
        assert_eq!(delay(&p, 3, None, 0.5), Duration::from_secs(2));
        assert_eq!(delay(&p, 3, None, 0.0), Duration::ZERO);
        assert_eq!(
            delay(&p, 30, None, 0.5),
            Duration::from_secs(5),
            "capped at max_delay"
        );
        assert_eq!(delay(&p, u32::MAX, None, 0.5), Duration::from_secs(5));
    }

    #[test]
    fn fixed_and_retry_after() {
        let p = policy(Backoff::Fixed);
        assert_eq!(delay(&p, 7, None, 0.1), Duration::from_secs(1));
        assert_eq!(
            delay(&p, 1, Some(Duration::from_secs(3)), 0.1),
            Duration::from_secs(3)
        );
        assert_eq!(
            delay(&p, 1, Some(Duration::from_secs(300)), 0.1),
            Duration::from_secs(10)
        );
        let now = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .to_utc();
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        assert_eq!(
            parse_retry_after("Thu, 01 Jan 2026 00:00:30 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
