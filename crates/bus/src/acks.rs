//! Acknowledgements in groups. Handlers finish in any order; one task per consuming
//! channel collects what finished and acknowledges, with one `multiple` ack, every
//! delivery up to the oldest one still in the works. A delivery that finished ahead of
//! an older one still running is acknowledged alone, at once, so a slow handler never
//! holds back the acks of the others (nor, through the prefetch, the deliveries behind
//! them). A quorum queue records each ack in its log, so a group costs the broker one
//! entry instead of one per message.

use std::collections::BTreeSet;

use lapin::options::BasicAckOptions;
use lapin::Channel;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::consume::answered;

/// What the acknowledging task hears about one delivery tag of its channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// Delivered; not finished yet.
    Delivered(u64),
    /// Finished: to be acknowledged.
    Done(u64),
    /// Settled some other way (nacked, or left for redelivery): never acknowledged.
    Dropped(u64),
}

/// The handle the consume loop and the handlers use; cheap to clone. Dropping every
/// clone ends the task.
#[derive(Clone)]
pub(crate) struct Acks {
    tx: mpsc::UnboundedSender<Event>,
}

impl Acks {
    /// Starts the acknowledging task of `channel`; it ends once every handle is
    /// dropped and what they handed over is sent.
    pub(crate) fn start(channel: Channel) -> (Acks, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(run(channel, rx));
        (Acks { tx }, task)
    }

    /// Called in delivery order, before the delivery is handed to a handler.
    pub(crate) fn delivered(&self, tag: u64) {
        let _ = self.tx.send(Event::Delivered(tag));
    }

    pub(crate) fn done(&self, tag: u64) {
        let _ = self.tx.send(Event::Done(tag));
    }

    pub(crate) fn dropped(&self, tag: u64) {
        let _ = self.tx.send(Event::Dropped(tag));
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Event>) {
    let mut book = Book::default();
    while let Some(event) = rx.recv().await {
        book.note(event);
        // Everything that arrived meanwhile goes into the same round.
        while let Ok(event) = rx.try_recv() {
            book.note(event);
        }
        let round = book.round();
        if let Some(up_to) = round.multiple {
            send(&channel, up_to, true).await;
        }
        for tag in round.single {
            send(&channel, tag, false).await;
        }
    }
}

async fn send(channel: &Channel, tag: u64, multiple: bool) {
    let ack = channel.basic_ack(tag, BasicAckOptions { multiple });
    match answered("acking deliveries", ack).await {
        Ok(Ok(())) => debug!(tag, multiple, "acked"),
        // Either way the channel is gone: the broker will redeliver, and handlers are
        // idempotent.
        Ok(Err(err)) => {
            warn!(error = %err, tag, multiple, "ack failed (the broker will redeliver)")
        }
        Err(err) => {
            warn!(error = %err, tag, multiple, "ack unanswered (the broker will redeliver)")
        }
    }
}

/// The tags of one channel still in the works, and those finished but not yet acked.
#[derive(Debug, Default)]
struct Book {
    unsettled: BTreeSet<u64>,
    finished: BTreeSet<u64>,
}

/// The acks of one round: one `multiple` ack up to a tag, then single acks.
#[derive(Debug, Default, PartialEq, Eq)]
struct Round {
    multiple: Option<u64>,
    single: Vec<u64>,
}

impl Book {
    fn note(&mut self, event: Event) {
        match event {
            Event::Delivered(tag) => {
                self.unsettled.insert(tag);
            }
            Event::Done(tag) => {
                self.unsettled.remove(&tag);
                self.finished.insert(tag);
            }
            Event::Dropped(tag) => {
                self.unsettled.remove(&tag);
            }
        }
    }

    /// A `multiple` ack covers every finished tag below the oldest unsettled one (it
    /// acknowledges everything outstanding up to its tag, so nothing unsettled may be
    /// below it); the finished tags above that are acknowledged one by one.
    fn round(&mut self) -> Round {
        let floor = self.unsettled.first().copied().unwrap_or(u64::MAX);
        let above = self.finished.split_off(&floor);
        let below = std::mem::take(&mut self.finished);
        // One finished tag alone below the floor is acknowledged alone: the same frame.
        let (multiple, mut single) = match below.len() {
            0 => (None, Vec::new()),
            1 => (None, below.into_iter().collect()),
            _ => (below.last().copied(), Vec::new()),
        };
        single.extend(above);
        Round { multiple, single }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn book(events: &[Event]) -> Book {
        let mut book = Book::default();
        for event in events {
            book.note(*event);
        }
        book
    }

    use Event::{Delivered, Done, Dropped};

    #[test]
    fn finished_tags_below_the_oldest_unsettled_go_in_one_multiple_ack() {
        let mut book = book(&[
            Delivered(1),
            Delivered(2),
            Delivered(3),
            Delivered(4),
            Done(2),
            Done(1),
            Done(3),
        ]);
        assert_eq!(
            book.round(),
            Round {
                multiple: Some(3),
                single: vec![]
            }
        );
        assert_eq!(book.round(), Round::default(), "nothing is acked twice");
    }

    #[test]
    fn a_multiple_ack_never_covers_a_tag_still_in_the_works() {
        let mut book = book(&[
            Delivered(1),
            Delivered(2),
            Delivered(3),
            Delivered(4),
            Done(1),
            Done(2),
            Done(4),
        ]);
        assert_eq!(
            book.round(),
            Round {
                multiple: Some(2),
                single: vec![4]
            },
            "3 is still running: 4 is acked alone, not held back behind it"
        );
        book.note(Done(3));
        assert_eq!(
            book.round(),
            Round {
                multiple: None,
                single: vec![3]
            }
        );
    }

    #[test]
    fn a_dropped_tag_no_longer_holds_the_floor_and_is_never_acked() {
        let mut book = book(&[
            Delivered(1),
            Delivered(2),
            Delivered(3),
            Dropped(1),
            Done(2),
            Done(3),
        ]);
        assert_eq!(
            book.round(),
            Round {
                multiple: Some(3),
                single: vec![]
            }
        );
    }

    #[test]
    fn a_slow_first_delivery_does_not_hold_back_the_others() {
        let mut book = book(&[Delivered(1), Delivered(2), Delivered(3), Done(2), Done(3)]);
        assert_eq!(
            book.round(),
            Round {
                multiple: None,
                single: vec![2, 3]
            }
        );
    }
}
