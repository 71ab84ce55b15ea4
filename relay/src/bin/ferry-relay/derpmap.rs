//! The DERP map entry of one relay, as Tailscale (`tailcfg.DERPMap` JSON: the policy file's
//! `derpMap`, derpprobe's `-derp-map`) and Headscale (a YAML file under `derp.paths`, read with
//! gopkg.in/yaml.v3 into the same Go structs, hence the lower-cased field names) want it.

use std::fmt::Write;

use anyhow::{bail, Context, Result};
use ferry_relay::server::{cert_name_pin, TlsConfig};

use crate::cli::{DerpmapArgs, MapFormat};
use crate::resolve::Resolved;

/// `ferry-relay derpmap`: this relay's region, from the same resolver and checks as the relay.
/// Reads the self-signed certificate if there is one; creates nothing.
pub(crate) fn command(args: DerpmapArgs, r: Resolved) -> Result<()> {
    r.check()?;
    let entry = entry(&r)?;
    match args.format {
        MapFormat::Json => println!("{}", entry.to_json()),
        MapFormat::Headscale => print!("{}", entry.to_headscale_yaml()),
    }
    // A DERP map has no field for a UDP relay (ferry clients learn the port when they
    // allocate over DERP), so say it beside the map: the port must be open too.
    if let Some(u) = &r.view().udp_relay {
        let port = match u.advertise.first().map_or(u.listen.port(), |a| a.port()) {
            0 => "an ephemeral port (the relay's ready line names it)".to_string(),
            p => format!("{p}/udp"),
        };
        eprintln!(
            "ferry-relay derpmap: the UDP relay listens on {port} (not part of the map: ferry clients learn it when they allocate over DERP); open it beside STUN in firewalls and load balancers, or turn it off with --udp-relay-listen off"
        );
    }
    Ok(())
}

/// The region entry of a resolved configuration.
fn entry(r: &Resolved) -> Result<RegionEntry> {
    let c = r.view();
    let dm = &r.derpmap;
    let Some(host) = c.hostname.clone() else {
        bail!("the DERP map needs the name clients use: set --hostname (FERRY_HOSTNAME, or `hostname` in the config file)");
    };
    let stun_port = c
        .stun
        .as_ref()
        .and_then(|s| s.udp_addrs.first())
        .map_or(-1, |a| i32::from(a.port()));
    let region_id = dm.region_id.unwrap_or(900);
    let region_code = dm.region_code.clone().unwrap_or_else(|| "ferry".into());
    if r.dev {
        eprintln!("ferry-relay derpmap: --dev serves plain HTTP; Tailscale clients expect TLS, so this map is for local tests only");
    }
    let cert_name = match &c.tls {
        Some(TlsConfig::SelfSigned { dir, .. }) => {
            let p = ferry_relay::server::tls::self_signed_cert_path(dir);
            let pem = match std::fs::read(&p) {
                Ok(b) => b,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                    "the self-signed certificate {} does not exist yet: start the relay once to create it, then run derpmap again (its CertName pin goes into the map)",
                    p.display()
                ),
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!("cannot read the self-signed certificate {}", p.display())
                    })
                }
            };
            let der = rustls_pemfile::certs(&mut &pem[..])
                .next()
                .and_then(|c| c.ok())
                .with_context(|| format!("{} holds no PEM certificate; delete it and start the relay to create a new one (the pin changes)", p.display()))?;
            Some(cert_name_pin(&der))
        }
        _ => None,
    };
    Ok(RegionEntry {
        region_id,
        region_name: dm
            .region_name
            .clone()
            .unwrap_or_else(|| region_code.clone()),
        region_code,
        node_name: dm
            .node_name
            .clone()
            .unwrap_or_else(|| format!("{region_id}a")),
        ipv4: dm
            .ipv4
            .or_else(|| host.parse().ok())
            .map(|ip: std::net::Ipv4Addr| ip.to_string()),
        ipv6: dm
            .ipv6
            .or_else(|| host.parse().ok())
            .map(|ip: std::net::Ipv6Addr| ip.to_string()),
        host_name: host,
        derp_port: dm.derp_port.unwrap_or(c.listen.port()),
        stun_port: dm.stun_port.unwrap_or(stun_port),
        cert_name,
    })
}

/// One region with one node: what `ferry-relay derpmap` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RegionEntry {
    /// `RegionID` (Tailscale's own regions are below 900).
    pub(crate) region_id: u32,
    /// `RegionCode`, short, e.g. "ferry" or "fra".
    pub(crate) region_code: String,
    /// `RegionName`, for people.
    pub(crate) region_name: String,
    /// The node's `Name`, e.g. "900a".
    pub(crate) node_name: String,
    /// `HostName` clients dial (and verify the certificate against, unless pinned).
    pub(crate) host_name: String,
    /// `IPv4`, if known: clients then skip DNS.
    pub(crate) ipv4: Option<String>,
    /// `IPv6`, if known.
    pub(crate) ipv6: Option<String>,
    /// Public DERP port (`DERPPort`).
    pub(crate) derp_port: u16,
    /// Public STUN port (`STUNPort`); -1 when STUN is off.
    pub(crate) stun_port: i32,
    /// `CertName`: `sha256-raw:<hex>` pins a self-signed certificate.
    pub(crate) cert_name: Option<String>,
}

