//! Diagnostics: every user error becomes one, pointing at the offending attribute when
//! there is one. No backtraces, no secrets: details are built from typed errors only.

use std::fmt;

use crate::tfplugin6 as pb;

/// A path to an attribute: `network_config.pod_cidr`, `image.measurements["4"]`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AttrPath(pub Vec<PathStep>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathStep {
    Attribute(String),
    Key(String),
    Index(i64),
}

impl AttrPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }
    /// A path of attribute names, e.g. `AttrPath::attr(&["network_config", "pod_cidr"])`.
    pub fn attr(names: &[&str]) -> Self {
        Self(
            names
                .iter()
                .map(|n| PathStep::Attribute((*n).to_owned()))
                .collect(),
        )
    }
    pub fn child(&self, name: &str) -> Self {
        let mut p = self.clone();
        p.0.push(PathStep::Attribute(name.to_owned()));
        p
    }
    pub fn key(&self, key: &str) -> Self {
        let mut p = self.clone();
        p.0.push(PathStep::Key(key.to_owned()));
        p
    }

    pub fn to_proto(&self) -> pb::AttributePath {
        use pb::attribute_path::{step::Selector, Step};
        pb::AttributePath {
            steps: self
                .0
                .iter()
                .map(|s| Step {
                    selector: Some(match s {
                        PathStep::Attribute(a) => Selector::AttributeName(a.clone()),
                        PathStep::Key(k) => Selector::ElementKeyString(k.clone()),
                        PathStep::Index(i) => Selector::ElementKeyInt(*i),
                    }),
                })
                .collect(),
        }
    }
}

impl fmt::Display for AttrPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                PathStep::Attribute(a) if i == 0 => f.write_str(a)?,
                PathStep::Attribute(a) => write!(f, ".{a}")?,
                PathStep::Key(k) => write!(f, "[{k:?}]")?,
                PathStep::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub severity: Severity,
    pub summary: String,
    pub detail: String,
    pub attribute: Option<AttrPath>,
}

impl Diagnostic {
    pub fn error(summary: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            summary: summary.into(),
            detail: detail.into(),
            attribute: None,
        }
    }
    pub fn warning(summary: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(summary, detail)
        }
    }
    pub fn at(mut self, path: AttrPath) -> Self {
        self.attribute = Some(path);
        self
    }

    pub fn to_proto(&self) -> pb::Diagnostic {
        pb::Diagnostic {
            severity: match self.severity {
                Severity::Error => pb::diagnostic::Severity::Error,
                Severity::Warning => pb::diagnostic::Severity::Warning,
            } as i32,
            summary: self.summary.clone(),
            detail: self.detail.clone(),
            attribute: self.attribute.as_ref().map(AttrPath::to_proto),
        }
    }
}

/// Diagnostics collected by one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(|d| d.severity == Severity::Error)
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
    pub fn to_proto(&self) -> Vec<pb::Diagnostic> {
        self.0.iter().map(Diagnostic::to_proto).collect()
    }
}

impl From<Diagnostic> for Diagnostics {
    fn from(d: Diagnostic) -> Self {
        Self(vec![d])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_print_and_encode() {
        let p = AttrPath::attr(&["image", "measurements"]).key("4");
        assert_eq!(p.to_string(), r#"image.measurements["4"]"#);
        let proto = p.to_proto();
        assert_eq!(proto.steps.len(), 3);
        let d =
            Diagnostic::error("bad", "worse").at(AttrPath::attr(&["network_config", "pod_cidr"]));
        let pd = d.to_proto();
        assert_eq!(pd.severity, pb::diagnostic::Severity::Error as i32);
        assert_eq!(pd.attribute.unwrap().steps.len(), 2);
    }
}
