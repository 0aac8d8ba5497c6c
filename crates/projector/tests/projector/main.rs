//! Integration tests of the projector, each against a fresh database (`TestDb`): the
//! read models follow the contract, every event is applied exactly once (crash, two
//! instances), and replay gives the rows live projection gives.

mod concurrency;
mod crash_safety;
mod order_status;
mod pages;
mod replay;
mod replay_many;
mod stock_levels;
mod support;
mod timers;
