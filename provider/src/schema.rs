//! Resource schemas: attribute types and flags, plus the plan behaviour each attribute has
//! (forces replacement, changes on every update). Converted to tfplugin6 schema messages.

use crate::tfplugin6 as pb;

/// A cty type.
#[derive(Debug, Clone, PartialEq)]
pub enum Type {
    String,
    Number,
    Bool,
    List(Box<Type>),
    Map(Box<Type>),
    Object(Vec<(&'static str, Type)>),
}

impl Type {
    pub fn name(&self) -> &'static str {
        match self {
            Type::String => "string",
            Type::Number => "number",
            Type::Bool => "bool",
            Type::List(_) => "list",
            Type::Map(_) => "map",
            Type::Object(_) => "object",
        }
    }

    /// The JSON type constraint Terraform expects in schema `type` fields.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{json, Map};
        match self {
            Type::String | Type::Number | Type::Bool => json!(self.name()),
            Type::List(e) => json!(["list", e.to_json()]),
            Type::Map(e) => json!(["map", e.to_json()]),
            Type::Object(attrs) => {
                let fields: Map<String, serde_json::Value> = attrs
                    .iter()
                    .map(|(k, t)| ((*k).to_owned(), t.to_json()))
                    .collect();
                json!(["object", fields])
            }
        }
    }
}

/// How an attribute gets its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Required,
    Optional,
    /// Set by the provider only.
    Computed,
    /// Set by the user, or by the provider when the user leaves it null.
    OptionalComputed,
}

/// What an attribute holds: a plain typed value or a single nested object of attributes.
#[derive(Debug, Clone)]
pub enum Kind {
    Plain(Type),
    Nested(Vec<Attribute>),
}

#[derive(Debug, Clone)]
pub struct Attribute {
    pub name: &'static str,
    pub kind: Kind,
    pub mode: Mode,
    pub description: &'static str,
    pub sensitive: bool,
    /// A change of this attribute forces replacement of the resource.
    pub forces_replacement: bool,
    /// Computed only: the value may change on any in-place update, so plans mark it unknown.
    /// Other computed attributes keep their prior value ("use state for unknown").
    pub changes_on_update: bool,
    /// Protocol 6.9 write-only: the value is in the configuration only, never in a plan or a
    /// state (the server nulls it in every value it returns). Top-level, not computed.
    pub write_only: bool,
}

impl Attribute {
    fn new(name: &'static str, kind: Kind, mode: Mode, description: &'static str) -> Self {
        Self {
            name,
            kind,
            mode,
            description,
            sensitive: false,
            forces_replacement: false,
            changes_on_update: false,
            write_only: false,
        }
    }
    pub fn required(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, Kind::Plain(ty), Mode::Required, description)
    }
    pub fn optional(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, Kind::Plain(ty), Mode::Optional, description)
    }
    pub fn computed(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, Kind::Plain(ty), Mode::Computed, description)
    }
    pub fn optional_computed(name: &'static str, ty: Type, description: &'static str) -> Self {
        Self::new(name, Kind::Plain(ty), Mode::OptionalComputed, description)
    }
    pub fn nested(
        name: &'static str,
        mode: Mode,
        attributes: Vec<Attribute>,
        description: &'static str,
    ) -> Self {
        Self::new(name, Kind::Nested(attributes), mode, description)
    }
    pub fn sensitive(mut self) -> Self {
        self.sensitive = true;
        self
    }
    pub fn forces_replacement(mut self) -> Self {
        self.forces_replacement = true;
        self
    }
    pub fn changes_on_update(mut self) -> Self {
        self.changes_on_update = true;
        self
    }
    pub fn write_only(mut self) -> Self {
        self.write_only = true;
        self
    }

    pub fn is_computed(&self) -> bool {
        matches!(self.mode, Mode::Computed | Mode::OptionalComputed)
    }

    /// The cty type of this attribute's value.
    pub fn value_type(&self) -> Type {
        match &self.kind {
            Kind::Plain(t) => t.clone(),
            Kind::Nested(attrs) => {
                Type::Object(attrs.iter().map(|a| (a.name, a.value_type())).collect())
            }
        }
    }

    /// A plain attribute (nested ones are emitted by [`Attribute::to_block_proto`]).
    fn to_proto(&self) -> pb::schema::Attribute {
        pb::schema::Attribute {
            name: self.name.to_owned(),
            r#type: self.value_type().to_json().to_string().into_bytes(),
            nested_type: None,
            description: self.description.to_owned(),
            required: self.mode == Mode::Required,
            optional: matches!(self.mode, Mode::Optional | Mode::OptionalComputed),
            computed: self.is_computed(),
            sensitive: self.sensitive,
            description_kind: pb::StringKind::Markdown as i32,
            deprecated: false,
            write_only: self.write_only,
        }
    }
}

