//! The local sink: one `<table_name>.ndjson` per table under a directory, one JSON object
//! per row with the contract's column names (DATE as "YYYY-MM-DD", NULL as null).
//!
//! Each table is written to a temporary file and renamed over the old one, so a reader
//! (or a crash) sees the old table or the new one, never a mix. Statistics views are
//! materialized too: `statistics_<slug>_<weekly|...>.ndjson` is the union of that
//! period's tables with `window_index` added, rewritten whenever one of them changes.

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::{PublishError, Sink, TableData, TableKind, Value};

/// Writes tables as NDJSON files in `dir`.
pub struct LocalSink {
    dir: PathBuf,
}

impl LocalSink {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(LocalSink {
            dir: dir.to_path_buf(),
        })
    }

    fn write_atomically(
        &self,
        name: &str,
        write: impl FnOnce(&mut BufWriter<std::fs::File>) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let path = self.dir.join(format!("{name}.ndjson"));
        let tmp = self.dir.join(format!("{name}.ndjson.tmp"));
        let mut w = BufWriter::new(std::fs::File::create(&tmp)?);
        write(&mut w)?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Rewrites a statistics view from its tables' files.
    fn rewrite_view(&self, view: &str, table: &TableData) -> std::io::Result<()> {
        // The view's tables share the name prefix of the published table up to the index.
        let prefix = table
            .name
            .rsplit_once('_')
            .map(|(p, _)| format!("{p}_"))
            .unwrap_or_default();
        let mut parts: Vec<(u32, PathBuf)> = std::fs::read_dir(&self.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let idx = name
                    .strip_prefix(&prefix)?
                    .strip_suffix(".ndjson")?
                    .parse()
                    .ok()?;
                Some((idx, e.path()))
            })
            .collect();
        parts.sort();
        self.write_atomically(view, |w| {
            for (idx, path) in parts {
                for line in std::fs::read_to_string(path)?.lines() {
                    // Every row is an object: append the index before the closing brace.
                    let body = line.strip_suffix('}').unwrap_or(line);
                    writeln!(w, "{body},\"window_index\":{idx}}}")?;
                }
            }
            Ok(())
        })
    }
}

/// Writes one row as a JSON object in column order.
pub fn write_row(w: &mut impl Write, table: &TableData, row: &[Value]) -> std::io::Result<()> {
    w.write_all(b"{")?;
    for (i, (col, v)) in table.columns.iter().zip(row).enumerate() {
        if i > 0 {
            w.write_all(b",")?;
        }
        serde_json::to_writer(&mut *w, &col.name)?;
        w.write_all(b":")?;
        match v {
            Value::Null => w.write_all(b"null")?,
            Value::Str(s) => serde_json::to_writer(&mut *w, s)?,
            Value::Int(x) => write!(w, "{x}")?,
            Value::Float(x) | Value::Numeric(x) if x.is_finite() => {
                serde_json::to_writer(&mut *w, x)?
            }
            Value::Float(_) | Value::Numeric(_) => w.write_all(b"null")?,
            Value::Bool(b) => write!(w, "{b}")?,
            Value::Date(d) => write!(w, "\"{}\"", d.format("%Y-%m-%d"))?,
        }
    }
    w.write_all(b"}\n")
}

impl Sink for LocalSink {
    fn publish(&mut self, table: &TableData) -> Result<(), PublishError> {
        let fail = |e: std::io::Error| PublishError::Permanent {
            table: table.name.clone(),
            detail: format!("{}: {e}", self.dir.display()),
        };
        self.write_atomically(&table.name, |w| {
            for row in &table.rows {
                write_row(w, table, row)?;
            }
            Ok(())
        })
        .map_err(fail)?;
        if let TableKind::Statistics { view, .. } = &table.kind {
            self.rewrite_view(view, table).map_err(fail)?;
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("local:{}", self.dir.display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::publish::{Column, ColumnType};

    #[test]
    fn writes_rows_and_views_and_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let mut sink = LocalSink::new(dir.path()).unwrap();
        let table = |idx: u32, point: f64| TableData {
            name: format!("statistics_s_week_{idx}"),
            kind: TableKind::Statistics {
                view: "statistics_s_weekly".into(),
                window_index: idx,
                data_sources: vec![],
            },
            columns: vec![
                Column::new("metric", ColumnType::String, false),
                Column::new("point", ColumnType::Float64, true),
                Column::new("d", ColumnType::Date, true),
            ],
            rows: vec![vec![
                Value::Str("a\"b".into()),
                Value::Float(point),
                Value::Date(NaiveDate::from_ymd_opt(2026, 1, 2).unwrap()),
            ]],
        };
        use chrono::NaiveDate;
        sink.publish(&table(2, 1.5)).unwrap();
        sink.publish(&table(1, f64::NAN)).unwrap();
        sink.publish(&table(1, 0.25)).unwrap();
        let t1 = std::fs::read_to_string(dir.path().join("statistics_s_week_1.ndjson")).unwrap();
        assert_eq!(
            t1,
            "{\"metric\":\"a\\\"b\",\"point\":0.25,\"d\":\"2026-01-02\"}\n"
        );
        let view = std::fs::read_to_string(dir.path().join("statistics_s_weekly.ndjson")).unwrap();
        let rows: Vec<serde_json::Value> = view
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0]["window_index"], 1);
        assert_eq!(rows[1]["point"], 1.5);
    }
}
