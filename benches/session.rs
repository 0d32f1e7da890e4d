//! Criterion benches (filled in by the session work).

fn main() {}
