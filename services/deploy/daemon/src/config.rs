//! Config files and their errors. A daemon's file struct has only `Option` fields (every one
//! also a flag); flags override the file, then `resolve` checks each field and names the bad one.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a configuration was refused. Every variant names the field (as written in the file).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// serde_yaml's message names the field and position (e.g. "listen: invalid socket address
    /// syntax at line 1 column 9" or "unknown field `lisen`").
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}` is required (set it in the config file or with --{flag})")]
    Missing {
        field: &'static str,
        flag: &'static str,
    },
    #[error("config field `{field}` = {value:?} is invalid: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: String,
    },
}

impl ConfigError {
    /// The field a [`ConfigError::Missing`] or [`ConfigError::Invalid`] names.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Missing { field, .. } | Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Reads a YAML (or JSON, which YAML parses) config file; `None` gives the default (all unset).
pub fn load_file<T: DeserializeOwned + Default>(path: Option<&Path>) -> Result<T, ConfigError> {
    let Some(path) = path else {
        return Ok(T::default());
    };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    if text.trim().is_empty() {
        return Ok(T::default());
    }
    serde_yaml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// The value of a required field, or the error naming it (`flag` is its long flag name).
pub fn required<T>(
    value: Option<T>,
    field: &'static str,
    flag: &'static str,
) -> Result<T, ConfigError> {
    value.ok_or(ConfigError::Missing { field, flag })
}

/// An error for `field` holding `value`.
pub fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// A directory that must exist.
pub fn existing_dir(field: &'static str, dir: PathBuf) -> Result<PathBuf, ConfigError> {
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(invalid(field, dir.display(), "not an existing directory"))
    }
}

/// Field by field: the flag's value where given, else the file's.
#[macro_export]
macro_rules! overlay {
    ($file:expr, $flags:expr; $($field:ident),+ $(,)?) => {{
        let mut file = $file;
        let flags = $flags;
        $( if flags.$field.is_some() { file.$field = flags.$field; } )+
        file
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        listen: Option<std::net::SocketAddr>,
        name: Option<String>,
    }

    fn parse(text: &str) -> Result<File, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, text).unwrap();
        load_file(Some(&path))
    }

    #[test]
    fn parse_errors_name_the_field() {
        let e = parse("listen: nowhere\n").unwrap_err().to_string();
        assert!(e.contains("listen"), "{e}");
        let e = parse("lisen: 1.2.3.4:5\n").unwrap_err().to_string();
        assert!(e.contains("lisen"), "{e}");
        let ok = parse("{\"listen\": \"1.2.3.4:5\"}").unwrap();
        assert_eq!(ok.listen, Some("1.2.3.4:5".parse().unwrap()));
    }

    #[test]
    fn flags_override_the_file() {
        let file = File {
            listen: Some("1.2.3.4:5".parse().unwrap()),
            name: Some("file".into()),
        };
        let flags = File {
            listen: None,
            name: Some("flag".into()),
        };
        let merged = overlay!(file, flags; listen, name);
        assert_eq!(merged.name.as_deref(), Some("flag"));
        assert_eq!(merged.listen, Some("1.2.3.4:5".parse().unwrap()));
    }
}
