//! `Upgrade` tunnels (WebSocket and friends): once both sides switched
//! protocols, bytes are copied both ways until either side hangs up.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

/// Splices the client's and the upstream's upgraded connections, in its own task.
pub fn splice(client: OnUpgrade, upstream: OnUpgrade, route: String) {
    tokio::spawn(async move {
        match tokio::try_join!(client, upstream) {
            Ok((down, up)) => {
                let (mut down, mut up) = (TokioIo::new(down), TokioIo::new(up));
                let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
            }
            Err(e) => tracing::debug!(route = %route, error = %e, "upgrade failed"),
        }
    });
}
