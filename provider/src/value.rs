//! Terraform (cty) values as the provider sees them, and their wire forms.
//!
//! Terraform sends values as msgpack (objects and maps are both msgpack maps, null is nil,
//! unknown is an extension value) and stored state as JSON. [`Value`] is the untyped tree of
//! either; [`conform`] shapes it to a schema [`Type`] (missing attributes become null).

use std::collections::BTreeMap;
use std::fmt;

use crate::schema::Type;

/// A Terraform value. Numbers are `f64`: every number this provider uses is a small integer.
#[derive(Clone, PartialEq, Default)]
pub enum Value {
    #[default]
    Null,
    /// Not known until apply. Terraform 1.15 sends refined unknowns (msgpack ext 12 with a
    /// prefix/nullness payload); every extension type decodes to this one variant.
    Unknown,
    Bool(bool),
    Number(f64),
    String(String),
    List(Vec<Value>),
    /// Both cty objects and cty maps.
    Map(BTreeMap<String, Value>),
}

/// Debug never prints string contents: values carry secrets (master secret, kubeconfig).
impl fmt::Debug for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Null => f.write_str("null"),
            Value::Unknown => f.write_str("unknown"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(n) => write!(f, "{n}"),
            Value::String(s) => write!(f, "<string, {} bytes>", s.len()),
            Value::List(l) => f.debug_list().entries(l).finish(),
            Value::Map(m) => f.debug_map().entries(m).finish(),
        }
    }
}

/// Why bytes from Terraform could not be read as a value.
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    #[error("msgpack is malformed: {0}")]
    Msgpack(String),
    #[error("JSON state is malformed: {0}")]
    Json(#[from] serde_json::Error),
    #[error("at {path}: expected {expected}, found {found}")]
    Type {
        path: String,
        expected: &'static str,
        found: &'static str,
    },
    #[error("at {path}: map key is not a string")]
    MapKey { path: String },
    #[error("at {path}: number {found} is not representable")]
    Number { path: String, found: String },
}

impl Value {
    pub fn string(s: impl Into<String>) -> Self {
        Value::String(s.into())
    }

    pub fn object<K: Into<String>>(fields: impl IntoIterator<Item = (K, Value)>) -> Self {
        Value::Map(fields.into_iter().map(|(k, v)| (k.into(), v)).collect())
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Value::Null => "null",
            Value::Unknown => "unknown",
            Value::Bool(_) => "bool",
            Value::Number(_) => "number",
            Value::String(_) => "string",
            Value::List(_) => "list",
            Value::Map(_) => "object or map",
        }
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Value::Null)
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self, Value::Unknown)
    }

    /// True when this value or anything inside it is unknown.
    pub fn contains_unknown(&self) -> bool {
        match self {
            Value::Unknown => true,
            Value::List(l) => l.iter().any(Value::contains_unknown),
            Value::Map(m) => m.values().any(Value::contains_unknown),
            _ => false,
        }
    }

    /// An attribute of an object; null when this is not an object or lacks the attribute.
    pub fn get(&self, name: &str) -> &Value {
        static NULL: Value = Value::Null;
        match self {
            Value::Map(m) => m.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// Sets an attribute; does nothing unless this is an object.
    pub fn set(&mut self, name: &str, value: Value) {
        if let Value::Map(m) = self {
            m.insert(name.to_owned(), value);
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Decodes Terraform's msgpack encoding.
    pub fn from_msgpack(bytes: &[u8]) -> Result<Self, ValueError> {
        let mut reader = bytes;
        let raw = rmpv::decode::read_value(&mut reader)
            .map_err(|e| ValueError::Msgpack(e.to_string()))?;
        if !reader.is_empty() {
            return Err(ValueError::Msgpack(format!(
                "{} trailing byte(s) after the value",
                reader.len()
            )));
        }
        from_rmpv(raw, &mut String::new())
    }

    /// Encodes as Terraform's msgpack: unknown is fixext1 type 0 (`d4 00 00`), as cty writes it.
    pub fn to_msgpack(&self) -> Vec<u8> {
        let mut out = Vec::new();
        // Writing into a Vec cannot fail.
        let _ = rmpv::encode::write_value(&mut out, &to_rmpv(self));
        out
    }

    /// Decodes stored JSON state (no unknowns can appear there).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ValueError> {
        let json: serde_json::Value = serde_json::from_slice(bytes)?;
        Ok(from_json_value(json))
    }
}

fn from_rmpv(raw: rmpv::Value, path: &mut String) -> Result<Value, ValueError> {
    use rmpv::Value as R;
    Ok(match raw {
        R::Nil => Value::Null,
        R::Ext(_, _) => Value::Unknown,
        R::Boolean(b) => Value::Bool(b),
        R::Integer(i) => match (i.as_i64(), i.as_u64()) {
            (Some(n), _) => Value::Number(n as f64),
            (None, Some(n)) => Value::Number(n as f64),
            (None, None) => {
                return Err(ValueError::Number {
                    path: path.clone(),
                    found: i.to_string(),
                })
            }
        },
        R::F32(f) => Value::Number(f64::from(f)),
        R::F64(f) => Value::Number(f),
        R::String(s) => match s.into_str() {
            Some(s) => Value::String(s),
            None => {
                return Err(ValueError::Type {
                    path: path.clone(),
                    expected: "UTF-8 string",
                    found: "invalid UTF-8",
                })
            }
        },
        R::Binary(_) => {
            return Err(ValueError::Type {
                path: path.clone(),
                expected: "a cty value",
                found: "binary",
            })
        }
        R::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(from_rmpv(item, path)?);
                path.truncate(len);
            }
            Value::List(out)
        }
        R::Map(entries) => {
            let mut out = BTreeMap::new();
            for (k, v) in entries {
                let key = match k {
                    R::String(s) => s.into_str(),
                    _ => None,
                }
                .ok_or_else(|| ValueError::MapKey { path: path.clone() })?;
                let len = path.len();
                path.push('.');
                path.push_str(&key);
                let value = from_rmpv(v, path)?;
                path.truncate(len);
                out.insert(key, value);
            }
            Value::Map(out)
        }
    })
}

