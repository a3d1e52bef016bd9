//! JSON Web Key Sets: parsed once into verifying keys ([`KeySet`]), read from `jwks_file` with
//! the configuration, or kept fresh from `jwks_url` by a background task per URL
//! ([`UrlKeys`]). The fetched keys outlive reloads: the [`Registry`] hands a reload the store it
//! already has for the same URL, and a store's task ends when no configuration uses it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::jwk::{AlgorithmParameters, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};
use tokio::sync::Notify;

/// Largest JWKS document accepted.
const MAX_JWKS: usize = 1 << 20;
/// A fetch that takes longer has failed.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// An unknown `kid` triggers a refresh at most this often.
const EARLY_REFRESH: Duration = Duration::from_secs(30);
/// Retries of a failing fetch back off up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// One verifying key.
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    /// The algorithm the JWK declares, if it declares one.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) key: DecodingKey,
}

/// The usable keys of a JWKS (symmetric `oct` keys are never taken from a key set: HMAC
/// secrets come from `secret_file` only).
pub(crate) struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS document; keys of unsupported types are skipped.
    pub(crate) fn parse(json: &[u8]) -> Result<KeySet, String> {
        let set: JwkSet = serde_json::from_slice(json).map_err(|e| format!("not a JWKS: {e}"))?;
        let keys: Vec<Key> = set.keys.iter().filter_map(key_of).collect();
        if keys.is_empty() {
            return Err("no usable public key (RSA, EC or OKP) in the key set".into());
        }
        Ok(KeySet { keys })
    }

    pub(crate) fn load(path: &Path) -> Result<KeySet, String> {
        let bytes =
            std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
        KeySet::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub(crate) fn by_kid(&self, kid: &str) -> Option<&Key> {
        self.keys.iter().find(|k| k.kid.as_deref() == Some(kid))
    }

    /// For a token without `kid`: the first key of the algorithm's family.
    pub(crate) fn for_algorithm(&self, alg: Algorithm) -> Option<&Key> {
        self.keys
            .iter()
            .find(|k| k.key.family() == alg.family() && k.alg.is_none_or(|a| a == alg))
    }
}

fn key_of(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.algorithm, AlgorithmParameters::OctetKey(_)) {
        return None;
    }
    let key = DecodingKey::from_jwk(jwk).ok()?;
    let alg = jwk
        .common
        .key_algorithm
        .and_then(|a| a.to_string().parse::<Algorithm>().ok());
    Some(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

/// The keys of one `jwks_url`, as last fetched.
pub(crate) struct UrlKeys {
    current: ArcSwapOption<KeySet>,
    wake: Arc<Notify>,
    /// When an unknown `kid` last asked for an early refresh (ms since the epoch).
    last_early: AtomicU64,
}

impl UrlKeys {
    /// The keys, once a fetch has succeeded.
    pub(crate) fn current(&self) -> Option<Arc<KeySet>> {
        self.current.load_full()
    }

    /// A token named a key this set lacks: refresh now, unless that was asked recently.
    pub(crate) fn unknown_kid(&self) {
        let now = now_ms();
        let last = self.last_early.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= EARLY_REFRESH.as_millis() as u64
            && self
                .last_early
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.wake.notify_one();
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The key stores of every `jwks_url` in use, by URL and CA file.
#[derive(Default)]
pub(crate) struct Registry {
    stores: Mutex<HashMap<String, Weak<UrlKeys>>>,
}

impl Registry {
    /// The store for `url` (fetched with `tls` for https), created with its refresh task when
    /// no configuration used it yet. Must run inside the tokio runtime.
    pub(crate) fn get(
        &self,
        url: &http::Uri,
        ca_key: &str,
        tls: Arc<rustls::ClientConfig>,
        refresh: Duration,
    ) -> Arc<UrlKeys> {
        let id = format!("{url} {ca_key} {}", refresh.as_millis());
        let mut map = self.stores.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        if let Some(k) = map.get(&id).and_then(Weak::upgrade) {
            return k;
        }
        let keys = Arc::new(UrlKeys {
            current: ArcSwapOption::empty(),
            wake: Arc::new(Notify::new()),
            last_early: AtomicU64::new(0),
        });
        map.insert(id, Arc::downgrade(&keys));
        tokio::spawn(refresh_loop(
            Arc::downgrade(&keys),
            keys.wake.clone(),
            url.clone(),
            tls,
            refresh,
        ));
        keys
    }
}

/// Fetches at once, then every `refresh`; a failure keeps the keys there are and retries with
/// back-off (up to a minute while there are none, up to `refresh` after). Ends when the store
/// is no longer used.
async fn refresh_loop(
    keys: Weak<UrlKeys>,
    wake: Arc<Notify>,
    url: http::Uri,
    tls: Arc<rustls::ClientConfig>,
    refresh: Duration,
) {
    let mut backoff = Duration::from_secs(1);
    loop {
        if keys.strong_count() == 0 {
            return;
        }
        let result = fetch(&url, &tls).await;
        let Some(store) = keys.upgrade() else {
            return;
        };
        let wait = match result {
            Ok(set) => {
                if store.current().is_none() {
                    tracing::info!(url = %url, "JWKS fetched");
                }
                store.current.store(Some(Arc::new(set)));
                backoff = Duration::from_secs(1);
                refresh
            }
            Err(e) => {
                let have = store.current().is_some();
                tracing::warn!(url = %url, error = %e, keeping_keys = have, "JWKS fetch failed; retrying");
                let w = backoff;
                backoff = (backoff * 2).min(if have { refresh } else { MAX_BACKOFF });
                w
            }
        };
        drop(store);
        let early = wake.notified();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = early => {}
        }
    }
}

/// One GET of a JWKS document, over TLS for https.
async fn fetch(url: &http::Uri, tls: &Arc<rustls::ClientConfig>) -> Result<KeySet, String> {
    tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(url, tls))
        .await
        .map_err(|_| "timed out".to_string())?
}

async fn fetch_inner(url: &http::Uri, tls: &Arc<rustls::ClientConfig>) -> Result<KeySet, String> {
    let host = url
        .host()
        .ok_or("no host")?
        .trim_matches(['[', ']'])
        .to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let path = url.path_and_query().map_or("/", |p| p.as_str()).to_string();
    let authority = url.authority().map_or(host.clone(), |a| a.to_string());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(
            http::header::USER_AGENT,
            concat!("wsgate/", env!("CARGO_PKG_VERSION")),
        )
        .header(http::header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = if https {
        let name =
            rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
        send(stream, req).await?
    } else {
        send(tcp, req).await?
    };
    if resp.status() != http::StatusCode::OK {
        return Err(format!("answered {}", resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_JWKS)
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    KeySet::parse(&body)
}

async fn send<S>(
    io: S,
    req: http::Request<Empty<Bytes>>,
) -> Result<http::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender.send_request(req).await.map_err(|e| e.to_string())
}

/// A TLS client for `jwks_url`: the system's roots plus the PEM bundle `ca` when given.
pub(crate) fn client_tls(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(c);
    }
    if let Some(path) = ca {
        let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: not a PEM bundle: {e:?}", path.display()))?;
        if certs.is_empty() {
            return Err(format!("{}: no CERTIFICATE in the file", path.display()));
        }
        for c in certs {
            roots
                .add(c)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    let cfg = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
