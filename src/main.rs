//! Command line only: `run`, `check`, `keygen`, `demo`, `schema`. Exit 0 ok, 1 bad configuration or
//! failed start, 2 usage error.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "portcullis", version, about = "Edge authentication proxy")]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve with the configuration file.
    Run {
        /// Configuration file (default: $PORTCULLIS_CONFIG, then ./portcullis.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate the configuration file and exit.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Also say what would happen to this request, e.g. "GET https://api.example.com/orders/42".
        #[arg(long, value_name = "METHOD URL")]
        explain: Option<String>,
    },
    /// Print a fresh random cookie key (base64, 32 bytes).
    Keygen,
    /// The whole product on 127.0.0.1: the proxy, a demo identity provider, an echo API and the example SPA.
    Demo {
        /// The proxy's port (the other parts take free ports).
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Print the generated configuration.
        #[arg(long)]
        print_config: bool,
    },
    /// Print the JSON Schema (Draft-07) of the configuration file.
    Schema,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(2),
            };
        }
    };
    // Held until main returns, so every buffered log line is written before exit.
    let _log_flush = init_logging(cli.log_format);
    match cli.command {
        Command::Keygen => match portcullis::keygen() {
            Some(k) => {
                println!("{k}");
                ExitCode::SUCCESS
            }
            None => ExitCode::from(1),
        },
        Command::Check { config, explain } => {
            let path = config_path(config);
            match portcullis::config::load(&path) {
                Ok(config) => {
                    for w in &config.warnings {
                        eprintln!("warning: {w}");
                    }
                    println!("{}: ok", path.display());
                    for r in config.routes.iter().filter(|r| r.upstreams.is_empty()) {
                        println!(
                            "route {}: forward auth only (no upstream; never matches on the proxy listeners)",
                            r.name
                        );
                    }
                    if let Some(t) = &config.tracing {
                        println!(
                            "tracing: spans to {}v1/traces, sample_ratio {}; [tracing] is read at start: a reload keeps the running one",
                            t.otlp_endpoint.to_string().trim_end_matches('/').to_owned() + "/",
                            t.sample_ratio
                        );
                    }
                    if let Some(request) = explain {
                        match portcullis::explain::explain(&config, &request) {
                            Ok(text) => print!("{text}"),
                            Err(e) => {
                                eprintln!("{e}");
                                return ExitCode::from(2);
                            }
                        }
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Run { config } => {
            let path = config_path(config);
            let Some(runtime) = runtime() else { return ExitCode::from(1) };
            runtime.block_on(portcullis::run::run(path))
        }
        Command::Schema => match serde_json::to_string_pretty(&portcullis::config::schema()) {
            // A closed pipe (`| head`) is the reader's choice, not an error.
            Ok(text) => {
                let _ = writeln!(std::io::stdout().lock(), "{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::from(1)
            }
        },
        Command::Demo { port, print_config } => {
            let Some(runtime) = runtime() else { return ExitCode::from(1) };
            runtime.block_on(portcullis::demo::demo(portcullis::demo::Options { port, print_config }))
        }
    }
}

/// The main thread's runtime (workers have their own): admin, reload, background work.
fn runtime() -> Option<tokio::runtime::Runtime> {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            None
        }
    }
}

fn config_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os("PORTCULLIS_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("portcullis.toml"))
}

/// Logs go to stderr through a writer thread: a request never waits on a write(2).
/// Not lossy: if the writer falls behind, logging applies back-pressure rather
/// than dropping access-log lines. The thread takes every line queued since it
/// last woke and writes them with one write(2), flushing before it sleeps again.
fn init_logging(format: LogFormat) -> tracing_appender::non_blocking::WorkerGuard {
    use tracing_subscriber::EnvFilter;
    let filter = std::env::var("PORTCULLIS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .ok()
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(64 * 1024, std::io::stderr()));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi)
        .with_timer(portcullis::logfmt::Time);
    match format {
        LogFormat::Text => builder.fmt_fields(portcullis::logfmt::Fields).init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    guard
}
