//! Content-format detection, equivalent to vLLM's "auto" mode (`_detect_content_format` in
//! vllm/entrypoints/chat_utils.py), done on the tokens of the template's tags instead of Jinja2's AST.
//!
//! A template wants content parts when it has a `for` loop over `<m>['content']` or `<m>.content`,
//! where `<m>` is the variable of a `for` loop over `messages` or over a name assigned from it
//! (`{% set loop_messages = messages[1:] %}`), possibly through filters, tests and slices. As in vLLM,
//! an unusual target bound to such a list (a tuple, a namespace attribute) makes the answer "string".

use std::collections::{HashSet, VecDeque};

use super::expr::{is_name, is_op, parse_expression, top_level_position, Expr, Subscript};
use super::scan::{scan, Tag, TagKind, Token, TokenKind};
use super::ContentFormat;

/// The content format vLLM would pick for this template; `String` when in doubt (vLLM's default).
pub fn detect_content_format(source: &str) -> ContentFormat {
    let Ok(tags) = scan(source) else {
        return ContentFormat::String;
    };
    let statements = Statements::collect(&tags);
    detect(&statements).unwrap_or(ContentFormat::String)
}

/// What a `for` or `set` binds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    Name(String),
    /// A tuple or a namespace attribute: vLLM's `assert isinstance(target, Name)` fails on these.
    Other,
}

/// The `for` loops and `{% set x = ... %}` assignments of a template, in source order.
struct Statements {
    loops: Vec<(Target, Expr)>,
    assigns: Vec<(Target, Expr)>,
}

impl Statements {
    fn collect(tags: &[Tag]) -> Self {
        let mut loops = Vec::new();
        let mut assigns = Vec::new();
        for tag in tags.iter().filter(|t| t.kind == TagKind::Block) {
            match tag.tokens.split_first() {
                Some((first, rest)) if is_name(first, "for") => loops.extend(parse_for(rest)),
                Some((first, rest)) if is_name(first, "set") => assigns.extend(parse_set(rest)),
                _ => {}
            }
        }
        Self { loops, assigns }
    }
}

/// vLLM's three steps; `None` where vLLM's assertion would fail (it then falls back to "string").
fn detect(statements: &Statements) -> Option<ContentFormat> {
    let message_lists = names_bound_to_messages(&statements.assigns)?;
    let mut message_vars = Vec::new();
    for (target, iter) in &statements.loops {
        if message_lists.iter().any(|name| accesses(iter, name, None)) {
            message_vars.push(target_name(target)?);
        }
    }
    for (target, iter) in &statements.loops {
        if message_vars
            .iter()
            .any(|name| accesses(iter, name, Some("content")))
        {
            target_name(target)?;
            return Some(ContentFormat::Parts);
        }
    }
    Some(ContentFormat::String)
}

/// `messages` and every name assigned from it, transitively (breadth first, like vLLM; a visited set
/// stops cycles such as `a = b` / `b = a`, on which vLLM would loop forever).
fn names_bound_to_messages(assigns: &[(Target, Expr)]) -> Option<Vec<String>> {
    let mut names = vec!["messages".to_string()];
    let mut queue = VecDeque::from(["messages".to_string()]);
    let mut visited = HashSet::from(["messages".to_string()]);
    while let Some(current) = queue.pop_front() {
        for (target, value) in assigns {
            if accesses(value, &current, None) {
                let name = target_name(target)?;
                if visited.insert(name.clone()) {
                    queue.push_back(name.clone());
                }
                names.push(name);
            }
        }
    }
    Some(names)
}

fn target_name(target: &Target) -> Option<String> {
    match target {
        Target::Name(name) => Some(name.clone()),
        Target::Other => None,
    }
}

/// vLLM's `_is_var_or_elems_access`: `name` (or `name[key]` / `name.key`), behind any filters, tests
/// and slices.
fn accesses(expr: &Expr, name: &str, key: Option<&str>) -> bool {
    match expr {
        Expr::Filter(inner) | Expr::Test(inner) | Expr::Getitem(inner, Subscript::Slice) => {
            accesses(inner, name, key)
        }
        _ => match key {
            None => matches!(expr, Expr::Name(n) if n == name),
            Some(key) => match expr {
                Expr::Getitem(inner, Subscript::Const(Some(k))) | Expr::Getattr(inner, k) => {
                    k == key && matches!(inner.as_ref(), Expr::Name(n) if n == name)
                }
                _ => false,
            },
        },
    }
}

/// `for TARGET in ITER [if COND] [recursive]`.
fn parse_for(tokens: &[Token]) -> Option<(Target, Expr)> {
    let split = top_level_position(tokens, |t| is_name(t, "in"))?;
    let target = parse_target(&tokens[..split]);
    let iter = &tokens[split + 1..];
    let end = top_level_position(iter, |t| is_name(t, "if") || is_name(t, "recursive"))
        .unwrap_or(iter.len());
    Some((target, parse_expression(&iter[..end])))
}

/// `set TARGET = VALUE` (block assignments, without `=`, are not assignments in Jinja2's AST).
fn parse_set(tokens: &[Token]) -> Option<(Target, Expr)> {
    let split = top_level_position(tokens, |t| t.kind == TokenKind::Op("="))?;
    Some((
        parse_target(&tokens[..split]),
        parse_expression(&tokens[split + 1..]),
    ))
}

fn parse_target(tokens: &[Token]) -> Target {
    match tokens {
        [Token {
            kind: TokenKind::Name(name),
            ..
        }] => Target::Name(name.clone()),
        [open, inner @ .., close] if is_op(Some(open), "(") && is_op(Some(close), ")") => {
            parse_target(inner)
        }
        _ => Target::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_cycles_terminate() {
        let src = "{% set a = messages %}{% set b = a %}{% set a = b %}{% for m in a %}{% for c in m.content %}{% endfor %}{% endfor %}";
        assert_eq!(detect_content_format(src), ContentFormat::Parts);
    }

    #[test]
    fn malformed_source_defaults_to_string() {
        assert_eq!(
            detect_content_format("{% for m in messages %}{% for c in m.content"),
            ContentFormat::String
        );
    }
}
