//! slipstream: streaming, incremental experiment analysis.
//!
//! # Layout
//!
//! Stage by stage, in the order data flows (DESIGN.md section 1):
//!
//! - [`config`]: experiments and pipeline settings from TOML, validated with every
//!   problem reported at once.
//! - [`event`]: the input contract and its decoding from JSON and protobuf; rejects are
//!   typed by reason.
//! - [`ingest`]: sources: NDJSON files (`replay`) and Kafka (`run`).
//! - [`apply`]: folds events into an in-memory batch and flushes it to sled atomically
//!   with the source offsets that produced it.
//! - [`aggregate`]: the per-client accumulators (daily telemetry, enrollment) and the
//!   fold of a client's days into one window's values.
//! - [`state`]: the sled key layout, format version, offsets.
//! - [`window`]: which analysis windows exist and when each is complete.
//! - [`materialize`]: state to tables (enrollments, aggregates, statistics).
//! - [`stats`]: statistics over one window's aggregates.
//! - [`publish`]: the table model and sinks (local NDJSON files by default).
//! - [`pipeline`]: the driver: flush, decide what is due, publish.
//! - [`sketch`]: HyperLogLog++ activity sketches (DAU/WAU/MAU by any dimensions), their
//!   byte format, keys, rollups and query planner.
//! - [`http`]: the HTTP API (axum) over the sketches and state.
//! - [`health`]: experiment health checks, published statistics rows in sled, `/metrics`
//!   counters.
//! - [`web`]: the results page, server-side HTML with inline SVG.
//! - [`finalize`]: the nightly pass (calendar-complete windows, dirty windows, failed
//!   publications, status per experiment) and backfill.
//! - [`generate`]: synthetic events for trying things out and for tests.

pub mod aggregate;
pub mod apply;
pub mod config;
pub mod event;
pub mod finalize;
pub mod generate;
pub mod health;
pub mod http;
pub mod ingest;
pub mod materialize;
pub mod pipeline;
pub mod publish;
pub mod sketch;
pub mod state;
pub mod stats;
pub mod web;
pub mod window;
