//! The circuit breaker of one upstream (PROTOCOL.md section 10).
//!
//! After `failures` failures in a row it opens: for `open_for` calls fail at once without
//! reaching the backend. Then one call is let through as a trial; its success closes the
//! circuit, its failure opens it again. A trial that ends without an outcome (its caller
//! went away) lets the next call be the trial.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

/// The breaker's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Calls go through; this many failed in a row.
    Closed(u32),
    /// Calls fail at once until then.
    Open(Instant),
    /// One trial call is in flight; others fail at once.
    Trial,
}

/// Whether a call may go to the backend, and as what.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// The circuit is closed.
    Normal,
    /// The circuit's time is up: this call tests the backend.
    Trial,
}

/// One upstream's circuit breaker.
#[derive(Debug)]
pub(super) struct Breaker {
    failures: u32,
    open_for: Duration,
    state: Mutex<State>,
}

impl Breaker {
    /// A closed breaker that opens after `failures` in a row, for `open_for`.
    pub(super) fn new(failures: u32, open_for: Duration) -> Self {
        Self {
            failures: failures.max(1),
            open_for,
            state: Mutex::new(State::Closed(0)),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a call may go through at `now`; `None`: fail it at once.
    pub(super) fn pass(&self, now: Instant) -> Option<Pass> {
        let mut state = self.state();
        match *state {
            State::Closed(_) => Some(Pass::Normal),
            State::Open(until) if now >= until => {
                *state = State::Trial;
                Some(Pass::Trial)
            }
            State::Open(_) | State::Trial => None,
        }
    }

    /// A call that went through ended: `ok` if the backend answered (a refusal is an answer).
    ///
    /// Returns whether this opened the circuit.
    pub(super) fn record(&self, pass: Pass, ok: bool, now: Instant) -> bool {
        let mut state = self.state();
        let next = match (*state, pass, ok) {
            (_, Pass::Trial, true) => State::Closed(0),
            (_, Pass::Trial, false) => State::Open(now + self.open_for),
            (State::Closed(_), Pass::Normal, true) => State::Closed(0),
            (State::Closed(n), Pass::Normal, false) if n + 1 >= self.failures => {
                State::Open(now + self.open_for)
            }
            (State::Closed(n), Pass::Normal, false) => State::Closed(n + 1),
            // A call that started before the circuit opened: the circuit's state stands.
            (other, Pass::Normal, _) => other,
        };
        let opened = matches!(next, State::Open(_)) && !matches!(*state, State::Open(_));
        *state = next;
        opened
    }

    /// Whether the circuit is open (or testing).
    #[cfg(test)]
    fn is_open(&self) -> bool {
        !matches!(*self.state(), State::Closed(_))
    }

    /// A trial call was abandoned before its outcome: the next call is the trial.
    fn abandoned(&self, now: Instant) {
        let mut state = self.state();
        if *state == State::Trial {
            *state = State::Open(now);
        }
    }
}

/// A call let through: records its outcome once, or, dropped without one, gives up a trial.
#[derive(Debug)]
pub(super) struct Passed<'a> {
    breaker: &'a Breaker,
    pass: Pass,
    done: bool,
}

impl<'a> Passed<'a> {
    /// Lets a call through `breaker` at `now`; `None`: fail it at once.
    pub(super) fn new(breaker: &'a Breaker, now: Instant) -> Option<Self> {
        let pass = breaker.pass(now)?;
        Some(Self {
            breaker,
            pass,
            done: false,
        })
    }

    /// Whether this call is the trial.
    pub(super) fn is_trial(&self) -> bool {
        self.pass == Pass::Trial
    }

    /// Records the outcome; returns whether this opened the circuit.
    pub(super) fn record(mut self, ok: bool, now: Instant) -> bool {
        self.done = true;
        self.breaker.record(self.pass, ok, now)
    }
}

impl Drop for Passed<'_> {
    fn drop(&mut self) {
        if !self.done && self.pass == Pass::Trial {
            self.breaker.abandoned(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_opens_after_failures_in_a_row_and_one_trial_closes_it() {
        let b = Breaker::new(3, Duration::from_secs(5));
        let t0 = Instant::now();
        for _ in 0..2 {
            assert_eq!(b.pass(t0), Some(Pass::Normal));
            assert!(!b.record(Pass::Normal, false, t0));
        }
        assert!(
            !b.record(Pass::Normal, true, t0),
            "an answer starts the count again"
        );
        for _ in 0..2 {
            b.record(Pass::Normal, false, t0);
        }
        assert!(
            b.record(Pass::Normal, false, t0),
            "the third in a row opens it"
        );
        assert!(b.is_open());
        assert_eq!(b.pass(t0 + Duration::from_secs(4)), None);
        let later = t0 + Duration::from_secs(5);
        assert_eq!(b.pass(later), Some(Pass::Trial));
        assert_eq!(b.pass(later), None, "one trial at a time");
        assert!(
            b.record(Pass::Trial, false, later),
            "a failed trial opens it again"
        );
        assert_eq!(b.pass(later + Duration::from_secs(1)), None);
        let again = later + Duration::from_secs(5);
        assert_eq!(b.pass(again), Some(Pass::Trial));
        b.record(Pass::Trial, true, again);
        assert!(!b.is_open());
        assert_eq!(b.pass(again), Some(Pass::Normal));
    }

    #[test]
    fn an_abandoned_trial_lets_the_next_call_be_the_trial() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        b.record(Pass::Normal, false, t0);
        let later = t0 + Duration::from_secs(5);
        let trial = Passed::new(&b, later).expect("the trial");
        assert!(trial.is_trial());
        assert!(Passed::new(&b, later).is_none(), "one trial at a time");
        drop(trial);
        let next = Passed::new(&b, later).expect("the next call is the trial");
        assert!(next.is_trial());
        next.record(true, later);
        assert!(!b.is_open());
    }

    #[test]
    fn calls_that_started_before_it_opened_do_not_change_it() {
        let b = Breaker::new(1, Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(b.record(Pass::Normal, false, t0));
        b.record(Pass::Normal, true, t0);
        assert!(
            b.is_open(),
            "a late success of an older call does not close it"
        );
    }
}
