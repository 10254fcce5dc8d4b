//! `[[routes.rules]]`: the first rule whose methods and path prefix match the
//! request decides; none matching, the route's own policy does. Rules were
//! compiled when the configuration was built, so deciding allocates nothing.

use http::Method;

use super::Claims;
use crate::config::{ClaimMatch, RuleSettings};
use crate::route::prefix_matches;

/// The rule deciding a request with `method` on the (normalised) `path`.
pub fn decide<'a>(rules: &'a [RuleSettings], method: &Method, path: &str) -> Option<&'a RuleSettings> {
    rules.iter().find(|r| {
        // Case-insensitively: an upstream may read `post` as POST.
        (r.methods.is_empty() || r.methods.iter().any(|m| m.as_str().eq_ignore_ascii_case(method.as_str())))
            && r.path_prefix.as_deref().is_none_or(|p| prefix_matches(p, path))
    })
}

/// Whether every claim condition holds: the claim (a dotted path into nested
/// objects) equals the value or, when it is an array, contains it.
pub fn claims_match(claims: &Claims, conditions: &[ClaimMatch]) -> bool {
    conditions.iter().all(|c| {
        let mut segments = c.path.iter();
        let Some(first) = segments.next() else { return false };
        let mut value = claims.all.get(first);
        for seg in segments {
            value = value.and_then(|v| v.get(seg));
        }
        match value {
            Some(serde_json::Value::Array(items)) => items.contains(&c.value),
            Some(v) => *v == c.value,
            None => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RuleAction;
    use serde_json::json;

    fn rule(methods: &[&str], prefix: Option<&str>, n: usize) -> RuleSettings {
        RuleSettings {
            methods: methods.iter().map(|m| Method::from_bytes(m.as_bytes()).unwrap()).collect(),
            path_prefix: prefix.map(str::to_owned),
            action: RuleAction::Public,
            number: n,
            line: None,
        }
    }

    #[test]
    fn first_match_by_method_and_segment_aware_prefix() {
        let rules =
            vec![rule(&["POST", "DELETE"], Some("/orders/admin"), 1), rule(&[], Some("/orders/health"), 2)];
        let n = |m: &str, p: &str| {
            decide(&rules, &Method::from_bytes(m.as_bytes()).unwrap(), p).map(|r| r.number)
        };
        assert_eq!(n("POST", "/orders/admin/x"), Some(1));
        assert_eq!(n("GET", "/orders/admin/x"), None);
        assert_eq!(n("POST", "/orders/administrator"), None);
        assert_eq!(n("GET", "/orders/health"), Some(2));
        assert_eq!(n("DELETE", "/orders/health/deep"), Some(2));
        assert_eq!(n("GET", "/orders/1"), None);
        assert_eq!(n("post", "/orders/admin/x"), Some(1));
    }

    #[test]
    fn claims_equal_contain_and_nest() {
        let all = json!({"groups": ["ops", "dev"], "tier": "gold", "level": 3, "realm_access": {"roles": ["admin"]}});
        let c = Claims { all: all.as_object().unwrap().clone(), ..Default::default() };
        let m = |path: &str, v: serde_json::Value| ClaimMatch {
            path: path.split('.').map(str::to_owned).collect(),
            value: v,
        };
        assert!(claims_match(&c, &[m("groups", json!("ops"))]));
        assert!(claims_match(&c, &[m("tier", json!("gold")), m("level", json!(3))]));
        assert!(claims_match(&c, &[m("realm_access.roles", json!("admin"))]));
        assert!(!claims_match(&c, &[m("groups", json!("admin"))]));
        assert!(!claims_match(&c, &[m("tier", json!("silver"))]));
        assert!(!claims_match(&c, &[m("missing", json!("x"))]));
        assert!(!claims_match(&c, &[m("realm_access.missing", json!("admin"))]));
        assert!(claims_match(&c, &[]));
    }
}
