//! The relay map: Tailscale's DERP map JSON (`tailcfg.DERPMap`), so one file serves Tailscale,
//! Headscale and ferry.
//!
//! ```json
//! {"Regions":{"900":{"RegionID":900,"RegionCode":"ferry","Nodes":[
//!   {"Name":"900a","RegionID":900,"HostName":"relay.example.com","IPv4":"203.0.113.10",
//!    "STUNPort":3478,"DERPPort":443,"CertName":"sha256-raw:<hex>"}]}}}
//! ```
//!
//! Field names and meanings are those of `tailscale.com/tailcfg/derpmap.go`. Go's JSON decoder
//! matches keys case-insensitively (Headscale's YAML maps use lower-case keys), so this parser
//! does too. Unknown keys are ignored, as Go does, so maps written for newer Tailscale versions
//! still load. Everything else is checked, and an error names the exact place
//! (`Regions["900"].Nodes[0].DERPPort`) and what was expected.
//!
//! One deliberate difference: Tailscale uses `InsecureForTests` to skip TLS verification. ferry
//! never skips verification; a node with `InsecureForTests: true` is dialled over plain HTTP
//! (what `ferry-relay --dev` serves). Use it only on loopback and in tests.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;

use serde_json::{Map, Value};

/// STUN port when a node's `STUNPort` is 0 or absent.
pub const DEFAULT_STUN_PORT: u16 = 3478;
/// DERP port when a node's `DERPPort` is 0 or absent.
pub const DEFAULT_DERP_PORT: u16 = 443;

/// Why a relay map could not be used.
#[derive(Debug, thiserror::Error)]
pub enum RelayMapError {
    /// The file could not be read.
    #[error("cannot read the relay map {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON at all.
    #[error("the relay map is not valid JSON: {0}. Expected Tailscale's DERP map format: {{\"Regions\":{{\"900\":{{\"RegionID\":900,\"Nodes\":[{{\"Name\":\"900a\",\"RegionID\":900,\"HostName\":\"relay.example.com\"}}]}}}}}}")]
    Json(String),
    /// A field is missing or has the wrong type or value.
    #[error("relay map: {at}: {why}")]
    Invalid {
        /// Where, e.g. `Regions["900"].Nodes[0].DERPPort`.
        at: String,
        /// What was wrong and what was expected.
        why: String,
    },
}

fn invalid(at: impl Into<String>, why: impl Into<String>) -> RelayMapError {
    RelayMapError::Invalid {
        at: at.into(),
        why: why.into(),
    }
}

/// How a node's address of one family is found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrChoice<T> {
    /// Not given: resolve `HostName` in DNS.
    Dns,
    /// Given: use this address, skip DNS.
    Fixed(T),
    /// `"none"`: do not use this family at all.
    Disabled,
}

/// The `CertName` of a node: a name for the certificate, or the `sha256-raw:` pin of a
/// self-signed one.
pub use ferry_proto::pin::{CertName, CertPin};

/// One relay server (a `DERPNode`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `Name`, unique across the map, e.g. "900a".
    pub name: String,
    /// `RegionID` of its region.
    pub region_id: u32,
    /// `HostName`: dialled (unless IPv4/IPv6 are given), sent as TLS SNI, and verified against
    /// the certificate unless `cert_name` says otherwise.
    pub host_name: String,
    /// `CertName`: a different certificate name, or a pin.
    pub cert_name: Option<CertName>,
    /// `IPv4`.
    pub ipv4: AddrChoice<Ipv4Addr>,
    /// `IPv6`.
    pub ipv6: AddrChoice<Ipv6Addr>,
    /// STUN port; `None` when `STUNPort` is -1 (STUN off on this node).
    pub stun_port: Option<u16>,
    /// `STUNOnly`: a STUN server, not a relay.
    pub stun_only: bool,
    /// DERP (HTTPS) port.
    pub derp_port: u16,
    /// `InsecureForTests`: ferry dials plain HTTP (see the module docs).
    pub insecure_for_tests: bool,
    /// `STUNTestIP`: send STUN here instead of the node's address (tests).
    pub stun_test_ip: Option<IpAddr>,
}

impl Node {
    /// Whether the DERP connection uses TLS.
    pub fn uses_tls(&self) -> bool {
        !self.insecure_for_tests
    }