fn to_rmpv(v: &Value) -> rmpv::Value {
    use rmpv::Value as R;
    match v {
        Value::Null => R::Nil,
        Value::Unknown => R::Ext(0, vec![0]),
        Value::Bool(b) => R::Boolean(*b),
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() < 9.0e15 {
                R::from(*n as i64)
            } else {
                R::F64(*n)
            }
        }
        Value::String(s) => R::from(s.as_str()),
        Value::List(l) => R::Array(l.iter().map(to_rmpv).collect()),
        Value::Map(m) => R::Map(
            m.iter()
                .map(|(k, v)| (R::from(k.as_str()), to_rmpv(v)))
                .collect(),
        ),
    }
}

fn from_json_value(json: serde_json::Value) -> Value {
    use serde_json::Value as J;
    match json {
        J::Null => Value::Null,
        J::Bool(b) => Value::Bool(b),
        J::Number(n) => Value::Number(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Value::String(s),
        J::Array(a) => Value::List(a.into_iter().map(from_json_value).collect()),
        J::Object(o) => Value::Map(
            o.into_iter()
                .map(|(k, v)| (k, from_json_value(v)))
                .collect(),
        ),
    }
}

/// Shapes a value to `ty`: objects get exactly the type's attributes (missing ones null,
/// extra ones dropped), and every leaf is checked against its type.
pub fn conform(value: Value, ty: &Type) -> Result<Value, ValueError> {
    conform_at(value, ty, &mut String::new())
}

fn conform_at(value: Value, ty: &Type, path: &mut String) -> Result<Value, ValueError> {
    let mismatch = |path: &String, v: &Value| ValueError::Type {
        path: path.clone(),
        expected: ty.name(),
        found: v.kind(),
    };
    match (ty, value) {
        (_, Value::Null) => Ok(Value::Null),
        (_, Value::Unknown) => Ok(Value::Unknown),
        (Type::String, v @ Value::String(_)) => Ok(v),
        (Type::Bool, v @ Value::Bool(_)) => Ok(v),
        (Type::Number, Value::Number(n)) if n.is_finite() => Ok(Value::Number(n)),
        (Type::List(elem), Value::List(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for (i, item) in items.into_iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{i}]"));
                out.push(conform_at(item, elem, path)?);
                path.truncate(len);
            }
            Ok(Value::List(out))
        }
        (Type::Map(elem), Value::Map(entries)) => {
            let mut out = BTreeMap::new();
            for (k, v) in entries {
                let len = path.len();
                path.push_str(&format!("[{k:?}]"));
                let v = conform_at(v, elem, path)?;
                path.truncate(len);
                out.insert(k, v);
            }
            Ok(Value::Map(out))
        }
        (Type::Object(attrs), Value::Map(mut entries)) => {
            let mut out = BTreeMap::new();
            for (name, attr_ty) in attrs {
                let v = entries.remove(*name).unwrap_or(Value::Null);
                let len = path.len();
                path.push('.');
                path.push_str(name);
                let v = conform_at(v, attr_ty, path)?;
                path.truncate(len);
                out.insert((*name).to_owned(), v);
            }
            Ok(Value::Map(out))
        }
        (_, v) => Err(mismatch(path, &v)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_extension_type_is_unknown() {
        // ext 0 as Terraform 1.0 sends it, and 1.15's refined unknown: ext 12 with
        // {1: false (not null), 2: "v-" (string prefix)}.
        let ext0 = [0xd4, 0x00, 0x00];
        assert_eq!(Value::from_msgpack(&ext0).unwrap(), Value::Unknown);
        let refined = rmpv::Value::Ext(12, {
            let mut b = Vec::new();
            rmpv::encode::write_value(
                &mut b,
                &rmpv::Value::Map(vec![
                    (rmpv::Value::from(1), rmpv::Value::from(false)),
                    (rmpv::Value::from(2), rmpv::Value::from("v-")),
                ]),
            )
            .unwrap();
            b
        });
        let mut bytes = Vec::new();
        rmpv::encode::write_value(&mut bytes, &refined).unwrap();
        assert_eq!(Value::from_msgpack(&bytes).unwrap(), Value::Unknown);
    }

    #[test]
    fn unknown_encodes_like_cty() {
        assert_eq!(Value::Unknown.to_msgpack(), vec![0xd4, 0x00, 0x00]);
        assert_eq!(Value::Null.to_msgpack(), vec![0xc0]);
    }

    #[test]
    fn msgpack_round_trip() {
        let v = Value::object([
            ("name", Value::string("c1")),
            ("count", Value::Number(3.0)),
            ("ratio", Value::Number(0.5)),
            ("on", Value::Bool(true)),
            ("gone", Value::Null),
            ("later", Value::Unknown),
            (
                "tags",
                Value::List(vec![Value::string("a"), Value::Unknown]),
            ),
        ]);
        let bytes = v.to_msgpack();
        assert_eq!(Value::from_msgpack(&bytes).unwrap(), v);
        // Integral numbers are written as msgpack integers.
        assert_eq!(Value::Number(3.0).to_msgpack(), vec![0x03]);
    }

    #[test]
    fn malformed_msgpack_is_an_error_not_a_panic() {
        assert!(Value::from_msgpack(&[0x82, 0xa1]).is_err());
        assert!(Value::from_msgpack(&[0xc0, 0xc0]).is_err());
        // Non-string map key.
        assert!(matches!(
            Value::from_msgpack(&[0x81, 0x01, 0x02]),
            Err(ValueError::MapKey { .. })
        ));
    }

    #[test]
    fn conform_fills_missing_attributes_and_drops_extras() {
        let ty = Type::Object(vec![
            ("a", Type::String),
            ("b", Type::Number),
            ("m", Type::Map(Box::new(Type::Bool))),
        ]);
        let v = Value::from_json(br#"{"a": "x", "old": 1, "m": {"k": true}}"#).unwrap();
        let v = conform(v, &ty).unwrap();
        assert_eq!(
            v,
            Value::object([
                ("a", Value::string("x")),
                ("b", Value::Null),
                ("m", Value::object([("k", Value::Bool(true))]),),
            ])
        );
        let bad = Value::from_json(br#"{"a": 1}"#).unwrap();
        let err = conform(bad, &ty).unwrap_err().to_string();
        assert!(
            err.contains(".a") && err.contains("expected string"),
            "{err}"
        );
    }

    #[test]
    fn debug_hides_strings() {
        let v = Value::object([("master_secret", Value::string("deadbeef"))]);
        let printed = format!("{v:?}");
        assert!(!printed.contains("deadbeef"), "{printed}");
    }
}
