//! (being written)

pub mod sampling;
