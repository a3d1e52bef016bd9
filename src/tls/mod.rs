//! TLS termination: PEM certificates and keys (read with `rustls-pki-types`' `PemObject`),
//! a check that each key matches its certificate, SNI choice among `[[tls.sni]]` entries, and
//! the rustls `ServerConfig`s (TLS 1.2 and 1.3; ALPN `h2`, with `[server] http2`, and
//! `http/1.1`): one per distinct client certificate setting, picked by SNI before the
//! handshake when names differ ([`TlsConfigs`]),
//! with the certificates `[acme]` ordered ahead of the files for their names;
//! [`stream`] runs connections and [`client_cert`] reads the identity a verified client
//! certificate gives.

pub(crate) mod client_cert;
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

use crate::config::{ClientAuth, ConfigError, Sourced, Tls};

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

/// The server configurations of one snapshot: the one for connections no `[[tls.sni]]` entry
/// with client certificate settings of its own picks, and those entries' own.
#[derive(Debug)]
pub(crate) struct TlsConfigs {
    default: Arc<ServerConfig>,
    /// Exact names, then `*.` suffixes, with settings of their own; empty: one configuration
    /// for all, and no need to read the ClientHello's name before the handshake.
    exact: HashMap<String, Arc<ServerConfig>>,
    wildcard: HashMap<String, Arc<ServerConfig>>,
    /// The certificates, for the questions asked before a handshake.
    resolver: Arc<SniResolver>,
    /// (name, notAfter) of every file certificate, for the expiry gauge.
    files: Vec<(String, i64)>,
}

impl TlsConfigs {
    /// Whether the ClientHello must be read before the handshake: the configuration depends
    /// on the SNI, or ACME may have to answer a challenge or refuse a name it has no
    /// certificate for yet.
    pub(crate) fn by_name(&self) -> bool {
        !self.exact.is_empty() || !self.wildcard.is_empty() || self.resolver.acme.is_some()
    }

    /// The TLS-ALPN-01 answer for `sni`, when a client asking for `acme-tls/1` is a
    /// validator of a pending order.
    pub(crate) fn challenge(&self, sni: Option<&str>) -> Option<Arc<ServerConfig>> {
        let acme = self.resolver.acme.as_ref()?;
        acme.challenge(&normalise(sni?))
    }

    /// Whether a certificate would be served for `sni`.
    pub(crate) fn can_serve(&self, sni: Option<&str>) -> bool {
        self.resolver.pick(sni).is_some()
    }

    /// (name, notAfter in Unix seconds) of every certificate loaded from files.
    pub(crate) fn file_expiry(&self) -> Vec<(String, i64)> {
        self.files.clone()
    }

    /// The configuration for a connection naming `sni`, chosen as the certificate is.
    pub(crate) fn pick(&self, sni: Option<&str>) -> &Arc<ServerConfig> {
        let Some(name) = sni else {
            return &self.default;
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(c) = self.exact.get(&name) {
            return c;
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(c) = self.wildcard.get(parent)
        {
            return c;
        }
        &self.default
    }

    /// The configuration when the name does not matter.
    pub(crate) fn any(&self) -> &Arc<ServerConfig> {
        &self.default
    }
}

/// The `reason` label of a failed handshake: `client_cert` when the client's certificate was
/// missing where required or did not verify, else `handshake`.
pub(crate) fn failure_reason(e: &std::io::Error) -> &'static str {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented) => {
            "client_cert"
        }
        _ => "handshake",
    }
}

