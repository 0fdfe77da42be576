//! Where change documents go. For now: JSON lines files (`weir capture`).

pub mod jsonl;

pub use jsonl::{JsonLinesSink, SinkError};
