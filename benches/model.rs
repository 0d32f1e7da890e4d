//! Criterion benches (filled in by the model work).

fn main() {}
