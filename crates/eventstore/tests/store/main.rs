//! Integration tests of the event store, each against a fresh database (`TestDb`).

mod append;
mod append_only;
mod cancelled_begin;
mod checkpoints;
mod connect;
mod gap_safety;
mod group_commit;
mod read;
mod support;
mod wakeups;