/// Loads every certificate and client CA bundle of `tls` and builds the server
/// configurations; errors cite the config lines.
pub(crate) fn server_config(
    tls: &Tls,
    config_file: &std::path::Path,
    acme: Option<Arc<crate::acme::Certs>>,
    http2: bool,
) -> Result<Arc<TlsConfigs>, Vec<ConfigError>> {
    let provider = provider();
    let mut errors = Vec::new();
    let mut files = Vec::new();
    let note = |ck: &CertifiedKey, files: &mut Vec<(String, i64)>| {
        if let Some(leaf) = ck.cert.first()
            && let Some(at) = crate::acme::store::not_after_unix(leaf.as_ref())
        {
            for n in crate::acme::store::names_of(leaf.as_ref()) {
                if !files.iter().any(|(f, _)| *f == n) {
                    files.push((n, at));
                }
            }
        }
    };
    let mut default_missing = false;
    let default = match &tls.default {
        Some((cert, key)) => {
            let d = load_pair(cert, key, &provider, config_file, &mut errors);
            default_missing = d.is_none();
            d
        }
        None => None,
    };
    let mut exact = HashMap::new();
    let mut wildcard = HashMap::new();
    for sni in &tls.sni {
        if let Some(ck) = load_pair(&sni.cert, &sni.key, &provider, config_file, &mut errors) {
            note(&ck, &mut files);
            match sni.server_name.strip_prefix("*.") {
                Some(suffix) => wildcard.insert(suffix.to_string(), ck),
                None => exact.insert(sni.server_name.clone(), ck),
            };
        }
    }
    // Each distinct client certificate setting once: its verifier and its fingerprint.
    let mut verifiers: Vec<(Option<ClientAuth>, Option<Verifier>)> = Vec::new();
    let mut settings = vec![tls.client_auth.clone()];
    settings.extend(
        tls.sni
            .iter()
            .filter_map(|s| s.client_auth.clone().map(Some)),
    );
    for setting in settings {
        if verifiers.iter().any(|(s, _)| *s == setting) {
            continue;
        }
        let v = match &setting {
            None => None,
            Some(ca) => match verifier(ca, &provider, config_file) {
                Ok(v) => Some(v),
                Err(e) => {
                    errors.push(e);
                    None
                }
            },
        };
        verifiers.push((setting, v));
    }
    if default_missing || !errors.is_empty() {
        return Err(errors);
    }
    if let Some(d) = &default {
        note(d, &mut files);
    }
    let resolver = Arc::new(SniResolver {
        exact,
        wildcard,
        default,
        acme,
    });
    let mut built: Vec<(Option<ClientAuth>, Arc<ServerConfig>)> = Vec::new();
    for (setting, v) in verifiers {
        let c = one_config(
            tls,
            &provider,
            resolver.clone(),
            v.as_ref(),
            config_file,
            http2,
        )?;
        built.push((setting, c));
    }
    let config_for = |setting: &Option<ClientAuth>| {
        built
            .iter()
            .find(|(s, _)| s == setting)
            .map(|(_, c)| c.clone())
            .expect("every setting was built")
    };
    let mut configs = TlsConfigs {
        default: config_for(&tls.client_auth),
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        resolver,
        files,
    };
    // Every entry, with or without settings of its own, so the configuration is picked by
    // exactly the rule the certificate is (an exact name beats a wildcard with settings).
    let any_own = tls.sni.iter().any(|s| s.client_auth.is_some());
    for sni in tls.sni.iter().filter(|_| any_own) {
        let c = match &sni.client_auth {
            Some(own) => config_for(&Some(own.clone())),
            None => config_for(&tls.client_auth),
        };
        match sni.server_name.strip_prefix("*.") {
            Some(suffix) => configs.wildcard.insert(suffix.to_string(), c),
            None => configs.exact.insert(sni.server_name.clone(), c),
        };
    }
    Ok(Arc::new(configs))
}

/// A client certificate verifier and the fingerprint of what it accepts.
struct Verifier {
    verifier: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    /// SHA-256 over the bundle's certificates and the mode: sessions resume only under the
    /// setting they were made under.
    fingerprint: [u8; 32],
}

