//! Identifiers.
use uuid::Uuid;

/// Namespace for the UUIDv5 ids of derived events.
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_7765_7665_6e74_7331);

/// The id of the `index`-th event that `handler` decided in reaction to the message
/// `causation_id`. Deterministic, so that handling a message twice yields the same ids
/// and the log's unique `event_id` turns the second attempt into a no-op.
pub fn derive_event_id(causation_id: Uuid, handler: &str, index: usize) -> Uuid {
    let name = format!("{causation_id}/{handler}/{index}");
    Uuid::new_v5(&EVENT_ID_NAMESPACE, name.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let m = Uuid::from_u128(42);
        assert_eq!(
            derive_event_id(m, "order", 0),
            derive_event_id(m, "order", 0)
        );
        assert_ne!(
            derive_event_id(m, "order", 0),
            derive_event_id(m, "order", 1)
        );
        assert_ne!(
            derive_event_id(m, "order", 0),
            derive_event_id(m, "payment", 0)
        );
    }
}
