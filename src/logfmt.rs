//! The fields of a text log line, written as tracing-subscriber's default
//! formatter writes them (`name=value`, strings in Debug quotes) but without
//! `fmt::Debug` and ANSI styling for what the access log is made of: plain
//! strings, integers and booleans. Anything else, any string that needs
//! escaping, `message`, and every field on a terminal (ANSI on) go through the
//! default visitor, so the line is the same byte for byte. `Time` writes the
//! default timestamp (RFC 3339 UTC, microseconds), its date and time of day
//! formatted once a second per thread.

use std::cell::Cell;
use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing_subscriber::field::{MakeVisitor, VisitFmt, VisitOutput};
use tracing_subscriber::fmt::format::{DefaultVisitor, Writer};
use tracing_subscriber::fmt::time::FormatTime;

/// `fmt_fields` for the text log format.
#[derive(Default)]
pub struct Fields;

impl<'a> MakeVisitor<Writer<'a>> for Fields {
    type Visitor = Visitor<'a>;

    fn make_visitor(&self, writer: Writer<'a>) -> Self::Visitor {
        let plain = !writer.has_ansi_escapes();
        Visitor { writer, empty: true, plain, result: Ok(()) }
    }
}

pub struct Visitor<'a> {
    writer: Writer<'a>,
    /// No field written yet: no separating space.
    empty: bool,
    /// ANSI off: names need no styling.
    plain: bool,
    result: fmt::Result,
}

impl Visitor<'_> {
    /// `name=` (with its separating space) when this field can take the fast
    /// path; `false` to hand it to the default visitor.
    fn name(&mut self, field: &Field) -> bool {
        let name = field.name();
        if !self.plain || name == "message" {
            return false;
        }
        let name = name.strip_prefix("r#").unwrap_or(name);
        if !self.empty {
            self.result = self.writer.write_char(' ');
        }
        self.empty = false;
        self.result =
            self.result.and_then(|()| self.writer.write_str(name)).and_then(|()| self.writer.write_char('='));
        true
    }

    fn fallback(&mut self, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.empty);
        record(&mut v);
        self.result = v.finish();
        self.empty = false;
    }

    /// A field whose Debug text is `text`.
    fn plain(&mut self, field: &Field, text: &str, or: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.name(field) {
            self.result = self.result.and_then(|()| self.writer.write_str(text));
        } else {
            self.fallback(or);
        }
    }

    /// As the default visitor (built with tracing-log), `log.*` fields are not written.
    fn skips(&self, field: &Field) -> bool {
        self.result.is_err() || field.name().starts_with("log.")
    }
}

/// Strings that `{:?}` writes as `"` + themselves + `"`.
fn debug_is_quoted_as_is(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        if self.skips(field) {
            return;
        }
        if debug_is_quoted_as_is(value) && self.name(field) {
            let w = &mut self.writer;
            self.result = self
                .result
                .and_then(|()| w.write_char('"'))
                .and_then(|()| w.write_str(value))
                .and_then(|()| w.write_char('"'));
        } else {
            self.fallback(|v| v.record_str(field, value));
        }
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        if !self.skips(field) {
            self.plain(field, itoa::Buffer::new().format(value), |v| v.record_u64(field, value));
        }
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        if !self.skips(field) {
            self.plain(field, itoa::Buffer::new().format(value), |v| v.record_i64(field, value));
        }
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        if !self.skips(field) {
            self.plain(field, if value { "true" } else { "false" }, |v| v.record_bool(field, value));
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        if !self.skips(field) {
            self.fallback(|v| v.record_error(field, value));
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        if self.skips(field) {
            return;
        }
        if self.name(field) {
            self.result = self.result.and_then(|()| write!(self.writer, "{value:?}"));
        } else {
            self.fallback(|v| v.record_debug(field, value));
        }
    }
}

impl VisitOutput<fmt::Result> for Visitor<'_> {
    fn finish(self) -> fmt::Result {
        self.result
    }
}

impl VisitFmt for Visitor<'_> {
    fn writer(&mut self) -> &mut dyn fmt::Write {
        &mut self.writer
    }
}

/// `YYYY-MM-DDTHH:MM:SS.ffffffZ`, as tracing-subscriber's `SystemTime` timer.
#[derive(Default, Clone, Copy)]
pub struct Time;

/// The last second a thread formatted, and `YYYY-MM-DDTHH:MM:SS.` for it.
type Second = (u64, [u8; 20]);