impl RegionEntry {
    /// `{"Regions":{"<id>":{...}}}`, Tailscale's DERPMap JSON.
    pub(crate) fn to_json(&self) -> String {
        let mut node = serde_json::Map::new();
        node.insert("Name".into(), self.node_name.clone().into());
        node.insert("RegionID".into(), self.region_id.into());
        node.insert("HostName".into(), self.host_name.clone().into());
        if let Some(c) = &self.cert_name {
            node.insert("CertName".into(), c.clone().into());
        }
        if let Some(ip) = &self.ipv4 {
            node.insert("IPv4".into(), ip.clone().into());
        }
        if let Some(ip) = &self.ipv6 {
            node.insert("IPv6".into(), ip.clone().into());
        }
        node.insert("STUNPort".into(), self.stun_port.into());
        node.insert("DERPPort".into(), self.derp_port.into());
        let region = serde_json::json!({
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
            "Nodes": [node],
        });
        let map = serde_json::json!({ "Regions": { self.region_id.to_string(): region } });
        serde_json::to_string_pretty(&map).expect("JSON of plain values")
    }

    /// Headscale's derp.yaml (`derp.paths`): the same fields, lower-cased.
    pub(crate) fn to_headscale_yaml(&self) -> String {
        // JSON strings are valid YAML double-quoted scalars.
        let q = |s: &str| serde_json::to_string(s).expect("a string");
        let mut y = String::new();
        let _ = writeln!(y, "regions:");
        let _ = writeln!(y, "  {}:", self.region_id);
        let _ = writeln!(y, "    regionid: {}", self.region_id);
        let _ = writeln!(y, "    regioncode: {}", q(&self.region_code));
        let _ = writeln!(y, "    regionname: {}", q(&self.region_name));
        let _ = writeln!(y, "    nodes:");
        let _ = writeln!(y, "      - name: {}", q(&self.node_name));
        let _ = writeln!(y, "        regionid: {}", self.region_id);
        let _ = writeln!(y, "        hostname: {}", q(&self.host_name));
        if let Some(c) = &self.cert_name {
            let _ = writeln!(y, "        certname: {}", q(c));
        }
        if let Some(ip) = &self.ipv4 {
            let _ = writeln!(y, "        ipv4: {}", q(ip));
        }
        if let Some(ip) = &self.ipv6 {
            let _ = writeln!(y, "        ipv6: {}", q(ip));
        }
        let _ = writeln!(y, "        stunport: {}", self.stun_port);
        let _ = writeln!(y, "        derpport: {}", self.derp_port);
        y
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> RegionEntry {
        RegionEntry {
            region_id: 901,
            region_code: "nyc".into(),
            region_name: "ferry New York".into(),
            node_name: "901a".into(),
            host_name: "nyc.derp.example.com".into(),
            ipv4: Some("203.0.113.10".into()),
            ipv6: None,
            derp_port: 443,
            stun_port: -1,
            cert_name: Some(format!("sha256-raw:{}", "ab".repeat(32))),
        }
    }

    #[test]
    fn json_has_tailscale_field_names() {
        let v: serde_json::Value = serde_json::from_str(&entry().to_json()).unwrap();
        let r = &v["Regions"]["901"];
        assert_eq!(r["RegionID"], 901);
        assert_eq!(r["RegionCode"], "nyc");
        let n = &r["Nodes"][0];
        assert_eq!(n["Name"], "901a");
        assert_eq!(n["RegionID"], 901);
        assert_eq!(n["HostName"], "nyc.derp.example.com");
        assert_eq!(n["IPv4"], "203.0.113.10");
        assert!(n.get("IPv6").is_none());
        assert_eq!(n["STUNPort"], -1);
        assert_eq!(n["DERPPort"], 443);
        assert!(n["CertName"].as_str().unwrap().starts_with("sha256-raw:"));
    }

    #[test]
    fn yaml_is_headscales_lowercase_form() {
        let y = entry().to_headscale_yaml();
        assert!(
            y.starts_with("regions:\n  901:\n    regionid: 901\n"),
            "{y}"
        );
        for line in [
            "    regioncode: \"nyc\"",
            "    regionname: \"ferry New York\"",
            "      - name: \"901a\"",
            "        regionid: 901",
            "        hostname: \"nyc.derp.example.com\"",
            "        ipv4: \"203.0.113.10\"",
            "        stunport: -1",
            "        derpport: 443",
        ] {
            assert!(y.lines().any(|l| l == line), "{line:?} missing:\n{y}");
        }
        assert!(y.contains("        certname: \"sha256-raw:"), "{y}");
    }
}
