//! The connection under every etcd client of the project: TCP to one of the endpoints, TLS
//! whose certificate, key and CA are re-read when their files change, HTTP/2 with keepalives.
//!
//! etcd-client's own `TlsOptions` take PEM bytes once, and tonic's channel reuses them for
//! every reconnect, so a rotated certificate would only reach a new `Client`. Here the
//! channel dials through [`Dialer`], which does the TLS handshake itself with a
//! [`clustermesh_certs::Reloading`] config: every handshake (a first connect, or tonic's
//! reconnect after etcd restarted) presents and verifies with the files as they are now,
//! while the established connection keeps its session. The URI given to tonic is `http://`
//! because TLS is already done when tonic sees the stream.
//!
//! Keepalives are HTTP/2 pings while a stream is open (watches, lease keepalives): a peer
//! that stops answering is declared dead after `interval + timeout` at most, which ends every
//! stream of the connection with an error the caller sees. Pings are not sent on idle
//! connections: etcd's gRPC server counts those as abuse and sends GOAWAY (`too_many_pings`).
//!
//! In TLS 1.3 a server refuses a client certificate after the client finished its half of
//! the handshake: the refusal (a TLS alert) arrives with the first read, inside hyper's
//! connection task, and the request only learns "connection closed". The stream is therefore
//! wrapped ([`Recorded`]) so that the last TLS error any connection of a [`Dialer`] met is
//! kept for [`Dialer::last_tls_error`], and a failed connect can say which certificate etcd
//! refused and why.
//!
//! This module must not retry on its own beyond trying each endpoint once per dial: the
//! callers own their backoff.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use clustermesh_certs::rustls::{self, pki_types::ServerName};
use clustermesh_certs::Reloading;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Where the connections of one [`Dialer`] leave the last TLS error they met.
type TlsSlot = Arc<Mutex<Option<rustls::Error>>>;

fn record(slot: &TlsSlot, e: &std::io::Error) {
    if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(r.clone());
    }
}

/// A TLS stream that records the TLS errors it meets (see the module docs).
pub struct Recorded {
    inner: TlsStream<TcpStream>,
    slot: TlsSlot,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            record(&self.slot, e);
        }
        r
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Err(e)) = &r {
            record(&self.slot, e);
        }
        r
    }

    /// Forwarded, so that hyper's HTTP/2 writer hands a frame header and its payload over in
    /// one call (one TLS record, one syscall) instead of one write each: the default
    /// implementation would take only the first slice.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Err(e)) = &r {
            record(&self.slot, e);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

use crate::{Error, Result};

/// Why one dial failed: the endpoint, the stage, and the I/O error (which carries the
/// `rustls::Error` of a failed handshake).
#[derive(Debug, thiserror::Error)]
#[error("{stage} to {endpoint} failed: {source}")]
pub struct DialError {
    /// `host:port` dialled.
    pub endpoint: String,
    /// `TCP connect` or `TLS handshake`.
    pub stage: &'static str,
    /// Cause.
    #[source]
    pub source: std::io::Error,
}

/// Dials the endpoints of one etcd, in turn, starting after the last one that worked.
#[derive(Clone)]
pub(crate) struct Dialer {
    endpoints: Arc<[String]>,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    connect_timeout: Duration,
    next: Arc<AtomicUsize>,
    last_tls: TlsSlot,
}

impl Dialer {
    /// `endpoints` are `host:port` (IP literals; names resolved before), `server_name` the
    /// name the server certificate must carry.
    pub(crate) fn new(
        endpoints: Vec<String>,
        server_name: &str,
        files: &Arc<Reloading>,
        connect_timeout: Duration,
    ) -> Result<Self> {
        let bare = server_name.trim_start_matches('[').trim_end_matches(']');
        let server_name = ServerName::try_from(bare.to_owned()).map_err(|e| Error::Endpoint {
            endpoint: server_name.to_owned(),
            reason: format!("not a valid TLS server name: {e}"),
        })?;
        let config = files.client_config().map_err(|source| Error::Tls {
            cert: files.files().cert.clone(),
            source,
        })?;
        Ok(Self {
            endpoints: endpoints.into(),
            server_name,
            tls: tokio_rustls::TlsConnector::from(Arc::new(config)),
            connect_timeout,
            next: Arc::new(AtomicUsize::new(0)),
            last_tls: Arc::default(),
        })
    }

    /// The last TLS error a connection of this dialer met (a refused client certificate
    /// shows only here), cleared by taking it.
    pub(crate) fn last_tls_error(&self) -> Option<rustls::Error> {
        self.last_tls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }

