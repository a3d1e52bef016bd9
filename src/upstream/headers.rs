//! The request headers a backend receives: hop-by-hop fields removed (RFC 9110 section 7.6.1),
//! the forwarding fields (`X-Forwarded-*`, `X-Real-IP`, `Forwarded`) appended or replaced, and
//! the target in origin form.

use std::net::{IpAddr, SocketAddr};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request headers sent to a backend for a client at `client` that used `proto`.
pub(crate) fn forward_headers(src: &HeaderMap, client: SocketAddr, proto: &str) -> HeaderMap {
    let mut out = src.clone();
    strip_hop_by_hop(&mut out);
    // The gateway's own (the decision path replaced the client's): `Connection` naming it
    // must not take a verified identity away from the backend.
    if let Some(v) = src.get(crate::request::XFCC) {
        out.insert(crate::request::XFCC, v.clone());
    }
    let ip = client.ip();
    let xff = join_values(src, "x-forwarded-for", &ip.to_string());
    let host = src
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_owned);
    let for_param = match ip {
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        v4 => format!("for={v4}"),
    };
    let mut element = format!("{for_param};proto={proto}");
    if let Some(h) = &host {
        if h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        {
            element.push_str(&format!(";host={h}"));
        } else {
            element.push_str(&format!(";host=\"{}\"", h.replace(['"', '\\'], "")));
        }
    }
    let forwarded = join_values(src, "forwarded", &element);
    set(&mut out, "x-forwarded-for", &xff);
    set(&mut out, "forwarded", &forwarded);
    set(&mut out, "x-real-ip", &ip.to_string());
    set(&mut out, "x-forwarded-proto", proto);
    match &host {
        Some(h) => set(&mut out, "x-forwarded-host", h),
        None => {
            out.remove("x-forwarded-host");
        }
    }
    out
}

/// Removes the hop-by-hop headers of RFC 9110 section 7.6.1, and those named in `Connection`.
pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.to_str().unwrap_or("").split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        // The WebSocket headers are end-to-end whatever a client lists.
        .filter(|n| !n.as_str().starts_with("sec-websocket-"))
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
    ] {
        h.remove(n);
    }
}

/// True when any value of header `name` holds `token` in its comma list (case-insensitive).
pub(crate) fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
    })
}

/// The target as origin-form (`/path?query`), as backends expect it.
pub(crate) fn origin_form(uri: &http::Uri) -> http::Uri {
    uri.path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/")
        .parse()
        .unwrap_or_else(|_| http::Uri::from_static("/"))
}

fn join_values(src: &HeaderMap, name: &str, append: &str) -> String {
    let mut v: Vec<&str> = src
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    v.push(append);
    v.join(", ")
}

fn set(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(HeaderName::from_static(name), v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_headers_append_and_replace() {
        let mut h = HeaderMap::new();
        h.insert("host", "chat.example.com".parse().unwrap());
        h.insert("x-forwarded-for", "10.0.0.1".parse().unwrap());
        h.insert("x-real-ip", "6.6.6.6".parse().unwrap());
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        let out = forward_headers(&h, "[2001:db8::1]:5000".parse().unwrap(), "https");
        assert_eq!(out["x-forwarded-for"], "10.0.0.1, 2001:db8::1");
        assert_eq!(out["x-real-ip"], "2001:db8::1");
        assert_eq!(out["x-forwarded-proto"], "https");
        assert_eq!(out["x-forwarded-host"], "chat.example.com");
        assert_eq!(
            out["forwarded"],
            "for=\"[2001:db8::1]\";proto=https;host=chat.example.com"
        );
        assert!(out.get("x-secret").is_none() && out.get("connection").is_none());
        assert_eq!(out["host"], "chat.example.com");
    }
}
