//! The benchmark's server (placeholder until bench/ lands).
fn main() {}