    /// `https://host:port/derp` (or `http://` for a test node), for messages and WebSocket.
    pub fn url(&self) -> String {
        let scheme = if self.uses_tls() { "https" } else { "http" };
        format!("{scheme}://{}/derp", self.host_port())
    }

    /// `host:port` as written in an HTTP Host header.
    pub fn host_port(&self) -> String {
        if self.host_name.contains(':') {
            format!("[{}]:{}", self.host_name, self.derp_port)
        } else {
            format!("{}:{}", self.host_name, self.derp_port)
        }
    }

    /// Addresses to try for the DERP connection: the fixed ones, or what DNS says.
    pub async fn derp_addrs(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        self.addrs(self.derp_port).await
    }

    /// Addresses to send STUN to (empty if STUN is off on this node).
    pub async fn stun_addrs(&self) -> std::io::Result<Vec<std::net::SocketAddr>> {
        let Some(port) = self.stun_port else {
            return Ok(Vec::new());
        };
        if let Some(ip) = self.stun_test_ip {
            return Ok(vec![std::net::SocketAddr::new(ip, port)]);
        }
        self.addrs(port).await
    }

    async fn addrs(&self, port: u16) -> std::io::Result<Vec<std::net::SocketAddr>> {
        let mut out = Vec::new();
        let mut need_dns = false;
        match self.ipv4 {
            AddrChoice::Fixed(ip) => out.push((IpAddr::V4(ip), port).into()),
            AddrChoice::Dns => need_dns = true,
            AddrChoice::Disabled => {}
        }
        match self.ipv6 {
            AddrChoice::Fixed(ip) => out.push((IpAddr::V6(ip), port).into()),
            AddrChoice::Dns => need_dns = true,
            AddrChoice::Disabled => {}
        }
        if need_dns {
            let host = self.host_name.trim_start_matches('[').trim_end_matches(']');
            match tokio::net::lookup_host((host, port)).await {
                Ok(found) => {
                    for a in found {
                        let wanted = match a.ip() {
                            IpAddr::V4(_) => self.ipv4 == AddrChoice::Dns,
                            IpAddr::V6(_) => self.ipv6 == AddrChoice::Dns,
                        };
                        if wanted && !out.contains(&a) {
                            out.push(a);
                        }
                    }
                }
                Err(e) if out.is_empty() => {
                    return Err(std::io::Error::new(
                        e.kind(),
                        format!("cannot resolve {host:?}: {e}"),
                    ))
                }
                Err(_) => {}
            }
        }
        Ok(out)
    }
}

/// A region: one or more nodes that mesh with each other (a `DERPRegion`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    /// `RegionID` (900–999 are for self-hosted regions).
    pub id: u32,
    /// `RegionCode`, short.
    pub code: String,
    /// `RegionName`, long.
    pub name: String,
    /// `Avoid`: never pick as home.
    pub avoid: bool,
    /// `NoMeasureNoHome`: no STUN to it, never home.
    pub no_measure_no_home: bool,
    /// `Nodes`, in the order to try them.
    pub nodes: Vec<Node>,
}

impl Region {
    /// Nodes that relay (not STUN-only).
    pub fn relay_nodes(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.stun_only)
    }

    /// A short label for messages: `900 (ferry)`.
    pub fn label(&self) -> String {
        if self.code.is_empty() {
            self.id.to_string()
        } else {
            format!("{} ({})", self.id, self.code)
        }
    }
}

/// A parsed, checked relay map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayMap {
    regions: BTreeMap<u32, Region>,
}

impl RelayMap {
    /// Reads and parses a map file.
    pub fn from_file(path: &Path) -> Result<RelayMap, RelayMapError> {
        let text = std::fs::read_to_string(path).map_err(|source| RelayMapError::Read {
            path: path.display().to_string(),
            source,
        })?;
        RelayMap::from_json(&text)
    }

