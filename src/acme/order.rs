//! One conversation with the ACME server (instant-acme speaks the protocol): the HTTP client
//! (the system's roots plus `directory_ca`, remembering a `Retry-After`), the account, and
//! one order for one name: its challenge answered through [`super::Certs`], a fresh ECDSA
//! P-256 key, the CSR and the chain.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, BodyWrapper, BytesResponse, ChallengeType,
    ExternalAccountKey, HttpClient, Identifier, NewAccount, NewOrder, OrderStatus, RetryPolicy,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use super::Certs;
use super::store::{self, Loaded};
use crate::config::{Acme as Conf, AcmeChallenge};

/// How long one request to the ACME server may take (to its response head).
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one whole order may take: validation polls for up to 90 s, issuance as long.
pub(crate) const ORDER_TIMEOUT: Duration = Duration::from_secs(300);

/// Why an order (or the account it needs) failed, as the log line and back-off need it.
#[derive(Debug)]
pub(crate) struct Failure {
    /// The problem document's type, or what failed on this side.
    pub(crate) kind: String,
    pub(crate) detail: String,
    /// The server's `Retry-After`, when it sent one.
    pub(crate) retry_after: Option<SystemTime>,
}

impl Failure {
    pub(crate) fn local(kind: &str, detail: impl std::fmt::Display) -> Failure {
        Failure {
            kind: kind.to_string(),
            detail: detail.to_string(),
            retry_after: None,
        }
    }

    fn from_acme(e: instant_acme::Error, client: &Client) -> Failure {
        let retry_after = client.take_retry_after();
        match e {
            instant_acme::Error::Api(p) => Failure {
                kind: p.r#type.clone().unwrap_or_else(|| "problem".into()),
                detail: p.to_string(),
                retry_after,
            },
            instant_acme::Error::Timeout(_) => Failure {
                kind: "timeout".into(),
                detail: "the order did not become ready in time".into(),
                retry_after,
            },
            other => Failure {
                kind: "connection".into(),
                detail: chain(&other),
                retry_after,
            },
        }
    }

    /// Whether the server no longer knows the account (a test server restarted, say). Not
    /// `unauthorized`: that is also what a failed validation says.
    fn unknown_account(&self) -> bool {
        self.kind.ends_with(":accountDoesNotExist")
    }
}

/// An error with its causes ("client error (Connect): tcp connect error: Connection refused").
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cause = c.source();
    }
    out
}

/// The HTTP client instant-acme sends through, keeping the last `Retry-After` a refusal carried
/// (instant-acme's problem documents do not).
#[derive(Clone)]
pub(crate) struct Client {
    inner: hyper_util::client::legacy::Client<
        hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
        BodyWrapper<Bytes>,
    >,
    retry_after: Arc<Mutex<Option<SystemTime>>>,
}

impl Client {
    pub(crate) fn new(conf: &Conf) -> Result<Client, Failure> {
        let ca = conf.directory_ca.as_ref().map(|c| c.value.as_path());
        let tls = crate::auth::jwks::client_tls(ca).map_err(|e| Failure::local("tls", e))?;
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_only()
            .enable_http1()
            .build();
        // Connections are kept only within an order: the server closes idle ones on its own
        // schedule, and one reused just as it closes fails the request.
        let inner =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(5))
                .pool_timer(hyper_util::rt::TokioTimer::new())
                .build(connector);
        Ok(Client {
            inner,
            retry_after: Arc::default(),
        })
    }

    fn take_retry_after(&self) -> Option<SystemTime> {
        self.retry_after
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

impl HttpClient for Client {
    fn request(
        &self,
        req: http::Request<BodyWrapper<Bytes>>,
    ) -> Pin<Box<dyn Future<Output = Result<BytesResponse, instant_acme::Error>> + Send>> {
        let fut = self.inner.request(req);
        let slot = self.retry_after.clone();
        Box::pin(async move {
            let rsp = match tokio::time::timeout(REQUEST_TIMEOUT, fut).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => return Err(instant_acme::Error::Other(Box::new(e))),
                Err(_) => return Err(instant_acme::Error::Str("the ACME server did not answer")),
            };
            let status = rsp.status().as_u16();
            if (status == 429 || status >= 500)
                && let Some(at) = rsp
                    .headers()
                    .get(http::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(parse_retry_after)
            {
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
            }
            Ok(BytesResponse::from(rsp))
        })
    }
}

/// `Retry-After`: seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    match v.parse::<u64>() {
        Ok(s) => Some(SystemTime::now() + Duration::from_secs(s)),
        Err(_) => httpdate_parse(v),
    }
}

fn httpdate_parse(v: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339_weak(v).ok().or_else(|| {
        // IMF-fixdate, as HTTP writes it: "Sun, 06 Nov 1994 08:49:37 GMT".
        let (_, rest) = v.split_once(", ")?;
        let mut it = rest.split(' ');
        let (day, mon, year, time) = (it.next()?, it.next()?, it.next()?, it.next()?);
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let m = months.iter().position(|x| *x == mon)? + 1;
        humantime::parse_rfc3339(&format!("{year}-{m:02}-{day:0>2}T{time}Z")).ok()
    })
}

