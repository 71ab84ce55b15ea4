//! The relay's front door as a whole: arbitrary bytes sent to a real in-process relay (plain
//! HTTP, as `--dev` serves it) on its DERP listener, its port-80 listener or its metrics
//! listener, then the write side closed. This covers the request-head parser, the router, the
//! fixed responses, the WebSocket and DERP upgrades (with fast-start frames pipelined after the
//! head) and the DERP handshake reader. Oracles: no task panics (a panic aborts the process, so
//! libFuzzer reports it), and whatever comes back before the close is a well-formed HTTP/1.1
//! response head whose Content-Length matches its body, or DERP frames after a 101/fast-start.
#![no_main]
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use ferry_relay::testing::{Options, TestRelay};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;

struct World {
    rt: Runtime,
    relay: TestRelay,
}

fn world() -> &'static World {
    static W: OnceLock<World> = OnceLock::new();
    W.get_or_init(|| {
        let rt = ferry_fuzz::relay_runtime();
        let relay = rt.block_on(Options::plain().start_with(|c| {
            c.http_listen = Some("127.0.0.1:0".parse().unwrap());
            c.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
            c.hostname = Some("relay.example".into());
        }));
        World { rt, relay }
    })
}

async fn exchange(addr: SocketAddr, input: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The relay may close before reading it all (a bad head): a failed write is fine.
    let _ = s.write_all(input).await;
    let _ = s.shutdown().await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, input)) = data.split_first() else { return };
    let w = world();
    let addr = match which % 3 {
        0 => w.relay.addr(),
        1 => w.relay.http_addr().unwrap(),
        _ => w.relay.metrics_addr().unwrap(),
    };
    let out = w.rt.block_on(exchange(addr, input));
    if out.is_empty() {
        return; // closed without an answer (malformed or truncated head, or fast-start DERP)
    }
    if !out.starts_with(b"HTTP/1.1 ") {
        // DERP with fast-start: frames straight away, starting with ServerKey.
        assert_eq!(out[0], 0x01, "neither an HTTP response nor a DERP ServerKey: {out:?}");
        return;
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let n = match resp.parse(&out) {
        Ok(httparse::Status::Complete(n)) => n,
        other => panic!("a malformed response head ({other:?}): {:?}", String::from_utf8_lossy(&out)),
    };
    let code = resp.code.unwrap();
    if code == 101 {
        return; // DERP or WebSocket frames follow
    }
    let len = resp
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .map(|h| std::str::from_utf8(h.value).unwrap().parse::<usize>().unwrap());
    let body = &out[n..];
    if let Some(len) = len {
        // Keep-alive: further responses may follow this one's body.
        assert!(body.len() >= len, "body shorter than Content-Length {len}: {body:?}");
    }
});
