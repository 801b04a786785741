//! Just enough of Jinja2's expression grammar to tell which expressions are plain variable accesses:
//! `name`, `name.attr`, `name['key']`, and those behind filters (`| f(..)`), tests (`is t`) and
//! slices (`[1:]`), which is what vLLM's content-format detection inspects. Everything else (calls,
//! operators, literals, tuples, conditionals) collapses to `Expr::Other`.

use super::scan::{Token, TokenKind};

/// The parts of an expression that the detection looks at (a subset of Jinja2's AST nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Expr {
    Name(String),
    /// A constant: only string constants matter (as subscripts).
    Const(Option<String>),
    Getattr(Box<Expr>, String),
    Getitem(Box<Expr>, Subscript),
    Filter(Box<Expr>),
    Test(Box<Expr>),
    /// Anything else: calls, operators, literals, tuples, conditionals.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Subscript {
    Const(Option<String>),
    Slice,
    Other,
}

pub(crate) fn is_name(token: &Token, name: &str) -> bool {
    matches!(&token.kind, TokenKind::Name(n) if n == name)
}

pub(crate) fn is_op(token: Option<&Token>, op: &str) -> bool {
    matches!(token.map(|t| &t.kind), Some(TokenKind::Op(o)) if *o == op)
}

/// Index of the first token at bracket depth 0 that satisfies `pred`.
pub(crate) fn top_level_position(tokens: &[Token], pred: impl Fn(&Token) -> bool) -> Option<usize> {
    let mut depth = 0usize;
    for (i, token) in tokens.iter().enumerate() {
        match token.kind {
            TokenKind::Op("(" | "[" | "{") => depth += 1,
            TokenKind::Op(")" | "]" | "}") => depth = depth.saturating_sub(1),
            _ if depth == 0 && pred(token) => return Some(i),
            _ => {}
        }
    }
    None
}

/// A whole expression; anything beyond a single postfix/filter/test chain is `Other`.
pub(crate) fn parse_expression(tokens: &[Token]) -> Expr {
    let mut parser = Parser { tokens, pos: 0 };
    let expr = parser.unary();
    if parser.pos == tokens.len() {
        expr
    } else {
        Expr::Other
    }
}

/// A recursive-descent reader following Jinja2's `parse_unary` / `parse_postfix` / `parse_filter_expr`.
struct Parser<'t> {
    tokens: &'t [Token],
    pos: usize,
}

