//! Sources of events: NDJSON files (`replay`) and Kafka (`run`, `produce`).

pub mod file;
pub mod kafka;
pub mod stream;