impl Attribute {
    /// A nested object as a SINGLE nested block (`image { ... }`). Protocol-6 nested
    /// attributes would allow `image = { ... }`, but Terraform 1.0.x panics on them when the
    /// prior state is null (objchange.proposedNewNestedType), so blocks it is.
    fn to_block_proto(&self, attrs: &[Attribute]) -> pb::schema::NestedBlock {
        let required = self.mode == Mode::Required;
        pb::schema::NestedBlock {
            type_name: self.name.to_owned(),
            block: Some(pb::schema::Block {
                version: 0,
                attributes: attrs.iter().map(Attribute::to_proto).collect(),
                block_types: Vec::new(),
                description: self.description.to_owned(),
                description_kind: pb::StringKind::Markdown as i32,
                deprecated: false,
            }),
            nesting: pb::schema::nested_block::NestingMode::Single as i32,
            // SINGLE nesting: both 1 when required, both 0 when optional.
            min_items: i64::from(required),
            max_items: i64::from(required),
        }
    }
}

/// The top-level schema of a resource or data source.
#[derive(Debug, Clone)]
pub struct Block {
    pub version: i64,
    pub description: &'static str,
    pub attributes: Vec<Attribute>,
}

impl Block {
    pub fn value_type(&self) -> Type {
        Type::Object(
            self.attributes
                .iter()
                .map(|a| (a.name, a.value_type()))
                .collect(),
        )
    }

    pub fn attribute(&self, name: &str) -> Option<&Attribute> {
        self.attributes.iter().find(|a| a.name == name)
    }

    /// The names of the write-only attributes.
    pub fn write_only_attributes(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.attributes
            .iter()
            .filter(|a| a.write_only)
            .map(|a| a.name)
    }

    pub fn to_proto(&self) -> pb::Schema {
        pb::Schema {
            version: self.version,
            block: Some(pb::schema::Block {
                version: self.version,
                attributes: self
                    .attributes
                    .iter()
                    .filter(|a| matches!(a.kind, Kind::Plain(_)))
                    .map(Attribute::to_proto)
                    .collect(),
                block_types: self
                    .attributes
                    .iter()
                    .filter_map(|a| match &a.kind {
                        Kind::Nested(inner) => Some(a.to_block_proto(inner)),
                        Kind::Plain(_) => None,
                    })
                    .collect(),
                description: self.description.to_owned(),
                description_kind: pb::StringKind::Markdown as i32,
                deprecated: false,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_json_matches_cty() {
        let t = Type::Map(Box::new(Type::Object(vec![
            ("expected", Type::String),
            ("warn_only", Type::Bool),
        ])));
        assert_eq!(
            t.to_json().to_string(),
            r#"["map",["object",{"expected":"string","warn_only":"bool"}]]"#
        );
    }

    #[test]
    fn write_only_reaches_the_protocol_and_is_listed() {
        let b = Block {
            version: 0,
            description: "",
            attributes: vec![
                Attribute::optional("secret_wo", Type::String, "")
                    .sensitive()
                    .write_only(),
                Attribute::optional("secret_wo_version", Type::Number, ""),
            ],
        };
        let p = b.to_proto();
        let attrs = &p.block.as_ref().unwrap().attributes;
        assert!(attrs[0].write_only && attrs[0].sensitive && attrs[0].optional);
        assert!(!attrs[1].write_only);
        assert_eq!(b.write_only_attributes().collect::<Vec<_>>(), ["secret_wo"]);
    }

    #[test]
    fn nested_objects_become_single_blocks() {
        let b = Block {
            version: 0,
            description: "",
            attributes: vec![Attribute::nested(
                "net",
                Mode::Required,
                vec![Attribute::required("cidr", Type::String, "")],
                "",
            )],
        };
        let p = b.to_proto();
        let block = p.block.as_ref().unwrap();
        assert!(block.attributes.is_empty());
        let nested = &block.block_types[0];
        assert_eq!(nested.type_name, "net");
        assert_eq!(
            nested.nesting,
            pb::schema::nested_block::NestingMode::Single as i32
        );
        assert_eq!((nested.min_items, nested.max_items), (1, 1));
        assert_eq!(nested.block.as_ref().unwrap().attributes[0].name, "cidr");
        assert_eq!(
            b.value_type(),
            Type::Object(vec![("net", Type::Object(vec![("cidr", Type::String)]))])
        );
    }
}
