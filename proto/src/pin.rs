//! The DERP map's `CertName`: either the name a node's certificate must carry, or
//! `sha256-raw:<64 hex>`, the SHA-256 of a self-signed leaf certificate's DER (what ferry-relay
//! logs at start and `ferry-relay derpmap` prints). With the `rustls` feature, [`tls`] has the
//! certificate verifier that accepts exactly the pinned leaf.

use std::fmt;
use std::str::FromStr;

use sha2::Digest;

/// What comes before the hex of a pin.
pub const PIN_PREFIX: &str = "sha256-raw:";

/// The SHA-256 of a leaf certificate's DER.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CertPin(pub [u8; 32]);

impl CertPin {
    /// The pin of a DER-encoded certificate.
    pub fn from_der(leaf_der: &[u8]) -> CertPin {
        CertPin(sha2::Sha256::digest(leaf_der).into())
    }

    /// The 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Whether `leaf_der` is the pinned certificate.
    pub fn matches(&self, leaf_der: &[u8]) -> bool {
        *self == CertPin::from_der(leaf_der)
    }
}

impl fmt::Display for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PIN_PREFIX}{}", hex::encode(self.0))
    }
}

impl fmt::Debug for CertPin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a pin or a CertName did not parse. The messages name the value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PinError {
    /// No `sha256-raw:` prefix.
    #[error("{0:?} does not start with `sha256-raw:`")]
    NoPrefix(String),
    /// Not 64 hex characters after the prefix.
    #[error("{0:?} is not sha256-raw: followed by 64 hex characters (32 bytes)")]
    BadHex(String),
    /// An empty CertName.
    #[error("CertName is empty; leave it out instead")]
    Empty,
}

impl FromStr for CertPin {
    type Err = PinError;
    fn from_str(s: &str) -> Result<Self, PinError> {
        let hex_part = s
            .strip_prefix(PIN_PREFIX)
            .ok_or_else(|| PinError::NoPrefix(s.to_string()))?;
        let bytes = hex::decode(hex_part).map_err(|_| PinError::BadHex(s.to_string()))?;
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| PinError::BadHex(s.to_string()))?;
        Ok(CertPin(pin))
    }
}

/// A node's `CertName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertName {
    /// The certificate must be valid for this name (instead of the node's `HostName`).
    Name(String),
    /// The leaf certificate must be exactly this one (self-signed relays).
    Pin(CertPin),
}

impl CertName {
    /// The pin, if this is one.
    pub fn pin(&self) -> Option<CertPin> {
        match self {
            CertName::Pin(p) => Some(*p),
            CertName::Name(_) => None,
        }
    }
}

impl FromStr for CertName {
    type Err = PinError;
    /// `sha256-raw:<64 hex>` is a pin; anything else that is not empty is a name.
    fn from_str(s: &str) -> Result<Self, PinError> {
        if s.starts_with(PIN_PREFIX) {
            s.parse().map(CertName::Pin)
        } else if s.is_empty() {
            Err(PinError::Empty)
        } else {
            Ok(CertName::Name(s.to_string()))
        }
    }
}

impl fmt::Display for CertName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CertName::Name(n) => f.write_str(n),
            CertName::Pin(p) => fmt::Display::fmt(p, f),
        }
    }
}

/// Certificate verifiers for rustls clients.
#[cfg(feature = "rustls")]
pub mod tls {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::crypto::CryptoProvider;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    use super::CertPin;

    /// Accepts exactly the leaf certificate whose SHA-256 is the pin: chain, name and dates are
    /// not checked (the pin is stronger than all three), but the handshake signatures are, so
    /// the server must hold the certificate's key. Without a pin it accepts any leaf (still
    /// checking signatures): for test tools only, see [`PinVerifier::any_leaf`].
    #[derive(Debug)]
    pub struct PinVerifier {
        pin: Option<CertPin>,
        provider: Arc<CryptoProvider>,
        what: &'static str,
        hint: &'static str,
    }

    impl PinVerifier {
        /// Accepts the leaf pinned by `pin`. A mismatch reads "certificate pin mismatch:
        /// {what} is sha256-raw:… but the server presented sha256-raw:…{hint}".
        pub fn new(
            pin: CertPin,
            provider: Arc<CryptoProvider>,
            what: &'static str,
            hint: &'static str,
        ) -> Self {
            PinVerifier {
                pin: Some(pin),
                provider,
                what,
                hint,
            }
        }

        /// Accepts any leaf certificate (handshake signatures are still verified). Only for
        /// tools that are told to (a load tester's `--insecure`).
        pub fn any_leaf(provider: Arc<CryptoProvider>) -> Self {
            PinVerifier {
                pin: None,
                provider,
                what: "",
                hint: "",
            }
        }
    }

    impl ServerCertVerifier for PinVerifier {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            match self.pin {
                Some(pin) if !pin.matches(end_entity.as_ref()) => {
                    Err(rustls::Error::General(format!(
                        "certificate pin mismatch: {} is {pin} but the server presented {}{}",
                        self.what,
                        CertPin::from_der(end_entity.as_ref()),
                        self.hint
                    )))
                }
                _ => Ok(ServerCertVerified::assertion()),
            }
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.provider.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.provider
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_format_parse_and_match() {
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let der = cert.cert.der().to_vec();
        let pin = CertPin::from_der(&der);
        let text = pin.to_string();
        assert!(
            text.starts_with("sha256-raw:") && text.len() == 11 + 64,
            "{text}"
        );
        assert_eq!(text.parse::<CertPin>().unwrap(), pin);
        assert_eq!(
            text.to_uppercase()
                .replace("SHA256-RAW", "sha256-raw")
                .parse::<CertPin>()
                .unwrap(),
            pin
        );
        assert!(pin.matches(&der));
        assert!(!pin.matches(b"another"));
        assert_eq!(text.parse::<CertName>().unwrap(), CertName::Pin(pin));
        assert_eq!(CertName::Pin(pin).to_string(), text);
    }

    #[test]
    fn bad_pins_and_names_say_what_is_wrong() {
        let e = "sha256-raw:abcd"
            .parse::<CertName>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("64 hex") && e.contains("abcd"), "{e}");
        let e = "sha256-raw:zz".parse::<CertPin>().unwrap_err();
        assert!(matches!(e, PinError::BadHex(_)));
        assert!(matches!(
            "relay.example".parse::<CertPin>(),
            Err(PinError::NoPrefix(_))
        ));
        assert_eq!("".parse::<CertName>(), Err(PinError::Empty));
        assert_eq!(
            "relay.example".parse::<CertName>().unwrap(),
            CertName::Name("relay.example".into())
        );
    }
}
