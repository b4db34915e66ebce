//! mirrorpoint-bench: measures volumes and front ends.
fn main() {}
