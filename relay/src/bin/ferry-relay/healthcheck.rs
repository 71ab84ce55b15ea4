//! `ferry-relay healthcheck`: one plain-HTTP GET, for container health checks in an image with
//! no shell or curl.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// GETs `url` (`http://host[:port][/path]`) within `timeout`. `Ok` on a 200 answer; otherwise
/// a one-line reason.
pub(crate) fn check(url: &str, timeout: Duration) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url}: only http:// URLs are supported (the metrics listener's /healthz is plain HTTP)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() {
        return Err(format!("{url}: no host"));
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
        .map_err(|e| format!("{url}: cannot resolve {hostport}: {e}"))?
        .collect();
    let mut last_err = format!("{url}: {hostport} resolves to no address");
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
            Err(e) => last_err = format!("{url}: cannot connect to {a}: {e} (is the relay running, with its metrics listener there?)"),
        }
    }
    let mut s = stream.ok_or(last_err)?;
    let io = |e: std::io::Error| format!("{url}: {e}");
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
                return Err(format!("{url}: no answer within {timeout:?}"))
            }
            Err(e) => return Err(io(e)),
        }
    }
    let line = String::from_utf8_lossy(&head);
    let line = line.lines().next().unwrap_or("").trim();
    let code = line.split_whitespace().nth(1);
    match code {
        Some("200") => Ok(()),
        Some(_) => Err(format!("{url}: answered {line:?}, not 200")),
        None => Err(format!("{url}: not an HTTP answer ({line:?})")),
    }
}
