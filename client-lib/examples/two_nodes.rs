//! Two nodes talk through a relay, end-to-end encrypted.
//!
//! ```sh
//! # Self-contained: starts an in-process ferry relay (TLS, self-signed, pinned) and two nodes.
//! cargo run -p ferry-client --example two_nodes
//!
//! # Or against your own relay map (both nodes in this process):
//! cargo run -p ferry-client --example two_nodes -- derpmap.json
//! ```

use ferry_client::{Endpoint, EndpointConfig, RelayMap, SecretKey};
use ferry_relay::server::{cert_name_pin, Config, Server, TlsConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("ferry-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Keep the relay alive for the whole example.
    let mut _relay = None;
    let map = match std::env::args().nth(1) {
        Some(path) => RelayMap::from_file(path.as_ref())?,
        None => {
            let relay = Server::spawn(Config {
                tls: Some(TlsConfig::SelfSigned {
                    names: vec!["localhost".into()],
                    dir: dir.clone(),
                }),
                ..Config::dev_loopback()
            })
            .await?;
            let pin = cert_name_pin(&relay.cert_der().expect("TLS relay"));
            let json = format!(
                r#"{{"Regions":{{"900":{{"RegionID":900,"RegionCode":"local","Nodes":[{{"Name":"900a","RegionID":900,
                   "HostName":"localhost","IPv4":"127.0.0.1","IPv6":"none","STUNPort":-1,"DERPPort":{},"CertName":"{pin}"}}]}}}}}}"#,
                relay.listen_addr().port()
            );
            println!("relay on {} with pin {pin}", relay.listen_addr());
            _relay = Some(relay);
            RelayMap::from_json(&json)?
        }
    };

    let alice = Endpoint::bind(EndpointConfig::new(SecretKey::generate(), map.clone())).await?;
    let bob = Endpoint::bind(EndpointConfig::new(SecretKey::generate(), map)).await?;
    println!(
        "alice {} (home region {:?})",
        alice.public_key(),
        alice.home_region()
    );
    println!(
        "bob   {} (home region {:?})",
        bob.public_key(),
        bob.home_region()
    );

    let mut paths = alice.path_events();
    alice.send(bob.public_key(), b"hello bob".to_vec()).await?;
    let (from, data) = bob.recv().await?;
    println!(
        "bob got {:?} from {} via {:?}",
        String::from_utf8_lossy(&data),
        if from == alice.public_key() {
            "alice"
        } else {
            "?"
        },
        bob.path(&from)
    );
    bob.send(from, b"hello alice".to_vec()).await?;
    let (_, data) = alice.recv().await?;
    println!("alice got {:?}", String::from_utf8_lossy(&data));
    println!("alice's path event: {:?}", paths.recv().await?);
    let pong = alice.ping(bob.public_key()).await?;
    println!(
        "ping: {:.2} ms via {}",
        pong.rtt.as_secs_f64() * 1000.0,
        pong.path
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
