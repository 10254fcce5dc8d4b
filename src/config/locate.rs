//! Maps key paths to line numbers and byte offsets back to key paths, using the
//! span-keeping `toml_edit` parser, so every problem can say `file:line: key`.

use std::fmt;
use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

/// One step of a key path: `routes[2].upstream` is `[Key(routes), Index(2), Key(upstream)]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }
    pub fn key(&self, k: &str) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.to_owned()));
        Self(v)
    }
    pub fn index(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if n == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(i) => write!(f, "[{i}]")?,
            }
        }
        Ok(())
    }
}

pub struct Locator<'a> {
    text: &'a str,
    doc: Option<ImDocument<&'a str>>,
}

impl<'a> Locator<'a> {
    pub fn new(text: &'a str) -> Self {
        Self { text, doc: ImDocument::parse(text).ok() }
    }

    pub fn line_of_offset(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end].iter().filter(|&&b| b == b'\n').count() + 1
    }

    /// Line of the key (or array element) at `path`; falls back to the nearest
    /// ancestor that exists, so a missing key points at its table.
    pub fn line_of(&self, path: &KeyPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut best: Option<Range<usize>> = None;
        let mut cur = Node::Table(doc.as_table());
        for seg in &path.0 {
            let next = match (cur, seg) {
                (Node::Table(t), Seg::Key(k)) => t
                    .get_key_value(k)
                    .map(|(key, item)| (key.span().or_else(|| item.span()), Node::from_item(item))),
                (Node::Inline(t), Seg::Key(k)) => {
                    t.get_key_value(k).map(|(key, v)| (key.span().or_else(|| v.span()), Node::from_item(v)))
                }
                (Node::Tables(a), Seg::Index(i)) => a.get(*i).map(|t| (t.span(), Node::Table(t))),
                (Node::Array(a), Seg::Index(i)) => a.get(*i).map(|v| (v.span(), Node::from_value(v))),
                _ => None,
            };
            let Some((span, node)) = next else { break };
            if span.is_some() {
                best = span;
            }
            cur = node;
        }
        best.map(|r| self.line_of_offset(r.start))
    }

    /// The deepest key path whose key or value covers `offset`.
    pub fn path_at(&self, offset: usize) -> KeyPath {
        let mut out = KeyPath::root();
        if let Some(doc) = &self.doc {
            walk_table(doc.as_table(), offset, &mut KeyPath::root(), &mut out);
        }
        out
    }
}

#[derive(Clone, Copy)]
enum Node<'t> {
    Table(&'t Table),
    Inline(&'t toml_edit::InlineTable),
    Tables(&'t toml_edit::ArrayOfTables),
    Array(&'t toml_edit::Array),
    Leaf,
}

impl<'t> Node<'t> {
    fn from_item(item: &'t Item) -> Self {
        match item {
            Item::Table(t) => Node::Table(t),
            Item::ArrayOfTables(a) => Node::Tables(a),
            Item::Value(v) => Node::from_value(v),
            Item::None => Node::Leaf,
        }
    }
    fn from_value(v: &'t Value) -> Self {
        match v {
            Value::InlineTable(t) => Node::Inline(t),
            Value::Array(a) => Node::Array(a),
            _ => Node::Leaf,
        }
    }
}

fn covers(span: Option<Range<usize>>, offset: usize) -> bool {
    span.is_some_and(|r| r.start <= offset && offset < r.end.max(r.start + 1))
}

fn walk_node(node: Node<'_>, offset: usize, here: &mut KeyPath, out: &mut KeyPath) {
    match node {
        Node::Table(t) => walk_table(t, offset, here, out),
        Node::Inline(t) => {
            for (k, v) in t.iter() {
                let key_span = t.key(k).and_then(|key| key.span());
                let p = here.key(k);
                if covers(key_span, offset) || covers(v.span(), offset) {
                    *out = p.clone();
                }
                walk_node(Node::from_value(v), offset, &mut p.clone(), out);
            }
        }
        Node::Tables(a) => {
            for (i, t) in a.iter().enumerate() {
                let p = here.index(i);
                if covers(t.span(), offset) {
                    *out = p.clone();
                }
                walk_table(t, offset, &mut p.clone(), out);
            }
        }
        Node::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                let p = here.index(i);
                if covers(v.span(), offset) {
                    *out = p.clone();
                }
                walk_node(Node::from_value(v), offset, &mut p.clone(), out);
            }
        }
        Node::Leaf => {}
    }
}

fn walk_table(t: &Table, offset: usize, here: &mut KeyPath, out: &mut KeyPath) {
    for (k, item) in t.iter() {
        let key_span = t.key(k).and_then(|key| key.span());
        let p = here.key(k);
        if covers(key_span, offset) || covers(item.span(), offset) {
            *out = p.clone();
        }
        walk_node(Node::from_item(item), offset, &mut p.clone(), out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "[listen]\nhttp = \"x\"\n\n[[routes]]\nname = \"a\"\n\n[[routes]]\nname = \"b\"\nupstrem = \"y\"\n[routes.identity_headers]\n\"X-Id\" = \"sub\"\n";

    #[test]
    fn line_of_paths() {
        let l = Locator::new(TEXT);
        assert_eq!(l.line_of(&KeyPath::root().key("listen").key("http")), Some(2));
        assert_eq!(l.line_of(&KeyPath::root().key("routes").index(1).key("upstrem")), Some(9));
        assert_eq!(
            l.line_of(&KeyPath::root().key("routes").index(1).key("identity_headers").key("X-Id")),
            Some(11)
        );
        // Missing key: nearest ancestor.
        assert_eq!(l.line_of(&KeyPath::root().key("routes").index(0).key("nope")), Some(4));
    }

    #[test]
    fn path_at_offsets() {
        let l = Locator::new(TEXT);
        let off = TEXT.find("upstrem").unwrap();
        assert_eq!(l.path_at(off).to_string(), "routes[1].upstrem");
        let off = TEXT.find("\"x\"").unwrap();
        assert_eq!(l.path_at(off).to_string(), "listen.http");
    }
}
