//! TLS for listeners and bridges, with rustls (ring provider; TLS 1.2 and 1.3 only).
//!
//! Listeners: `[[listener]] tls = { cert, key, client_ca, use_identity_as_username }`.
//! With `client_ca` every client must present a certificate signed by that CA; with
//! `use_identity_as_username` the certificate's subject CN becomes the client's user name
//! (for ACL `user` blocks and `%u`), replacing whatever user name the CONNECT carried, and
//! no password is checked: the certificate is the credential.
//!
//! Each TLS listener holds its current `ServerConfig` behind a lock that is read once per
//! accepted connection; [`TlsListener::reload`] (SIGHUP in the daemon) reads the files again
//! and swaps it in. Connections already open keep the session they negotiated; a reload
//! that fails (missing file, key not matching, bad PEM) keeps the old config.
//!
//! Bridges: [`client_config`] builds the upstream `ClientConfig` from a CA file or the
//! system's roots, with an optional client certificate (mutual TLS). rumqttc sends the
//! address's host as SNI and checks the server certificate against it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// `tls = { ... }` of a `[[listener]]`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, the server's own certificate first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate(s): when set, clients must present a certificate it signed.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// The client certificate's subject CN is the user name (needs `client_ca`).
    #[serde(default)]
    pub use_identity_as_username: bool,
}

/// One listener (`[[listener]]`): where to bind, and TLS settings if it speaks MQTT over TLS
/// (`tls = { cert, key, client_ca, use_identity_as_username }`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub bind: SocketAddr,
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl From<SocketAddr> for ListenerConfig {
    /// A plain TCP listener.
    fn from(bind: SocketAddr) -> Self {
        ListenerConfig { bind, tls: None }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("{0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        message: message.to_string(),
    }
}

/// The one crypto provider used everywhere (never the process default, so nothing depends
/// on which rustls features other crates enable).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Every certificate in a PEM file (at least one).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// The first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_error(path, format!("no usable PEM private key: {e}")))
}

/// The CA certificates of a PEM file as a root store.
pub fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Reads the files of a listener's `tls` and builds its server config.
pub fn server_config(settings: &TlsConfig) -> Result<Arc<ServerConfig>, TlsError> {
    if settings.use_identity_as_username && settings.client_ca.is_none() {
        return Err(TlsError::Config(
            "use_identity_as_username needs client_ca (clients must present a certificate)".into(),
        ));
    }
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match &settings.client_ca {
        Some(ca) => {
            let roots = load_roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| file_error(ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let certs = load_certs(&settings.cert)?;
    let key = load_key(&settings.key)?;
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "{} and {}: {e}",
            settings.cert.display(),
            settings.key.display()
        ))
    })?;
    Ok(Arc::new(config))
}

