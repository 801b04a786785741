//! Python's `str()` and `repr()` of template values, so that `{{ value }}`, `|string` and `|trim` print
//! non-strings the way Jinja2 does (`None`, `True`, `[1, 'a']`, `{'k': 1.5}`, `1e+16`).

use minijinja::value::ValueKind;
use minijinja::Value;

/// `str(value)`: strings as they are, everything else as its `repr`.
pub(crate) fn py_str(value: &Value) -> String {
    match value.as_str() {
        Some(s) => s.to_string(),
        None if value.is_undefined() => String::new(),
        None => py_repr(value),
    }
}

/// `repr(value)` for the JSON-like values templates handle; other objects fall back to minijinja's text.
pub(crate) fn py_repr(value: &Value) -> String {
    match value.kind() {
        ValueKind::Undefined => String::new(),
        ValueKind::None => "None".to_string(),
        ValueKind::Bool => if value.is_true() { "True" } else { "False" }.to_string(),
        ValueKind::Number if !value.is_integer() => match f64::try_from(value.clone()) {
            Ok(f) => float_repr(f),
            Err(_) => value.to_string(),
        },
        ValueKind::String => string_repr(value.as_str().unwrap_or_default()),
        ValueKind::Seq => seq_repr(value),
        ValueKind::Map => map_repr(value),
        _ => value.to_string(),
    }
}

/// A list as `[a, b]`, a tuple as `(a, b)` or `(a,)`.
fn seq_repr(value: &Value) -> String {
    let items: Vec<String> = match value.try_iter() {
        Ok(iter) => iter.map(|item| py_repr(&item)).collect(),
        Err(_) => return value.to_string(),
    };
    if value.is_tuple() {
        let trailing = if items.len() == 1 { "," } else { "" };
        format!("({}{trailing})", items.join(", "))
    } else {
        format!("[{}]", items.join(", "))
    }
}

fn map_repr(value: &Value) -> String {
    let Ok(keys) = value.try_iter() else {
        return value.to_string();
    };
    let items: Vec<String> = keys
        .map(|key| {
            let item = value.get_item(&key).unwrap_or_default();
            format!("{}: {}", py_repr(&key), py_repr(&item))
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Python's `float.__repr__`: the shortest round-trip digits, in positional notation when the decimal
/// exponent is in [-4, 16), else `d.ddde+XX`.
pub(crate) fn float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".to_string();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf" } else { "-inf" }.to_string();
    }
    // Rust's `{:e}` gives the same shortest round-trip digits, e.g. "-1.5e-5".
    let sci = format!("{:e}", f.abs());
    let (mantissa, exponent) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if f.is_sign_negative() { "-" } else { "" };
    // Position of the decimal point relative to the first digit (Python's `decpt`).
    let point = exponent + 1;
    let body = if !(-3..=16).contains(&point) {
        let (head, tail) = digits.split_at(1);
        let fraction = if tail.is_empty() {
            String::new()
        } else {
            format!(".{tail}")
        };
        let exp_sign = if exponent < 0 { '-' } else { '+' };
        format!("{head}{fraction}e{exp_sign}{:02}", exponent.abs())
    } else if point <= 0 {
        format!("0.{}{digits}", "0".repeat(point.unsigned_abs() as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        let (int, frac) = digits.split_at(point as usize);
        format!("{int}.{frac}")
    };
    format!("{sign}{body}")
}

/// Python's `str.__repr__`: single quotes unless the text has a `'` and no `"`; backslash escapes for
/// the quote, backslash, `\t\n\r`, other control characters and non-printable characters.
pub(crate) fn string_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            _ if c == quote || c == '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            _ if is_python_printable(c) => out.push(c),
            _ if (c as u32) <= 0xff => out.push_str(&format!("\\x{:02x}", c as u32)),
            _ if (c as u32) <= 0xffff => out.push_str(&format!("\\u{:04x}", c as u32)),
            _ => out.push_str(&format!("\\U{:08x}", c as u32)),
        }
    }
    out.push(quote);
    out
}

/// `str.isprintable()` for one character. Exact for ASCII and Latin-1; beyond that it knows the usual
/// separators and format characters (std has no Unicode category table), which is what templates meet.
fn is_python_printable(c: char) -> bool {
    let u = c as u32;
    match u {
        0x20..=0x7e => true,
        0x00..=0x1f | 0x7f..=0xa0 | 0xad => false,
        0x1680 | 0x2000..=0x200f | 0x2028..=0x202f | 0x205f..=0x2064 | 0x3000 | 0xfeff => false,
        0xd800..=0xdfff | 0xe000..=0xf8ff | 0xfff9..=0xfffb => false,
        _ => !(u & 0xfffe == 0xfffe || (0xfdd0..=0xfdef).contains(&u) || u >= 0xf0000),
    }
}

/// `str.isspace()` for one character: Unicode whitespace plus the ASCII separators 0x1c..=0x1f.
pub(crate) fn is_python_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python() {
        let cases = [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (1e16, "1e+16"),
            (1e15, "1000000000000000.0"),
            (1.5e-5, "1.5e-05"),
            (0.0001, "0.0001"),
            (123456789.125, "123456789.125"),
            (-0.0, "-0.0"),
            (2.0 / 3.0, "0.6666666666666666"),
            (1e22, "1e+22"),
            (-2.5e-300, "-2.5e-300"),
            (f64::INFINITY, "inf"),
        ];
        for (value, expected) in cases {
            assert_eq!(float_repr(value), expected, "{value}");
        }
    }

    #[test]
    fn strings_repr_like_python() {
        assert_eq!(string_repr("it's"), "\"it's\"");
        assert_eq!(string_repr("say \"hi\" it's"), "'say \"hi\" it\\'s'");
        assert_eq!(
            string_repr("a\nb\\\u{1}\u{7f}é\u{a0}😀"),
            "'a\\nb\\\\\\x01\\x7fé\\xa0😀'"
        );
        assert_eq!(string_repr("\u{2028}"), "'\\u2028'");
    }

    #[test]
    fn containers_repr_like_python() {
        let v = Value::from(minijinja::value::Serde(
            serde_json::json!([1, "a", null, true, {"k": [1.5]}]),
        ));
        assert_eq!(py_str(&v), "[1, 'a', None, True, {'k': [1.5]}]");
        assert_eq!(py_str(&Value::UNDEFINED), "");
    }
}
