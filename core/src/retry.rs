//! Retry delays for transient failures: 100 ms, doubling, at most 30 s.

use std::time::Duration;

/// The delay before retry number `attempt` (1 for the first retry).
pub fn delay(attempt: u32) -> Duration {
    let millis = 100u64.saturating_mul(1u64 << attempt.saturating_sub(1).min(9));
    Duration::from_millis(millis.min(30_000))
}

/// Successive delays for one operation; [`Backoff::reset`] after a success.
#[derive(Debug, Default)]
pub struct Backoff {
    attempt: u32,
}

impl Backoff {
    pub fn next_delay(&mut self) -> Duration {
        self.attempt = self.attempt.saturating_add(1);
        delay(self.attempt)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_a_ceiling() {
        assert_eq!(delay(0), Duration::from_millis(100));
        assert_eq!(delay(5), Duration::from_millis(1600));
        assert_eq!(delay(40), Duration::from_secs(30));
        let mut b = Backoff::default();
        let waits: Vec<_> = (0..12).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(&waits[..4], &[100, 200, 400, 800]);
        assert_eq!(*waits.last().unwrap(), 30_000);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
