//! The `mmserve` binary (being written).
fn main() {}