impl<'t> Parser<'t> {
    fn peek(&self) -> Option<&'t Token> {
        self.tokens.get(self.pos)
    }

    fn peek_name(&self) -> Option<&'t str> {
        match self.peek().map(|t| &t.kind) {
            Some(TokenKind::Name(n)) => Some(n),
            _ => None,
        }
    }

    fn unary(&mut self) -> Expr {
        if self.peek_name() == Some("not") || is_op(self.peek(), "-") || is_op(self.peek(), "+") {
            return Expr::Other;
        }
        let primary = self.primary();
        let postfix = self.postfix(primary);
        self.filters_and_tests(postfix)
    }

    fn primary(&mut self) -> Expr {
        let Some(token) = self.peek() else {
            return Expr::Other;
        };
        match &token.kind {
            TokenKind::Name(name) => {
                self.pos += 1;
                match name.as_str() {
                    "true" | "false" | "none" | "True" | "False" | "None" => Expr::Const(None),
                    _ => Expr::Name(name.clone()),
                }
            }
            TokenKind::Str(_) => {
                // Adjacent string literals are one constant in Jinja2.
                let mut text = String::new();
                while let Some(TokenKind::Str(s)) = self.peek().map(|t| &t.kind) {
                    text.push_str(s);
                    self.pos += 1;
                }
                Expr::Const(Some(text))
            }
            TokenKind::Number => {
                self.pos += 1;
                Expr::Const(None)
            }
            TokenKind::Op("(") => {
                let inner = self.bracketed();
                // `(x)` is `x`; `(x, y)` and `()` are tuples.
                match top_level_position(inner, |t| t.kind == TokenKind::Op(",")) {
                    None if !inner.is_empty() => parse_expression(inner),
                    _ => Expr::Other,
                }
            }
            TokenKind::Op("[" | "{") => {
                self.bracketed();
                Expr::Other
            }
            _ => Expr::Other,
        }
    }

    /// Consumes a balanced `( .. )`, `[ .. ]` or `{ .. }` group and returns the tokens inside it.
    fn bracketed(&mut self) -> &'t [Token] {
        let tokens = self.tokens;
        let start = self.pos + 1;
        let mut depth = 0usize;
        while let Some(token) = tokens.get(self.pos) {
            self.pos += 1;
            match token.kind {
                TokenKind::Op("(" | "[" | "{") => depth += 1,
                TokenKind::Op(")" | "]" | "}") => {
                    depth -= 1;
                    if depth == 0 {
                        return &tokens[start..self.pos - 1];
                    }
                }
                _ => {}
            }
        }
        &tokens[start.min(tokens.len())..]
    }

    fn postfix(&mut self, mut node: Expr) -> Expr {
        loop {
            if is_op(self.peek(), ".") {
                self.pos += 1;
                node = match self.peek().map(|t| t.kind.clone()) {
                    Some(TokenKind::Name(attr)) => Expr::Getattr(Box::new(node), attr),
                    Some(TokenKind::Number) => {
                        Expr::Getitem(Box::new(node), Subscript::Const(None))
                    }
                    _ => return Expr::Other,
                };
                self.pos += 1;
            } else if is_op(self.peek(), "[") {
                let inner = self.bracketed();
                node = Expr::Getitem(Box::new(node), subscript(inner));
            } else if is_op(self.peek(), "(") {
                self.bracketed();
                node = Expr::Other;
            } else {
                return node;
            }
        }
    }

    fn filters_and_tests(&mut self, mut node: Expr) -> Expr {
        loop {
            if is_op(self.peek(), "|") {
                self.pos += 1;
                self.dotted_name();
                if is_op(self.peek(), "(") {
                    self.bracketed();
                }
                node = Expr::Filter(Box::new(node));
            } else if self.peek_name() == Some("is") {
                self.pos += 1;
                let negated = self.peek_name() == Some("not");
                if negated {
                    self.pos += 1;
                }
                self.dotted_name();
                self.test_argument();
                node = if negated {
                    Expr::Other
                } else {
                    Expr::Test(Box::new(node))
                };
            } else if is_op(self.peek(), "(") {
                self.bracketed();
                node = Expr::Other;
            } else {
                return node;
            }
        }
    }

    fn dotted_name(&mut self) {
        while self.peek_name().is_some() {
            self.pos += 1;
            if !is_op(self.peek(), ".") {
                return;
            }
            self.pos += 1;
        }
    }

    /// A test's argument: `(args)`, or one bare primary (`is divisibleby 3`), as in Jinja2's `parse_test`.
    fn test_argument(&mut self) {
        let Some(token) = self.peek() else { return };
        let bare = match &token.kind {
            TokenKind::Op("(") => {
                self.bracketed();
                return;
            }
            TokenKind::Name(n) => !matches!(n.as_str(), "else" | "or" | "and"),
            TokenKind::Str(_) | TokenKind::Number | TokenKind::Op("[" | "{") => true,
            _ => false,
        };
        if bare {
            let primary = self.primary();
            self.postfix(primary);
        }
    }
}

/// What is inside `x[...]`: a slice if it has a top-level `:`, a constant, or something else.
fn subscript(tokens: &[Token]) -> Subscript {
    if top_level_position(tokens, |t| t.kind == TokenKind::Op(":")).is_some() {
        return Subscript::Slice;
    }
    match parse_expression(tokens) {
        Expr::Const(value) => Subscript::Const(value),
        _ => Subscript::Other,
    }
}
#[cfg(test)]
mod tests {
    use super::super::scan::scan;
    use super::*;

    fn expr(src: &str) -> Expr {
        let tags = scan(&format!("{{{{ {src} }}}}")).unwrap();
        parse_expression(&tags[0].tokens)
    }

    #[test]
    fn expressions_reduce_to_the_nodes_vllm_inspects() {
        let name = |n: &str| Box::new(Expr::Name(n.into()));
        assert_eq!(
            expr("m['content']"),
            Expr::Getitem(name("m"), Subscript::Const(Some("content".into())))
        );
        assert_eq!(
            expr("m.content"),
            Expr::Getattr(name("m"), "content".into())
        );
        assert_eq!(
            expr("messages[1:]"),
            Expr::Getitem(name("messages"), Subscript::Slice)
        );
        assert_eq!(
            expr("(messages) | reverse | list"),
            Expr::Filter(Box::new(Expr::Filter(name("messages"))))
        );
        assert_eq!(expr("m is string"), Expr::Test(name("m")));
        assert_eq!(expr("m is not none"), Expr::Other);
        assert_eq!(expr("m.get('content')"), Expr::Other);
        assert_eq!(expr("messages + []"), Expr::Other);
        assert_eq!(expr("not messages"), Expr::Other);
        assert_eq!(expr("m[key]"), Expr::Getitem(name("m"), Subscript::Other));
    }
}
