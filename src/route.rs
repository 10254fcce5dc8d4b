//! Route selection: host (without port, case-insensitive), then the longest
//! segment-aware path prefix. Routes naming a host win over host-less routes;
//! a host-less route is the fallback for any host. Pure, so it is table-tested here.

use std::collections::HashMap;

pub struct RouteTable<T> {
    by_host: HashMap<String, Vec<(String, T)>>,
    any_host: Vec<(String, T)>,
}

impl<T> RouteTable<T> {
    /// `entries` are `(host, path_prefix, value)`; prefixes have no trailing `/` (except `/`).
    pub fn new(entries: impl IntoIterator<Item = (Option<String>, String, T)>) -> Self {
        let mut by_host: HashMap<String, Vec<(String, T)>> = HashMap::new();
        let mut any_host = Vec::new();
        for (host, prefix, value) in entries {
            match host {
                Some(h) => by_host.entry(h.to_ascii_lowercase()).or_default().push((prefix, value)),
                None => any_host.push((prefix, value)),
            }
        }
        // Longest prefix first, so the first match is the most specific one.
        for list in by_host.values_mut() {
            list.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        }
        any_host.sort_by_key(|e| std::cmp::Reverse(e.0.len()));
        Self { by_host, any_host }
    }

    /// `host` is the request's Host or :authority, with or without a port.
    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&T> {
        let host = host.map(strip_port);
        let specific = host.and_then(|h| {
            // Host names are usually lower-case already; avoid allocating then.
            if h.bytes().any(|b| b.is_ascii_uppercase()) {
                self.by_host.get(&h.to_ascii_lowercase())
            } else {
                self.by_host.get(h)
            }
        });
        specific.and_then(|list| first_match(list, path)).or_else(|| first_match(&self.any_host, path))
    }
}

fn first_match<'a, T>(list: &'a [(String, T)], path: &str) -> Option<&'a T> {
    list.iter().find(|(prefix, _)| prefix_matches(prefix, path)).map(|(_, v)| v)
}

/// `/orders` matches `/orders` and `/orders/1`, never `/ordersx`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/') || path.is_empty();
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// Removes a `:port` (and IPv6 brackets keep their content) from a Host value.
pub fn strip_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// The path sent upstream when the route strips its prefix; always starts with `/`.
pub fn strip_path<'a>(prefix: &str, path: &'a str) -> &'a str {
    if prefix == "/" {
        return path;
    }
    match path.strip_prefix(prefix) {
        Some("") => "/",
        Some(rest) => rest,
        None => path,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RouteTable<&'static str> {
        RouteTable::new([
            (None, "/".to_owned(), "root"),
            (None, "/orders".to_owned(), "orders"),
            (None, "/orders/admin".to_owned(), "orders-admin"),
            (Some("API.example.com".to_owned()), "/orders".to_owned(), "api-orders"),
            (Some("legacy.example.com".to_owned()), "/v1".to_owned(), "legacy-v1"),
        ])
    }

    #[test]
    fn precedence_and_segments() {
        let t = table();
        let cases = [
            (None, "/", Some("root")),
            (None, "/orders", Some("orders")),
            (None, "/orders/", Some("orders")),
            (None, "/orders/42", Some("orders")),
            (None, "/ordersx", Some("root")),
            (None, "/orders/admin/x", Some("orders-admin")),
            (None, "/orders/administrator", Some("orders")),
            (Some("api.example.com"), "/orders/1", Some("api-orders")),
            (Some("API.Example.COM:8443"), "/orders/1", Some("api-orders")),
            (Some("api.example.com"), "/other", Some("root")),
            (Some("legacy.example.com"), "/v1/x", Some("legacy-v1")),
            (Some("legacy.example.com"), "/v10", Some("root")),
            (Some("other.example.com"), "/orders", Some("orders")),
        ];
        for (host, path, want) in cases {
            assert_eq!(t.find(host, path).copied(), want, "{host:?} {path}");
        }
    }

    #[test]
    fn no_fallback_means_no_route() {
        let t = RouteTable::new([(Some("a.example".to_owned()), "/x".to_owned(), 1)]);
        assert_eq!(t.find(Some("a.example"), "/y"), None);
        assert_eq!(t.find(Some("b.example"), "/x"), None);
        assert_eq!(t.find(None, "/x"), None);
    }

    #[test]
    fn ports_and_brackets() {
        assert_eq!(strip_port("example.com:8080"), "example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:443"), "::1");
        assert_eq!(strip_port("127.0.0.1:80"), "127.0.0.1");
    }

    #[test]
    fn strip_prefix_paths() {
        assert_eq!(strip_path("/api", "/api/users"), "/users");
        assert_eq!(strip_path("/api", "/api"), "/");
        assert_eq!(strip_path("/", "/x"), "/x");
    }
}
