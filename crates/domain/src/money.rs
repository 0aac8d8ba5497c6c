//! Money in integer minor units.

/// An amount in minor units (cents). Never a float.
pub type Cents = i64;
