//! Publishing tables: the one table model every sink writes, and the sink trait.
//!
//! A sink replaces a whole table at a time, so publishing the same window twice leaves
//! one copy of each row (DESIGN.md section 5). The local sink is the embedded default;
//! the BigQuery sink is another implementation of the same trait.

pub mod bigquery;
pub mod local;

use chrono::NaiveDate;

/// Column types, named as BigQuery names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnType {
    String,
    Int64,
    Float64,
    Bool,
    Date,
    Numeric,
}

/// One column of a table schema.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnType,
    pub nullable: bool,
}

impl Column {
    pub fn new(name: impl Into<String>, kind: ColumnType, nullable: bool) -> Self {
        Column {
            name: name.into(),
            kind,
            nullable,
        }
    }
}

/// One cell. Floats that are not finite are written as NULL.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    Date(NaiveDate),
    Numeric(f64),
}

/// What a table is, so sinks can maintain views over families of tables.
#[derive(Debug, Clone, PartialEq)]
pub enum TableKind {
    Enrollments,
    Aggregates,
    /// A statistics table: the view it belongs to, its 1-based window index, and what the
    /// window's aggregate rows counted per data source (kept for the health report, not
    /// published).
    Statistics {
        view: String,
        window_index: u32,
        data_sources: Vec<DataSourceFlags>,
    },
    /// A day's activity sketches (`activity_sketches_YYYYMMDD`).
    Sketches,
}

/// Clients of one window and analysis basis whose telemetry of one data source reported a
/// branch other than their enrolled one (or several), or carried no branch tag: the
/// `<data_source>_has_contradictory_branch` and `_has_non_enrolled_data` columns of the
/// aggregate table, counted. Many of either means the results are suspect.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DataSourceFlags {
    pub analysis_basis: String,
    pub data_source: String,
    /// Clients in the aggregate table (its rows).
    pub clients: u64,
    pub contradictory_branch: u64,
    pub non_enrolled_data: u64,
}

/// A whole table, replaced atomically by a sink.
#[derive(Debug, Clone, PartialEq)]
pub struct TableData {
    pub name: String,
    pub kind: TableKind,
    pub columns: Vec<Column>,
    pub rows: Vec<Vec<Value>>,
}

/// Why a publication failed; transient errors are retried, permanent ones stop the table.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("transient error publishing {table}: {detail}")]
    Transient { table: String, detail: String },
    #[error("permanent error publishing {table}: {detail}")]
    Permanent { table: String, detail: String },
}

/// A destination for tables.
pub trait Sink: Send {
    /// Replaces the table's contents with `table.rows` (creating it if needed), atomically.
    fn publish(&mut self, table: &TableData) -> Result<(), PublishError>;
    /// Short name for logs, e.g. `local:/path` or `bigquery:project.dataset`.
    fn describe(&self) -> String;
}
