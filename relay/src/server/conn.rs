//! An accepted connection before DERP: TLS, the request head, and routing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::http::{self, HttpError, Request, Response};
use super::metrics::HandshakeFailure;
use super::tls::acme::CHALLENGE_PREFIX;
use super::tls::records;
use super::ws::WsIo;
use super::{client, Shared, TlsRecords};

/// Which listener a connection came in on; each serves a different set of routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listener {
    /// The DERP listener (TLS unless dev): DERP, probes, health, home page.
    Derp,
    /// The port-80 listener: captive-portal check and health; everything else redirects to HTTPS.
    Port80,
    /// The metrics listener: `/metrics` and `/healthz`.
    Metrics,
}

/// What to do with a request.
enum Route {
    Derp { fast_start: bool },
    WebSocket { key: String },
    Respond(Response),
}

fn route(req: &Request, listener: Listener, shared: &Shared) -> Route {
    let path = http::target_path(&req.path);
    let m = req.method.as_str();
    let get_like = m == "GET" || m == "HEAD";
    if listener == Listener::Metrics {
        return Route::Respond(match (path, get_like) {
            ("/metrics", true) => Response::new(
                200,
                "OK",
                "text/plain; version=0.0.4; charset=utf-8",
                shared.metrics.render(),
            ),
            ("/healthz", true) => health(shared),
            _ => Response::text(
                404,
                "Not Found",
                "ferry-relay metrics listener: GET /metrics, GET /healthz\n",
            ),
        });
    }
    match path {
        "/derp" if listener == Listener::Derp => {
            let upgrade = req.header("upgrade").unwrap_or("").to_ascii_lowercase();
            match upgrade.as_str() {
                "derp" => Route::Derp {
                    fast_start: req.header("derp-fast-start") == Some("1"),
                },
                "websocket" if req.header_has_token("sec-websocket-protocol", "derp") => {
                    match req.header("sec-websocket-key") {
                        Some(k) => Route::WebSocket { key: k.to_string() },
                        None => Route::Respond(Response::text(
                            400,
                            "Bad Request",
                            "WebSocket upgrade without Sec-WebSocket-Key\n",
                        )),
                    }
                }
                "websocket" => Route::Respond(Response::text(
                    400,
                    "Bad Request",
                    "WebSocket DERP needs Sec-WebSocket-Protocol: derp\n",
                )),
                _ => {
                    let mut r = Response::text(
                        426,
                        "Upgrade Required",
                        "DERP requires connection upgrade\n",
                    );
                    r.headers.push(("Upgrade", "DERP".into()));
                    Route::Respond(r)
                }
            }
        }
        "/derp/probe" | "/derp/latency-check" if get_like => {
            let mut r = Response::text(200, "OK", "");
            r.headers.push(("Access-Control-Allow-Origin", "*".into()));
            Route::Respond(r)
        }
        "/generate_204" if get_like => {
            let mut r = Response::new(204, "No Content", "text/plain", Vec::new());
            r.headers.clear();
            if let Some(c) = req
                .header("x-tailscale-challenge")
                .filter(|c| http::valid_challenge(c))
            {
                r.headers
                    .push(("X-Tailscale-Response", format!("response {c}")));
            }
            Route::Respond(r)
        }
        "/healthz" if get_like => Route::Respond(health(shared)),
        p if get_like && listener == Listener::Port80 && p.starts_with(CHALLENGE_PREFIX) => {
            let token = &p[CHALLENGE_PREFIX.len()..];
            Route::Respond(match shared.acme_challenges.get(token) {
                Some(key_auth) => {
                    Response::new(200, "OK", "application/octet-stream", key_auth.into_bytes())
                }
                None => Response::text(404, "Not Found", "no such ACME challenge\n"),
            })
        }
        "/robots.txt" if get_like => {
            Route::Respond(Response::text(200, "OK", "User-agent: *\nDisallow: /\n"))
        }
        "/" if get_like && listener == Listener::Derp => Route::Respond(http::home_page()),
        _ if listener == Listener::Port80 => {
            let host = req
                .header("host")
                .map(|h| h.split(':').next().unwrap_or(h).to_string());
            match host.or_else(|| shared.hostname.clone()) {
                Some(h) => {
                    let mut r = Response::text(308, "Permanent Redirect", "use HTTPS\n");
                    r.headers
                        .push(("Location", format!("https://{h}{}", req.path)));
                    Route::Respond(r)
                }
                None => Route::Respond(Response::text(404, "Not Found", "not found\n")),
            }
        }
        _ => Route::Respond(Response::text(404, "Not Found", "not found\n")),
    }
}

/// `/healthz`: 200 once every listener is up, 503 while starting or draining.
fn health(shared: &Shared) -> Response {
    if shared.is_ready() {
        Response::text(200, "OK", "ok\n")
    } else {
        Response::text(
            503,
            "Service Unavailable",
            "not ready (starting or shutting down)\n",
        )
    }
}

/// Sets socket options every accepted connection gets.
pub(crate) fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10));
    let _ = sock.set_tcp_keepalive(&ka);
}