    /// Parses map JSON.
    pub fn from_json(text: &str) -> Result<RelayMap, RelayMapError> {
        let v: Value =
            serde_json::from_str(text).map_err(|e| RelayMapError::Json(e.to_string()))?;
        let top = as_object(&v, "the map")?;
        let regions_v = get(top, "Regions").ok_or_else(|| {
            invalid(
                "the map",
                "no \"Regions\" object (a DERP map is {\"Regions\":{\"<id>\":{...}}})",
            )
        })?;
        let regions_o = as_object(regions_v, "Regions")?;
        let mut regions = BTreeMap::new();
        for (key, rv) in regions_o {
            let at = format!("Regions[{key:?}]");
            let region = parse_region(key, rv, &at)?;
            regions.insert(region.id, region);
        }
        if regions.is_empty() {
            return Err(invalid("Regions", "is empty: add at least one region"));
        }
        let mut names = std::collections::HashSet::new();
        for r in regions.values() {
            for n in &r.nodes {
                if !names.insert(n.name.clone()) {
                    return Err(invalid(
                        format!("Regions[\"{}\"]", r.id),
                        format!("node name {:?} is used twice; names must be unique", n.name),
                    ));
                }
            }
        }
        Ok(RelayMap { regions })
    }

    /// A one-region map for a single relay URL: `http://127.0.0.1:3340` (a `--dev` relay,
    /// plain HTTP, STUN on 3478 of the same host) or `https://relay.example.com[:443]`.
    /// `cert_name` may pin a self-signed certificate.
    pub fn from_url(url: &str, cert_name: Option<&str>) -> Result<RelayMap, RelayMapError> {
        let bad = |why: &str| invalid("relay URL", format!("{url:?}: {why}"));
        let (tls, rest) = if let Some(r) = url.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(bad("must start with http:// or https://"));
        };
        let hostport = rest.split('/').next().unwrap_or("");
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => match p.parse::<u16>() {
                Ok(p) => (h.trim_start_matches('[').trim_end_matches(']'), p),
                Err(_) if h.contains(':') && !h.starts_with('[') => {
                    (hostport, if tls { 443 } else { 80 })
                }
                Err(_) => return Err(bad("the port is not a number")),
            },
            _ => (hostport, if tls { 443 } else { 80 }),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let mut node = json_obj(&[
            ("Name", "900a".into()),
            ("RegionID", 900.into()),
            ("HostName", host.into()),
            ("DERPPort", port.into()),
            ("InsecureForTests", (!tls).into()),
        ]);
        if let Ok(ip) = host.parse::<IpAddr>() {
            let k = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
            node.insert(k.into(), ip.to_string().into());
            let other = if ip.is_ipv4() { "IPv6" } else { "IPv4" };
            node.insert(other.into(), "none".into());
        }
        if let Some(c) = cert_name {
            node.insert("CertName".into(), c.into());
        }
        let map = serde_json::json!({"Regions": {"900": {"RegionID": 900, "RegionCode": "relay",
            "RegionName": url, "Nodes": [node]}}});
        RelayMap::from_json(&map.to_string())
    }

    /// The regions, by id.
    pub fn regions(&self) -> impl Iterator<Item = &Region> {
        self.regions.values()
    }

    /// One region.
    pub fn region(&self, id: u32) -> Option<&Region> {
        self.regions.get(&id)
    }

    /// The map as Tailscale DERP map JSON.
    pub fn to_json(&self) -> String {
        let mut regions = Map::new();
        for r in self.regions.values() {
            let nodes: Vec<Value> = r
                .nodes
                .iter()
                .map(|n| {
                    let mut o = json_obj(&[
                        ("Name", n.name.clone().into()),
                        ("RegionID", n.region_id.into()),
                        ("HostName", n.host_name.clone().into()),
                        ("DERPPort", n.derp_port.into()),
                        ("STUNPort", n.stun_port.map(i64::from).unwrap_or(-1).into()),
                    ]);
                    let fam = |c: String| Value::from(c);
                    match n.ipv4 {
                        AddrChoice::Fixed(ip) => drop(o.insert("IPv4".into(), fam(ip.to_string()))),
                        AddrChoice::Disabled => drop(o.insert("IPv4".into(), fam("none".into()))),
                        AddrChoice::Dns => {}
                    }
                    match n.ipv6 {
                        AddrChoice::Fixed(ip) => drop(o.insert("IPv6".into(), fam(ip.to_string()))),
                        AddrChoice::Disabled => drop(o.insert("IPv6".into(), fam("none".into()))),
                        AddrChoice::Dns => {}
                    }
                    if let Some(c) = &n.cert_name {
                        o.insert("CertName".into(), c.to_string().into());
                    }
                    if n.stun_only {
                        o.insert("STUNOnly".into(), true.into());
                    }
                    if n.insecure_for_tests {
                        o.insert("InsecureForTests".into(), true.into());
                    }
                    if let Some(ip) = n.stun_test_ip {
                        o.insert("STUNTestIP".into(), ip.to_string().into());
                    }
                    Value::Object(o)
                })
                .collect();
            let mut ro = json_obj(&[
                ("RegionID", r.id.into()),
                ("RegionCode", r.code.clone().into()),
                ("RegionName", r.name.clone().into()),
                ("Nodes", Value::Array(nodes)),
            ]);
            if r.avoid {
                ro.insert("Avoid".into(), true.into());
            }
            if r.no_measure_no_home {
                ro.insert("NoMeasureNoHome".into(), true.into());
            }
            regions.insert(r.id.to_string(), Value::Object(ro));
        }
        serde_json::to_string_pretty(&serde_json::json!({ "Regions": regions }))
            .expect("JSON of plain values")
    }
}