    /// Asks the server once more, outside hyper, why a connection was cut: dials, sends the
    /// HTTP/2 client preface and reads the server's first frame. A refused client certificate
    /// shows as the TLS alert on that read and is kept for [`Dialer::last_tls_error`]: hyper
    /// may have met a broken pipe on its own write first and never read the alert.
    pub(crate) async fn diagnose(&self) {
        const PREFACE: &[u8] =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        let Ok(io) = self.clone().dial().await else {
            return;
        };
        let mut stream = io.into_inner();
        let _ = tokio::time::timeout(self.connect_timeout, async {
            stream.write_all(PREFACE).await?;
            stream.flush().await?;
            let mut frame = [0u8; 9];
            stream.read_exact(&mut frame).await.map(|_| ())
        })
        .await;
    }

    async fn dial(self) -> Result<TokioIo<Recorded>, DialError> {
        let n = self.endpoints.len();
        let start = self.next.load(Ordering::Relaxed);
        let mut last = None;
        for i in 0..n {
            let endpoint = &self.endpoints[(start + i) % n];
            match self.dial_one(endpoint).await {
                Ok(io) => {
                    self.next.store((start + i) % n, Ordering::Relaxed);
                    return Ok(io);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| DialError {
            endpoint: String::new(),
            stage: "TCP connect",
            source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "no endpoints"),
        }))
    }

    async fn dial_one(&self, endpoint: &str) -> Result<TokioIo<Recorded>, DialError> {
        let err = |stage, source| DialError {
            endpoint: endpoint.to_owned(),
            stage,
            source,
        };
        let timed_out = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {:?}", self.connect_timeout),
            )
        };
        let tcp = tcp_connect(endpoint, self.connect_timeout)
            .await
            .map_err(|_| err("TCP connect", timed_out()))?
            .map_err(|e| err("TCP connect", e))?;
        // Small gRPC frames (watch events, pings) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let tls = tokio::time::timeout(
            self.connect_timeout,
            self.tls.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| err("TLS handshake", timed_out()))?
        .map_err(|e| {
            record(&self.last_tls, &e);
            err("TLS handshake", e)
        })?;
        Ok(TokioIo::new(Recorded {
            inner: tls,
            slot: self.last_tls.clone(),
        }))
    }
}

/// A TCP connect to `endpoint` within `timeout`, sending a fresh SYN after 0.5 s, 1 s, 2 s…
/// without an answer instead of leaving the retransmits to the kernel (1 s, then 3 s after
/// the first): a connect that started while a link was cut completes within about half a
/// second of the link's return rather than up to 2 s later. A slow path still connects: each
/// try waits twice as long as the one before. `Err(Elapsed)` when `timeout` passed.
async fn tcp_connect(
    endpoint: &str,
    timeout: Duration,
) -> Result<std::io::Result<TcpStream>, tokio::time::error::Elapsed> {
    tokio::time::timeout(timeout, async {
        let mut wait = PROBE_TIMEOUT;
        loop {
            if let Ok(r) = tokio::time::timeout(wait, TcpStream::connect(endpoint)).await {
                return r;
            }
            wait *= 2;
        }
    })
    .await
}

impl tower_service::Service<http::Uri> for Dialer {
    type Response = TokioIo<Recorded>;
    type Error = DialError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, DialError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), DialError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().dial())
    }
}

/// Returns once a TCP connection to one of `endpoints` (`host:port`) succeeds, trying each
/// every `every`. A remote that failed as unreachable reconnects as soon as its network is
/// back instead of at the end of a backoff that grew during the outage; a SYN per endpoint
/// per try is all it costs while the outage lasts.
///
/// Each try gives up after [`PROBE_TIMEOUT`] and the next one sends a fresh SYN: a SYN lost
/// in the outage (no ICMP answer, or a rate-limited one) would otherwise be retransmitted by
/// the kernel only 1 s, then 3 s later, delaying the resync by as much.
pub async fn wait_reachable(endpoints: &[String], every: Duration) {
    loop {
        for e in endpoints {
            if let Ok(Ok(_)) =
                tokio::time::timeout(PROBE_TIMEOUT, TcpStream::connect(e.as_str())).await
            {
                return;
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// How long one reachability try waits for the TCP handshake (round trips between
/// datacenters are far shorter; a slower path only falls back to the backoff).
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

/// HTTP/2 settings of the channel.
pub(crate) struct Http2 {
    pub(crate) keepalive_interval: Duration,
    pub(crate) keepalive_timeout: Duration,
}

/// A lazily connecting channel over `dialer` (the first request dials; tonic redials
/// through it after a connection is lost).
pub(crate) fn channel(dialer: Dialer, http2: &Http2) -> Result<tonic::transport::Channel> {
    let authority = dialer.endpoints.first().cloned().unwrap_or_default();
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{authority}"))
        .map_err(|e| Error::Endpoint {
            endpoint: authority.clone(),
            reason: e.to_string(),
        })?
        .http2_keep_alive_interval(http2.keepalive_interval)
        .keep_alive_timeout(http2.keepalive_timeout)
        .keep_alive_while_idle(false)
        .tcp_nodelay(true);
    Ok(endpoint.connect_with_connector_lazy(dialer))
}
