//! Rates from successive snapshots: the counts a snapshot reads (orders, finished
//! orders, the log head) only grow, so their differences over time are throughput,
//! without a time-range query over a million rows.
use std::collections::VecDeque;

use chrono::{DateTime, Utc};

use super::snapshot::Snapshot;

/// How far back rates and the sparkline look.
pub const WINDOW_SECONDS: f64 = 60.0;
/// Points kept for the sparkline (one per refresh).
const MAX_POINTS: usize = 240;

/// The counters of one snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub at: DateTime<Utc>,
    pub placed: i64,
    pub finished: i64,
    pub head: i64,
}

impl Point {
    pub fn of(snapshot: &Snapshot) -> Point {
        Point {
            at: snapshot.taken_at,
            placed: snapshot.orders_total(),
            finished: snapshot.finished_total(),
            head: snapshot.head,
        }
    }
}

/// Per-second rates between two points.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Rates {
    pub placed: f64,
    pub finished: f64,
    pub events: f64,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    points: VecDeque<Point>,
}

impl History {
    pub fn new() -> History {
        History::default()
    }

    pub fn record(&mut self, snapshot: &Snapshot) {
        self.push(Point::of(snapshot));
    }

    pub fn push(&mut self, point: Point) {
        // A rebuilt read model (replay) can shrink the counts: start over rather
        // than show negative rates.
        if self
            .points
            .back()
            .is_some_and(|last| point.placed < last.placed || point.head < last.head)
        {
            self.points.clear();
        }
        self.points.push_back(point);
        while self.points.len() > MAX_POINTS {
            self.points.pop_front();
        }
    }

    /// Rates between the last two snapshots; `None` before there are two.
    pub fn current(&self) -> Option<Rates> {
        let mut newest = self.points.iter().rev();
        let last = newest.next()?;
        let before = newest.next()?;
        rates(before, last)
    }

    /// Rates over the last minute (or what the history holds of it).
    pub fn last_minute(&self) -> Option<Rates> {
        let last = self.points.back()?;
        let first = self
            .points
            .iter()
            .find(|p| seconds_between(p, last) <= WINDOW_SECONDS)?;
        rates(first, last)
    }

    /// Orders placed per second between successive snapshots, oldest first, for the
    /// sparkline (whole orders per second, rounded up so a trickle still shows).
    pub fn placed_per_second(&self) -> Vec<u64> {
        let points: Vec<&Point> = self.points.iter().collect();
        points
            .windows(2)
            .filter_map(|pair| rates(pair[0], pair[1]))
            .map(|r| r.placed.max(0.0).ceil() as u64)
            .collect()
    }
}

fn seconds_between(from: &Point, to: &Point) -> f64 {
    (to.at - from.at).num_milliseconds() as f64 / 1000.0
}

fn rates(from: &Point, to: &Point) -> Option<Rates> {
    let seconds = seconds_between(from, to);
    if seconds <= 0.0 {
        return None;
    }
    let per_second = |a: i64, b: i64| (b - a) as f64 / seconds;
    Some(Rates {
        placed: per_second(from.placed, to.placed),
        finished: per_second(from.finished, to.finished),
        events: per_second(from.head, to.head),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn point(second: i64, placed: i64, finished: i64, head: i64) -> Point {
        Point {
            at: DateTime::<Utc>::UNIX_EPOCH + TimeDelta::seconds(second),
            placed,
            finished,
            head,
        }
    }

    #[test]
    fn rates_come_from_the_last_two_points() {
        let mut history = History::new();
        assert_eq!(history.current(), None);
        history.push(point(0, 10, 5, 100));
        assert_eq!(history.current(), None);
        history.push(point(2, 14, 7, 140));
        assert_eq!(
            history.current(),
            Some(Rates {
                placed: 2.0,
                finished: 1.0,
                events: 20.0
            })
        );
    }

    #[test]
    fn the_last_minute_ignores_older_points() {
        let mut history = History::new();
        history.push(point(0, 0, 0, 0));
        history.push(point(50, 100, 0, 0));
        history.push(point(110, 160, 60, 600));
        // from t=50 to t=110
        let minute = history.last_minute().expect("two points within a minute");
        assert_eq!(minute.placed, 1.0);
        assert_eq!(minute.finished, 1.0);
        assert_eq!(minute.events, 10.0);
        assert_eq!(history.placed_per_second(), vec![2, 1]);
    }

    #[test]
    fn shrinking_counts_start_the_history_over() {
        let mut history = History::new();
        history.push(point(0, 100, 0, 1000));
        history.push(point(1, 0, 0, 1000));
        assert_eq!(history.current(), None);
        assert!(history.placed_per_second().is_empty());
    }
}