/// Serves an accepted TCP connection on `listener`, with TLS when the server has it.
pub(crate) async fn handle_tcp(
    tcp: TcpStream,
    remote: SocketAddr,
    listener: Listener,
    shared: Arc<Shared>,
) {
    let accepted = Instant::now();
    tune(&tcp);
    match (&shared.tls_acceptor, listener) {
        (Some(acceptor), Listener::Derp) => {
            let deadline =
                tokio::time::Instant::from_std(accepted + shared.limits.handshake_timeout);
            match shared.tls_records {
                TlsRecords::Ferry => {
                    let config = Arc::clone(acceptor.config());
                    let hs = records::accept(tcp, config);
                    serve_tls(hs, deadline, remote, accepted, listener, shared).await
                }
                TlsRecords::Rustls => {
                    let hs = acceptor.accept(tcp);
                    serve_tls(hs, deadline, remote, accepted, listener, shared).await
                }
            }
        }
        _ => serve(tcp, remote, accepted, listener, shared).await,
    }
}

/// Runs a TLS handshake within `deadline`, then serves the connection; a failed or late
/// handshake is counted.
async fn serve_tls<S>(
    handshake: impl std::future::Future<Output = std::io::Result<S>>,
    deadline: tokio::time::Instant,
    remote: SocketAddr,
    accepted: Instant,
    listener: Listener,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let error = match tokio::time::timeout_at(deadline, Box::pin(handshake)).await {
        // Boxed: the TLS state is large, and a stream inline here would size the connection's
        // task for it twice over.
        Ok(Ok(tls)) => return serve(Box::new(tls), remote, accepted, listener, shared).await,
        Ok(Err(e)) => e.to_string(),
        Err(_) => "timed out".to_string(),
    };
    shared.metrics.handshake_failed(HandshakeFailure::Tls);
    debug!(%remote, %error, "TLS handshake failed");
}

/// Reads requests and answers them until one upgrades or the connection ends.
async fn serve<S>(
    mut io: S,
    remote: SocketAddr,
    accepted: Instant,
    listener: Listener,
    shared: Arc<Shared>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut buf = BytesMut::new();
    let mut first = true;
    loop {
        // The whole head must arrive within the handshake deadline (first request) or the idle
        // timeout (later ones): slowloris protection.
        let limit = if first {
            shared.limits.handshake_timeout
        } else {
            shared.limits.http_idle_timeout
        };
        // A keep-alive connection waiting for its next request is closed at shutdown (a
        // scraper's or prober's connection must not hold the process).
        let idle = !first && buf.is_empty();
        let read = tokio::time::timeout(limit, Box::pin(http::read_request(&mut io, &mut buf)));
        let req = match tokio::select! {
            _ = shared.drain.cancelled(), if idle => return,
            r = read => r,
        } {
            Err(_) => {
                if first {
                    shared
                        .metrics
                        .handshake_failed(HandshakeFailure::HttpTimeout);
                }
                return;
            }
            Ok(Ok(None)) => return,
            Ok(Ok(Some(r))) => r,
            Ok(Err(e)) => {
                if listener == Listener::Derp {
                    shared.metrics.handshake_failed(match e {
                        HttpError::Io(_) | HttpError::Truncated => HandshakeFailure::Io,
                        _ => HandshakeFailure::HttpMalformed,
                    });
                }
                debug!(%remote, error = %crate::error_chain(&e), "bad HTTP request");
                if !matches!(e, HttpError::Io(_)) {
                    let r = Response::text(400, "Bad Request", "malformed HTTP request\n");
                    let _ = tokio::time::timeout(shared.limits.write_timeout, async {
                        io.write_all(&r.encode(false, false)).await?;
                        io.shutdown().await
                    })
                    .await;
                }
                return;
            }
        };
        first = false;
        match route(&req, listener, &shared) {
            Route::Derp { fast_start } => {
                // The request's strings must not live on with the connection.
                drop(req);
                let prefix = if fast_start {
                    Vec::new()
                } else {
                    crate::proto::client::switching_protocols_response(&shared.public)
                };
                // Boxed: the connection task then holds only what the DERP phase needs, not
                // the largest state of every phase before it (idle connections are most of a
                // relay's memory).
                return Box::pin(client::run(io, prefix, buf, remote, accepted, shared)).await;
            }
            Route::WebSocket { key } => {
                drop(req);
                let resp = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                     Sec-WebSocket-Accept: {}\r\nSec-WebSocket-Protocol: derp\r\n\r\n",
                    derive_accept_key(key.as_bytes())
                );
                if tokio::time::timeout(shared.limits.write_timeout, io.write_all(resp.as_bytes()))
                    .await
                    .is_err()
                {
                    shared.metrics.handshake_failed(HandshakeFailure::Io);
                    return;
                }
                let mut cfg = WebSocketConfig::default();
                cfg.max_message_size = Some(2 << 20);
                cfg.max_frame_size = Some(2 << 20);
                let ws = Box::pin(WebSocketStream::from_partially_read(
                    io,
                    buf.to_vec(),
                    Role::Server,
                    Some(cfg),
                ))
                .await;
                return Box::pin(client::run(
                    WsIo::new(ws),
                    Vec::new(),
                    BytesMut::new(),
                    remote,
                    accepted,
                    shared,
                ))
                .await;
            }
            Route::Respond(resp) => {
                shared.metrics.http_requests.increment(1);
                // At shutdown the answer carries `Connection: close` and the connection ends.
                let keep = req.keep_alive() && !req.has_body() && !shared.drain.is_cancelled();
                let bytes = resp.encode(req.method == "HEAD", keep);
                match tokio::time::timeout(shared.limits.write_timeout, io.write_all(&bytes)).await
                {
                    Ok(Ok(())) if keep => {}
                    _ => {
                        let _ =
                            tokio::time::timeout(shared.limits.write_timeout, io.shutdown()).await;
                        return;
                    }
                }
            }
        }
    }
}
