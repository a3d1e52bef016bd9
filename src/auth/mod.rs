//! Authentication at the edge, the decision path's step after the route and its Origin: a
//! route's authenticator ([`jwt`] with keys from [`jwks`], or [`forward`] auth) admits or
//! refuses the request before any backend is contacted, and on admission rewrites what the
//! backend will receive (the verified identity in headers the client cannot forge, the token
//! stripped) and says when the tunnel's credential ends.

pub(crate) mod forward;
pub(crate) mod jwks;
pub(crate) mod jwt;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderValue};

use crate::config::{self, ConfigError, JwksSource, TokenSource};
use crate::conn::Conn;
use crate::reject::{AuthFailure, Refusal};

/// A route's authenticator, built with the configuration snapshot.
pub(crate) enum Authenticator {
    Jwt {
        cfg: config::Jwt,
        verifier: jwt::Verifier,
    },
    Forward(forward::ForwardAuth),
}

/// Who an admitted request is, for the tunnel it may become.
#[derive(Debug, Clone, Default)]
pub(crate) struct Identity {
    /// A JWT's `sub`, or the forward-auth answer's `subject_header`.
    pub(crate) subject: Option<String>,
    /// When the credential ends; the tunnel is closed then.
    pub(crate) expires_at: Option<SystemTime>,
    /// The close code to the client at that moment.
    pub(crate) expired_close_code: u16,
}

impl Identity {
    /// How long from now until the credential ends (zero if it already has).
    pub(crate) fn remaining(&self) -> Option<Duration> {
        self.expires_at.map(|t| {
            t.duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO)
        })
    }
}

/// A refused request: counted and logged as `refusal`, answered with `answer` when the auth
/// service gave one to relay.
#[derive(Debug)]
pub(crate) struct Denied {
    pub(crate) refusal: Refusal,
    pub(crate) answer: Option<Box<http::Response<Bytes>>>,
}

impl From<Refusal> for Denied {
    fn from(refusal: Refusal) -> Self {
        Denied {
            refusal,
            answer: None,
        }
    }
}

impl Authenticator {
    /// Builds `cfg`'s authenticator: reads `jwks_file` and `secret_file` now (so a reload
    /// re-reads them), takes the shared store of a `jwks_url`.
    pub(crate) fn build(
        cfg: &config::Auth,
        file: &std::path::Path,
        keys: &jwks::Registry,
    ) -> Result<Authenticator, Vec<ConfigError>> {
        let err = |line: usize, key: &str, message: String| {
            vec![ConfigError {
                file: file.to_path_buf(),
                line,
                key: key.to_string(),
                message,
            }]
        };
        match &cfg.kind {
            config::AuthKind::Forward(f) => {
                Ok(Authenticator::Forward(forward::ForwardAuth::new(f.clone())))
            }
            config::AuthKind::Jwt(j) => {
                let source = match &j.keys {
                    None => jwt::Keys::None,
                    Some(JwksSource::File(f)) => match jwks::KeySet::load(&f.value) {
                        Ok(set) => jwt::Keys::File(Arc::new(set)),
                        Err(e) => return Err(err(f.line, &f.key, e)),
                    },
                    Some(JwksSource::Url { url, ca, refresh }) => {
                        let tls = jwks::client_tls(ca.as_ref().map(|c| c.value.as_path()))
                            .map_err(|e| {
                                let (line, key) = ca
                                    .as_ref()
                                    .map_or((0, "jwks_ca"), |c| (c.line, c.key.as_str()));
                                err(line, key, e)
                            })?;
                        let ca_key = ca
                            .as_ref()
                            .map_or(String::new(), |c| c.value.display().to_string());
                        jwt::Keys::Url(keys.get(url, &ca_key, tls, *refresh))
                    }
                };
                let secret = match &j.secret_file {
                    None => None,
                    Some(s) => match std::fs::read(&s.value) {
                        Ok(bytes) => {
                            let trimmed = bytes.trim_ascii();
                            if trimmed.is_empty() {
                                return Err(err(
                                    s.line,
                                    &s.key,
                                    format!("{}: the secret is empty", s.value.display()),
                                ));
                            }
                            Some(jsonwebtoken::DecodingKey::from_secret(trimmed))
                        }
                        Err(e) => {
                            return Err(err(
                                s.line,
                                &s.key,
                                format!("{}: cannot read: {e}", s.value.display()),
                            ));
                        }
                    },
                };
                Ok(Authenticator::Jwt {
                    verifier: jwt::Verifier::new(j, source, secret),
                    cfg: j.clone(),
                })
            }
        }
    }
}