/// The account file: the credentials and the directory they belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct AccountFile {
    directory: String,
    credentials: AccountCredentials,
}

/// The account of `conf.storage` on `conf.directory`: the stored one, or a new one (stored).
pub(crate) async fn account(conf: &Conf, client: &Client, fresh: bool) -> Result<Account, Failure> {
    let path = conf.storage.value.join("account.json");
    if !fresh
        && let Ok(text) = std::fs::read(&path)
        && let Ok(f) = serde_json::from_slice::<AccountFile>(&text)
        && f.directory == conf.directory
    {
        return Account::builder_with_http(Box::new(client.clone()))
            .from_credentials(f.credentials)
            .await
            .map_err(|e| Failure::from_acme(e, client));
    }
    let eab = match &conf.eab {
        None => None,
        Some((kid, file)) => {
            let text = std::fs::read_to_string(&file.value)
                .map_err(|e| Failure::local("eab", format!("{}: {e}", file.value.display())))?;
            let key = eab_key(&text)
                .map_err(|e| Failure::local("eab", format!("{}: {e}", file.value.display())))?;
            Some(ExternalAccountKey::new(kid.clone(), &key))
        }
    };
    let contact: Vec<&str> = conf.contact.iter().map(String::as_str).collect();
    let (account, credentials) = Account::builder_with_http(Box::new(client.clone()))
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            conf.directory.clone(),
            eab.as_ref(),
        )
        .await
        .map_err(|e| Failure::from_acme(e, client))?;
    let file = AccountFile {
        directory: conf.directory.clone(),
        credentials,
    };
    let json = serde_json::to_vec_pretty(&file).map_err(|e| Failure::local("storage", e))?;
    store::ensure_dir(&conf.storage.value)
        .and_then(|()| store::write_private(&path, &json))
        .map_err(|e| Failure::local("storage", format!("{}: {e}", path.display())))?;
    tracing::info!(directory = %conf.directory, "ACME account created");
    Ok(account)
}

/// The HMAC key of an EAB key file: base64url, padded or not, on one line.
pub(crate) fn eab_key(text: &str) -> Result<Vec<u8>, String> {
    use base64::Engine;
    let t = text.trim().trim_end_matches('=');
    if t.is_empty() {
        return Err("empty".into());
    }
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(t)
        .map_err(|e| format!("not base64url: {e}"))
}

/// A certificate ordered for `name`: what is served and what is stored.
pub(crate) struct Issued {
    pub(crate) loaded: Loaded,
    pub(crate) chain_pem: String,
    pub(crate) key_pem: String,
}

/// Orders a certificate for `name`, once more with a new account if the server forgot ours.
pub(crate) async fn order(
    account: &mut Option<Account>,
    conf: &Conf,
    client: &Client,
    certs: &Certs,
    name: &str,
    replaces: Option<&instant_acme::CertificateIdentifier<'static>>,
) -> Result<Issued, Failure> {
    for attempt in 0..2 {
        let acct = match account {
            Some(a) => a.clone(),
            None => {
                let a = self::account(conf, client, attempt > 0).await?;
                *account = Some(a.clone());
                a
            }
        };
        match order_once(&acct, conf.challenge, client, certs, name, replaces).await {
            Err(Refused::Account(f)) if attempt == 0 => {
                tracing::info!(detail = %f.detail, "the ACME server does not know the account: creating one");
                *account = None;
            }
            Err(Refused::Account(f) | Refused::Order(f)) => return Err(f),
            Ok(issued) => return Ok(issued),
        }
    }
    unreachable!("the loop returns on its second pass")
}

/// How an order failed: the account is unknown to the server (only `newOrder` says so), or
/// anything else.
enum Refused {
    Account(Failure),
    Order(Failure),
}

impl From<Failure> for Refused {
    fn from(f: Failure) -> Refused {
        Refused::Order(f)
    }
}