/// `tls` of a `[[bridge]]`: the CA to trust (none: the system's roots) and an optional
/// client certificate and key.
pub fn client_config(
    ca_file: Option<&Path>,
    client_auth: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = match ca_file {
        Some(path) => load_roots(path)?,
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "none found".into());
                return Err(TlsError::Config(format!(
                    "no system CA certificates ({why}): set the bridge's tls.ca_file"
                )));
            }
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client_auth {
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
            .map_err(|e| {
                TlsError::Config(format!("{} and {}: {e}", cert.display(), key.display()))
            })?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// A TLS listener's settings and its current server config (swapped by `reload`).
pub struct TlsListener {
    settings: TlsConfig,
    current: RwLock<TlsAcceptor>,
}

impl TlsListener {
    /// Reads the certificate files; errors name the file.
    pub fn new(settings: TlsConfig) -> Result<TlsListener, TlsError> {
        let config = server_config(&settings)?;
        Ok(TlsListener {
            settings,
            current: RwLock::new(TlsAcceptor::from(config)),
        })
    }

    pub fn settings(&self) -> &TlsConfig {
        &self.settings
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reads the files again and uses them for new connections. On error the config in
    /// use is kept.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = server_config(&self.settings)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = TlsAcceptor::from(config);
        Ok(())
    }
}

/// The first common name (OID 2.5.4.3) in the subject of a DER X.509 certificate. Only
/// what rustls has already verified is passed here; anything unexpected gives `None`.
pub fn common_name(der: &[u8]) -> Option<String> {
    let (0x30, certificate, _) = der_next(der)? else {
        return None;
    };
    let (0x30, tbs, _) = der_next(certificate)? else {
        return None;
    };
    let mut rest = tbs;
    // version [0] EXPLICIT (absent in v1 certificates)
    if let (0xa0, _, after) = der_next(rest)? {
        rest = after;
    }
    // serialNumber, signature, issuer, validity
    for _ in 0..4 {
        rest = der_next(rest)?.2;
    }
    let (0x30, mut names, _) = der_next(rest)? else {
        return None;
    };
    while !names.is_empty() {
        let (tag, mut set, after) = der_next(names)?;
        names = after;
        if tag != 0x31 {
            return None;
        }
        while !set.is_empty() {
            let (tag, attribute, after) = der_next(set)?;
            set = after;
            if tag != 0x30 {
                return None;
            }
            let (0x06, oid, value) = der_next(attribute)? else {
                return None;
            };
            if oid != [0x55, 0x04, 0x03] {
                continue;
            }
            let (tag, value, _) = der_next(value)?;
            return match tag {
                // UTF8String, PrintableString, IA5String
                0x0c | 0x13 | 0x16 => std::str::from_utf8(value).ok().map(str::to_string),
                // TeletexString: read as Latin-1
                0x14 => Some(value.iter().map(|&b| char::from(b)).collect()),
                // BMPString: UTF-16BE
                0x1e if value.len() % 2 == 0 => String::from_utf16(
                    &value
                        .chunks(2)
                        .map(|c| u16::from_be_bytes([c[0], c[1]]))
                        .collect::<Vec<_>>(),
                )
                .ok(),
                _ => None,
            };
        }
    }
    None
}

/// One DER element: (tag, contents, the bytes after it). Single-byte tags only.
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, &b| (acc << 8) | usize::from(b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER of one element with a short or long length.
    fn tlv(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if body.len() < 0x80 {
            out.push(body.len() as u8);
        } else {
            out.push(0x82);
            out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    fn name(attributes: &[(&[u8], u8, &[u8])]) -> Vec<u8> {
        let mut rdns = Vec::new();
        for (oid, tag, value) in attributes {
            let atv = [tlv(0x06, oid), tlv(*tag, value)].concat();
            rdns.extend(tlv(0x31, &tlv(0x30, &atv)));
        }
        tlv(0x30, &rdns)
    }

    fn certificate(subject: &[u8], with_version: bool) -> Vec<u8> {
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[1, 2, 3]));
        tbs.extend(tlv(0x30, &tlv(0x06, &[0x2a, 0x86, 0x48])));
        tbs.extend(name(&[(&[0x55, 4, 3], 0x0c, b"Issuer CA")]));
        tbs.extend(tlv(
            0x30,
            &[tlv(0x17, b"250101000000Z"), tlv(0x17, b"350101000000Z")].concat(),
        ));
        tbs.extend_from_slice(subject);
        tbs.extend(tlv(0x30, &[0u8; 200]));
        tlv(
            0x30,
            &[tlv(0x30, &tbs), tlv(0x30, &[]), tlv(0x03, &[0, 1, 2])].concat(),
        )
    }

    #[test]
    fn common_name_is_read_from_the_subject_not_the_issuer() {
        let subject = name(&[
            (&[0x55, 4, 6], 0x13, b"DE"),
            (&[0x55, 4, 3], 0x0c, b"sensor-17"),
        ]);
        assert_eq!(
            common_name(&certificate(&subject, true)).as_deref(),
            Some("sensor-17")
        );
        assert_eq!(
            common_name(&certificate(&subject, false)).as_deref(),
            Some("sensor-17")
        );
        let printable = name(&[(&[0x55, 4, 3], 0x13, b"dev1")]);
        assert_eq!(
            common_name(&certificate(&printable, true)).as_deref(),
            Some("dev1")
        );
        let bmp = name(&[(&[0x55, 4, 3], 0x1e, &[0, b'a', 0, b'b'])]);
        assert_eq!(common_name(&certificate(&bmp, true)).as_deref(), Some("ab"));
        let no_cn = name(&[(&[0x55, 4, 10], 0x0c, b"Org")]);
        assert_eq!(common_name(&certificate(&no_cn, true)), None);
    }

    #[test]
    fn truncated_or_garbage_der_gives_none() {
        let subject = name(&[(&[0x55, 4, 3], 0x0c, b"sensor-17")]);
        let cert = certificate(&subject, true);
        for cut in 0..cert.len() {
            let _ = common_name(&cert[..cut]);
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[]), None);
    }

    #[test]
    fn bridge_system_roots_or_an_error_naming_ca_file() {
        // `tls = true`: the system's CA certificates (Debian's ca-certificates), or, on a
        // machine without them, an error that says what to set instead.
        match client_config(None, None) {
            Ok(config) => assert!(config.alpn_protocols.is_empty()),
            Err(e) => assert!(e.to_string().contains("ca_file"), "{e}"),
        }
        let err = client_config(Some(Path::new("/nonexistent/ca.pem")), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn missing_files_are_named() {
        let settings = TlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            use_identity_as_username: false,
        };
        let err = server_config(&settings).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/cert.pem"), "{err}");
        let err = server_config(&TlsConfig {
            use_identity_as_username: true,
            ..settings
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("client_ca"), "{err}");
    }
}
