//! Configurations as an operator writes them, table by table:
//!
//! ```ignore
//! let toml = Config::new()
//!     .table(idp.issuer_table().set("jwks_refresh", "1h"))
//!     .table(idp.auth_server_table())
//!     .table(session_table().set("refresh_grace", "1s"))
//!     .table(api_route(&up))
//!     .toml();
//! ```
//!
//! The tables for the test IdP come from [`TestIdp::issuer_table`](super::TestIdp::issuer_table)
//! and [`TestIdp::auth_server_table`](super::TestIdp::auth_server_table); routes other
//! than [`api_route`] and anything else the builder has no word for go in as raw TOML.

use super::upstream::Upstream;

/// One TOML table: a header (`[session]`, `[[issuers]]`) and its keys, in order.
#[derive(Debug, Clone)]
pub struct Table {
    header: String,
    entries: Vec<(String, toml::Value)>,
    raw: Vec<String>,
}

impl Table {
    /// An empty table; `header` is written as is, e.g. `"[state]"` or `"[[issuers]]"`.
    pub fn new(header: &str) -> Self {
        Self { header: header.to_owned(), entries: Vec::new(), raw: Vec::new() }
    }

    /// Sets `key` (replacing an earlier value): `"30s"`, `false`, `vec!["RS256"]`.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        let value = value.into();
        match self.entries.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.entries.push((key.to_owned(), value)),
        }
        self
    }

    /// Removes `key` if it was set.
    pub fn unset(mut self, key: &str) -> Self {
        self.entries.retain(|(k, _)| k != key);
        self
    }

    /// Appends raw `key = value` lines (a test's extra settings, written by hand).
    pub fn lines(mut self, raw: &str) -> Self {
        if !raw.trim().is_empty() {
            self.raw.push(raw.to_owned());
        }
        self
    }

    fn write(&self, out: &mut String) {
        out.push_str(&self.header);
        out.push('\n');
        for (k, v) in &self.entries {
            out.push_str(&format!("{k} = {v}\n"));
        }
        for raw in &self.raw {
            out.push_str(raw);
            out.push('\n');
        }
        out.push('\n');
    }
}

/// `[session]`: cookies sealed with the key(s) in the `COOKIE_KEY` variable, without
/// `Secure` (the tests speak plain HTTP).
pub fn session_table() -> Table {
    Table::new("[session]").set("cookie_key_env", "COOKIE_KEY").set("secure", false)
}

/// `[[routes]]` "api": `/api` to `up`, tokens checked against issuer "main".
pub fn api_route(up: &Upstream) -> Table {
    Table::new("[[routes]]")
        .set("name", "api")
        .set("path_prefix", "/api")
        .set("upstream", up.url())
        .set("issuer", "main")
}

/// A whole configuration file under construction.
#[derive(Debug, Clone, Default)]
pub struct Config {
    text: String,
}

impl Config {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a table.
    pub fn table(mut self, t: Table) -> Self {
        t.write(&mut self.text);
        self
    }

    /// Appends raw TOML: `[[routes]]`, `[limits]`, anything else.
    pub fn raw(mut self, toml: &str) -> Self {
        self.text.push_str(toml);
        self.text.push('\n');
        self
    }

    /// The file's text.
    pub fn toml(&self) -> String {
        self.text.clone()
    }
}
