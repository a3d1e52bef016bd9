//! TLS termination: PEM certificates and keys (read with `rustls-pki-types`' `PemObject`),
//! a check that each key matches its certificate, SNI choice among `[[tls.sni]]` entries, and
//! the rustls `ServerConfig` (TLS 1.2 and 1.3, ALPN `http/1.1`); [`stream`] runs connections.

pub(crate) mod stream;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::{ConfigError, Sourced, Tls};

/// The crypto provider wsgate uses everywhere.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    // AES-128-GCM first: as strong in practice and cheaper per record than AES-256-GCM.
    p.cipher_suites.sort_by_key(|s| match s.suite() {
        rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
        rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256 => 2,
        _ => 3,
    });
    // Key exchange from aws-lc-rs: its X25519 takes about half of ring's time (32 against
    // 59 µs per handshake here, the largest single cost of a new connection), and it adds
    // the post-quantum X25519MLKEM768 hybrid that current browsers offer first. The client's
    // order picks among these, as usual.
    p.kx_groups = vec![
        rustls::crypto::aws_lc_rs::kx_group::X25519MLKEM768,
        rustls::crypto::aws_lc_rs::kx_group::X25519,
        rustls::crypto::ring::kx_group::SECP256R1,
        rustls::crypto::ring::kx_group::SECP384R1,
    ];
    // aws-lc seeds its random generator from CPU jitter on first use, about 30 ms: done here,
    // at start-up, rather than inside the first client's handshake.
    static SEED: std::sync::Once = std::sync::Once::new();
    SEED.call_once(|| drop(rustls::crypto::aws_lc_rs::kx_group::X25519.start()));
    Arc::new(p)
}

/// Loads every certificate of `tls` and builds the server configuration; errors cite the
/// config lines.
pub(crate) fn server_config(
    tls: &Tls,
    config_file: &std::path::Path,
) -> Result<Arc<ServerConfig>, Vec<ConfigError>> {
    let provider = provider();
    let mut errors = Vec::new();
    let default = load_pair(&tls.cert, &tls.key, &provider, config_file, &mut errors);
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for sni in &tls.sni {
        if let Some(ck) = load_pair(&sni.cert, &sni.key, &provider, config_file, &mut errors) {
            match sni.server_name.strip_prefix("*.") {
                Some(suffix) => wildcard.insert(suffix.to_string(), ck),
                None => exact.insert(sni.server_name.clone(), ck),
            };
        }
    }
    let Some(default) = default else {
        return Err(errors);
    };
    if !errors.is_empty() {
        return Err(errors);
    }
    let resolver = SniResolver {
        exact,
        wildcard,
        default,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| {
            vec![ConfigError {
                file: config_file.to_path_buf(),
                line: 0,
                key: "tls".into(),
                message: format!("TLS setup failed: {e}"),
            }]
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config.ignore_client_order = true;
    if tls.session_tickets {
        // Stateless tickets: resumption costs no server memory however many clients return.
        config.ticketer = ticketer().map_err(|e| {
            vec![ConfigError {
                file: config_file.to_path_buf(),
                line: 0,
                key: "tls.session_tickets".into(),
                message: format!("cannot set up session tickets: {e}"),
            }]
        })?;
    } else {
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

/// The process's one ticket key rotator, shared by every `ServerConfig` it builds.
///
/// A reload builds a new `ServerConfig`; with a new ticketer each time, every ticket issued
/// before it would stop resuming and a whole fleet would pay full handshakes at once. ring's
/// `Ticketer` rotates its own keys (every six hours), so keeping it for the process's life
/// does not keep one key forever.
fn ticketer() -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    static TICKETER: std::sync::OnceLock<Arc<dyn rustls::server::ProducesTickets>> =
        std::sync::OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let fresh = rustls::crypto::ring::Ticketer::new()?;
    Ok(TICKETER.get_or_init(|| fresh).clone())
}

/// Picks the certificate for the client's SNI: exact name, then `*.` wildcard, then default.
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = hello.server_name() else {
            return Some(self.default.clone());
        };
        let name = name.to_ascii_lowercase();
        if let Some(ck) = self.exact.get(&name) {
            return Some(ck.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(ck) = self.wildcard.get(parent)
        {
            return Some(ck.clone());
        }
        Some(self.default.clone())
    }
}

fn load_pair(
    cert: &Sourced<PathBuf>,
    key: &Sourced<PathBuf>,
    provider: &CryptoProvider,
    file: &std::path::Path,
    errors: &mut Vec<ConfigError>,
) -> Option<Arc<CertifiedKey>> {
    let err = |s: &Sourced<PathBuf>, message: String| ConfigError {
        file: file.to_path_buf(),
        line: s.line,
        key: s.key.clone(),
        message,
    };
    let chain = match CertificateDer::pem_file_iter(&cert.value)
        .map_err(|e| pem_error(&cert.value, e))
        .and_then(|it| {
            it.collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(&cert.value, e))
        }) {
        Ok(c) if c.is_empty() => {
            errors.push(err(
                cert,
                format!("{}: no CERTIFICATE in the file", cert.value.display()),
            ));
            None
        }
        Ok(c) => Some(c),
        Err(msg) => {
            errors.push(err(cert, msg));
            None
        }
    };
    let private = match PrivateKeyDer::from_pem_file(&key.value) {
        Ok(k) => Some(k),
        Err(rustls_pki_types::pem::Error::NoItemsFound) => {
            errors.push(err(
                key,
                format!(
                    "{}: no private key (PKCS#8, PKCS#1 or SEC1) in the file",
                    key.value.display()
                ),
            ));
            None
        }
        Err(e) => {
            errors.push(err(key, pem_error(&key.value, e)));
            None
        }
    };
    let (chain, private) = (chain?, private?);
    match CertifiedKey::from_der(chain, private, provider) {
        Ok(ck) => Some(Arc::new(ck)),
        Err(rustls::Error::InconsistentKeys(_)) => {
            errors.push(err(
                key,
                format!(
                    "{} does not match the certificate {}",
                    key.value.display(),
                    cert.value.display()
                ),
            ));
            None
        }
        Err(e) => {
            errors.push(err(key, format!("{}: {e}", key.value.display())));
            None
        }
    }
}

fn pem_error(path: &std::path::Path, e: rustls_pki_types::pem::Error) -> String {
    match e {
        rustls_pki_types::pem::Error::Io(io) => format!("{}: cannot read: {io}", path.display()),
        other => format!("{}: not valid PEM: {other:?}", path.display()),
    }
}