/// The files an authenticator reads (`jwks_file`, `secret_file`, `jwks_ca`), checked the way a
/// reload would read them, without fetching anything (for `--check`).
pub(crate) fn check_files(cfg: &config::Auth, file: &std::path::Path) -> Vec<ConfigError> {
    let config::AuthKind::Jwt(j) = &cfg.kind else {
        return Vec::new();
    };
    let mut errors = Vec::new();
    let mut err = |s: &config::Sourced<std::path::PathBuf>, message: String| {
        errors.push(ConfigError {
            file: file.to_path_buf(),
            line: s.line,
            key: s.key.clone(),
            message,
        })
    };
    match &j.keys {
        Some(JwksSource::File(f)) => {
            if let Err(e) = jwks::KeySet::load(&f.value) {
                err(f, e);
            }
        }
        Some(JwksSource::Url { ca: Some(ca), .. }) => {
            if let Err(e) = jwks::client_tls(Some(&ca.value)) {
                err(ca, e);
            }
        }
        _ => {}
    }
    if let Some(s) = &j.secret_file {
        match std::fs::read(&s.value) {
            Ok(b) if b.trim_ascii().is_empty() => {
                err(s, format!("{}: the secret is empty", s.value.display()))
            }
            Ok(_) => {}
            Err(e) => err(s, format!("{}: cannot read: {e}", s.value.display())),
        }
    }
    errors
}

/// Authenticates a request on a guarded route, rewriting `req` for the backend on success.
pub(crate) async fn authenticate(
    conn: &Conn,
    auth: &Authenticator,
    req: &mut http::request::Parts,
    upgrade: bool,
) -> Result<Identity, Denied> {
    match auth {
        Authenticator::Jwt { cfg, verifier } => authenticate_jwt(cfg, verifier, req, upgrade),
        Authenticator::Forward(f) => match f.check(req, conn.client, conn.listener.proto()).await {
            forward::Verdict::Allow {
                copy,
                subject,
                expires_at,
            } => {
                for name in f.copied_names() {
                    req.headers.remove(name);
                }
                for (name, value) in copy {
                    req.headers.append(name, value);
                }
                Ok(Identity {
                    subject,
                    expires_at,
                    expired_close_code: 1008,
                })
            }
            forward::Verdict::Deny(answer) => Err(Denied {
                refusal: Refusal::AuthDenied,
                answer: Some(Box::new(answer)),
            }),
            forward::Verdict::Unavailable(why) => {
                tracing::warn!(error = %why, "auth service unavailable");
                Err(Refusal::AuthUnavailable.into())
            }
        },
    }
}

fn authenticate_jwt(
    cfg: &config::Jwt,
    verifier: &jwt::Verifier,
    req: &mut http::request::Parts,
    upgrade: bool,
) -> Result<Identity, Denied> {
    let found = cfg
        .token_from
        .iter()
        .find_map(|s| token_in(s, req, upgrade).map(|t| (s, t)));
    let Some((source, token)) = found else {
        return Err(Refusal::Auth(AuthFailure::Missing).into());
    };
    let claims = match verifier.verify(&token) {
        Ok(c) => c,
        Err(jwt::Failure::Invalid(i)) => return Err(Refusal::Auth(AuthFailure::Invalid(i)).into()),
        Err(jwt::Failure::KeysUnavailable) => return Err(Refusal::AuthUnavailable.into()),
    };
    // No client can claim an identity: headers of the forwarded claims' names go first.
    for (_, name) in &cfg.forward_claims {
        req.headers.remove(name);
    }
    for (claim, name) in &cfg.forward_claims {
        if let Some(text) = claims.get(claim).and_then(jwt::claim_text)
            && let Ok(v) = HeaderValue::from_str(&text)
        {
            req.headers.insert(name.clone(), v);
        }
    }
    // The token's own subprotocol entry is never offered to the backend.
    for s in &cfg.token_from {
        if let TokenSource::Subprotocol(prefix) = s {
            strip_subprotocol(req, prefix);
        }
    }
    if cfg.strip_token {
        strip(source, req);
    }
    let expires_at = claims
        .get("exp")
        .and_then(serde_json::Value::as_u64)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s));
    Ok(Identity {
        subject: claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .map(str::to_string),
        expires_at,
        expired_close_code: cfg.expired_close_code,
    })
}

/// The token at one source, if it is there.
fn token_in(source: &TokenSource, req: &http::request::Parts, upgrade: bool) -> Option<String> {
    match source {
        TokenSource::Header(name) => {
            let v = req.headers.get(name)?.to_str().ok()?.trim();
            if *name == header::AUTHORIZATION {
                let (scheme, rest) = v.split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim().to_string())
                    .filter(|t| !t.is_empty())
            } else {
                (!v.is_empty()).then(|| v.to_string())
            }
        }
        TokenSource::Cookie(name) => cookies(req)
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.to_string())
            .filter(|v| !v.is_empty()),
        TokenSource::Query(name) => {
            let q = req.uri.query()?;
            q.split('&').find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then(|| {
                    percent_encoding::percent_decode_str(v)
                        .decode_utf8_lossy()
                        .into_owned()
                })
            })
        }
        TokenSource::Subprotocol(prefix) if upgrade => offered_protocols(req)
            .find_map(|p| p.strip_prefix(prefix.as_str()).map(str::to_string))
            .filter(|t| !t.is_empty()),
        TokenSource::Subprotocol(_) => None,
    }
}

