//! `portcullis run`: load, bind, serve until SIGTERM/SIGINT, drain, exit.
//! SIGHUP and changes of the file reload the configuration.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

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
    // Signals first, so a SIGHUP right after start never kills the process.
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) =
        (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
    else {
        eprintln!("cannot install signal handlers");
        return ExitCode::from(1);
    };
    for w in &config.warnings {
        tracing::warn!(problem = %w, "configuration warning");
    }
    let server = match Server::bind(config).await {
        Ok(s) => s,
        Err(e) => {
            let cause = std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default();
            eprintln!("{}: {e}: {cause}", path.display());
            return ExitCode::from(1);
        }
    };
    let addrs = server.addrs();
    tracing::info!(http = ?addrs.http, https = ?addrs.https, admin = ?addrs.admin, forward_auth = ?addrs.forward_auth, config = %path.display(), "portcullis listening");

    let weak = Arc::downgrade(&server.runtime());
    tokio::spawn(crate::reload::watch(weak.clone(), path.clone(), Duration::from_secs(1)));
    let hup_path = path.clone();
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            tracing::info!(signal = "SIGHUP", "reloading configuration");
            let Some(rt) = weak.upgrade() else { return };
            let _ = crate::reload::reload(&rt, &hup_path);
        }
    });

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
