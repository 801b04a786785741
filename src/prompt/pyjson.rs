//! Python's `json.dumps(value, ensure_ascii, indent, separators, sort_keys)` over template values: the
//! `tojson` filter transformers installs (it does not HTML-escape, unlike Jinja2's and minijinja's).

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Value};

use super::pyfmt;

/// The arguments of `json.dumps`, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct JsonOptions {
    /// Escape every non-ASCII character as `\uXXXX`.
    pub ensure_ascii: bool,
    /// `None`: everything on one line; `Some(unit)`: one item per line, indented by `unit` per level.
    pub indent: Option<String>,
    /// Between items (`", "`, or `","` when indenting).
    pub item_separator: String,
    /// Between a key and its value.
    pub key_separator: String,
    pub sort_keys: bool,
}

impl JsonOptions {
    /// Interprets the Python arguments: `indent` an int (that many spaces) or a string, `separators` a
    /// pair of strings; the default separators depend on `indent` as in Python.
    pub fn from_python_args(
        ensure_ascii: bool,
        indent: Option<&Value>,
        separators: Option<&Value>,
        sort_keys: bool,
    ) -> Result<Self, Error> {
        let indent = match indent {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(indent_unit(v)?),
        };
        let (item_separator, key_separator) = match separators {
            Some(v) if !v.is_none() => separator_pair(v)?,
            _ if indent.is_some() => (",".to_string(), ": ".to_string()),
            _ => (", ".to_string(), ": ".to_string()),
        };
        Ok(Self {
            ensure_ascii,
            indent,
            item_separator,
            key_separator,
            sort_keys,
        })
    }
}

fn indent_unit(v: &Value) -> Result<String, Error> {
    if let Some(s) = v.as_str() {
        return Ok(s.to_string());
    }
    if v.kind() == ValueKind::Bool {
        return Ok(if v.is_true() { " " } else { "" }.to_string());
    }
    match v.as_i64() {
        Some(n) => Ok(" ".repeat(n.max(0) as usize)),
        None => Err(bad_argument(format!(
            "tojson indent must be an int or a string, not {}",
            v.kind()
        ))),
    }
}

fn separator_pair(v: &Value) -> Result<(String, String), Error> {
    let parts: Vec<Value> = v.try_iter().map(|it| it.collect()).unwrap_or_default();
    match parts.as_slice() {
        [item, key] => match (item.as_str(), key.as_str()) {
            (Some(item), Some(key)) => Ok((item.to_string(), key.to_string())),
            _ => Err(bad_argument(
                "tojson separators must be two strings".to_string(),
            )),
        },
        _ => Err(bad_argument(
            "tojson separators must be a pair (item_separator, key_separator)".to_string(),
        )),
    }
}

fn bad_argument(message: String) -> Error {
    Error::new(ErrorKind::InvalidOperation, message)
}

/// Serializes `value` exactly as `json.dumps` would with `options`.
pub(crate) fn dumps(value: &Value, options: &JsonOptions) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

fn write_value(
    out: &mut String,
    value: &Value,
    options: &JsonOptions,
    depth: usize,
) -> Result<(), Error> {
    match value.kind() {
        ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(value)),
        ValueKind::String => write_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        ),
        ValueKind::Seq => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(
                out,
                ('[', ']'),
                &items,
                options,
                depth,
                |out, item, depth| write_value(out, item, options, depth),
            )?;
        }
        ValueKind::Map => {
            let mut entries: Vec<(String, Value)> = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                entries.push((key_string(&key)?, item));
            }
            if options.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(
                out,
                ('{', '}'),
                &entries,
                options,
                depth,
                |out, (key, item), depth| {
                    write_string(out, key, options.ensure_ascii);
                    out.push_str(&options.key_separator);
                    write_value(out, item, options, depth)
                },
            )?;
        }
        kind => {
            let name = if kind == ValueKind::Undefined {
                "Undefined".to_string()
            } else {
                kind.to_string()
            };
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("Object of type {name} is not JSON serializable"),
            ));
        }
    }
    Ok(())
}

