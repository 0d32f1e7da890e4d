//! Criterion benches (filled in by the protocol work).

fn main() {}
