//! Reading values and the PostgreSQL data types a tag takes.
//!
//! A value's type is inferred from its JSON form, as the original does: integer → `integer`,
//! float → `double precision`, bool → `boolean`, string → `text`, array or object → `jsonb`,
//! null → `text`.
//!
//! # How a tag's type changes
//! A tag keeps one data type, the type an admin sees and a chart reads; every stored reading
//! also keeps the type of its own value (`value_type`), so history never depends on the tag.
//! When a new value's type differs from the tag's (see [`DataType::merge`]):
//! - `integer` and `double precision` widen to `double precision`, and stay there: a float
//!   sensor that happens to send `12` does not flap back to `integer`;
//! - a null value changes nothing (it carries no type);
//! - any other change (a number becoming text, say) takes the new type: the device changed
//!   what it sends, and the tag follows.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A tag's data type, named as the PostgreSQL type its values are read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DataType {
    #[serde(rename = "integer")]
    Integer,
    #[serde(rename = "double precision")]
    Double,
    #[serde(rename = "boolean")]
    Boolean,
    #[serde(rename = "text")]
    Text,
    #[serde(rename = "jsonb")]
    Jsonb,
}

impl DataType {
    /// The PostgreSQL type name, as stored in `tag.data_type` and `tag_reading.value_type`.
    pub const fn as_str(self) -> &'static str {
        match self {
            DataType::Integer => "integer",
            DataType::Double => "double precision",
            DataType::Boolean => "boolean",
            DataType::Text => "text",
            DataType::Jsonb => "jsonb",
        }
    }

    /// Reads a type name stored by [`DataType::as_str`].
    pub fn from_pg_name(name: &str) -> Option<Self> {
        Some(match name {
            "integer" => DataType::Integer,
            "double precision" => DataType::Double,
            "boolean" => DataType::Boolean,
            "text" => DataType::Text,
            "jsonb" => DataType::Jsonb,
            _ => return None,
        })
    }

    /// The tag type after a value of type `seen` arrives for a tag of type `self`.
    /// `None` for `seen` is a null value. See the module doc for the rules.
    pub fn merge(self, seen: Option<DataType>) -> DataType {
        match (self, seen) {
            (current, None) => current,
            (DataType::Integer, Some(DataType::Double))
            | (DataType::Double, Some(DataType::Integer)) => DataType::Double,
            (_, Some(seen)) => seen,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reading's value, typed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum Value {
    #[serde(rename = "integer")]
    Integer(i64),
    #[serde(rename = "double precision")]
    Double(f64),
    #[serde(rename = "boolean")]
    Boolean(bool),
    #[serde(rename = "text")]
    Text(String),
    #[serde(rename = "jsonb")]
    Json(serde_json::Value),
    #[serde(rename = "null")]
    Null,
}

impl Value {
    /// Types a JSON value. Integers outside `i64` are stored as `double precision`.
    pub fn from_json(json: serde_json::Value) -> Value {
        match json {
            serde_json::Value::Null => Value::Null,
            serde_json::Value::Bool(b) => Value::Boolean(b),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => Value::Integer(i),
                // serde_json keeps a number it cannot hold as i64 or u64 as f64; only
                // non-finite numbers lack one, and JSON has none.
                None => Value::Double(n.as_f64().unwrap_or(f64::NAN)),
            },
            serde_json::Value::String(s) => Value::Text(s),
            json @ (serde_json::Value::Array(_) | serde_json::Value::Object(_)) => {
                Value::Json(json)
            }
        }
    }

    /// The value's own type; `None` for null.
    pub fn data_type(&self) -> Option<DataType> {
        match self {
            Value::Integer(_) => Some(DataType::Integer),
            Value::Double(_) => Some(DataType::Double),
            Value::Boolean(_) => Some(DataType::Boolean),
            Value::Text(_) => Some(DataType::Text),
            Value::Json(_) => Some(DataType::Jsonb),
            Value::Null => None,
        }
    }

    /// The type recorded with a stored reading: null is recorded as `text`, as in the original.
    pub fn stored_type(&self) -> DataType {
        self.data_type().unwrap_or(DataType::Text)
    }

    /// The value as JSON, as it is published to subscribers.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Value::Integer(i) => (*i).into(),
            Value::Double(f) => serde_json::Number::from_f64(*f)
                .map(serde_json::Value::Number)
                .unwrap_or(serde_json::Value::Null),
            Value::Boolean(b) => (*b).into(),
            Value::Text(s) => s.clone().into(),
            Value::Json(j) => j.clone(),
            Value::Null => serde_json::Value::Null,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn infers_types_as_the_original() {
        let cases = [
            (json!(10), Some(DataType::Integer)),
            (json!(-10), Some(DataType::Integer)),
            (json!(12.00), Some(DataType::Double)),
            (json!(1.5e3), Some(DataType::Double)),
            (json!(true), Some(DataType::Boolean)),
            (json!("on"), Some(DataType::Text)),
            (json!([1, 2]), Some(DataType::Jsonb)),
            (json!({"a": 1}), Some(DataType::Jsonb)),
            (json!(null), None),
        ];
        for (json, ty) in cases {
            assert_eq!(Value::from_json(json.clone()).data_type(), ty, "{json}");
        }
        assert_eq!(Value::Null.stored_type(), DataType::Text);
    }

    #[test]
    fn integers_past_i64_become_doubles() {
        let v: serde_json::Value = serde_json::from_str("18446744073709551615").unwrap();
        assert_eq!(
            Value::from_json(v),
            Value::Double(18_446_744_073_709_551_615.0)
        );
    }

    #[test]
    fn numbers_widen_and_never_narrow() {
        use DataType::*;
        assert_eq!(Integer.merge(Some(Double)), Double);
        assert_eq!(Double.merge(Some(Integer)), Double);
        assert_eq!(Integer.merge(Some(Integer)), Integer);
        assert_eq!(Integer.merge(None), Integer);
        assert_eq!(Boolean.merge(None), Boolean);
        assert_eq!(Double.merge(Some(Text)), Text);
        assert_eq!(Text.merge(Some(Integer)), Integer);
        assert_eq!(Jsonb.merge(Some(Boolean)), Boolean);
    }

    #[test]
    fn pg_names_round_trip() {
        for t in [
            DataType::Integer,
            DataType::Double,
            DataType::Boolean,
            DataType::Text,
            DataType::Jsonb,
        ] {
            assert_eq!(DataType::from_pg_name(t.as_str()), Some(t));
            assert_eq!(
                serde_json::to_value(t).unwrap(),
                serde_json::json!(t.as_str())
            );
        }
        assert_eq!(DataType::from_pg_name("numeric"), None);
    }
}
