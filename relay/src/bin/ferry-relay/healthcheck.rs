//! `ferry-relay healthcheck`: one plain-HTTP GET, for container health checks in an image with
//! no shell or curl.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Why the URL is not healthy. `main` prints it with its source, on one line.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Unhealthy {
    #[error(
        "{url}: only http:// URLs are supported (the metrics listener's /healthz is plain HTTP)"
    )]
    NotHttp { url: String },
    #[error("{url}: no host")]
    NoHost { url: String },
    #[error("{url}: cannot resolve {hostport}")]
    Resolve {
        url: String,
        hostport: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {hostport} resolves to no address")]
    NoAddress { url: String, hostport: String },
    #[error(
        "{url}: cannot connect to {addr} (is the relay running, with its metrics listener there?)"
    )]
    Connect {
        url: String,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: no answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    /// The status line, as received.
    #[error("{url}: answered {line:?}, not 200")]
    Status { url: String, line: String },
    #[error("{url}: not an HTTP answer ({line:?})")]
    NotHttpAnswer { url: String, line: String },
}

/// GETs `url` (`http://host[:port][/path]`) within `timeout`. `Ok` on a 200 answer.
pub(crate) fn check(url: &str, timeout: Duration) -> Result<(), Unhealthy> {
    let u = || url.to_string();
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| Unhealthy::NotHttp { url: u() })?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(Unhealthy::NoHost { url: u() });
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let hostport = if has_port {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    let deadline = Instant::now() + timeout;
    let left = || deadline.saturating_duration_since(Instant::now());
    let addrs: Vec<_> = hostport
        .to_socket_addrs()
        .map_err(|source| Unhealthy::Resolve {
            url: u(),
            hostport: hostport.clone(),
            source,
        })?
        .collect();
    let mut last_err = Unhealthy::NoAddress {
        url: u(),
        hostport: hostport.clone(),
    };
    let mut stream = None;
    for a in addrs {
        if left().is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&a, left()) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(source) => {
                last_err = Unhealthy::Connect {
                    url: u(),
                    addr: a,
                    source,
                }
            }
        }
    }
    let mut s = stream.ok_or(last_err)?;
    let io = |source: std::io::Error| Unhealthy::Io { url: u(), source };
    let bound = left().max(Duration::from_millis(1));
    s.set_read_timeout(Some(bound)).map_err(io)?;
    s.set_write_timeout(Some(bound)).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {authority}\r\nUser-Agent: ferry-relay-healthcheck\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    // The status line is all we need; read until it is complete.
    let mut head = Vec::new();
    let mut buf = [0u8; 512];
    while !head.contains(&b'\n') && head.len() < 8192 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return Err(Unhealthy::Timeout { url: u(), timeout })
            }
            Err(e) => return Err(io(e)),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim().to_string();
    let code = line.split_whitespace().nth(1);
    match code {
        Some("200") => Ok(()),
        Some(_) => Err(Unhealthy::Status { url: u(), line }),
        None => Err(Unhealthy::NotHttpAnswer { url: u(), line }),
    }
}
