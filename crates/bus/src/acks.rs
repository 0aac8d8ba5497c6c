//! Acknowledgements of one channel, coalesced: the deliveries whose handlers finished
//! together are acknowledged with one `basic.ack` (`multiple`) when nothing delivered
//! before them is still open, instead of one frame each. On a quorum queue every ack
//! is also a command in the queue's replicated log, so a frame saved is work saved on
//! the broker as well.
//!
//! A `multiple` ack settles every delivery up to its tag, so it is sent only up to the
//! first delivery that is still being handled (or was returned with a nack, which is
//! sent before the ledger hears of it). A finished delivery behind one that is still
//! open is acknowledged on its own at once: a slow handler never holds back the acks of
//! the others, which would fill the prefetch window and stall the queue.
use std::collections::{BTreeSet, HashMap};

use futures::future::join_all;
use lapin::options::BasicAckOptions;
use lapin::Acker;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::consume::answered;

/// Delivery tags of one channel that are neither acknowledged nor returned.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    open: BTreeSet<u64>,
}

/// The frames that acknowledge a set of finished deliveries.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct AckPlan {
    /// One `multiple` ack up to and including this tag.
    pub(crate) up_to: Option<u64>,
    /// Tags acknowledged one by one (behind a delivery that is still open).
    pub(crate) singles: Vec<u64>,
}

impl Ledger {
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.open.insert(tag);
    }

    /// The delivery was settled another way (a nack already sent) or never will be on
    /// this channel.
    pub(crate) fn settled(&mut self, tag: u64) {
        self.open.remove(&tag);
    }

    /// How to acknowledge `finished`, which leave the ledger.
    pub(crate) fn plan(&mut self, mut finished: Vec<u64>) -> AckPlan {
        for tag in &finished {
            self.open.remove(tag);
        }
        finished.sort_unstable();
        let first_open = self.open.first().copied();
        let covered = finished.partition_point(|tag| first_open.is_none_or(|open| *tag < open));
        let singles = finished.split_off(covered);
        match finished.as_slice() {
            [] => AckPlan {
                up_to: None,
                singles,
            },
            // A lone tag goes out as an ordinary ack.
            [only] => {
                let mut singles = singles;
                singles.insert(0, *only);
                AckPlan {
                    up_to: None,
                    singles,
                }
            }
            [.., last] => AckPlan {
                up_to: Some(*last),
                singles,
            },
        }
    }
}

enum Note {
    Delivered(u64),
    Finished(u64, Acker),
    Settled(u64),
    Flush(oneshot::Sender<()>),
}

/// The acknowledger of one channel: a task that takes what happened to its deliveries
/// and sends the acks, as many at once as have finished since its last round.
#[derive(Clone)]
pub(crate) struct Acks {
    notes: mpsc::UnboundedSender<Note>,
}

impl Acks {
    pub(crate) fn start() -> Acks {
        let (notes, received) = mpsc::unbounded_channel();
        tokio::spawn(acknowledge(received));
        Acks { notes }
    }

    /// Must be called for each delivery, in the order the channel delivered them,
    /// before its handler can finish.
    pub(crate) fn delivered(&self, tag: u64) {
        self.note(Note::Delivered(tag));
    }

    /// The delivery's effects are committed: acknowledge it (soon, possibly with others).
    pub(crate) fn finished(&self, tag: u64, acker: Acker) {
        self.note(Note::Finished(tag, acker));
    }

    /// The delivery was returned with a nack (already sent), or is left to redelivery.
    pub(crate) fn settled(&self, tag: u64) {
        self.note(Note::Settled(tag));
    }

    /// Waits until every ack asked for before this call has been handed to the channel.
    pub(crate) async fn flush(&self) {
        let (done, flushed) = oneshot::channel();
        self.note(Note::Flush(done));
        let _ = flushed.await;
    }

    fn note(&self, note: Note) {
        // The task ends only when every sender is gone.
        let _ = self.notes.send(note).is_ok();
    }
}

