//! Reading typed inputs out of a [`Value`] with one diagnostic per bad attribute.
//!
//! The same decoder serves validation and apply: an unknown value (during validate or plan)
//! marks the result incomplete without a diagnostic, so validation checks every known part
//! and skips the rest.

use std::fmt::Display;

use crate::diag::{AttrPath, Diagnostic, Diagnostics};
use crate::value::Value;

#[derive(Debug, Default)]
pub struct Decoder {
    pub diagnostics: Diagnostics,
    /// Some value was unknown, so the decoded result is absent without an error.
    pub incomplete: bool,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// `Some(Some(s))` set, `Some(None)` null, `None` unknown or wrongly typed (recorded).
    pub fn opt_string(&mut self, v: &Value, path: &AttrPath) -> Option<Option<String>> {
        match v {
            Value::Null => Some(None),
            Value::Unknown => {
                self.incomplete = true;
                None
            }
            Value::String(s) => Some(Some(s.clone())),
            other => {
                self.type_error(path, "string", other);
                None
            }
        }
    }

    pub fn req_string(&mut self, v: &Value, path: &AttrPath) -> Option<String> {
        self.opt_string(v, path)?.or_else(|| {
            self.required(path);
            None
        })
    }

    /// A non-negative integer no larger than `max`.
    pub fn opt_uint(&mut self, v: &Value, path: &AttrPath, max: u32) -> Option<Option<u32>> {
        match v {
            Value::Null => Some(None),
            Value::Unknown => {
                self.incomplete = true;
                None
            }
            Value::Number(n) if n.fract() == 0.0 && *n >= 0.0 && *n <= f64::from(max) => {
                Some(Some(*n as u32))
            }
            Value::Number(n) => {
                self.diagnostics.push(
                    Diagnostic::error(
                        format!("Invalid value for {path}"),
                        format!("expected a whole number between 0 and {max}, found {n}"),
                    )
                    .at(path.clone()),
                );
                None
            }
            other => {
                self.type_error(path, "number", other);
                None
            }
        }
    }

    pub fn req_uint(&mut self, v: &Value, path: &AttrPath, max: u32) -> Option<u32> {
        self.opt_uint(v, path, max)?.or_else(|| {
            self.required(path);
            None
        })
    }

    pub fn opt_bool(&mut self, v: &Value, path: &AttrPath) -> Option<Option<bool>> {
        match v {
            Value::Null => Some(None),
            Value::Unknown => {
                self.incomplete = true;
                None
            }
            Value::Bool(b) => Some(Some(*b)),
            other => {
                self.type_error(path, "bool", other);
                None
            }
        }
    }

    /// An object (nested attribute): `Some(None)` when null.
    pub fn opt_object<'v>(&mut self, v: &'v Value, path: &AttrPath) -> Option<Option<&'v Value>> {
        match v {
            Value::Null => Some(None),
            Value::Unknown => {
                self.incomplete = true;
                None
            }
            Value::Map(_) => Some(Some(v)),
            other => {
                self.type_error(path, "object", other);
                None
            }
        }
    }

    pub fn req_object<'v>(&mut self, v: &'v Value, path: &AttrPath) -> Option<&'v Value> {
        self.opt_object(v, path)?.or_else(|| {
            self.required(path);
            None
        })
    }

    /// Records a failed check of a known value: `summary` names what was wrong.
    pub fn check<T, E: Display>(
        &mut self,
        result: Result<T, E>,
        path: &AttrPath,
        summary: &str,
    ) -> Option<T> {
        match result {
            Ok(t) => Some(t),
            Err(e) => {
                self.error(path, summary, e.to_string());
                None
            }
        }
    }

    pub fn error(&mut self, path: &AttrPath, summary: &str, detail: impl Into<String>) {
        self.diagnostics
            .push(Diagnostic::error(summary, detail).at(path.clone()));
    }

    fn required(&mut self, path: &AttrPath) {
        self.error(
            path,
            &format!("Missing required attribute {path}"),
            "this attribute must be set",
        );
    }

    fn type_error(&mut self, path: &AttrPath, expected: &str, found: &Value) {
        self.error(
            path,
            &format!("Wrong type for {path}"),
            format!("expected {expected}, found {}", found.kind()),
        );
    }

    /// The decoded value for apply/read: any unknown left is a provider bug, reported as such.
    pub fn finish<T>(self, value: Option<T>) -> Result<T, Diagnostics> {
        match value {
            Some(v) if !self.diagnostics.has_errors() => Ok(v),
            _ => {
                let mut d = self.diagnostics;
                if !d.has_errors() {
                    d.push(Diagnostic::error(
                        "Value not known at apply time",
                        "an input was still unknown when the provider needed it; this is a \
                         provider bug, please report it",
                    ));
                }
                Err(d)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_is_skipped_without_diagnostic() {
        let mut d = Decoder::new();
        assert_eq!(d.req_string(&Value::Unknown, &AttrPath::attr(&["a"])), None);
        assert!(d.incomplete);
        assert!(d.diagnostics.0.is_empty());
    }

    #[test]
    fn numbers_out_of_range_point_at_the_attribute() {
        let mut d = Decoder::new();
        let p = AttrPath::attr(&["attestation", "tee_version"]);
        assert_eq!(d.opt_uint(&Value::Number(256.0), &p, 255), None);
        assert_eq!(d.opt_uint(&Value::Number(1.5), &p, 255), None);
        assert_eq!(d.opt_uint(&Value::Number(-1.0), &p, 255), None);
        assert_eq!(d.opt_uint(&Value::Number(7.0), &p, 255), Some(Some(7)));
        assert_eq!(d.diagnostics.0.len(), 3);
        assert!(d
            .diagnostics
            .0
            .iter()
            .all(|x| x.attribute.as_ref() == Some(&p)));
    }

    #[test]
    fn finish_reports_leftover_unknowns() {
        let mut d = Decoder::new();
        let v = d.req_string(&Value::Unknown, &AttrPath::attr(&["a"]));
        let err = d.finish(v).unwrap_err();
        assert!(err.has_errors());
    }
}