/// Reads a `client_ca` bundle and builds its verifier: chain to one of its CAs, validity
/// dates, and the `clientAuth` extended key usage when the certificate lists usages.
fn verifier(
    ca: &ClientAuth,
    provider: &Arc<CryptoProvider>,
    file: &std::path::Path,
) -> Result<Verifier, ConfigError> {
    let err = |message: String| ConfigError {
        file: file.to_path_buf(),
        line: ca.ca.line,
        key: ca.ca.key.clone(),
        message,
    };
    let path = &ca.ca.value;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))
        .and_then(|it| {
            it.collect::<Result<Vec<_>, _>>()
                .map_err(|e| pem_error(path, e))
        })
        .map_err(err)?;
    if certs.is_empty() {
        return Err(err(format!(
            "{}: no CERTIFICATE in the file",
            path.display()
        )));
    }
    let mut roots = rustls::RootCertStore::empty();
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    for c in &certs {
        roots.add(c.clone()).map_err(|e| {
            err(format!(
                "{}: not a usable CA certificate: {e}",
                path.display()
            ))
        })?;
        digest.update(c.as_ref());
    }
    digest.update(if ca.required {
        b"required"
    } else {
        b"optional"
    });
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    let builder = if ca.required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    let verifier = builder
        .build()
        .map_err(|e| err(format!("{}: {e}", path.display())))?;
    let mut fingerprint = [0u8; 32];
    fingerprint.copy_from_slice(digest.finish().as_ref());
    Ok(Verifier {
        verifier,
        fingerprint,
    })
}

/// One `ServerConfig`: every certificate, and the client certificate setting `verifier`.
fn one_config(
    tls: &Tls,
    provider: &Arc<CryptoProvider>,
    resolver: Arc<SniResolver>,
    verifier: Option<&Verifier>,
    config_file: &std::path::Path,
    http2: bool,
) -> Result<Arc<ServerConfig>, Vec<ConfigError>> {
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| {
            vec![ConfigError {
                file: config_file.to_path_buf(),
                line: 0,
                key: "tls".into(),
                message: format!("TLS setup failed: {e}"),
            }]
        })?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v.verifier.clone()),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(resolver);
    // `ignore_client_order`: h2 whenever the client offers it, as every peer does.
    config.alpn_protocols = if http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config.ignore_client_order = true;
    if tls.session_tickets {
        // Stateless tickets: resumption costs no server memory however many clients return.
        config.ticketer = ticketer(verifier.map(|v| v.fingerprint)).map_err(|e| {
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

/// The ticket key rotator for connections under one client certificate setting (`None`: no
/// client certificates), kept for the process's life.
///
/// A reload builds new `ServerConfig`s; with a new ticketer each time, every ticket issued
/// before it would stop resuming and a whole fleet would pay full handshakes at once. ring's
/// `Ticketer` rotates its own keys (every six hours), so keeping it does not keep one key
/// forever. A setting gets a rotator of its own, so a session (with the certificate rustls
/// keeps in it, or without one) resumes only under the bundle and mode it was verified under:
/// after a reload that removes its CA, or makes a certificate required where it was not, its
/// ticket no longer decrypts and the client goes through a full handshake.
fn ticketer(
    setting: Option<[u8; 32]>,
) -> Result<Arc<dyn rustls::server::ProducesTickets>, rustls::Error> {
    type Tickets = HashMap<Option<[u8; 32]>, Arc<dyn rustls::server::ProducesTickets>>;
    static TICKETERS: std::sync::OnceLock<std::sync::Mutex<Tickets>> = std::sync::OnceLock::new();
    let mut map = TICKETERS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(t) = map.get(&setting) {
        return Ok(t.clone());
    }
    let fresh = rustls::crypto::ring::Ticketer::new()?;
    map.insert(setting, fresh.clone());
    Ok(fresh)
}

/// Picks the certificate for the client's SNI: the one ACME ordered for the name, then the
/// exact name's file, then a `*.` wildcard, then the default (when there is one).
#[derive(Debug)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
    acme: Option<Arc<crate::acme::Certs>>,
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl SniResolver {
    fn pick(&self, sni: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = normalise(name);
        if let Some(acme) = &self.acme
            && let Some(ck) = acme.get(&name)
        {
            return Some(ck);
        }
        if let Some(ck) = self.exact.get(&name) {
            return Some(ck.clone());
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(ck) = self.wildcard.get(parent)
        {
            return Some(ck.clone());
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
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
