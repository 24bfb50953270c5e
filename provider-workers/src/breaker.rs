//! A circuit breaker for one cloud worker: closed → open after N consecutive
//! failures → after the open period exactly one probe (half-open) → closed on
//! success, open again on failure.
//!
//! A std `Mutex` guards a few words and is never held across an `.await`,
//! so it is cheaper than an async lock here. Time comes from `tokio::time`
//! so tests can pause it.

use std::sync::Mutex;
use std::time::Duration;

use prometheus::{IntCounterVec, IntGaugeVec};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
    fn gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Phase {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// Whether a call was let through as a normal call or as the half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Normal,
    Probe,
}

pub struct CircuitBreaker {
    phase: Mutex<Phase>,
    threshold: u32,
    open_for: Duration,
    /// The longest open period, whatever an upstream's `Retry-After` asks.
    max_open: Duration,
    label: &'static str,
    state_gauge: IntGaugeVec,
    transitions: IntCounterVec,
}

impl CircuitBreaker {
    /// `open_for` is clamped to `max_open`, so is every `Retry-After`.
    pub fn new(
        threshold: u32,
        open_for: Duration,
        max_open: Duration,
        label: &'static str,
        state_gauge: IntGaugeVec,
        transitions: IntCounterVec,
    ) -> Self {
        state_gauge.with_label_values(&[label]).set(0);
        CircuitBreaker {
            phase: Mutex::new(Phase::Closed { failures: 0 }),
            threshold: threshold.max(1),
            open_for: open_for.min(max_open),
            max_open,
            label,
            state_gauge,
            transitions,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Phase> {
        // A poisoned lock only means another thread panicked mid-update of
        // plain data; the data is still usable.
        self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn enter(&self, phase: &mut Phase, next: Phase) {
        let state = match next {
            Phase::Closed { .. } => BreakerState::Closed,
            Phase::Open { .. } => BreakerState::Open,
            Phase::HalfOpen { .. } => BreakerState::HalfOpen,
        };
        *phase = next;
        self.state_gauge
            .with_label_values(&[self.label])
            .set(state.gauge());
        self.transitions
            .with_label_values(&[self.label, state.as_str()])
            .inc();
        tracing::warn!(
            breaker = self.label,
            state = state.as_str(),
            "circuit breaker transition"
        );
    }

    /// Lets a call through, or says how long until the breaker may admit one.
    pub fn admit(&self) -> Result<Admission, Duration> {
        let mut phase = self.lock();
        match *phase {
            Phase::Closed { .. } => Ok(Admission::Normal),
            Phase::Open { until } => {
                let now = Instant::now();
                if now >= until {
                    self.enter(&mut phase, Phase::HalfOpen { probing: true });
                    Ok(Admission::Probe)
                } else {
                    Err(until - now)
                }
            }
            Phase::HalfOpen { probing: true } => Err(Duration::ZERO),
            Phase::HalfOpen { probing: false } => {
                *phase = Phase::HalfOpen { probing: true };
                Ok(Admission::Probe)
            }
        }
    }

    pub fn on_success(&self) {
        let mut phase = self.lock();
        match *phase {
            Phase::Closed { .. } => *phase = Phase::Closed { failures: 0 },
            _ => self.enter(&mut phase, Phase::Closed { failures: 0 }),
        }
    }

    /// Records an upstream failure; `retry_after` (from a 429) lengthens the
    /// open period when it is longer than the configured one, up to
    /// `max_open`: an upstream's number never overflows the clock nor holds
    /// the breaker open for longer.
    pub fn on_failure(&self, retry_after: Option<Duration>) {
        let retry_after = retry_after.map(|r| r.min(self.max_open));
        let open_for = retry_after.map_or(self.open_for, |r| r.max(self.open_for));
        let now = Instant::now();
        let later = |d: Duration| now.checked_add(d).unwrap_or(now);
        let mut phase = self.lock();
        match *phase {
            Phase::Closed { failures } => {
                let failures = failures.saturating_add(1);
                if failures >= self.threshold {
                    self.enter(
                        &mut phase,
                        Phase::Open {
                            until: later(open_for),
                        },
                    );
                } else {
                    *phase = Phase::Closed { failures };
                }
            }
            Phase::HalfOpen { .. } => self.enter(
                &mut phase,
                Phase::Open {
                    until: later(open_for),
                },
            ),
            Phase::Open { until } => {
                let until = until.max(later(retry_after.unwrap_or_default()));
                *phase = Phase::Open { until };
            }
        }
    }

    /// A call that ended without telling anything about the upstream (the
    /// request itself was bad, or it was cancelled): frees the probe slot.
    pub fn on_neutral(&self, admission: Admission) {
        let mut phase = self.lock();
        if admission == Admission::Probe {
            if let Phase::HalfOpen { probing: true } = *phase {
                *phase = Phase::HalfOpen { probing: false };
            }
        }
    }
}

/// A call let through the breaker. It must end in a verdict; dropped
/// without one (the call was cancelled), it frees the probe slot, so a
/// cancelled probe cannot leave the breaker half-open for ever.
pub struct Permit<'a> {
    breaker: &'a CircuitBreaker,
    admission: Admission,
    settled: bool,
}

impl Permit<'_> {
    pub fn success(mut self) {
        self.settled = true;
        self.breaker.on_success();
    }

    pub fn failure(mut self, retry_after: Option<Duration>) {
        self.settled = true;
        self.breaker.on_failure(retry_after);
    }

    pub fn neutral(mut self) {
        self.settled = true;
        self.breaker.on_neutral(self.admission);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.breaker.on_neutral(self.admission);
        }
    }
}

