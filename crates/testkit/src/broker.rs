//! Owned by the bus work: `TestVhost`.
