//! Row encoding for the Storage Write API: a proto2 `DescriptorProto` built from the table's
//! columns at run time, and rows encoded by hand with prost's wire helpers.
//!
//! Every field is proto2 `optional`, so a NULL is simply an absent field (a proto3 field
//! holding 0 would be dropped from the wire and arrive as NULL: DESIGN.md section 11).

use prost::encoding;
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};

use crate::publish::{Column, ColumnType, Value};

/// Name of the row message in the writer schema; BigQuery only looks at its fields.
const ROW_MESSAGE: &str = "Row";

/// The writer schema: field `i + 1` is column `i`.
pub fn descriptor(columns: &[Column]) -> Result<DescriptorProto, String> {
    let mut fields = Vec::with_capacity(columns.len());
    for (i, column) in columns.iter().enumerate() {
        check_column_name(&column.name)?;
        let kind = match column.kind {
            ColumnType::String | ColumnType::Numeric => Type::String,
            ColumnType::Int64 => Type::Int64,
            ColumnType::Float64 => Type::Double,
            ColumnType::Bool => Type::Bool,
            ColumnType::Date => Type::Int32,
        };
        fields.push(FieldDescriptorProto {
            name: Some(column.name.clone()),
            number: Some(i as i32 + 1),
            label: Some(Label::Optional as i32),
            r#type: Some(kind as i32),
            ..Default::default()
        });
    }
    Ok(DescriptorProto {
        name: Some(ROW_MESSAGE.to_string()),
        field: fields,
        ..Default::default()
    })
}

/// Column names double as proto field names and as SQL identifiers in the views.
fn check_column_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let ok = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "column name {name:?} is not a valid BigQuery column name (expected letters, digits and '_', not starting with a digit)"
        ))
    }
}

/// Encodes one row; `row_index` only serves error messages.
pub fn encode_row(
    columns: &[Column],
    row: &[Value],
    row_index: usize,
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    if row.len() != columns.len() {
        return Err(format!(
            "row {row_index} has {} values but the table has {} columns",
            row.len(),
            columns.len()
        ));
    }
    for (i, (column, value)) in columns.iter().zip(row).enumerate() {
        let tag = i as u32 + 1;
        let mismatch = || {
            format!(
                "row {row_index}, column {}: value {value:?} does not fit type {:?}",
                column.name, column.kind
            )
        };
        let present = match (column.kind, value) {
            (_, Value::Null) => false,
            (ColumnType::String, Value::Str(s)) => {
                encoding::string::encode(tag, s, buf);
                true
            }
            (ColumnType::Int64, Value::Int(v)) => {
                encoding::int64::encode(tag, v, buf);
                true
            }
            (ColumnType::Float64, Value::Float(v) | Value::Numeric(v)) => {
                if v.is_finite() {
                    encoding::double::encode(tag, v, buf);
                }
                v.is_finite()
            }
            (ColumnType::Float64, Value::Int(v)) => {
                encoding::double::encode(tag, &(*v as f64), buf);
                true
            }
            (ColumnType::Bool, Value::Bool(v)) => {
                encoding::bool::encode(tag, v, buf);
                true
            }
            (ColumnType::Date, Value::Date(d)) => {
                encoding::int32::encode(tag, &days_since_epoch(*d), buf);
                true
            }
            (ColumnType::Numeric, Value::Numeric(v) | Value::Float(v)) => match numeric(*v) {
                Some(s) => {
                    encoding::string::encode(tag, &s, buf);
                    true
                }
                None => false,
            },
            (ColumnType::Numeric, Value::Int(v)) => {
                encoding::string::encode(tag, &v.to_string(), buf);
                true
            }
            _ => return Err(mismatch()),
        };
        if !present && !column.nullable {
            return Err(format!(
                "row {row_index}, column {}: NULL (or a non-finite number) in a REQUIRED column",
                column.name
            ));
        }
    }
    Ok(())
}