/// Writes `[a, b]`, or with an indent one item per line, as Python's encoder does.
fn write_container<T>(
    out: &mut String,
    (open, close): (char, char),
    items: &[T],
    options: &JsonOptions,
    depth: usize,
    mut write_item: impl FnMut(&mut String, &T, usize) -> Result<(), Error>,
) -> Result<(), Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline_indent = |level: usize| match &options.indent {
        Some(unit) => format!("\n{}", unit.repeat(level)),
        None => String::new(),
    };
    let inner = newline_indent(depth + 1);
    out.push_str(&inner);
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&options.item_separator);
            out.push_str(&inner);
        }
        write_item(out, item, depth + 1)?;
    }
    out.push_str(&newline_indent(depth));
    out.push(close);
    Ok(())
}

/// Integers as digits; floats as `float.__repr__`, with `NaN`/`Infinity` spelled as Python's encoder does.
fn number(value: &Value) -> String {
    if value.is_integer() {
        return value.to_string();
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_nan() => "NaN".to_string(),
        Ok(f) if f.is_infinite() => if f > 0.0 { "Infinity" } else { "-Infinity" }.to_string(),
        Ok(f) => pyfmt::float_repr(f),
        Err(_) => value.to_string(),
    }
}

/// Dict keys: strings as they are; numbers, booleans and None converted as Python does.
fn key_string(key: &Value) -> Result<String, Error> {
    match key.kind() {
        ValueKind::String => Ok(key.as_str().unwrap_or_default().to_string()),
        ValueKind::None => Ok("null".to_string()),
        ValueKind::Bool => Ok(if key.is_true() { "true" } else { "false" }.to_string()),
        ValueKind::Number => Ok(number(key)),
        kind => Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("keys must be str, int, float, bool or None, not {kind}"),
        )),
    }
}

/// A JSON string with Python's escapes: `\"`, `\\`, `\n`, `\r`, `\t`, `\b`, `\f`, `\u00XX` for other
/// control characters, and with `ensure_ascii` `\uXXXX` (surrogate pairs above the BMP) for non-ASCII.
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c if ensure_ascii && (c as u32) > 0x7e => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dump(json: serde_json::Value, options: &JsonOptions) -> String {
        dumps(&Value::from(minijinja::value::Serde(json)), options).unwrap()
    }

    fn options(indent: Option<Value>, separators: Option<Value>) -> JsonOptions {
        JsonOptions::from_python_args(false, indent.as_ref(), separators.as_ref(), false).unwrap()
    }

    #[test]
    fn compact_default_uses_python_separators() {
        let v = serde_json::json!({"a": [1, 2.5, null, true], "b": "<&>"});
        assert_eq!(
            dump(v, &options(None, None)),
            r#"{"a": [1, 2.5, null, true], "b": "<&>"}"#
        );
    }

    #[test]
    fn indent_puts_items_on_lines_and_drops_the_space_after_commas() {
        let v = serde_json::json!({"a": [1, {}], "b": []});
        let out = dump(v, &options(Some(Value::from(2)), None));
        assert_eq!(out, "{\n  \"a\": [\n    1,\n    {}\n  ],\n  \"b\": []\n}");
    }

    #[test]
    fn escapes_follow_python() {
        let v = serde_json::json!("é\u{1}\u{7f}😀\"\\");
        assert_eq!(
            dump(v.clone(), &options(None, None)),
            "\"é\\u0001\u{7f}😀\\\"\\\\\""
        );
        let ascii = JsonOptions {
            ensure_ascii: true,
            ..options(None, None)
        };
        assert_eq!(
            dump(v, &ascii),
            "\"\\u00e9\\u0001\\u007f\\ud83d\\ude00\\\"\\\\\""
        );
    }

    #[test]
    fn rejects_bad_arguments_and_undefined() {
        assert!(
            JsonOptions::from_python_args(false, Some(&Value::from(1.5)), None, false).is_err()
        );
        assert!(
            JsonOptions::from_python_args(false, None, Some(&Value::from(",")), false).is_err()
        );
        assert!(dumps(&Value::UNDEFINED, &options(None, None)).is_err());
    }
}
