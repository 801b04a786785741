//! The minijinja environment configured like transformers' chat-template environment
//! (`transformers/utils/chat_template_utils.py`): `trim_blocks`, `lstrip_blocks`, no kept trailing
//! newline, loop controls, no autoescaping, Python string methods, and the extras transformers adds:
//! `raise_exception`, `strftime_now` and a `tojson` that behaves like `json.dumps`.
//!
//! Output goes through Python's `str()` (see `pyfmt`), and the `string`/`trim` filters are replaced so
//! that non-string values print as Jinja2 prints them.

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Rest};
use minijinja::{
    AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior, Value,
};

use super::{pyfmt, pyjson, strftime};

/// The name the single template is registered under.
pub(crate) const TEMPLATE_NAME: &str = "chat_template";

/// The message of a `raise_exception(...)` call, carried as the source of the minijinja error so that
/// it can be told apart from other render failures.
#[derive(Debug)]
struct RaisedByTemplate(String);

impl std::fmt::Display for RaisedByTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedByTemplate {}

/// Builds the environment and compiles `source` (already rid of `{% generation %}` tags) into it.
pub(crate) fn build(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_syntax(
        SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()?,
    );
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.set_undefined_behavior(UndefinedBehavior::Lenient);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.set_formatter(write_python_str);
    env.add_filter("tojson", tojson);
    env.add_filter("string", string_filter);
    env.add_filter("trim", trim_filter);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime::strftime_now);
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

/// The message passed to `raise_exception`, if that is what ended the render.
pub(crate) fn raised_message(err: &Error) -> Option<String> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(raised) = e.downcast_ref::<RaisedByTemplate>() {
            return Some(raised.0.clone());
        }
        current = e.source();
    }
    None
}

/// `{{ value }}`: Jinja2 writes `str(value)`; undefined writes nothing.
fn write_python_str(out: &mut Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    if value.is_undefined() {
        return Ok(());
    }
    let text = match value.as_str() {
        Some(s) => out.write_str(s),
        None => out.write_str(&pyfmt::py_str(value)),
    };
    text.map_err(Error::from)
}

/// transformers' `raise_exception(message)`: aborts the render with the template's own message.
fn raise_exception(message: Value) -> Result<Value, Error> {
    let message = pyfmt::py_str(&message);
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedByTemplate(message)))
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False)`:
/// `json.dumps` with those arguments, positional or by keyword, and no HTML escaping.
fn tojson(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    const PARAMETERS: [&str; 4] = ["ensure_ascii", "indent", "separators", "sort_keys"];
    if args.len() > PARAMETERS.len() {
        return Err(Error::new(
            ErrorKind::TooManyArguments,
            "tojson() takes at most 4 arguments",
        ));
    }
    let mut resolved: [Option<Value>; 4] = Default::default();
    for (i, name) in PARAMETERS.iter().enumerate() {
        let keyword: Option<Value> = kwargs.get(name)?;
        resolved[i] = match (args.get(i).cloned(), keyword) {
            (Some(_), Some(_)) => {
                return Err(Error::new(
                    ErrorKind::TooManyArguments,
                    format!("tojson() got multiple values for argument '{name}'"),
                ))
            }
            (positional, keyword) => positional.or(keyword),
        };
    }
    let [ensure_ascii, indent, separators, sort_keys] = resolved;
    kwargs.assert_all_used()?;
    let options = pyjson::JsonOptions::from_python_args(
        ensure_ascii.is_some_and(|v| v.is_true()),
        indent.as_ref(),
        separators.as_ref(),
        sort_keys.is_some_and(|v| v.is_true()),
    )?;
    pyjson::dumps(value, &options)
}

/// Jinja2's `string` filter: `str(value)`.
fn string_filter(value: &Value) -> Value {
    if value.as_str().is_some() {
        value.clone()
    } else {
        Value::from(pyfmt::py_str(value))
    }
}

/// Jinja2's `trim(value, chars=None)`: `str(value).strip(chars)`, with Python's idea of whitespace.
fn trim_filter(value: &Value, chars: Option<String>) -> String {
    let text = match value.as_str() {
        Some(s) => s.to_string(),
        None => pyfmt::py_str(value),
    };
    match chars {
        Some(chars) => text.trim_matches(|c| chars.contains(c)).to_string(),
        None => text.trim_matches(pyfmt::is_python_space).to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(src: &str) -> Result<String, Error> {
        let env = build(src.to_string())?;
        let template = env.get_template(TEMPLATE_NAME)?;
        template.render(())
    }

    #[test]
    fn whitespace_control_matches_transformers() {
        // trim_blocks drops the newline after a block tag, lstrip_blocks the indentation before it,
        // and one trailing newline of the template is not kept.
        assert_eq!(
            render("{% if true %}\n  x\n  {% endif %}\ny\n").unwrap(),
            "  x\ny"
        );
    }

    #[test]
    fn tojson_does_not_escape_html_and_takes_python_arguments() {
        assert_eq!(render("{{ '<a & b>'|tojson }}").unwrap(), "\"<a & b>\"");
        assert_eq!(
            render("{{ {'b': [1, 2]}|tojson(indent=2) }}").unwrap(),
            "{\n  \"b\": [\n    1,\n    2\n  ]\n}"
        );
        assert!(render("{{ 1|tojson(true, ensure_ascii=true) }}").is_err());
        assert!(render("{{ 1|tojson(colour=1) }}").is_err());
    }

    #[test]
    fn raise_exception_message_is_recoverable() {
        let err = render("{{ raise_exception('no ' ~ 'way') }}").unwrap_err();
        assert_eq!(raised_message(&err).as_deref(), Some("no way"));
        let other = render("{{ nothing.attr }}").unwrap_err();
        assert_eq!(raised_message(&other), None);
    }

    #[test]
    fn python_methods_and_trim() {
        assert_eq!(
            render(
                "{{ ' Ab '.strip().upper() }}|{{ '\u{1f} x\u{a0}'|trim }}|{{ 'xax'|trim('x') }}"
            )
            .unwrap(),
            "AB|x|a"
        );
    }
}
