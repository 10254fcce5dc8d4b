//! Configuration: the TOML file (`file`), its validation into runtime settings
//! (`build`), and problems reported as `file:line: key.path: message`, all at once.

mod build;
pub mod file;
pub mod locate;
mod schema;
pub mod secret;
mod settings;
pub use schema::schema;
pub mod units;

use std::fmt;
use std::path::{Path, PathBuf};

pub use secret::{Env, ProcessEnv, Secret};
pub use settings::*;

use locate::{KeyPath, Locator};

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub line: Option<usize>,
    pub key_path: String,
    pub message: String,
}

/// Every problem found in a file; `Display` prints one per line, ready for an operator.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    pub file: String,
    pub problems: Vec<ConfigProblem>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}", self.file)?;
            if let Some(line) = p.line {
                write!(f, ":{line}")?;
            }
            if !p.key_path.is_empty() {
                write!(f, ": {}", p.key_path)?;
            }
            write!(f, ": {}", p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and validates `path`; relative paths inside it resolve against its folder.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with_env(path, &ProcessEnv)
}

pub fn load_with_env(path: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
    let label = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
        file: label.clone(),
        problems: vec![ConfigProblem {
            line: None,
            key_path: String::new(),
            message: format!("cannot read the configuration file: {e}"),
        }],
    })?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    from_toml(&text, &label, &base, env)
}

/// Pure: parses `text` and validates it, resolving relative file paths against `base_dir`.
pub fn from_toml(text: &str, label: &str, base_dir: &Path, env: &dyn Env) -> Result<Config, ConfigErrors> {
    let locator = Locator::new(text);
    let parsed: file::File = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            return Err(ConfigErrors { file: label.to_owned(), problems: vec![parse_problem(&e, &locator)] })
        }
    };
    let mut problems = Problems { locator: &locator, list: Vec::new(), warnings: Vec::new() };
    let built = build::build(parsed, &mut problems, base_dir, env);
    if problems.list.is_empty() {
        if let Some(mut config) = built {
            let mut warnings = problems.warnings;
            warnings.sort_by_key(|p| p.line.unwrap_or(0));
            let errors = ConfigErrors { file: label.to_owned(), problems: warnings };
            config.warnings = if errors.problems.is_empty() {
                Vec::new()
            } else {
                errors.to_string().lines().map(str::to_owned).collect()
            };
            return Ok(config);
        }
    }
    let mut list = problems.list;
    list.sort_by_key(|p| p.line.unwrap_or(0));
    Err(ConfigErrors { file: label.to_owned(), problems: list })
}

fn parse_problem(e: &toml::de::Error, locator: &Locator<'_>) -> ConfigProblem {
    let offset = e.span().map(|s| s.start);
    let line = offset.map(|o| locator.line_of_offset(o));
    let mut path = offset.map(|o| locator.path_at(o).to_string()).unwrap_or_default();
    let raw = e.message().trim();
    let message = if let Some(rest) = raw.strip_prefix("unknown field `") {
        let field = rest.split('`').next().unwrap_or("");
        if !path.ends_with(field) {
            path = if path.is_empty() { field.to_owned() } else { format!("{path}.{field}") };
        }
        let expected = rest.split_once(", expected ").map(|(_, e)| e).unwrap_or("");
        let hint = suggest(field, expected);
        match hint {
            Some(h) => format!("unknown key (did you mean `{h}`?)"),
            None if expected.is_empty() => "unknown key".to_owned(),
            None => format!("unknown key (expected {expected})"),
        }
    } else if let Some(rest) = raw.strip_prefix("missing field `") {
        let field = rest.split('`').next().unwrap_or("");
        format!("missing required key `{field}`")
    } else {
        raw.to_owned()
    };
    ConfigProblem { line, key_path: path, message }
}

/// The expected key closest to `field`, if one is close enough to be a typo.
fn suggest(field: &str, expected: &str) -> Option<String> {
    expected
        .split('`')
        .skip(1)
        .step_by(2)
        .map(|cand| (edit_distance(field, cand), cand))
        .filter(|(d, cand)| *d <= 2.max(cand.len() / 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c.to_owned())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != *cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Collects problems while `build` walks the file, resolving each key path to a line.
pub struct Problems<'a> {
    locator: &'a Locator<'a>,
    list: Vec<ConfigProblem>,
    warnings: Vec<ConfigProblem>,
}

impl Problems<'_> {
    pub fn add(&mut self, path: &KeyPath, message: impl Into<String>) {
        self.list.push(ConfigProblem {
            line: self.locator.line_of(path),
            key_path: path.to_string(),
            message: message.into(),
        });
    }
    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The line of `path` in the file.
    pub fn line(&self, path: &KeyPath) -> Option<usize> {
        self.locator.line_of(path)
    }

    /// Something legal that an operator probably did not mean.
    pub fn warn(&mut self, path: &KeyPath, message: impl Into<String>) {
        self.warnings.push(ConfigProblem {
            line: self.locator.line_of(path),
            key_path: path.to_string(),
            message: message.into(),
        });
    }
}

/// Resolves a path from the file against the file's folder.
pub fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    const VALID: &str = r#"
[listen]
http = "127.0.0.1:0"
[limits]
header_read_timeout = "5s"
[[issuers]]
name = "main"
issuer = "https://id.example.com"
jwks_url = "https://id.example.com/jwks.json"
[[routes]]
name = "api"
path_prefix = "/api"
upstream = "http://127.0.0.1:9001"
issuer = "main"
audiences = ["api"]
"#;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]

        #[test]
        fn any_text_is_accepted_or_refused_without_panic(text in "(?s).{0,200}") {
            let _ = from_toml(&text, "t.toml", Path::new("."), &HashMap::new());
        }

        /// A valid file cut short or with a byte replaced: an answer, never a panic,
        /// and every problem names a line inside the file.
        #[test]
        fn damaged_files_get_located_problems(cut in 0usize..400, at in 0usize..400, b in 0x20u8..0x7f) {
            let mut bytes = VALID.as_bytes()[..cut.min(VALID.len())].to_vec();
            if !bytes.is_empty() {
                let i = at % bytes.len();
                bytes[i] = b;
            }
            let text = String::from_utf8(bytes).unwrap();
            if let Err(e) = from_toml(&text, "t.toml", Path::new("."), &HashMap::new()) {
                let lines = text.lines().count().max(1);
                for p in &e.problems {
                    prop_assert!(p.line.is_none_or(|l| l >= 1 && l <= lines + 1), "{:?} of {}", p, lines);
                }
            }
        }
    }
}