/// Runs until every [`Acks`] of the channel is dropped.
async fn acknowledge(mut notes: mpsc::UnboundedReceiver<Note>) {
    let mut ledger = Ledger::default();
    while let Some(first) = notes.recv().await {
        let mut finished = HashMap::new();
        let mut flushes = Vec::new();
        let mut take = |note| match note {
            Note::Delivered(tag) => ledger.delivered(tag),
            Note::Finished(tag, acker) => {
                finished.insert(tag, acker);
            }
            Note::Settled(tag) => ledger.settled(tag),
            Note::Flush(done) => flushes.push(done),
        };
        take(first);
        // Whatever else finished meanwhile goes out in the same round.
        while let Ok(note) = notes.try_recv() {
            take(note);
        }
        let plan = ledger.plan(finished.keys().copied().collect());
        send(&plan, &finished).await;
        for done in flushes {
            let _ = done.send(());
        }
    }
}

async fn send(plan: &AckPlan, ackers: &HashMap<u64, Acker>) {
    let multiple = plan
        .up_to
        .and_then(|tag| ackers.get(&tag))
        .map(|acker| acker.ack(BasicAckOptions { multiple: true }));
    let singles = plan
        .singles
        .iter()
        .filter_map(|tag| ackers.get(tag))
        .map(|acker| acker.ack(BasicAckOptions::default()));
    let frames = multiple.into_iter().chain(singles);
    let answers = answered("acknowledging deliveries", join_all(frames)).await;
    debug!(
        up_to = plan.up_to,
        singles = plan.singles.len(),
        "acknowledged"
    );
    // Either way the channel is gone: the broker will redeliver, and handlers are
    // idempotent.
    match answers {
        Ok(answers) => {
            for answer in answers {
                if let Err(err) = answer {
                    warn!(error = %err, "ack failed (the broker will redeliver)");
                }
            }
        }
        Err(err) => warn!(error = %err, "acks unanswered (the broker will redeliver)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(open: &[u64]) -> Ledger {
        let mut ledger = Ledger::default();
        for tag in open {
            ledger.delivered(*tag);
        }
        ledger
    }

    #[test]
    fn deliveries_finished_together_in_order_take_one_multiple_ack() {
        let mut ledger = ledger(&[1, 2, 3, 4]);
        assert_eq!(
            ledger.plan(vec![3, 1, 2, 4]),
            AckPlan {
                up_to: Some(4),
                singles: vec![]
            }
        );
    }

    #[test]
    fn a_delivery_still_open_bounds_the_multiple_ack_and_the_rest_go_alone() {
        let mut ledger = ledger(&[1, 2, 3, 4, 5]);
        assert_eq!(
            ledger.plan(vec![1, 2, 4, 5]),
            AckPlan {
                up_to: Some(2),
                singles: vec![4, 5]
            }
        );
        // 3 finishes later: nothing before it is open any more.
        assert_eq!(
            ledger.plan(vec![3]),
            AckPlan {
                up_to: None,
                singles: vec![3]
            }
        );
    }

    #[test]
    fn a_returned_delivery_no_longer_holds_back_the_others() {
        let mut ledger = ledger(&[1, 2, 3]);
        assert_eq!(
            ledger.plan(vec![2, 3]),
            AckPlan {
                up_to: None,
                singles: vec![2, 3]
            }
        );
        ledger.settled(1);
        ledger.delivered(4);
        ledger.delivered(5);
        assert_eq!(
            ledger.plan(vec![4, 5]),
            AckPlan {
                up_to: Some(5),
                singles: vec![]
            }
        );
    }

    #[test]
    fn a_multiple_ack_never_reaches_a_delivery_that_is_still_open() {
        let mut ledger = ledger(&[1, 2, 3, 4, 5, 6]);
        let plan = ledger.plan(vec![1, 2, 5, 6]);
        assert!(plan.up_to.is_some_and(|tag| tag < 3), "{plan:?}");
        assert_eq!(plan.singles, vec![5, 6]);
    }

    #[test]
    fn nothing_finished_sends_nothing() {
        let mut ledger = ledger(&[1]);
        assert_eq!(ledger.plan(vec![]), AckPlan::default());
    }
}