thread_local! {
    static LAST: Cell<Second> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// Year 10000: later dates take tracing-subscriber's own (wider) format.
const YEAR_10000: u64 = 253_402_300_800;

impl FormatTime for Time {
    fn format_time(&self, w: &mut Writer<'_>) -> fmt::Result {
        let now = SystemTime::now();
        let Some(t) = now.duration_since(UNIX_EPOCH).ok().filter(|t| t.as_secs() < YEAR_10000) else {
            return tracing_subscriber::fmt::time::SystemTime.format_time(w);
        };
        let secs = t.as_secs();
        let (last, mut prefix) = LAST.get();
        if last != secs {
            prefix = second_text(secs);
            LAST.set((secs, prefix));
        }
        let mut out = [0u8; 27];
        out[..20].copy_from_slice(&prefix);
        let mut micros = t.subsec_micros();
        for d in out[20..26].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        out[26] = b'Z';
        w.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` of a Unix second before year 10000.
fn second_text(secs: u64) -> [u8; 20] {
    let (y, m, d) = civil(secs / 86_400);
    let tod = secs % 86_400;
    let mut out = *b"0000-00-00T00:00:00.";
    let mut put = |at: usize, width: usize, mut v: u64| {
        for i in (at..at + width).rev() {
            out[i] = b'0' + (v % 10) as u8;
            v /= 10;
        }
    };
    put(0, 4, y);
    put(5, 2, m);
    put(8, 2, d);
    put(11, 2, tod / 3600);
    put(14, 2, tod % 3600 / 60);
    put(17, 2, tod % 60);
    out
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Hinnant's days-to-civil, for non-negative days).
fn civil(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + u64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Self::Writer {
            self.clone()
        }
    }

    /// The same events through the default fields and through `Fields`.
    fn both(ansi: bool, emit: fn()) -> (String, String) {
        let out = |fast: bool| {
            let buf = Buf::default();
            let b = tracing_subscriber::fmt().with_writer(buf.clone()).with_ansi(ansi).without_time();
            if fast {
                tracing::subscriber::with_default(b.fmt_fields(Fields).finish(), emit);
            } else {
                tracing::subscriber::with_default(b.finish(), emit);
            }
            let text = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
            text
        };
        (out(false), out(true))
    }

    fn events() {
        let err = std::io::Error::other("refused");
        let span = tracing::info_span!("conn", peer = "127.0.0.1:5", n = 3u64);
        let _in = span.enter();
        tracing::info!(
            target: "portcullis::access",
            request_id = "a1b2-0f",
            trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736",
            method = %http::Method::GET,
            path = "/orders/7",
            status = 200u16,
            duration_us = 1234u64,
            upstream_us = Some(1000u64),
            subject = Option::<&str>::None,
            error = Some("invalid_token"),
            "request"
        );
        tracing::warn!(
            quote = "say \"hi\"",
            tab = "a\tb",
            esc = "\x1b[31m",
            uni = "héllo",
            neg = -5i64,
            yes = true,
            "odd {}",
            1
        );
        tracing::error!(error = &err as &(dyn std::error::Error + 'static), r#type = "x", "failed");
        tracing::info!(only = 1u64);
    }

    #[test]
    fn lines_are_those_of_the_default_formatter() {
        for ansi in [false, true] {
            let (default, fast) = both(ansi, events);
            assert_eq!(fast, default, "ansi {ansi}");
            assert_eq!(default.lines().count(), 4, "{default}");
        }
        let (default, _) = both(false, events);
        assert!(
            default.contains(r#"request_id="a1b2-0f" trace_id=4bf92f3577b34da6a3ce929d0e0e4736 method=GET"#),
            "{default}"
        );
    }

    #[test]
    fn seconds_are_written_as_rfc_3339() {
        for (secs, text) in [
            (0, "1970-01-01T00:00:00."),
            (951_782_400, "2000-02-29T00:00:00."),
            (951_868_799, "2000-02-29T23:59:59."),
            (951_868_800, "2000-03-01T00:00:00."),
            (1_796_220_000, "2026-12-02T14:00:00."),
            (4_102_444_800, "2100-01-01T00:00:00."),
            (YEAR_10000 - 1, "9999-12-31T23:59:59."),
        ] {
            assert_eq!(std::str::from_utf8(&second_text(secs)).unwrap(), text, "{secs}");
        }
    }

    #[test]
    fn time_is_tracing_subscribers_to_the_second() {
        // Read around a second boundary's worth of tries: equal text up to the micros.
        for _ in 0..3 {
            let (mut ours, mut theirs) = (String::new(), String::new());
            Time.format_time(&mut Writer::new(&mut ours)).unwrap();
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut theirs)).unwrap();
            assert_eq!(ours.len(), 27, "{ours}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..19] == theirs[..19] {
                return;
            }
        }
        panic!("the timestamp differs from tracing-subscriber's");
    }
}