impl CircuitBreaker {
    /// [`CircuitBreaker::admit`] as a [`Permit`].
    pub fn permit(&self) -> Result<Permit<'_>, Duration> {
        let admission = self.admit()?;
        Ok(Permit {
            breaker: self,
            admission,
            settled: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn breaker(threshold: u32, open_ms: u64) -> CircuitBreaker {
        let g = IntGaugeVec::new(Opts::new("g", "g"), &["provider"]).unwrap();
        let t = IntCounterVec::new(Opts::new("t", "t"), &["provider", "to"]).unwrap();
        CircuitBreaker::new(
            threshold,
            Duration::from_millis(open_ms),
            Duration::from_secs(600),
            "cloud",
            g,
            t,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_threshold_then_one_probe() {
        let b = breaker(3, 30_000);
        for _ in 0..2 {
            assert_eq!(b.admit(), Ok(Admission::Normal));
            b.on_failure(None);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        b.on_failure(None);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(29_999)).await;
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit(), Ok(Admission::Probe));
        // Only one probe at a time.
        assert!(b.admit().is_err());
        b.on_success();
        assert_eq!(b.state(), BreakerState::Closed);
        assert_eq!(b.admit(), Ok(Admission::Normal));
        assert_eq!(b.state_gauge.with_label_values(&["cloud"]).get(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_reopens_and_success_resets_count() {
        let b = breaker(2, 1000);
        b.on_failure(None);
        b.on_success();
        b.on_failure(None);
        assert_eq!(
            b.state(),
            BreakerState::Closed,
            "success resets the consecutive count"
        );
        b.on_failure(None);
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(b.admit(), Ok(Admission::Probe));
        b.on_failure(None);
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.state_gauge.with_label_values(&["cloud"]).get(), 1);
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.admit().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_longer_than_open_period_wins() {
        let b = breaker(1, 1000);
        b.on_failure(Some(Duration::from_secs(5)));
        tokio::time::advance(Duration::from_millis(4000)).await;
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(1000)).await;
        assert_eq!(b.admit(), Ok(Admission::Probe));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_permit_frees_the_slot() {
        let b = breaker(1, 10);
        b.on_failure(None);
        tokio::time::advance(Duration::from_millis(10)).await;
        let probe = b.permit().unwrap();
        assert!(b.permit().is_err(), "one probe at a time");
        drop(probe); // e.g. the requester cancelled the stream
        b.permit().unwrap().success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn neutral_probe_frees_the_slot() {
        let b = breaker(1, 10);
        b.on_failure(None);
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(b.admit(), Ok(Admission::Probe));
        b.on_neutral(Admission::Probe);
        assert_eq!(b.admit(), Ok(Admission::Probe));
    }

    /// `Retry-After: 18446744073709551615` once panicked when added to the
    /// clock; now it opens the breaker for `max_open` (10 min here), and a
    /// second one while open does not lengthen that.
    #[tokio::test(start_paused = true)]
    async fn a_huge_retry_after_is_clamped_to_max_open() {
        let b = breaker(1, 1000);
        let huge = Some(Duration::from_secs(u64::MAX));
        b.on_failure(huge);
        assert_eq!(b.state(), BreakerState::Open);
        b.on_failure(huge);
        let wait = b.admit().unwrap_err();
        assert_eq!(wait, Duration::from_secs(600));
        tokio::time::advance(Duration::from_secs(600) - Duration::from_millis(1)).await;
        assert!(b.admit().is_err());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(b.admit(), Ok(Admission::Probe));
        // Half-open, a failed probe with the same header reopens for max_open too.
        b.on_failure(huge);
        assert_eq!(b.admit().unwrap_err(), Duration::from_secs(600));
    }
}
