//! Where change documents go: Delta Lake tables (`weir run`), JSON lines files
//! (`weir capture`).

pub mod delta;
pub mod jsonl;

pub use jsonl::{JsonLinesSink, SinkError};