async fn order_once(
    account: &Account,
    challenge: AcmeChallenge,
    client: &Client,
    certs: &Certs,
    name: &str,
    replaces: Option<&instant_acme::CertificateIdentifier<'static>>,
) -> Result<Issued, Refused> {
    let acme = |e| Failure::from_acme(e, client);
    let ids = [Identifier::Dns(name.to_string())];
    let mut new = NewOrder::new(&ids);
    if let Some(r) = replaces {
        new = new.replaces(r.clone());
    }
    let placed = match account.new_order(&new).await {
        // A server may refuse `replaces` (already replaced, say): order without it.
        Err(_) if replaces.is_some() => account.new_order(&NewOrder::new(&ids)).await,
        other => other,
    };
    let mut order = match placed {
        Ok(o) => o,
        Err(e) => {
            let f = acme(e);
            return Err(if f.unknown_account() {
                Refused::Account(f)
            } else {
                Refused::Order(f)
            });
        }
    };
    // Whatever happens below, the challenge answers go with this guard.
    let _answers = Answers { certs, name };
    let mut authorizations = order.authorizations();
    while let Some(a) = authorizations.next().await {
        let mut authz = a.map_err(acme)?;
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => {
                return Err(Failure::local(
                    "authorization",
                    format!("the authorization for {name} is {other:?}"),
                )
                .into());
            }
        }
        let kind = match challenge {
            AcmeChallenge::TlsAlpn01 => ChallengeType::TlsAlpn01,
            AcmeChallenge::Http01 => ChallengeType::Http01,
        };
        let mut ch = authz.challenge(kind).ok_or_else(|| {
            Failure::local(
                "challenge",
                format!(
                    "the server offers no {} challenge for {name}",
                    challenge.name()
                ),
            )
        })?;
        let key_auth = ch.key_authorization();
        match challenge {
            AcmeChallenge::TlsAlpn01 => {
                let config = challenge_config(name, key_auth.digest().as_ref())
                    .map_err(|e| Failure::local("challenge", e))?;
                certs.set_alpn(name, config);
            }
            AcmeChallenge::Http01 => {
                certs.set_token(name, &ch.token, key_auth.as_str());
            }
        }
        ch.set_ready().await.map_err(acme)?;
    }
    let poll = RetryPolicy::new()
        .initial_delay(Duration::from_millis(250))
        .backoff(1.5)
        .timeout(Duration::from_secs(90));
    let status = order.poll_ready(&poll).await.map_err(acme)?;
    if status != OrderStatus::Ready {
        // The challenge's own error says what the server saw.
        let mut detail = format!("the order is {status:?}");
        let mut kind = "orderNotReady".to_string();
        let mut authorizations = order.authorizations();
        while let Some(Ok(mut a)) = authorizations.next().await {
            // The states read before validation are cached: fetch what the server saw.
            if a.refresh().await.is_err() {
                continue;
            }
            if let Some(p) = a.challenges.iter().find_map(|c| c.error.clone()) {
                kind = p.r#type.clone().unwrap_or(kind);
                detail = p.to_string();
            }
        }
        return Err(Refused::Order(Failure {
            kind,
            detail,
            retry_after: client.take_retry_after(),
        }));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| Failure::local("key", e))?;
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()])
        .map_err(|e| Failure::local("csr", e))?;
    // rcgen's default subject ("rcgen self signed cert") is refused by public CAs: the name
    // is in the subjectAltName, the subject stays empty.
    params.distinguished_name = rcgen::DistinguishedName::new();
    let csr = params
        .serialize_request(&key)
        .map_err(|e| Failure::local("csr", e))?;
    order.finalize_csr(csr.der()).await.map_err(acme)?;
    let chain_pem = order.poll_certificate(&poll).await.map_err(acme)?;
    let key_pem = key.serialize_pem();
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| Failure::local("certificate", format!("{e:?}")))?;
    let private = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| Failure::local("key", format!("{e:?}")))?;
    let loaded = store::certified(chain, private).map_err(|e| Failure::local("certificate", e))?;
    Ok(Issued {
        loaded,
        chain_pem,
        key_pem,
    })
}

/// Removes a name's challenge answers when its order ends, however it ends.
struct Answers<'a> {
    certs: &'a Certs,
    name: &'a str,
}

impl Drop for Answers<'_> {
    fn drop(&mut self) {
        self.certs.clear_challenges(self.name);
    }
}

/// The TLS-ALPN-01 answer for `name` (RFC 8737): a self-signed certificate for the name with
/// the critical acmeIdentifier extension holding the key authorization's digest, offered only
/// under ALPN `acme-tls/1`.
fn challenge_config(name: &str, digest: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    let key =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_string()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let private = PrivateKeyDer::try_from(key.serialize_der()).map_err(str::to_string)?;
    let provider = crate::tls::provider();
    // Not `with_single_cert`: it checks the certificate as a web PKI end entity, and refuses
    // the critical extension the challenge is made of.
    let signer = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| e.to_string())?;
    let answer = Arc::new(rustls::sign::CertifiedKey::new(
        vec![cert.der().clone()],
        signer,
    ));
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Always(answer)));
    config.alpn_protocols = vec![super::ACME_TLS_ALPN.to_vec()];
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Serves one certificate to every client.
#[derive(Debug)]
struct Always(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Always {
    fn resolve(
        &self,
        _: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        let soon = parse_retry_after("120").unwrap();
        let d = soon.duration_since(SystemTime::now()).unwrap();
        assert!(d > Duration::from_secs(110) && d <= Duration::from_secs(120));
        let at = parse_retry_after("Sun, 06 Nov 1994 08:49:37 GMT").unwrap();
        assert_eq!(
            at.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
            784_111_777
        );
        assert!(parse_retry_after("soon").is_none());
    }

    #[test]
    fn eab_keys_are_base64url_with_or_without_padding() {
        assert_eq!(eab_key("aGVsbG8\n").unwrap(), b"hello");
        assert_eq!(eab_key("aGVsbG8=").unwrap(), b"hello");
        assert!(eab_key("").is_err());
        assert!(eab_key("not base64!").is_err());
    }
}
