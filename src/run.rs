//! `portcullis run`: load, bind, serve until SIGTERM/SIGINT, drain, exit.

use std::path::PathBuf;
use std::process::ExitCode;

use tokio::signal::unix::{signal, SignalKind};

use crate::Server;

pub async fn run(path: PathBuf) -> ExitCode {
    let config = match crate::config::load(&path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let server = match Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, source = ?std::error::Error::source(&e).map(|s| s.to_string()), "failed to start");
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let addrs = server.addrs();
    tracing::info!(http = ?addrs.http, https = ?addrs.https, admin = ?addrs.admin, config = %path.display(), "portcullis listening");
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        eprintln!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    server
        .run(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "stopping"),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "stopping"),
            }
        })
        .await;
    ExitCode::SUCCESS
}
