//! Criterion benches (filled in by the ws work).

fn main() {}