fn cookies(req: &http::request::Parts) -> impl Iterator<Item = (&str, &str)> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| {
            let (k, v) = c.trim().split_once('=')?;
            Some((k.trim(), v.trim()))
        })
}

fn offered_protocols(req: &http::request::Parts) -> impl Iterator<Item = &str> {
    req.headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
}

/// Removes the token from where it was found (`strip_token`).
fn strip(source: &TokenSource, req: &mut http::request::Parts) {
    match source {
        TokenSource::Header(name) => {
            req.headers.remove(name);
        }
        TokenSource::Cookie(name) => {
            let kept: Vec<String> = cookies(req)
                .filter(|(k, _)| k != name)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            req.headers.remove(header::COOKIE);
            if !kept.is_empty()
                && let Ok(v) = HeaderValue::from_str(&kept.join("; "))
            {
                req.headers.insert(header::COOKIE, v);
            }
        }
        TokenSource::Query(name) => {
            let Some(q) = req.uri.query() else { return };
            let kept: Vec<&str> = q
                .split('&')
                .filter(|pair| pair.split_once('=').map_or(*pair, |(k, _)| k) != name)
                .collect();
            let path = req.uri.path();
            let target = if kept.is_empty() {
                path.to_string()
            } else {
                format!("{path}?{}", kept.join("&"))
            };
            let mut parts = req.uri.clone().into_parts();
            if let Ok(pq) = target.parse() {
                parts.path_and_query = Some(pq);
                if let Ok(u) = http::Uri::from_parts(parts) {
                    req.uri = u;
                }
            }
        }
        TokenSource::Subprotocol(prefix) => strip_subprotocol(req, prefix),
    }
}

fn strip_subprotocol(req: &mut http::request::Parts, prefix: &str) {
    let has = offered_protocols(req).any(|p| p.starts_with(prefix));
    if !has {
        return;
    }
    let kept: Vec<String> = offered_protocols(req)
        .filter(|p| !p.starts_with(prefix))
        .map(str::to_string)
        .collect();
    req.headers.remove(header::SEC_WEBSOCKET_PROTOCOL);
    if !kept.is_empty()
        && let Ok(v) = HeaderValue::from_str(&kept.join(", "))
    {
        req.headers.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(target: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::get(target);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn tokens_are_found_in_each_source() {
        let p = parts(
            "/chat?a=1&access_token=q%2Etok&b=2",
            &[
                ("authorization", "Bearer h.tok"),
                ("cookie", "x=1; access_token=c.tok; y=2"),
                ("sec-websocket-protocol", "chat, access_token.s.tok"),
            ],
        );
        let h = TokenSource::Header(header::AUTHORIZATION);
        assert_eq!(token_in(&h, &p, true).as_deref(), Some("h.tok"));
        let c = TokenSource::Cookie("access_token".into());
        assert_eq!(token_in(&c, &p, true).as_deref(), Some("c.tok"));
        let q = TokenSource::Query("access_token".into());
        assert_eq!(token_in(&q, &p, true).as_deref(), Some("q.tok"));
        let s = TokenSource::Subprotocol("access_token.".into());
        assert_eq!(token_in(&s, &p, true).as_deref(), Some("s.tok"));
        assert_eq!(
            token_in(&s, &p, false),
            None,
            "subprotocols only on upgrades"
        );
        let basic = parts("/", &[("authorization", "Basic dXNlcg==")]);
        assert_eq!(token_in(&h, &basic, true), None);
    }

    #[test]
    fn stripping_leaves_everything_else() {
        let mut p = parts(
            "/chat?a=1&access_token=q.tok&b=2",
            &[
                ("cookie", "x=1; access_token=c.tok; y=2"),
                ("sec-websocket-protocol", "chat, access_token.s.tok"),
            ],
        );
        strip(&TokenSource::Query("access_token".into()), &mut p);
        assert_eq!(p.uri.path_and_query().unwrap().as_str(), "/chat?a=1&b=2");
        strip(&TokenSource::Cookie("access_token".into()), &mut p);
        assert_eq!(p.headers["cookie"], "x=1; y=2");
        strip(&TokenSource::Subprotocol("access_token.".into()), &mut p);
        assert_eq!(p.headers["sec-websocket-protocol"], "chat");
    }
}
