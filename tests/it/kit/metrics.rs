//! The one `/metrics` parser: Prometheus text, checked line by line as it is read.

use std::collections::HashMap;

use super::client::get;
use super::proxy::Instance;

/// Every series of a `/metrics` answer with its value, keyed by the series as
/// written: `name` or `name{label="value",…}`.
#[derive(Debug, Clone)]
pub struct Metrics(HashMap<String, f64>);

impl Metrics {
    /// Parses the exposition format, panicking on any line that is neither a
    /// `# HELP` / `# TYPE` comment nor `name{labels} value`.
    pub fn parse(text: &str) -> Self {
        let mut out = HashMap::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
                continue;
            }
            let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("no value: {line}"));
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value: {line}"));
            let name_end = series.find('{').unwrap_or(series.len());
            let name = &series[..name_end];
            assert!(
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name: {line}"
            );
            if name_end < series.len() {
                let labels = series[name_end..].strip_prefix('{').and_then(|l| l.strip_suffix('}'));
                let labels = labels.unwrap_or_else(|| panic!("bad label set: {line}"));
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").unwrap_or_else(|| panic!("bad label: {line}"));
                    assert!(
                        k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                        "bad label name: {line}"
                    );
                    assert!(!v.contains('\n'));
                }
            }
            out.insert(series.to_owned(), value);
        }
        Self(out)
    }

    /// The value of `series` (e.g. `portcullis_refreshes_total{outcome="grace"}`), if exposed.
    pub fn get(&self, series: &str) -> Option<f64> {
        self.0.get(series).copied()
    }

    /// The value of `series`, 0 when it is not exposed (yet).
    pub fn value(&self, series: &str) -> f64 {
        self.get(series).unwrap_or(0.0)
    }

    pub fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }

    /// The sum of every series of metric `name`, whatever its labels.
    pub fn total(&self, name: &str) -> f64 {
        self.0
            .iter()
            .filter(|(series, _)| {
                series.strip_prefix(name).is_some_and(|rest| rest.is_empty() || rest.starts_with('{'))
            })
            .map(|(_, v)| v)
            .sum()
    }
}

/// `GET /metrics` on the admin listener, parsed.
pub async fn metrics(p: &impl Instance) -> Metrics {
    Metrics::parse(&get(format!("{}/metrics", p.admin_url())).send().await.text())
}

/// The value of one series on the instance's `/metrics`, 0 when it is not exposed (yet).
pub async fn metric(p: &impl Instance, series: &str) -> f64 {
    metrics(p).await.value(series)
}
