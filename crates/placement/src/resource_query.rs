//! The resource query language of seed 003 (LStore's resource service), used to choose targets
//! for pools (`strata pool create --select`) and to constrain containers.
//!
//! Two spellings, one AST (a query with ':' and no '=' or '(' is in tuple form):
//! - **tuple form** (the seed's): tuples `OP:key:KEY_OP:val:VAL_OP` joined by `.`, evaluated in
//!   postfix order. `OP` 1 = match key/val, 2 = NOT (pops one), 3 = AND, 4 = OR (pop two).
//!   `KEY_OP`/`VAL_OP` 1 = exact, 2 = prefix, 3 = any; or'ed with 64 ("each selected target
//!   unique in this key") or 128 ("one value of this key for all"), written `1|64` or `65`.
//!   Tuples left on the stack at the end are joined by AND.
//! - **readable form**: `media=ssd and not zone=b`, `host=node-*` (prefix), `rack=*` (any),
//!   `key!=val`, parentheses, and `unique(host)` / `same(rack)` joined by `and` at top level.
//!
//! Attributes of a target: its labels, its fault-domain levels (`host`, `rack`, `zone`, ...),
//! `rank`, `target` (`rank:index`), `domain` (the full path) and `state`.
//! Limits: a query of at most 4096 bytes and 256 tuples or terms.

use std::collections::BTreeMap;
use std::fmt;
use strata_types::TargetId;

pub const QUERY_BYTES_MAX: usize = 4096;
pub const QUERY_TERMS_MAX: usize = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Exact(String),
    Prefix(String),
    Any,
}

