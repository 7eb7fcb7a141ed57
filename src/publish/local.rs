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
        let mut w = BufWriter::with_capacity(1 << 16, std::fs::File::create(&tmp)?);
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

/// Encodes rows of one table as JSON objects in column order. The keys (`"name":`, and
/// `,"name":` after the first) are escaped once per table; dates, plain strings and numbers are written
/// without going through a formatter. The bytes are those of serde_json.
pub struct RowWriter {
    keys: Vec<Vec<u8>>,
}

impl RowWriter {
    pub fn new(table: &TableData) -> Self {
        let keys = table
            .columns
            .iter()
            .enumerate()
            .map(|(i, col)| {
                let mut k = if i == 0 { vec![] } else { vec![b','] };
                serde_json::to_writer(&mut k, &col.name).expect("writing to memory");
                k.push(b':');
                k
            })
            .collect();
        RowWriter { keys }
    }

    pub fn write(&self, w: &mut impl Write, row: &[Value]) -> std::io::Result<()> {
        w.write_all(b"{")?;
        for (key, v) in self.keys.iter().zip(row) {
            w.write_all(key)?;
            match v {
                Value::Null => w.write_all(b"null")?,
                Value::Str(s) => write_str(w, s)?,
                Value::Int(x) => serde_json::to_writer(&mut *w, x)?,
                Value::Float(x) | Value::Numeric(x) if x.is_finite() => {
                    serde_json::to_writer(&mut *w, x)?
                }
                Value::Float(_) | Value::Numeric(_) => w.write_all(b"null")?,
                Value::Bool(b) => w.write_all(if *b { b"true" } else { b"false" })?,
                Value::Date(d) => write_date(w, *d)?,
            }
        }
        w.write_all(b"}\n")
    }
}

/// A JSON string: as is when nothing in it needs escaping (the usual client id), else
/// through serde_json.
fn write_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        w.write_all(b"\"")?;
        w.write_all(s.as_bytes())?;
        w.write_all(b"\"")
    } else {
        serde_json::to_writer(&mut *w, s).map_err(std::io::Error::from)
    }
}

/// `"YYYY-MM-DD"`, as `%Y-%m-%d` formats it (years outside 0..=9999 through chrono).
fn write_date(w: &mut impl Write, d: chrono::NaiveDate) -> std::io::Result<()> {
    use chrono::Datelike;
    let (y, m, day) = (d.year(), d.month(), d.day());
    if !(0..=9999).contains(&y) {
        return write!(w, "\"{}\"", d.format("%Y-%m-%d"));
    }
    let y = y as u32;
    let digit = |x: u32| b'0' + x as u8;
    w.write_all(&[
        b'"',
        digit(y / 1000),
        digit(y / 100 % 10),
        digit(y / 10 % 10),
        digit(y % 10),
        b'-',
        digit(m / 10),
        digit(m % 10),
        b'-',
        digit(day / 10),
        digit(day % 10),
        b'"',
    ])
}

impl Sink for LocalSink {
    fn publish(&mut self, table: &TableData) -> Result<(), PublishError> {
        let fail = |e: std::io::Error| PublishError::Permanent {
            table: table.name.clone(),
            detail: format!("{}: {e}", self.dir.display()),
        };
        let rows = RowWriter::new(table);
        self.write_atomically(&table.name, |w| {
            for row in &table.rows {
                rows.write(w, row)?;
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

    /// The encoding before [`RowWriter`]: every key and value through serde_json or chrono.
    fn reference_row(table: &TableData, row: &[Value]) -> Vec<u8> {
        let mut w = Vec::new();
        w.push(b'{');
        for (i, (col, v)) in table.columns.iter().zip(row).enumerate() {
            if i > 0 {
                w.push(b',');
            }
            serde_json::to_writer(&mut w, &col.name).unwrap();
            w.push(b':');
            match v {
                Value::Null => w.extend_from_slice(b"null"),
                Value::Str(s) => serde_json::to_writer(&mut w, s).unwrap(),
                Value::Int(x) => write!(w, "{x}").unwrap(),
                Value::Float(x) | Value::Numeric(x) if x.is_finite() => {
                    serde_json::to_writer(&mut w, x).unwrap()
                }
                Value::Float(_) | Value::Numeric(_) => w.extend_from_slice(b"null"),
                Value::Bool(b) => write!(w, "{b}").unwrap(),
                Value::Date(d) => write!(w, "\"{}\"", d.format("%Y-%m-%d")).unwrap(),
            }
        }
        w.extend_from_slice(b"}\n");
        w
    }

    #[test]
    fn row_writer_writes_the_same_bytes_as_serde_json() {
        use chrono::NaiveDate;
        let date = |y, m, d| Value::Date(NaiveDate::from_ymd_opt(y, m, d).unwrap());
        let table = TableData {
            name: "t".into(),
            kind: TableKind::Aggregates,
            columns: ["client_id", "na\"me", "n", "x", "b", "d", "z"]
                .iter()
                .map(|c| Column::new(*c, ColumnType::String, true))
                .collect(),
            rows: vec![],
        };
        let values = [
            vec![Value::Str("c-0001".into()), Value::Str("a\"b\\c".into())],
            vec![
                Value::Str("tab\there, é, \u{1}".into()),
                Value::Str(String::new()),
            ],
            vec![
                Value::Int(0),
                Value::Int(-42),
                Value::Int(i64::MIN),
                Value::Int(i64::MAX),
            ],
            vec![
                Value::Float(0.1),
                Value::Float(-1e300),
                Value::Numeric(0.5),
                Value::Float(3.0),
            ],
            vec![
                Value::Float(f64::NAN),
                Value::Numeric(f64::INFINITY),
                Value::Null,
            ],
            vec![Value::Bool(true), Value::Bool(false)],
            vec![
                date(2026, 1, 2),
                date(999, 12, 31),
                date(-3, 5, 6),
                date(10000, 1, 1),
            ],
        ];
        let mut n = 0;
        for a in &values[0] {
            for b in &values[1] {
                for c in &values[2] {
                    for (x, bo) in values[3]
                        .iter()
                        .chain(&values[4])
                        .zip(values[5].iter().cycle())
                    {
                        for d in &values[6] {
                            let row = vec![
                                a.clone(),
                                b.clone(),
                                c.clone(),
                                x.clone(),
                                bo.clone(),
                                d.clone(),
                                Value::Null,
                            ];
                            let mut got = Vec::new();
                            RowWriter::new(&table).write(&mut got, &row).unwrap();
                            assert_eq!(
                                String::from_utf8(got).unwrap(),
                                String::from_utf8(reference_row(&table, &row)).unwrap()
                            );
                            n += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(n, 2 * 2 * 4 * 7 * 4);
        let empty = TableData {
            columns: vec![],
            ..table
        };
        let mut got = Vec::new();
        RowWriter::new(&empty).write(&mut got, &[]).unwrap();
        assert_eq!(got, b"{}\n");
    }

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