/// DATE travels as int32 days since 1970-01-01.
fn days_since_epoch(d: chrono::NaiveDate) -> i32 {
    (d - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid epoch")).num_days() as i32
}

/// NUMERIC travels as a decimal string with at most 9 decimals (BigQuery's scale);
/// non-finite values are NULL.
pub fn numeric(v: f64) -> Option<String> {
    if !v.is_finite() {
        return None;
    }
    let s = format!("{v:.9}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    Some(if s == "-0" {
        "0".to_string()
    } else {
        s.to_string()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    /// A prost message with the same field numbers, to decode what we encoded.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Decoded {
        #[prost(string, optional, tag = "1")]
        s: Option<String>,
        #[prost(int64, optional, tag = "2")]
        i: Option<i64>,
        #[prost(double, optional, tag = "3")]
        f: Option<f64>,
        #[prost(bool, optional, tag = "4")]
        b: Option<bool>,
        #[prost(int32, optional, tag = "5")]
        d: Option<i32>,
        #[prost(string, optional, tag = "6")]
        n: Option<String>,
    }

    fn columns() -> Vec<Column> {
        vec![
            Column::new("s", ColumnType::String, true),
            Column::new("i", ColumnType::Int64, true),
            Column::new("f", ColumnType::Float64, true),
            Column::new("b", ColumnType::Bool, true),
            Column::new("d", ColumnType::Date, true),
            Column::new("n", ColumnType::Numeric, true),
        ]
    }

    #[test]
    fn encodes_every_type_and_zero_values_survive() {
        let row = vec![
            Value::Str(String::new()),
            Value::Int(0),
            Value::Float(0.0),
            Value::Bool(false),
            Value::Date(chrono::NaiveDate::from_ymd_opt(2026, 11, 1).unwrap()),
            Value::Numeric(0.1),
        ];
        let mut buf = Vec::new();
        encode_row(&columns(), &row, 0, &mut buf).unwrap();
        let d = Decoded::decode(buf.as_slice()).unwrap();
        assert_eq!(d.s.as_deref(), Some(""));
        assert_eq!(d.i, Some(0));
        assert_eq!(d.f, Some(0.0));
        assert_eq!(d.b, Some(false));
        assert_eq!(d.d, Some(20758));
        assert_eq!(d.n.as_deref(), Some("0.1"));
    }

    #[test]
    fn nulls_and_non_finite_are_absent() {
        let row = vec![
            Value::Null,
            Value::Null,
            Value::Float(f64::NAN),
            Value::Null,
            Value::Null,
            Value::Numeric(f64::INFINITY),
        ];
        let mut buf = Vec::new();
        encode_row(&columns(), &row, 0, &mut buf).unwrap();
        assert!(buf.is_empty());
    }

    #[test]
    fn rejects_mismatches_and_required_nulls() {
        let mut cols = columns();
        let mut row = vec![Value::Int(1); 6];
        assert!(encode_row(&cols, &row, 3, &mut Vec::new())
            .unwrap_err()
            .contains("row 3, column s"));
        row[0] = Value::Null;
        cols[0].nullable = false;
        assert!(encode_row(&cols, &row, 0, &mut Vec::new())
            .unwrap_err()
            .contains("REQUIRED"));
        assert!(encode_row(&cols, &row[..2], 0, &mut Vec::new()).is_err());
    }

    #[test]
    fn numeric_strings() {
        assert_eq!(numeric(0.1).unwrap(), "0.1");
        assert_eq!(numeric(0.9).unwrap(), "0.9");
        assert_eq!(numeric(0.0).unwrap(), "0");
        assert_eq!(numeric(-0.0).unwrap(), "0");
        assert_eq!(numeric(12.5).unwrap(), "12.5");
        assert_eq!(numeric(1e-12).unwrap(), "0");
        assert_eq!(numeric(-3.0).unwrap(), "-3");
        assert_eq!(numeric(0.123456789123).unwrap(), "0.123456789");
        assert_eq!(numeric(f64::NAN), None);
    }

    #[test]
    fn descriptor_fields_are_optional_and_numbered() {
        let d = descriptor(&columns()).unwrap();
        assert_eq!(d.field.len(), 6);
        assert_eq!(d.field[4].number, Some(5));
        assert_eq!(d.field[4].r#type, Some(Type::Int32 as i32));
        assert!(d
            .field
            .iter()
            .all(|f| f.label == Some(Label::Optional as i32)));
        assert!(descriptor(&[Column::new("bad-name", ColumnType::String, true)]).is_err());
    }
}
