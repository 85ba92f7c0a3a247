//! The circuit breaker of one destination, as a pure state machine:
//! consecutive failed attempts open it; after the cool-down one probe goes
//! (half open); a failed probe opens it again for twice as long (up to the
//! maximum), a successful one closes it.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::BreakerPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed,
    Open,
    HalfOpen,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    pub fn parse(s: &str) -> State {
        match s {
            "open" => State::Open,
            "half_open" => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// The gauge value: 0 closed, 1 open, 2 half open.
    pub fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::Open => 1.0,
            State::HalfOpen => 2.0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Breaker {
    pub state: State,
    /// Consecutive failed attempts while closed.
    pub failures: u32,
    /// Open: when the next probe may go. Half open: when the probe in flight
    /// is given up on (another may go then).
    pub until: Option<DateTime<Utc>>,
    /// The cool-down of the current (or last) opening.
    pub cool_down: Duration,
}

impl Default for Breaker {
    fn default() -> Self {
        Self {
            state: State::Closed,
            failures: 0,
            until: None,
            cool_down: Duration::ZERO,
        }
    }
}

/// What the breaker says to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Verdict {
    Go,
    /// Go, as the one probe.
    Probe,
    /// Hold until then.
    Hold(DateTime<Utc>),
}

fn plus(t: DateTime<Utc>, d: Duration) -> DateTime<Utc> {
    t + chrono::TimeDelta::from_std(d).unwrap_or(chrono::TimeDelta::MAX / 2)
}

/// How long the probe may take before another may go.
pub fn probe_budget(cool_down: Duration) -> Duration {
    cool_down
        .min(Duration::from_secs(30))
        .max(Duration::from_secs(1))
}

impl Breaker {
    /// Whether a request may go now (without changing anything).
    pub fn check(&self, now: DateTime<Utc>) -> Verdict {
        match (self.state, self.until) {
            (State::Closed, _) => Verdict::Go,
            (_, Some(until)) if now < until => Verdict::Hold(until),
            _ => Verdict::Probe,
        }
    }

    /// The probe goes: half open until it answers (or its budget passes).
    pub fn start_probe(&mut self, now: DateTime<Utc>) {
        self.state = State::HalfOpen;
        self.until = Some(plus(now, probe_budget(self.cool_down)));
    }

    /// A request answered; true when the state (closed, open, half open) changed.
    pub fn record(
        &mut self,
        policy: &BreakerPolicy,
        failed: bool,
        probe: bool,
        now: DateTime<Utc>,
    ) -> bool {
        let before = *self;
        match (self.state, failed) {
            (State::Closed, false) => self.failures = 0,
            (State::Closed, true) => {
                self.failures += 1;
                if self.failures >= policy.failures {
                    self.open(policy.cool_down, now);
                }
            }
            (_, false) if probe || self.state == State::HalfOpen => {
                *self = Breaker::default();
            }
            (_, true) if probe => {
                let next = (self.cool_down * 2).min(policy.max_cool_down);
                self.open(next.max(policy.cool_down), now);
            }
            // An answer from before it opened changes nothing.
            _ => {}
        }
        self.state != before.state
    }

    fn open(&mut self, cool_down: Duration, now: DateTime<Utc>) {
        self.state = State::Open;
        self.cool_down = cool_down;
        self.until = Some(plus(now, cool_down));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_probes_doubles_and_closes() {
        let p = BreakerPolicy {
            failures: 2,
            cool_down: Duration::from_secs(10),
            max_cool_down: Duration::from_secs(25),
        };
        let t0 = Utc::now();
        let mut b = Breaker::default();
        assert!(!b.record(&p, true, false, t0));
        assert_eq!(b.check(t0), Verdict::Go);
        assert!(b.record(&p, true, false, t0));
        assert_eq!(b.state, State::Open);
        assert_eq!(b.check(t0), Verdict::Hold(plus(t0, p.cool_down)));
        let t1 = plus(t0, Duration::from_secs(10));
        assert_eq!(b.check(t1), Verdict::Probe);
        b.start_probe(t1);
        assert!(
            matches!(b.check(t1), Verdict::Hold(_)),
            "one probe at a time"
        );
        b.record(&p, true, true, t1);
        assert_eq!(
            (b.state, b.cool_down),
            (State::Open, Duration::from_secs(20))
        );
        let t2 = plus(t1, Duration::from_secs(20));
        b.start_probe(t2);
        b.record(&p, true, true, t2);
        assert_eq!(b.cool_down, Duration::from_secs(25), "capped");
        let t3 = plus(t2, Duration::from_secs(25));
        b.start_probe(t3);
        assert!(b.record(&p, false, true, t3));
        assert_eq!(b, Breaker::default());
    }
}