fn json_obj(fields: &[(&str, Value)]) -> Map<String, Value> {
    fields
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn as_object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, RelayMapError> {
    v.as_object()
        .ok_or_else(|| invalid(at, format!("expected an object, got {}", kind(v))))
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Case-insensitive key lookup, as Go's encoding/json does it.
fn get<'a>(o: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    o.get(key).or_else(|| {
        o.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn get_str(o: &Map<String, Value>, key: &str, at: &str) -> Result<Option<String>, RelayMapError> {
    match get(o, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(invalid(
            format!("{at}.{key}"),
            format!("expected a string, got {}", kind(v)),
        )),
    }
}

fn get_bool(o: &Map<String, Value>, key: &str, at: &str) -> Result<bool, RelayMapError> {
    match get(o, key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(invalid(
            format!("{at}.{key}"),
            format!("expected true or false, got {}", kind(v)),
        )),
    }
}

fn get_int(
    o: &Map<String, Value>,
    key: &str,
    at: &str,
    range: std::ops::RangeInclusive<i64>,
) -> Result<Option<i64>, RelayMapError> {
    match get(o, key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => match n.as_i64() {
            Some(i) if range.contains(&i) => Ok(Some(i)),
            _ => Err(invalid(
                format!("{at}.{key}"),
                format!(
                    "{n} is out of range: expected an integer from {} to {}",
                    range.start(),
                    range.end()
                ),
            )),
        },
        Some(v) => Err(invalid(
            format!("{at}.{key}"),
            format!("expected an integer, got {}", kind(v)),
        )),
    }
}

fn parse_region(key: &str, v: &Value, at: &str) -> Result<Region, RelayMapError> {
    let o = as_object(v, at)?;
    let key_id: u32 = key
        .parse()
        .ok()
        .filter(|&i| i > 0)
        .ok_or_else(|| invalid(at, "region keys are positive integers (the RegionID)"))?;
    let id = get_int(o, "RegionID", at, 1..=i64::from(u32::MAX))?
        .map(|i| i as u32)
        .unwrap_or(key_id);
    if id != key_id {
        return Err(invalid(
            format!("{at}.RegionID"),
            format!("is {id} but the region is listed under {key:?}; they must match"),
        ));
    }
    let nodes_v = get(o, "Nodes").ok_or_else(|| {
        invalid(
            at,
            "no \"Nodes\" array: a region needs at least one node with a HostName",
        )
    })?;
    let nodes_a = nodes_v.as_array().ok_or_else(|| {
        invalid(
            format!("{at}.Nodes"),
            format!("expected an array, got {}", kind(nodes_v)),
        )
    })?;
    if nodes_a.is_empty() {
        return Err(invalid(
            format!("{at}.Nodes"),
            "is empty: a region needs at least one node",
        ));
    }
    let nodes = nodes_a
        .iter()
        .enumerate()
        .map(|(i, nv)| parse_node(id, nv, &format!("{at}.Nodes[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Region {
        id,
        code: get_str(o, "RegionCode", at)?.unwrap_or_default(),
        name: get_str(o, "RegionName", at)?.unwrap_or_default(),
        avoid: get_bool(o, "Avoid", at)?,
        no_measure_no_home: get_bool(o, "NoMeasureNoHome", at)?,
        nodes,
    })
}

fn parse_node(region_id: u32, v: &Value, at: &str) -> Result<Node, RelayMapError> {
    let o = as_object(v, at)?;
    let host_name = get_str(o, "HostName", at)?
        .filter(|h| !h.is_empty())
        .ok_or_else(|| {
            invalid(
                format!("{at}.HostName"),
                "is required (the relay's DNS name or IP address)",
            )
        })?;
    if host_name.contains("://") || host_name.contains('/') {
        return Err(invalid(
            format!("{at}.HostName"),
            format!("{host_name:?} must be a bare host name, without scheme or path"),
        ));
    }
    let name = get_str(o, "Name", at)?.unwrap_or_else(|| format!("{region_id}"));
    let rid = get_int(o, "RegionID", at, 0..=i64::from(u32::MAX))?.unwrap_or(0) as u32;
    if rid != 0 && rid != region_id {
        return Err(invalid(
            format!("{at}.RegionID"),
            format!("is {rid} but the node is in region {region_id}"),
        ));
    }
    let ipv4 = match get_str(o, "IPv4", at)?.as_deref() {
        None | Some("") => AddrChoice::Dns,
        Some("none") => AddrChoice::Disabled,
        Some(s) => AddrChoice::Fixed(s.parse().map_err(|_| {
            invalid(
                format!("{at}.IPv4"),
                format!("{s:?} is not an IPv4 address (use \"none\" to disable IPv4)"),
            )
        })?),
    };
    let ipv6 = match get_str(o, "IPv6", at)?.as_deref() {
        None | Some("") => AddrChoice::Dns,
        Some("none") => AddrChoice::Disabled,
        Some(s) => AddrChoice::Fixed(s.parse().map_err(|_| {
            invalid(
                format!("{at}.IPv6"),
                format!("{s:?} is not an IPv6 address (use \"none\" to disable IPv6)"),
            )
        })?),
    };
    let stun_port = match get_int(o, "STUNPort", at, -1..=65535)? {
        None | Some(0) => Some(DEFAULT_STUN_PORT),
        Some(-1) => None,
        Some(p) => Some(p as u16),
    };
    let derp_port = match get_int(o, "DERPPort", at, 0..=65535)? {
        None | Some(0) => DEFAULT_DERP_PORT,
        Some(p) => p as u16,
    };
    let cert_name = get_str(o, "CertName", at)?
        .map(|s| {
            s.parse::<CertName>().map_err(|e| {
                invalid(
                    format!("{at}.CertName"),
                    format!("{e} (the pin ferry-relay logs as cert_name=...)"),
                )
            })
        })
        .transpose()?;
    let stun_test_ip = get_str(o, "STUNTestIP", at)?
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse().map_err(|_| {
                invalid(
                    format!("{at}.STUNTestIP"),
                    format!("{s:?} is not an IP address"),
                )
            })
        })
        .transpose()?;
    Ok(Node {
        name,
        region_id,
        host_name,
        cert_name,
        ipv4,
        ipv6,
        stun_port,
        stun_only: get_bool(o, "STUNOnly", at)?,
        derp_port,
        insecure_for_tests: get_bool(o, "InsecureForTests", at)?,
        stun_test_ip,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
      "Regions": {
        "900": {
          "RegionID": 900, "RegionCode": "ferry-eu", "RegionName": "ferry Europe",
          "Nodes": [{
            "Name": "900a", "RegionID": 900, "HostName": "relay.example.com",
            "IPv4": "203.0.113.10", "IPv6": "none", "STUNPort": 3478, "DERPPort": 8443,
            "CertName": "sha256-raw:00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff",
            "CanPort80": true
          }]
        },
        "901": {"RegionID": 901, "Nodes": [{"Name": "901a", "HostName": "r2.example.com", "STUNPort": -1, "STUNOnly": true}]}
      }
    }"#;

    #[test]
    fn parses_tailscale_fields() {
        let m = RelayMap::from_json(GOOD).unwrap();
        let r = m.region(900).unwrap();
        assert_eq!(r.code, "ferry-eu");
        let n = &r.nodes[0];
        assert_eq!(n.host_name, "relay.example.com");
        assert_eq!(n.ipv4, AddrChoice::Fixed("203.0.113.10".parse().unwrap()));
        assert_eq!(n.ipv6, AddrChoice::Disabled);
        assert_eq!(n.derp_port, 8443);
        assert_eq!(n.stun_port, Some(3478));
        assert!(matches!(n.cert_name, Some(CertName::Pin(p)) if p.as_bytes()[1] == 0x11));
        assert!(n.uses_tls());
        let n2 = &m.region(901).unwrap().nodes[0];
        assert_eq!(n2.stun_port, None);
        assert!(n2.stun_only);
        assert_eq!(n2.derp_port, 443);
        assert_eq!(m.region(901).unwrap().relay_nodes().count(), 0);
        // Round trip through our own JSON.
        assert_eq!(RelayMap::from_json(&m.to_json()).unwrap(), m);
    }

    #[test]
    fn keys_match_case_insensitively_like_go() {
        let m = RelayMap::from_json(
            r#"{"regions":{"7":{"regionid":7,"nodes":[{"name":"7a","hostname":"h","derpport":1,"stunport":0}]}}}"#,
        )
        .unwrap();
        let n = &m.region(7).unwrap().nodes[0];
        assert_eq!((n.derp_port, n.stun_port), (1, Some(DEFAULT_STUN_PORT)));
    }

    fn err(json: &str) -> String {
        RelayMap::from_json(json).unwrap_err().to_string()
    }

    #[test]
    fn malformed_maps_say_where_and_what() {
        assert!(err("{").contains("not valid JSON"));
        assert!(err("[]").contains("expected an object"));
        assert!(err("{}").contains("no \"Regions\""));
        assert!(err(r#"{"Regions":{}}"#).contains("is empty"));
        assert!(err(r#"{"Regions":{"x":{"Nodes":[]}}}"#).contains("positive integers"));
        let e = err(r#"{"Regions":{"900":{"RegionID":901,"Nodes":[{"HostName":"h"}]}}}"#);
        assert!(e.contains(r#"Regions["900"].RegionID"#), "{e}");
        let e = err(r#"{"Regions":{"900":{"Nodes":[]}}}"#);
        assert!(e.contains("Nodes") && e.contains("is empty"), "{e}");
        let e = err(r#"{"Regions":{"900":{"Nodes":[{"Name":"a"}]}}}"#);
        assert!(e.contains(r#"Regions["900"].Nodes[0].HostName"#), "{e}");
        let e = err(r#"{"Regions":{"900":{"Nodes":[{"HostName":"h","DERPPort":"443"}]}}}"#);
        assert!(
            e.contains("DERPPort") && e.contains("expected an integer"),
            "{e}"
        );
        let e = err(r#"{"Regions":{"900":{"Nodes":[{"HostName":"h","DERPPort":70000}]}}}"#);
        assert!(e.contains("out of range"), "{e}");
        let e = err(r#"{"Regions":{"900":{"Nodes":[{"HostName":"h","IPv4":"1.2.3"}]}}}"#);
        assert!(e.contains("IPv4") && e.contains("not an IPv4"), "{e}");
        let e =
            err(r#"{"Regions":{"900":{"Nodes":[{"HostName":"h","CertName":"sha256-raw:abc"}]}}}"#);
        assert!(e.contains("CertName") && e.contains("64 hex"), "{e}");
        let e = err(r#"{"Regions":{"900":{"Nodes":[{"HostName":"https://h"}]}}}"#);
        assert!(e.contains("without scheme"), "{e}");
        let e = err(
            r#"{"Regions":{"1":{"Nodes":[{"Name":"a","HostName":"h"}]},"2":{"Nodes":[{"Name":"a","HostName":"h"}]}}}"#,
        );
        assert!(e.contains("used twice"), "{e}");
    }

    #[test]
    fn from_url() {
        let m = RelayMap::from_url("http://127.0.0.1:3340", None).unwrap();
        let n = &m.region(900).unwrap().nodes[0];
        assert!(!n.uses_tls());
        assert_eq!(n.derp_port, 3340);
        assert_eq!(n.ipv4, AddrChoice::Fixed(Ipv4Addr::LOCALHOST));
        assert_eq!(n.url(), "http://127.0.0.1:3340/derp");
        let m = RelayMap::from_url("https://relay.example.com", None).unwrap();
        assert_eq!(m.region(900).unwrap().nodes[0].derp_port, 443);
        assert!(RelayMap::from_url("relay.example.com", None).is_err());
        assert!(RelayMap::from_url("http://h:x", None).is_err());
    }
}
