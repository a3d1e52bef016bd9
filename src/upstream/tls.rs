//! TLS to backends (`backend_tls`): a rustls client per route trusting the system's roots plus
//! `backend_ca`, offering ALPN `http/1.1`, naming `backend_server_name` or each backend's host.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::ServerName;

/// A route's TLS client.
pub(crate) fn client_config(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let base = crate::auth::jwks::client_tls(ca)?;
    let mut cfg = (*base).clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// The name to send and verify for a backend: the override, or the address's host.
pub(crate) fn server_name(
    backend: &crate::config::Backend,
    name: Option<&str>,
) -> Result<ServerName<'static>, String> {
    let host = match (name, backend) {
        (Some(n), _) => n.to_string(),
        (None, crate::config::Backend::Tcp(addr)) => {
            let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
            host.trim_matches(['[', ']']).to_string()
        }
        (None, crate::config::Backend::Unix(_)) => return Err("a unix socket has no name".into()),
    };
    ServerName::try_from(host.clone()).map_err(|_| format!("\"{host}\" is not a server name"))
}
