//! TLS for the tests: a private CA made with rcgen, leaf certificates it issues, and
//! a rustls client that trusts only it.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::client::Reply;
use super::upstream::Body;
use super::{TempDir, DEADLINE};

/// A private CA made with rcgen for one test.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

/// A leaf certificate issued by a [`TestCa`].
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: rustls_pki_types::CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let key = KeyPair::generate().expect("CA key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "portcullis test CA");
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("self-sign CA");
        Self { cert, key }
    }

    /// A leaf for `names` (DNS names), signed by this CA.
    pub fn issue(&self, names: &[&str]) -> Leaf {
        use rcgen::{CertificateParams, DnType, KeyPair};
        let key = KeyPair::generate().expect("leaf key");
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, names.first().cloned().unwrap_or_default());
        let cert = params.signed_by(&key, &self.cert, &self.key).expect("sign leaf");
        Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    /// Writes the CA certificate to `NAME` in `dir` (for a route's `ca_file`).
    pub fn write_to(&self, dir: &TempDir, name: &str) -> String {
        dir.write(name, &self.cert.pem()).display().to_string()
    }

    /// A rustls client that trusts only this CA and offers `alpn` (e.g. `["h2"]`).
    pub fn client_config(&self, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.cert.der().clone()).expect("add CA root");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(cfg)
    }
}

impl Leaf {
    /// A rustls server presenting this leaf and offering `alpn` (e.g. `["h2"]`).
    pub fn server_config(&self, alpn: &[&str]) -> Arc<rustls::ServerConfig> {
        use rustls_pki_types::pem::PemObject;
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("leaf key PEM");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![self.der.clone()], key)
            .expect("leaf certificate and key");
        cfg.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        Arc::new(cfg)
    }

    /// Writes `STEM.pem` and `STEM.key` into `dir`; returns both paths as TOML-ready strings.
    pub fn write_to(&self, dir: &TempDir, stem: &str) -> (String, String) {
        let cert = dir.write(&format!("{stem}.pem"), &self.cert_pem);
        let key = dir.write(&format!("{stem}.key"), &self.key_pem);
        (cert.display().to_string(), key.display().to_string())
    }
}

/// Connects with TLS, sending `sni` as the server name.
pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> Result<TlsStream<TcpStream>, std::io::Error> {
    let tcp = TcpStream::connect(addr).await?;
    let name = rustls_pki_types::ServerName::try_from(sni.to_owned()).expect("valid server name");
    tokio::time::timeout(DEADLINE, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
}

/// The ALPN protocol the server chose.
pub fn alpn(stream: &TlsStream<TcpStream>) -> Option<String> {
    stream.get_ref().1.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned())
}

/// The leaf certificate the server presented.
pub fn presented_leaf(stream: &TlsStream<TcpStream>) -> rustls_pki_types::CertificateDer<'static> {
    stream.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("server sent a certificate").clone()
}

/// Sends one request on an established TLS stream, in HTTP/2 if ALPN chose `h2`,
/// else HTTP/1.1, and reads the whole answer.
pub async fn send_over(stream: TlsStream<TcpStream>, req: Request<Body>) -> Reply {
    let exchange = async { Reply::read(open_over(stream, req).await).await.expect("read response") };
    tokio::time::timeout(DEADLINE, exchange).await.expect("TLS exchange within the deadline")
}

/// Like [`send_over`], but returns as soon as the response headers are in, the body
/// left to stream.
pub async fn open_over(stream: TlsStream<TcpStream>, mut req: Request<Body>) -> Response<Incoming> {
    let io = TokioIo::new(stream);
    // A connection-level HTTP/1.1 client writes no Host of its own; every HTTP/1.1 request needs one.
    if let Some(a) = req.uri().authority().map(|a| a.to_string()) {
        req.headers_mut().entry(http::header::HOST).or_insert(a.parse().expect("authority as Host"));
    }
    let h2 = io.inner().get_ref().1.alpn_protocol() == Some(b"h2");
    let exchange = async {
        if h2 {
            let (mut sender, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.expect("h2 handshake");
            // The connection lives until the server ends it, so a streamed body can finish.
            let keep = sender.clone();
            tokio::spawn(async move {
                let _ = conn.await;
                drop(keep);
            });
            sender.send_request(req).await.expect("h2 request")
        } else {
            let (mut sender, conn) = hyper::client::conn::http1::handshake(io).await.expect("h1 handshake");
            tokio::spawn(conn);
            sender.send_request(req).await.expect("h1 request")
        }
    };
    tokio::time::timeout(DEADLINE, exchange).await.expect("response headers within the deadline")
}
