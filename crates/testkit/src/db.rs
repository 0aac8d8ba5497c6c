//! Owned by the event-store work: `TestDb`.
