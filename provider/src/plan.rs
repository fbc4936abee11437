//! Generic plan rules driven by the schema flags; resources adjust the result afterwards.
//!
//! * Create: computed attributes that are null become unknown ("known after apply").
//! * Update: computed attributes keep their prior value ("use state for unknown", Terraform's
//!   proposed state already carries them) unless flagged `changes_on_update`, which become
//!   unknown when anything else changes; attributes flagged `forces_replacement` that differ
//!   from the prior state are returned as `requires_replace` paths.
//! * Destroy: the null proposed state passes through.

use crate::diag::{AttrPath, Diagnostics};
use crate::schema::{Attribute, Block, Kind, Mode};
use crate::value::Value;

#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub state: Value,
    pub requires_replace: Vec<AttrPath>,
    /// Shown with the plan (e.g. which nodes an image change replaces).
    pub warnings: Diagnostics,
}

impl Planned {
    pub fn is_create(prior: &Value) -> bool {
        prior.is_null()
    }
}

pub fn plan(schema: &Block, prior: &Value, proposed: &Value) -> Planned {
    if proposed.is_null() {
        return Planned {
            state: Value::Null,
            requires_replace: Vec::new(),
            warnings: Diagnostics::default(),
        };
    }
    let mut state = proposed.clone();
    if prior.is_null() {
        unknown_for_null_computed(&schema.attributes, &mut state);
        return Planned {
            state,
            requires_replace: Vec::new(),
            warnings: Diagnostics::default(),
        };
    }
    let mut requires_replace = Vec::new();
    let mut changed = false;
    for attr in &schema.attributes {
        let (old, new) = (prior.get(attr.name), proposed.get(attr.name));
        if attr.mode != Mode::Computed && old != new {
            changed = true;
            if attr.forces_replacement {
                requires_replace.push(AttrPath::attr(&[attr.name]));
            }
        }
    }
    if changed {
        for attr in &schema.attributes {
            if attr.mode == Mode::Computed && attr.changes_on_update {
                state.set(attr.name, Value::Unknown);
            }
        }
    }
    Planned {
        state,
        requires_replace,
        warnings: Diagnostics::default(),
    }
}

fn unknown_for_null_computed(attrs: &[Attribute], object: &mut Value) {
    let Value::Map(fields) = object else {
        return;
    };
    for attr in attrs {
        let Some(v) = fields.get_mut(attr.name) else {
            continue;
        };
        if v.is_null() && attr.is_computed() {
            *v = Value::Unknown;
        } else if let Kind::Nested(inner) = &attr.kind {
            unknown_for_null_computed(inner, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::Type;

    fn schema() -> Block {
        Block {
            version: 0,
            description: "",
            attributes: vec![
                Attribute::required("name", Type::String, "").forces_replacement(),
                Attribute::required("count", Type::Number, ""),
                Attribute::computed("id", Type::String, ""),
                Attribute::computed("nodes", Type::String, "").changes_on_update(),
                Attribute::optional_computed("secret", Type::String, "")
                    .sensitive()
                    .forces_replacement(),
            ],
        }
    }

    fn obj(name: &str, count: f64, id: Value, nodes: Value, secret: Value) -> Value {
        Value::object([
            ("name", Value::string(name)),
            ("count", Value::Number(count)),
            ("id", id),
            ("nodes", nodes),
            ("secret", secret),
        ])
    }

    #[test]
    fn create_marks_null_computed_unknown() {
        let proposed = obj("a", 1.0, Value::Null, Value::Null, Value::Null);
        let p = plan(&schema(), &Value::Null, &proposed);
        assert_eq!(
            p.state,
            obj("a", 1.0, Value::Unknown, Value::Unknown, Value::Unknown)
        );
        // A user-set optional+computed value stays as configured.
        let proposed = obj("a", 1.0, Value::Null, Value::Null, Value::string("s"));
        let p = plan(&schema(), &Value::Null, &proposed);
        assert_eq!(p.state.get("secret"), &Value::string("s"));
    }

    #[test]
    fn unchanged_update_is_a_no_op() {
        let prior = obj(
            "a",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("s"),
        );
        let p = plan(&schema(), &prior, &prior);
        assert_eq!(p.state, prior);
        assert!(p.requires_replace.is_empty());
    }

    #[test]
    fn in_place_update_keeps_stable_computed_and_unknowns_volatile_ones() {
        let prior = obj(
            "a",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("s"),
        );
        let proposed = obj(
            "a",
            2.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("s"),
        );
        let p = plan(&schema(), &prior, &proposed);
        assert!(p.requires_replace.is_empty());
        assert_eq!(p.state.get("id"), &Value::string("i"));
        assert_eq!(p.state.get("nodes"), &Value::Unknown);
    }

    #[test]
    fn replacement_paths() {
        let prior = obj(
            "a",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("s"),
        );
        let proposed = obj(
            "b",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("t"),
        );
        let p = plan(&schema(), &prior, &proposed);
        assert_eq!(
            p.requires_replace,
            vec![AttrPath::attr(&["name"]), AttrPath::attr(&["secret"])]
        );
        // An unknown new value may differ: it forces replacement too.
        let proposed = obj(
            "a",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::Unknown,
        );
        let p = plan(&schema(), &prior, &proposed);
        assert_eq!(p.requires_replace, vec![AttrPath::attr(&["secret"])]);
    }

    #[test]
    fn destroy_passes_null_through() {
        let prior = obj(
            "a",
            1.0,
            Value::string("i"),
            Value::string("n"),
            Value::string("s"),
        );
        assert_eq!(plan(&schema(), &prior, &Value::Null).state, Value::Null);
    }
}
