//! `Upgrade` tunnels (WebSocket and friends): once both sides switched
//! protocols, bytes are copied both ways, until either side hangs up or the
//! credential that opened the tunnel ends:
//!
//! - a revocation matching the token (`jti`, or `sub` issued before), posted to
//!   this instance or arriving from the fleet (`revoked`);
//! - a logout of the session, local or back-channel by `sid` or `sub` (`logout`);
//! - the session passing `absolute_timeout` (`session_expired`);
//! - the route's `max_tunnel_lifetime` (`lifetime`).
//!
//! Closing drops both connections. Each tunnel listens to the revocation list's
//! stream of new entries, so non-tunnel requests pay nothing for this.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::broadcast::error::RecvError;
use tokio::time::Instant;

use crate::auth::revocation::{Revocation, Revocations, Subject};
use crate::auth::{Admitted, SessionBinding, TokenSource};
use crate::metrics::Metrics;

/// Who opened a tunnel.
#[derive(Debug, Clone, Default)]
struct Opener {
    jti: Option<String>,
    sub: Option<String>,
    sid: Option<String>,
    iat: Option<i64>,
    session: Option<SessionBinding>,
}

impl Opener {
    fn of(admitted: &Admitted) -> Self {
        let Some(c) = admitted.claims() else { return Self::default() };
        let session = match admitted.source() {
            Some(TokenSource::Cookie(_, s)) if !s.id.is_empty() => Some(s.clone()),
            _ => None,
        };
        Self {
            jti: c.jti.clone(),
            sub: c.sub.clone(),
            sid: c.all.get("sid").and_then(|v| v.as_str()).map(str::to_owned),
            iat: c.iat,
            session,
        }
    }

    /// Why `entry` ends this tunnel, if it does.
    fn ended_by(&self, entry: &Revocation) -> Option<&'static str> {
        let login = self.session.as_ref().map(|s| s.login);
        let before = |t: Option<i64>, cut: i64| t.is_none_or(|t| t < cut);
        match entry {
            Revocation::Jti { jti, .. } => (self.jti.as_deref() == Some(jti)).then_some("revoked"),
            Revocation::Sub { sub, issued_before, logout, .. } => {
                let token = self.sub.as_deref() == Some(sub) && before(self.iat, *issued_before);
                let session = self.session.as_ref().is_some_and(|s| s.sub.as_deref() == Some(sub))
                    && before(login, *issued_before);
                (token || session).then_some(if *logout { "logout" } else { "revoked" })
            }
            Revocation::Sid { sid, issued_before, .. } => {
                let token = self.sid.as_deref() == Some(sid) && before(self.iat, *issued_before);
                let session = self.session.as_ref().is_some_and(|s| s.sid.as_deref() == Some(sid))
                    && before(login, *issued_before);
                (token || session).then_some("logout")
            }
            Revocation::Session { session, .. } => {
                self.session.as_ref().is_some_and(|s| &s.id == session).then_some("logout")
            }
        }
    }

    /// Whether the list as it stands ends this tunnel (after missed entries).
    fn denied(&self, revocations: &Revocations) -> bool {
        let token = Subject {
            jti: self.jti.as_deref(),
            sub: self.sub.as_deref(),
            sid: self.sid.as_deref(),
            since: self.iat,
            session: None,
        };
        let session = self.session.as_ref().map(|s| Subject {
            jti: None,
            sub: s.sub.as_deref(),
            sid: s.sid.as_deref(),
            since: Some(s.login),
            session: Some(s.id.as_str()),
        });
        (self.jti.is_some() || self.sub.is_some()) && revocations.denies(&token)
            || session.is_some_and(|s| revocations.denies(&s))
    }
}

/// A tunnel about to be spliced: the upstream's side, who opened it, its limits.
pub struct Tunnel {
    upstream: OnUpgrade,
    opener: Opener,
    deadline: Option<(Instant, &'static str)>,
    revocations: Arc<Revocations>,
    /// Subscribed when the upstream agreed, so no entry in between is missed.
    added: tokio::sync::broadcast::Receiver<Revocation>,
    metrics: Arc<Metrics>,
}

impl Tunnel {
    pub fn new(
        upstream: OnUpgrade,
        admitted: &Admitted,
        max_lifetime: Option<std::time::Duration>,
        revocations: Arc<Revocations>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let opener = Opener::of(admitted);
        let now = Instant::now();
        let lifetime = max_lifetime.map(|d| (now + d, "lifetime"));
        let session_end = opener.session.as_ref().map(|s| {
            let left = s.ends_at.saturating_sub(crate::clock::unix_now()).max(0) as u64;
            (now + std::time::Duration::from_secs(left), "session_expired")
        });
        let deadline = match (lifetime, session_end) {
            (Some(a), Some(b)) => Some(if a.0 <= b.0 { a } else { b }),
            (a, b) => a.or(b),
        };
        let added = revocations.subscribe();
        Self { upstream, opener, deadline, revocations, added, metrics }
    }
}

/// Splices the client's connection (as the server connection handed it back)
/// with the upstream's upgraded one, in its own task, until one side hangs up or
/// what opened the tunnel ends.
pub fn splice<C>(mut client: C, tunnel: Tunnel)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        let Tunnel { upstream, opener, deadline, revocations, mut added, metrics } = tunnel;
        let mut up = match upstream.await {
            Ok(up) => TokioIo::new(up),
            Err(e) => {
                tracing::debug!(error = %e, "upstream upgrade failed");
                return;
            }
        };
        metrics.tunnels_open.fetch_add(1, Ordering::Relaxed);
        let ended = async {
            loop {
                match added.recv().await {
                    Ok(entry) => {
                        if let Some(reason) = opener.ended_by(&entry) {
                            return reason;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        if opener.denied(&revocations) {
                            return "revoked";
                        }
                    }
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        };
        let until = async {
            match deadline {
                Some((at, reason)) => {
                    tokio::time::sleep_until(at).await;
                    reason
                }
                None => std::future::pending().await,
            }
        };
        // An entry that came while the upstream answered the upgrade is not missed.
        let closed = if opener.denied(&revocations) {
            Some("revoked")
        } else {
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut client, &mut up) => None,
                reason = ended => Some(reason),
                reason = until => Some(reason),
            }
        };
        metrics.tunnels_open.fetch_sub(1, Ordering::Relaxed);
        if let Some(reason) = closed {
            metrics.tunnel_closed(reason);
            tracing::info!(reason, "tunnel closed");
        }
        // Dropping both ends closes both connections.
    });
}