impl Pattern {
    fn matches(&self, s: &str) -> bool {
        match self {
            Pattern::Exact(p) => s == p,
            Pattern::Prefix(p) => s.starts_with(p.as_str()),
            Pattern::Any => true,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expr {
    True,
    Match { key: Pattern, val: Pattern },
    Not(Box<Expr>),
    And(Box<Expr>, Box<Expr>),
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    pub fn eval(&self, attrs: &BTreeMap<String, String>) -> bool {
        match self {
            Expr::True => true,
            Expr::Match { key, val } => attrs.iter().any(|(k, v)| key.matches(k) && val.matches(v)),
            Expr::Not(e) => !e.eval(attrs),
            Expr::And(a, b) => a.eval(attrs) && b.eval(attrs),
            Expr::Or(a, b) => a.eval(attrs) || b.eval(attrs),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spread {
    /// Every selected target has a different value of the key.
    Unique,
    /// Every selected target has the same value of the key.
    Same,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Query {
    pub filter: Expr,
    pub spread: Vec<(String, Spread)>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct QueryError {
    /// 1-based tuple number (tuple form) or column (readable form).
    pub at: usize,
    pub snippet: String,
    pub reason: String,
    pub tuple_form: bool,
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tuple_form {
            write!(f, "resource query tuple {} '{}': {}", self.at, self.snippet, self.reason)
        } else {
            write!(f, "resource query at column {} near '{}': {}", self.at, self.snippet, self.reason)
        }
    }
}

/// Parse either form (tuple form if the query starts with a digit and contains ':').
pub fn parse(query: &str) -> Result<Query, QueryError> {
    let q = query.trim();
    if q.len() > QUERY_BYTES_MAX {
        return Err(QueryError { at: 1, snippet: String::new(), reason: format!("query is {} bytes; the limit is {QUERY_BYTES_MAX}", q.len()), tuple_form: false });
    }
    if q.is_empty() {
        return Ok(Query { filter: Expr::True, spread: Vec::new() });
    }
    // The readable form always has '=' or '!=' (or is '*'/'any' or only spread calls); the
    // tuple form never does.
    if q.contains(':') && !q.contains('=') && !q.contains('(') {
        parse_tuples(q)
    } else {
        Readable::new(q).parse()
    }
}

fn parse_op_field(field: &str) -> Option<(u32, Option<Spread>)> {
    let mut base = 0u32;
    let mut flags = 0u32;
    for (i, part) in field.split('|').enumerate() {
        let v: u32 = part.trim().parse().ok()?;
        if i == 0 {
            flags |= v & !0x3f;
            base = v & 0x3f;
        } else {
            flags |= v;
        }
    }
    let spread = match flags {
        0 => None,
        64 => Some(Spread::Unique),
        128 => Some(Spread::Same),
        _ => return None,
    };
    if !(1..=3).contains(&base) {
        return None;
    }
    Some((base, spread))
}

fn parse_tuples(q: &str) -> Result<Query, QueryError> {
    let mut stack: Vec<Expr> = Vec::new();
    let mut spread = Vec::new();
    let tuples: Vec<&str> = q.split('.').collect();
    if tuples.len() > QUERY_TERMS_MAX {
        return Err(QueryError { at: QUERY_TERMS_MAX + 1, snippet: String::new(), reason: format!("more than {QUERY_TERMS_MAX} tuples"), tuple_form: true });
    }
    for (i, t) in tuples.iter().enumerate() {
        let err = |reason: String| QueryError { at: i + 1, snippet: t.to_string(), reason, tuple_form: true };
        let f: Vec<&str> = t.split(':').collect();
        if f.len() != 5 {
            return Err(err(format!("expected 5 fields OP:key:KEY_OP:val:VAL_OP, found {}", f.len())));
        }
        let op: u32 = f[0].trim().parse().map_err(|_| err(format!("OP '{}' is not a number", f[0])))?;
        match op {
            1 => {
                let (kop, kspread) = parse_op_field(f[2]).ok_or_else(|| err(format!("KEY_OP '{}' must be 1, 2 or 3, optionally |64 or |128", f[2])))?;
                let (vop, vspread) = parse_op_field(f[4]).ok_or_else(|| err(format!("VAL_OP '{}' must be 1, 2 or 3, optionally |64 or |128", f[4])))?;
                let pat = |op: u32, text: &str| match op {
                    1 => Pattern::Exact(text.to_owned()),
                    2 => Pattern::Prefix(text.to_owned()),
                    _ => Pattern::Any,
                };
                if let Some(s) = kspread.or(vspread) {
                    if kop != 1 {
                        return Err(err("unique (64) and pick-one (128) need an exact key (KEY_OP 1)".into()));
                    }
                    spread.push((f[1].to_owned(), s));
                }
                stack.push(Expr::Match { key: pat(kop, f[1]), val: pat(vop, f[3]) });
            }
            2 => {
                let e = stack.pop().ok_or_else(|| err("NOT needs one expression before it".into()))?;
                stack.push(Expr::Not(Box::new(e)));
            }
            3 | 4 => {
                let (Some(b), Some(a)) = (stack.pop(), stack.pop()) else {
                    return Err(err(format!("{} needs two expressions before it", if op == 3 { "AND" } else { "OR" })));
                };
                stack.push(if op == 3 { Expr::And(Box::new(a), Box::new(b)) } else { Expr::Or(Box::new(a), Box::new(b)) });
            }
            other => return Err(err(format!("unknown OP {other} (1 match, 2 NOT, 3 AND, 4 OR)"))),
        }
    }
    let filter = stack.into_iter().reduce(|a, b| Expr::And(Box::new(a), Box::new(b))).unwrap_or(Expr::True);
    Ok(Query { filter, spread })
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Word(String),
    Eq,
    Ne,
    LParen,
    RParen,
}

struct Readable<'a> {
    src: &'a str,
    toks: Vec<(usize, Tok)>,
    pos: usize,
    /// unique()/same() calls seen: (column, attribute, kind).
    spreads: Vec<(usize, String, Spread)>,
}

impl<'a> Readable<'a> {
    fn new(src: &'a str) -> Self {
        Readable { src, toks: Vec::new(), pos: 0, spreads: Vec::new() }
    }

    fn err(&self, col: usize, reason: impl Into<String>) -> QueryError {
        let start = col.saturating_sub(1).min(self.src.len());
        let snippet: String = self.src[start..].chars().take(16).collect();
        QueryError { at: col, snippet, reason: reason.into(), tuple_form: false }
    }

    fn lex(&mut self) -> Result<(), QueryError> {
        let b = self.src.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            let col = i + 1;
            match c {
                b' ' | b'\t' | b'\n' => i += 1,
                b'(' => {
                    self.toks.push((col, Tok::LParen));
                    i += 1
                }
                b')' => {
                    self.toks.push((col, Tok::RParen));
                    i += 1
                }
                b'=' => {
                    self.toks.push((col, Tok::Eq));
                    i += 1
                }
                b'!' if b.get(i + 1) == Some(&b'=') => {
                    self.toks.push((col, Tok::Ne));
                    i += 2
                }
                c if c.is_ascii_alphanumeric() || b"_-./*:@+".contains(&c) => {
                    let s = i;
                    while i < b.len() && (b[i].is_ascii_alphanumeric() || b"_-./*:@+".contains(&b[i])) {
                        i += 1;
                    }
                    self.toks.push((col, Tok::Word(self.src[s..i].to_owned())));
                }
                _ => return Err(self.err(col, format!("unexpected character '{}'", self.src[i..].chars().next().unwrap_or('?')))),
            }
            if self.toks.len() > QUERY_TERMS_MAX * 4 {
                return Err(self.err(col, "query has too many terms"));
            }
        }
        Ok(())
    }

    fn peek(&self) -> Option<&Tok> {
        self.toks.get(self.pos).map(|(_, t)| t)
    }
    fn col(&self) -> usize {
        self.toks.get(self.pos).map_or(self.src.len() + 1, |(c, _)| *c)
    }
    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Some(Tok::Word(w)) if w.eq_ignore_ascii_case(kw))
    }

    fn parse(mut self) -> Result<Query, QueryError> {
        self.lex()?;
        let filter = self.or_expr(0)?;
        if self.pos < self.toks.len() {
            return Err(self.err(self.col(), "expected 'and', 'or' or the end of the query"));
        }
        let spread = self.spreads.drain(..).map(|(_, name, kind)| (name, kind)).collect();
        Ok(Query { filter, spread })
    }

    /// unique()/same() constrain the whole selection, so they may sit only under `and`s.
    fn refuse_spreads_since(&self, mark: usize, under: &str) -> Result<(), QueryError> {
        match self.spreads.get(mark) {
            Some((col, _, _)) => Err(self.err(*col, format!("unique() and same() may only be joined with 'and', not used under '{under}'"))),
            None => Ok(()),
        }
    }

    fn or_expr(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mark = self.spreads.len();
        let mut e = self.and_expr(depth)?;
        let mut had_or = false;
        while self.is_kw("or") {
            self.pos += 1;
            had_or = true;
            let r = self.and_expr(depth)?;
            e = Expr::Or(Box::new(e), Box::new(r));
        }
        if had_or {
            self.refuse_spreads_since(mark, "or")?;
        }
        Ok(e)
    }

    fn and_expr(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let mut e = self.not_expr(depth)?;
        while self.is_kw("and") {
            self.pos += 1;
            let r = self.not_expr(depth)?;
            e = match (e, r) {
                (Expr::True, r) => r,
                (l, Expr::True) => l,
                (l, r) => Expr::And(Box::new(l), Box::new(r)),
            };
        }
        Ok(e)
    }

    fn not_expr(&mut self, depth: usize) -> Result<Expr, QueryError> {
        if depth > 64 {
            return Err(self.err(self.col(), "expression nested too deeply"));
        }
        if self.is_kw("not") {
            self.pos += 1;
            let mark = self.spreads.len();
            let inner = self.not_expr(depth + 1)?;
            self.refuse_spreads_since(mark, "not")?;
            return Ok(Expr::Not(Box::new(inner)));
        }
        self.atom(depth)
    }

    fn atom(&mut self, depth: usize) -> Result<Expr, QueryError> {
        let col = self.col();
        match self.toks.get(self.pos).cloned() {
            Some((_, Tok::LParen)) => {
                self.pos += 1;
                let e = self.or_expr(depth + 1)?;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.err(self.col(), "expected ')'"));
                }
                self.pos += 1;
                Ok(e)
            }
            Some((_, Tok::Word(w)))
                if (w.eq_ignore_ascii_case("unique") || w.eq_ignore_ascii_case("same")) && self.toks.get(self.pos + 1).map(|(_, t)| t) == Some(&Tok::LParen) =>
            {
                let kind = if w.eq_ignore_ascii_case("unique") { Spread::Unique } else { Spread::Same };
                self.pos += 2;
                let name = match self.toks.get(self.pos) {
                    Some((_, Tok::Word(n))) if !n.contains('*') => n.clone(),
                    _ => return Err(self.err(self.col(), "expected an attribute name, e.g. unique(host)")),
                };
                self.pos += 1;
                if self.peek() != Some(&Tok::RParen) {
                    return Err(self.err(self.col(), "expected ')'"));
                }
                self.pos += 1;
                self.spreads.push((col, name, kind));
                Ok(Expr::True)
            }
            Some((_, Tok::Word(w)))
                if (w == "*" || w.eq_ignore_ascii_case("any")) && !matches!(self.toks.get(self.pos + 1).map(|(_, t)| t), Some(Tok::Eq | Tok::Ne)) =>
            {
                self.pos += 1;
                Ok(Expr::True)
            }
            Some((_, Tok::Word(key))) => {
                self.pos += 1;
                let negate = match self.peek() {
                    Some(Tok::Eq) => false,
                    Some(Tok::Ne) => true,
                    _ => return Err(self.err(self.col(), format!("expected '=' or '!=' after '{key}'"))),
                };
                self.pos += 1;
                let val = match self.toks.get(self.pos) {
                    Some((_, Tok::Word(v))) => v.clone(),
                    _ => return Err(self.err(self.col(), "expected a value")),
                };
                self.pos += 1;
                let pat = |s: &str| {
                    if s == "*" {
                        Pattern::Any
                    } else if let Some(p) = s.strip_suffix('*') {
                        Pattern::Prefix(p.to_owned())
                    } else {
                        Pattern::Exact(s.to_owned())
                    }
                };
                let m = Expr::Match { key: pat(&key), val: pat(&val) };
                Ok(if negate { Expr::Not(Box::new(m)) } else { m })
            }
            Some((c, _)) => Err(self.err(c, "expected an attribute test like media=ssd")),
            None => Err(self.err(col, "query ends where a term was expected")),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    #[error("only {found} targets satisfy the query, {wanted} requested")]
    NotEnough { found: usize, wanted: usize },
}

/// Select targets: filter, then apply `same` (the value shared by most matching targets,
/// ties to the smallest value) and `unique` (first target of each value, in candidate order),
/// then take `n` (all if `None`). Deterministic in its inputs.
pub fn select(query: &Query, candidates: &[(TargetId, BTreeMap<String, String>)], n: Option<usize>) -> Result<Vec<TargetId>, SelectError> {
    let mut pool: Vec<&(TargetId, BTreeMap<String, String>)> = candidates.iter().filter(|(_, a)| query.filter.eval(a)).collect();
    for (key, kind) in &query.spread {
        if *kind == Spread::Same {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, a) in &pool {
                if let Some(v) = a.get(key) {
                    *counts.entry(v.as_str()).or_default() += 1;
                }
            }
            let best = counts.iter().max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0))).map(|(v, _)| v.to_string());
            pool.retain(|(_, a)| a.get(key) == best.as_ref());
        }
    }
    for (key, kind) in &query.spread {
        if *kind == Spread::Unique {
            let mut seen = std::collections::HashSet::new();
            pool.retain(|(_, a)| a.get(key).is_some_and(|v| seen.insert(v.clone())));
        }
    }
    let found = pool.len();
    let picked: Vec<TargetId> = pool.into_iter().map(|(t, _)| *t).take(n.unwrap_or(usize::MAX)).collect();
    if let Some(n) = n {
        if picked.len() < n {
            return Err(SelectError::NotEnough { found, wanted: n });
        }
    }
    Ok(picked)
}
