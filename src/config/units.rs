//! Durations ("30s", "15m", "7d") and sizes ("10MB", "64KiB") as operators write them.

use std::time::Duration;

/// Parses a duration string; a bare number is rejected so units are never guessed.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration (write e.g. \"30s\", \"15m\" or \"7d\")".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("\"{text}\" has no unit (write e.g. \"{text}s\" or \"{text}ms\")"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("\"{text}\" is not a duration ({e}); write e.g. \"30s\", \"15m\" or \"7d\""))
}

/// Parses a size: `KB`/`MB`/`GB` are powers of 1000, `KiB`/`MiB`/`GiB` of 1024, `B` or no unit is bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let bad = || format!("\"{text}\" is not a size; write e.g. \"10MB\", \"512KiB\" or \"1048576\"");
    let n: u64 = digits.parse().map_err(|_| bad())?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        _ => return Err(bad()),
    };
    n.checked_mul(mult).ok_or_else(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let table = [
            ("30s", Some(30)),
            ("15m", Some(900)),
            ("7d", Some(604_800)),
            ("1h 30m", Some(5_400)),
            ("30", None),
            ("", None),
            ("soon", None),
            ("5x", None),
        ];
        for (input, want) in table {
            let got = parse_duration(input).ok().map(|d| d.as_secs());
            assert_eq!(got, want, "{input:?}");
        }
    }

    #[test]
    fn sizes() {
        let table = [
            ("10MB", Some(10_000_000)),
            ("64KiB", Some(65_536)),
            ("1MiB", Some(1_048_576)),
            ("2KB", Some(2_000)),
            ("123", Some(123)),
            ("7B", Some(7)),
            ("10 MB", Some(10_000_000)),
            ("MB", None),
            ("10mb", None),
            ("-1", None),
            ("99999999999999GiB", None),
        ];
        for (input, want) in table {
            assert_eq!(parse_size(input).ok(), want, "{input:?}");
        }
    }
}
