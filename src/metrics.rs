//! Every metric name and label set, declared once. Counters are plain atomics
//! reached without a lock on the request path: per-route counters are resolved
//! when a configuration is built, and the other label sets are closed enums.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;

/// Upper bounds (seconds) of the upstream latency histogram.
const BUCKETS: [f64; 14] =
    [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Auth rejection reasons: the `error` codes of SPEC §4 that rejections carry.
pub const REJECTION_REASONS: [&str; 8] = [
    "missing_token",
    "invalid_token",
    "insufficient_scope",
    "csrf",
    "session_expired",
    "auth_server_unavailable",
    "keys_unavailable",
    "forbidden",
];

pub const TUNNEL_CLOSE_REASONS: [&str; 4] = ["revoked", "logout", "session_expired", "lifetime"];

pub const LOGOUT_KINDS: [&str; 3] = ["local", "backchannel", "rp_initiated"];

pub const REFRESH_OUTCOMES: [&str; 5] = ["ok", "rotated", "grace", "invalid_grant", "auth_server_error"];

/// Status codes counted in every worker's shard: IANA's registered codes and
/// nginx's 499. Any other code an upstream answers is counted in one row the
/// workers share, which keeps a shard at half a kilobyte per route.
const COMMON: [u16; 64] = [
    100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305, 306,
    307, 308, 400, 401, 402, 403, 404, 405, 406, 407, 408, 409, 410, 411, 412, 413, 414, 415, 416, 417, 418,
    421, 422, 423, 424, 425, 426, 428, 429, 431, 451, 499, 500, 501, 502, 503, 504, 505, 506, 507, 508, 510,
    511,
];

/// Status code - 100 → its slot in `COMMON`, or `NONE`.
const SLOT: [u8; 500] = {
    let mut t = [NONE; 500];
    let mut i = 0;
    while i < COMMON.len() {
        t[(COMMON[i] - 100) as usize] = i as u8;
        i += 1;
    }
    t
};
const NONE: u8 = u8::MAX;

/// Counters of one route; kept across reloads while the route name exists.
/// One shard per worker, summed when scraped: a request adds to its own
/// worker's cache lines only, so workers never contend for a counter.
pub struct RouteMetrics {
    shards: Box<[RouteShard]>,
    /// Index = status code - 100, for codes outside `COMMON`.
    other: Box<[AtomicU64]>,
}

// Aligned so two workers' hot counters never share a cache line.
#[repr(align(128))]
struct RouteShard {
    /// Index = slot in `COMMON`.
    by_status: [AtomicU64; COMMON.len()],
    buckets: [AtomicU64; BUCKETS.len()],
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for RouteShard {
    fn default() -> Self {
        Self {
            by_status: [const { AtomicU64::new(0) }; COMMON.len()],
            buckets: Default::default(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Default for RouteMetrics {
    fn default() -> Self {
        Self {
            shards: (0..crate::worker::shards()).map(|_| RouteShard::default()).collect(),
            other: (100..600).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl RouteMetrics {
    fn mine(&self) -> &RouteShard {
        &self.shards[crate::worker::shard(self.shards.len())]
    }

    pub fn record_status(&self, status: u16) {
        let i = usize::from(status).wrapping_sub(100);
        match SLOT.get(i) {
            Some(&NONE) => self.other[i].fetch_add(1, Relaxed),
            Some(&slot) => self.mine().by_status[usize::from(slot)].fetch_add(1, Relaxed),
            None => return,
        };
    }

    /// Requests answered with `status`, all workers together.
    fn status_count(&self, status_index: usize) -> u64 {
        match SLOT[status_index] {
            NONE => self.other[status_index].load(Relaxed),
            slot => self.sum(|s| &s.by_status[usize::from(slot)]),
        }
    }

    pub fn record_upstream(&self, d: Duration) {
        let m = self.mine();
        let secs = d.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                m.buckets[i].fetch_add(1, Relaxed);
                break;
            }
        }
        m.sum_micros.fetch_add(d.as_micros() as u64, Relaxed);
        m.count.fetch_add(1, Relaxed);
    }

    fn sum(&self, f: impl Fn(&RouteShard) -> &AtomicU64) -> u64 {
        self.shards.iter().map(|s| f(s).load(Relaxed)).sum()
    }
}

#[derive(Default)]
pub struct Metrics {
    routes: DashMap<String, Arc<RouteMetrics>>,
    /// Requests that matched no route.
    pub unrouted: RouteMetrics,
    rejections: [AtomicU64; REJECTION_REASONS.len()],
    refreshes: [AtomicU64; REFRESH_OUTCOMES.len()],
    jwks: DashMap<(String, &'static str), AtomicU64>,
    introspections: DashMap<(String, &'static str), AtomicU64>,
    rate_limited: DashMap<String, AtomicU64>,
    logouts: [AtomicU64; LOGOUT_KINDS.len()],
    logout_rejections: DashMap<&'static str, AtomicU64>,
    pub reloads_ok: AtomicU64,
    pub reloads_error: AtomicU64,
    pub open_connections: AtomicI64,
    pub tunnels_open: AtomicI64,
    tunnels_closed: [AtomicU64; TUNNEL_CLOSE_REASONS.len()],
    pub state_errors: AtomicU64,
    /// Spans dropped: the export queue was full or the collector did not take them.
    pub trace_export_errors: AtomicU64,
}

impl Metrics {
    pub fn route(&self, name: &str) -> Arc<RouteMetrics> {
        self.routes.entry(name.to_owned()).or_default().clone()
    }

    pub fn rejection(&self, reason: &str) {
        if let Some(i) = REJECTION_REASONS.iter().position(|r| *r == reason) {
            self.rejections[i].fetch_add(1, Relaxed);
        }
    }

    pub fn refresh(&self, outcome: &str) {
        if let Some(i) = REFRESH_OUTCOMES.iter().position(|r| *r == outcome) {
            self.refreshes[i].fetch_add(1, Relaxed);
        }
    }

    pub fn jwks_fetch(&self, issuer: &str, ok: bool) {
        let outcome = if ok { "ok" } else { "error" };
        self.jwks.entry((issuer.to_owned(), outcome)).or_default().fetch_add(1, Relaxed);
    }

    pub fn tunnel_closed(&self, reason: &str) {
        if let Some(i) = TUNNEL_CLOSE_REASONS.iter().position(|r| *r == reason) {
            self.tunnels_closed[i].fetch_add(1, Relaxed);
        }
    }

    pub fn logout(&self, kind: &str) {
        if let Some(i) = LOGOUT_KINDS.iter().position(|k| *k == kind) {
            self.logouts[i].fetch_add(1, Relaxed);
        }
    }

    pub fn logout_token_rejected(&self, reason: &'static str) {
        self.logout_rejections.entry(reason).or_default().fetch_add(1, Relaxed);
    }

    pub fn rate_limited(&self, limit: &str) {
        if let Some(c) = self.rate_limited.get(limit) {
            c.fetch_add(1, Relaxed);
            return;
        }
        self.rate_limited.entry(limit.to_owned()).or_default().fetch_add(1, Relaxed);
    }

    /// `outcome`: `active`, `inactive` or `error`.
    pub fn introspection(&self, issuer: &str, outcome: &'static str) {
        self.introspections.entry((issuer.to_owned(), outcome)).or_default().fetch_add(1, Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let _ = self.render_into(&mut out);
        out
    }

    fn render_into(&self, o: &mut String) -> std::fmt::Result {
        writeln!(o, "# HELP portcullis_requests_total Requests answered, by route and status.")?;
        writeln!(o, "# TYPE portcullis_requests_total counter")?;
        let mut routes: Vec<_> = self.routes.iter().map(|e| (e.key().clone(), e.value().clone())).collect();
        routes.sort_by(|a, b| a.0.cmp(&b.0));
        let all = routes.iter().map(|(n, m)| (n.as_str(), &**m)).chain([("", &self.unrouted)]);
        for (name, m) in all.clone() {
            for i in 0..SLOT.len() {
                let v = m.status_count(i);
                if v > 0 {
                    writeln!(
                        o,
                        "portcullis_requests_total{{route=\"{}\",status=\"{}\"}} {v}",
                        esc(name),
                        i + 100
                    )?;
                }
            }
        }
        writeln!(o, "# HELP portcullis_upstream_duration_seconds Time to the upstream's response headers.")?;
        writeln!(o, "# TYPE portcullis_upstream_duration_seconds histogram")?;
        for (name, m) in routes.iter().map(|(n, m)| (n.as_str(), &**m)) {
            let mut cum = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cum += m.sum(|s| &s.buckets[i]);
                writeln!(
                    o,
                    "portcullis_upstream_duration_seconds_bucket{{route=\"{}\",le=\"{bound}\"}} {cum}",
                    esc(name)
                )?;
            }
            let count = m.sum(|s| &s.count);
            writeln!(
                o,
                "portcullis_upstream_duration_seconds_bucket{{route=\"{}\",le=\"+Inf\"}} {count}",
                esc(name)
            )?;
            let sum = m.sum(|s| &s.sum_micros) as f64 / 1e6;
            writeln!(o, "portcullis_upstream_duration_seconds_sum{{route=\"{}\"}} {sum}", esc(name))?;
            writeln!(o, "portcullis_upstream_duration_seconds_count{{route=\"{}\"}} {count}", esc(name))?;
        }
        writeln!(
            o,
            "# HELP portcullis_auth_rejections_total Requests refused by authentication, by reason."
        )?;
        writeln!(o, "# TYPE portcullis_auth_rejections_total counter")?;
        for (i, r) in REJECTION_REASONS.iter().enumerate() {
            writeln!(
                o,
                "portcullis_auth_rejections_total{{reason=\"{r}\"}} {}",
                self.rejections[i].load(Relaxed)
            )?;
        }
        writeln!(o, "# HELP portcullis_refreshes_total Token refreshes brokered, by outcome.")?;
        writeln!(o, "# TYPE portcullis_refreshes_total counter")?;
        for (i, r) in REFRESH_OUTCOMES.iter().enumerate() {
            writeln!(o, "portcullis_refreshes_total{{outcome=\"{r}\"}} {}", self.refreshes[i].load(Relaxed))?;
        }
        writeln!(o, "# HELP portcullis_jwks_fetches_total JWKS fetches, by issuer and outcome.")?;
        writeln!(o, "# TYPE portcullis_jwks_fetches_total counter")?;
        let mut jwks: Vec<_> = self.jwks.iter().map(|e| (e.key().clone(), e.value().load(Relaxed))).collect();
        jwks.sort();
        for ((issuer, outcome), v) in jwks {
            writeln!(
                o,
                "portcullis_jwks_fetches_total{{issuer=\"{}\",outcome=\"{outcome}\"}} {v}",
                esc(&issuer)
            )?;
        }
        writeln!(
            o,
            "# HELP portcullis_introspections_total RFC 7662 introspection calls, by issuer and outcome."
        )?;
        writeln!(o, "# TYPE portcullis_introspections_total counter")?;
        let mut calls: Vec<_> =
            self.introspections.iter().map(|e| (e.key().clone(), e.value().load(Relaxed))).collect();
        calls.sort();
        for ((issuer, outcome), v) in calls {
            writeln!(
                o,
                "portcullis_introspections_total{{issuer=\"{}\",outcome=\"{outcome}\"}} {v}",
                esc(&issuer)
            )?;
        }
        writeln!(o, "# HELP portcullis_tunnels_open Upgrade tunnels open now.")?;
        writeln!(o, "# TYPE portcullis_tunnels_open gauge")?;
        writeln!(o, "portcullis_tunnels_open {}", self.tunnels_open.load(Relaxed))?;
        writeln!(o, "# HELP portcullis_tunnels_closed_total Tunnels closed by the proxy, by reason.")?;
        writeln!(o, "# TYPE portcullis_tunnels_closed_total counter")?;
        for (i, r) in TUNNEL_CLOSE_REASONS.iter().enumerate() {
            writeln!(
                o,
                "portcullis_tunnels_closed_total{{reason=\"{r}\"}} {}",
                self.tunnels_closed[i].load(Relaxed)
            )?;
        }
        writeln!(o, "# HELP portcullis_logouts_total Sessions ended, by kind.")?;
        writeln!(o, "# TYPE portcullis_logouts_total counter")?;
        for (i, k) in LOGOUT_KINDS.iter().enumerate() {
            writeln!(o, "portcullis_logouts_total{{kind=\"{k}\"}} {}", self.logouts[i].load(Relaxed))?;
        }
        writeln!(
            o,
            "# HELP portcullis_logout_tokens_rejected_total Back-channel logout tokens refused, by reason."
        )?;
        writeln!(o, "# TYPE portcullis_logout_tokens_rejected_total counter")?;
        let mut refused: Vec<_> =
            self.logout_rejections.iter().map(|e| (*e.key(), e.value().load(Relaxed))).collect();
        refused.sort();
        for (reason, v) in refused {
            writeln!(o, "portcullis_logout_tokens_rejected_total{{reason=\"{}\"}} {v}", esc(reason))?;
        }
        writeln!(o, "# HELP portcullis_rate_limited_total Requests refused by a rate limit, by limit.")?;
        writeln!(o, "# TYPE portcullis_rate_limited_total counter")?;
        let mut limited: Vec<_> =
            self.rate_limited.iter().map(|e| (e.key().clone(), e.value().load(Relaxed))).collect();
        limited.sort();
        for (limit, v) in limited {
            writeln!(o, "portcullis_rate_limited_total{{limit=\"{}\"}} {v}", esc(&limit))?;
        }
        writeln!(o, "# HELP portcullis_config_reloads_total Configuration reloads, by outcome.")?;
        writeln!(o, "# TYPE portcullis_config_reloads_total counter")?;
        writeln!(o, "portcullis_config_reloads_total{{outcome=\"ok\"}} {}", self.reloads_ok.load(Relaxed))?;
        writeln!(
            o,
            "portcullis_config_reloads_total{{outcome=\"error\"}} {}",
            self.reloads_error.load(Relaxed)
        )?;
        writeln!(o, "# HELP portcullis_open_connections Downstream connections open now.")?;
        writeln!(o, "# TYPE portcullis_open_connections gauge")?;
        writeln!(o, "portcullis_open_connections {}", self.open_connections.load(Relaxed))?;
        writeln!(o, "# HELP portcullis_state_errors_total Failures talking to the shared state store.")?;
        writeln!(o, "# TYPE portcullis_state_errors_total counter")?;
        writeln!(o, "portcullis_state_errors_total {}", self.state_errors.load(Relaxed))?;
        writeln!(
            o,
            "# HELP portcullis_trace_export_errors_total Spans dropped: export queue full or the collector failed."
        )?;
        writeln!(o, "# TYPE portcullis_trace_export_errors_total counter")?;
        writeln!(o, "portcullis_trace_export_errors_total {}", self.trace_export_errors.load(Relaxed))?;
        Ok(())
    }
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histogram() {
        let m = Metrics::default();
        let r = m.route("orders");
        r.record_status(200);
        r.record_status(200);
        r.record_status(502);
        r.record_upstream(Duration::from_millis(3));
        m.rejection("invalid_token");
        m.jwks_fetch("main", true);
        let text = m.render();
        assert!(text.contains("portcullis_requests_total{route=\"orders\",status=\"200\"} 2"));
        assert!(text.contains("portcullis_requests_total{route=\"orders\",status=\"502\"} 1"));
        assert!(text.contains("portcullis_upstream_duration_seconds_bucket{route=\"orders\",le=\"0.005\"} 1"));
        assert!(
            text.contains("portcullis_upstream_duration_seconds_bucket{route=\"orders\",le=\"0.0025\"} 0")
        );
        assert!(text.contains("portcullis_auth_rejections_total{reason=\"invalid_token\"} 1"));
        assert!(text.contains("portcullis_jwks_fetches_total{issuer=\"main\",outcome=\"ok\"} 1"));
    }

    #[test]
    fn status_counts_add_up_across_workers_and_uncommon_codes() {
        let m = Metrics::default();
        let r = m.route("api");
        std::thread::scope(|t| {
            for w in 0..4 {
                let r = &r;
                t.spawn(move || {
                    crate::worker::set(w);
                    for _ in 0..100 {
                        r.record_status(204);
                    }
                    r.record_status(599);
                    r.record_status(103);
                    r.record_status(600);
                    r.record_status(99);
                });
            }
        });
        let text = m.render();
        assert!(text.contains("portcullis_requests_total{route=\"api\",status=\"204\"} 400"), "{text}");
        assert!(text.contains("portcullis_requests_total{route=\"api\",status=\"599\"} 4"));
        assert!(text.contains("portcullis_requests_total{route=\"api\",status=\"103\"} 4"));
        assert!(!text.contains("status=\"600\"") && !text.contains("status=\"99\""));
        for (i, code) in COMMON.iter().enumerate() {
            assert_eq!(usize::from(SLOT[usize::from(*code) - 100]), i);
        }
    }
}
