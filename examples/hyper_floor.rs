//! The floor of the HTTP stack portcullis is built on: a reverse proxy made of
//! hyper's HTTP/1.1 server and client connections on one current-thread tokio
//! runtime, and nothing else (no routing, token, header rewriting, metrics or
//! log). Upstream connections are pooled and driven by the request using them,
//! as portcullis does. `benches/load.sh` runs it beside portcullis, so what the
//! stack itself costs per request is measured rather than guessed.
//!
//!   hyper_floor LISTEN_ADDR UPSTREAM_ADDR

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>>>>;

/// An upstream connection: its request handle and its own future.
struct Link {
    sender: SendRequest<Incoming>,
    driver: Option<Driver>,
}

impl Link {
    fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(d) = &mut self.driver {
            if d.as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
    }
}

type Pool = Rc<RefCell<Vec<Link>>>;

/// The upstream response body; gives its connection back at its end.
struct Pooled {
    inner: Incoming,
    link: Option<(Link, Pool)>,
}

impl Pooled {
    /// Read to the end: the connection, if still open, serves the next request.
    fn give_back(&mut self) {
        if let Some((link, pool)) = self.link.take() {
            if link.driver.is_some() && !link.sender.is_closed() {
                pool.borrow_mut().push(link);
            }
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        if let Some((link, _)) = &mut this.link {
            link.drive(cx);
        }
        let frame = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            this.give_back();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.inner.is_end_stream() {
            self.give_back();
        }
    }
}

async fn forward(
    pool: Pool,
    upstream: Rc<str>,
    req: Request<Incoming>,
) -> Result<Response<Pooled>, Box<dyn std::error::Error + Send + Sync>> {
    // An idle connection is polled once first, so one the upstream closed is dropped.
    let pooled = std::iter::from_fn(|| pool.borrow_mut().pop()).find_map(|mut link| {
        link.drive(&mut Context::from_waker(std::task::Waker::noop()));
        (link.driver.is_some() && !link.sender.is_closed()).then_some(link)
    });
    let mut link = match pooled {
        Some(link) => link,
        None => {
            let tcp = TcpStream::connect(&*upstream).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            Link { sender, driver: Some(Box::pin(conn)) }
        }
    };
    let mut sent = std::pin::pin!(link.sender.send_request(req));
    let resp = std::future::poll_fn(|cx| {
        link.drive(cx);
        sent.as_mut().poll(cx)
    })
    .await?;
    Ok(resp.map(|inner| Pooled { inner, link: Some((link, pool)) }))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let upstream: Rc<str> = upstream.into();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let listener = TcpListener::bind(&listen).await?;
        let pool: Pool = Rc::default();
        loop {
            let (tcp, _) = tokio::select! {
                a = listener.accept() => a?,
                _ = tokio::signal::ctrl_c() => return Ok(()),
            };
            tcp.set_nodelay(true)?;
            let (pool, upstream) = (pool.clone(), upstream.clone());
            tokio::task::spawn_local(async move {
                let svc = hyper::service::service_fn(move |req| forward(pool.clone(), upstream.clone(), req));
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    })
}
