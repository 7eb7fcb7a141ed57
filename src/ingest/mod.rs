//! Sources of events: NDJSON files (`replay`, `backfill`) and Kafka (`run`).

pub mod file;
