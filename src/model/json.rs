//! Typed reads of one `config.json` section with transformers' defaults, and errors that
//! name the file and key.

use std::path::Path;

use serde_json::{Map, Value};

use super::ModelError;

/// Reads a config file; a missing one is [`ModelError::MissingFile`].
pub(crate) fn read_file(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => ModelError::MissingFile(path.to_path_buf()),
        _ => ModelError::Io {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// Parses a config file's JSON into its top-level object; `path` names it in errors.
pub(crate) fn parse_object(path: &Path, json: &str) -> Result<Map<String, Value>, ModelError> {
    match serde_json::from_str(json) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ModelError::config(path, "expected a JSON object")),
        Err(e) => Err(ModelError::config(path, format!("invalid JSON: {e}"))),
    }
}

/// One JSON object (the top level or a sub-config) of a config file.
pub(crate) struct Section<'a> {
    file: &'a Path,
    name: String,
    map: &'a Map<String, Value>,
}

impl<'a> Section<'a> {
    pub(crate) fn new(
        file: &'a Path,
        name: impl Into<String>,
        map: &'a Map<String, Value>,
    ) -> Self {
        Self {
            file,
            name: name.into(),
            map,
        }
    }

    /// The object `map` found under `key` of this section, named `self.key` in errors.
    pub(crate) fn nested(&self, key: &str, map: &'a Map<String, Value>) -> Section<'a> {
        let name = if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        };
        Section::new(self.file, name, map)
    }

    /// The raw value of `key`, with JSON `null` read as absent.
    pub(crate) fn get(&self, key: &str) -> Option<&'a Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// Whether `key` is present, even as `null`.
    pub(crate) fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn error(&self, key: &str, message: impl std::fmt::Display) -> ModelError {
        let at = if self.name.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.name)
        };
        ModelError::config(self.file, format!("{at}: {message}"))
    }

    /// A nested object, or `None` if absent.
    pub(crate) fn object(&self, key: &str) -> Result<Option<&'a Map<String, Value>>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(v) => Err(self.error(key, format!("expected an object, got {v}"))),
        }
    }

    pub(crate) fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    self.error(key, format!("expected a non-negative integer, got {v}"))
                }),
        }
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize, ModelError> {
        Ok(self.opt_usize(key)?.unwrap_or(default))
    }

    /// Like [`Self::usize_or`] but rejects 0 (sizes and counts).
    pub(crate) fn positive_or(&self, key: &str, default: usize) -> Result<usize, ModelError> {
        match self.usize_or(key, default)? {
            0 => Err(self.error(key, "must be positive")),
            n => Ok(n),
        }
    }

    pub(crate) fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected a number, got {v}"))),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, ModelError> {
        Ok(self.opt_f64(key)?.unwrap_or(default))
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, ModelError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.error(key, format!("expected a boolean, got {v}"))),
        }
    }

    pub(crate) fn opt_str(&self, key: &str) -> Result<Option<&'a str>, ModelError> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(Some)
                .ok_or_else(|| self.error(key, format!("expected a string, got {v}"))),
        }
    }

    pub(crate) fn str_or(&self, key: &str, default: &'a str) -> Result<&'a str, ModelError> {
        Ok(self.opt_str(key)?.unwrap_or(default))
    }

    /// An integer or a list of integers (`eos_token_id`, `vision_feature_layer`).
    pub(crate) fn int_list(&self, key: &str) -> Result<Option<Vec<i64>>, ModelError> {
        let bad = |v: &Value| self.error(key, format!("expected an integer or a list, got {v}"));
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| v.as_i64().ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(v) => v.as_i64().map(|n| Some(vec![n])).ok_or_else(|| bad(v)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn reads_values_defaults_and_names_bad_keys() {
        let m = map(serde_json::json!({"a": 3, "b": null, "c": "x", "d": [1, -2], "e": 1.5}));
        let s = Section::new(Path::new("config.json"), "text_config", &m);
        assert_eq!(s.usize_or("a", 9).ok(), Some(3));
        assert_eq!(s.usize_or("b", 9).ok(), Some(9));
        assert!(s.has("b") && !s.has("z"));
        assert_eq!(s.str_or("c", "y").ok(), Some("x"));
        assert_eq!(s.int_list("d").ok().flatten(), Some(vec![1, -2]));
        assert_eq!(s.int_list("a").ok().flatten(), Some(vec![3]));
        assert_eq!(s.f64_or("e", 0.0).ok(), Some(1.5));
        let err = s.usize_or("c", 0).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("config.json: text_config.c: expected a non-negative integer, got \"x\"")
        );
    }
}
