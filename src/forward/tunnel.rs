//! `Upgrade` tunnels (WebSocket and friends): once both sides switched
//! protocols, bytes are copied both ways until either side hangs up.

use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

/// Splices the client's connection (as the server connection handed it back)
/// with the upstream's upgraded one, in its own task.
pub fn splice<C>(mut client: C, upstream: OnUpgrade)
where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match upstream.await {
            Ok(up) => {
                let mut up = TokioIo::new(up);
                let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
            }
            Err(e) => tracing::debug!(error = %e, "upstream upgrade failed"),
        }
    });
}
