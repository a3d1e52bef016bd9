//! The sticky cookie's value: an opaque keyed hash of the route and the backend's address (HMAC
//! with SHA-256, cut to 16 bytes, hex). It names a backend without showing its address, is the
//! same on every gateway of a fleet and across restarts, so a session stays put wherever the
//! client's next request lands.

use http::HeaderValue;

/// The cookie value naming `backend` on `route`.
pub(crate) fn value(route: &str, backend: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"wsgate sticky backend v1");
    let mut msg = Vec::with_capacity(route.len() + backend.len() + 1);
    msg.extend_from_slice(route.as_bytes());
    msg.push(0);
    msg.extend_from_slice(backend.as_bytes());
    let tag = ring::hmac::sign(&key, &msg);
    tag.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The `Set-Cookie` an answer carries to pin the client to `backend`.
pub(crate) fn set_cookie(name: &str, route: &str, backend: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!(
        "{name}={}; Path=/; HttpOnly; Secure; SameSite=Lax",
        value(route, backend)
    ))
    .ok()
}

/// The value of cookie `name` in a request, if sent.
pub(crate) fn from_request<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| k.trim() == name)
        .map(|(_, v)| v.trim())
}

/// Removes cookie `name` from a request (other cookies stay): backends never see it.
pub(crate) fn strip(headers: &mut http::HeaderMap, name: &str) {
    let is_ours = |c: &[u8]| {
        let k = c.split(|&b| b == b'=').next().unwrap_or(c);
        k.trim_ascii() == name.as_bytes()
    };
    let values: Vec<HeaderValue> = headers
        .get_all(http::header::COOKIE)
        .iter()
        .cloned()
        .collect();
    if !values
        .iter()
        .any(|v| v.as_bytes().split(|&b| b == b';').any(is_ours))
    {
        return;
    }
    // Only the sticky cookie goes: every other cookie stays, byte for byte, in its own header.
    headers.remove(http::header::COOKIE);
    for v in values {
        let parts: Vec<&[u8]> = v.as_bytes().split(|&b| b == b';').collect();
        if !parts.iter().any(|c| is_ours(c)) {
            headers.append(http::header::COOKIE, v);
            continue;
        }
        let kept: Vec<&[u8]> = parts
            .into_iter()
            .map(<[u8]>::trim_ascii)
            .filter(|c| !c.is_empty() && !is_ours(c))
            .collect();
        if !kept.is_empty()
            && let Ok(v) = HeaderValue::from_bytes(&kept.join(&b"; "[..]))
        {
            headers.append(http::header::COOKIE, v);
        }
    }
}

/// A cookie-sticky route's cookie as the request carried it, taken off the request (backends
/// never see it), so the answer can pin the client to the backend that served it.
pub(crate) struct Sent<'r> {
    name: &'r str,
    value: Option<String>,
}

/// Takes the route's sticky cookie off `headers`; `None` when the route is not cookie-sticky.
pub(crate) fn take<'r>(
    sticky: &'r crate::config::Sticky,
    headers: &mut http::HeaderMap,
) -> Option<Sent<'r>> {
    let crate::config::Sticky::Cookie(name) = sticky else {
        return None;
    };
    let value = from_request(headers, name).map(str::to_string);
    strip(headers, name);
    Some(Sent { name, value })
}

impl Sent<'_> {
    /// Adds the `Set-Cookie` naming `backend` to an answer, unless the client already sent it.
    pub(crate) fn answer(&self, route: &str, backend: &str, headers: &mut http::HeaderMap) {
        if self.value.as_deref() != Some(value(route, backend).as_str())
            && let Some(v) = set_cookie(self.name, route, backend)
        {
            headers.append(http::header::SET_COOKIE, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_stable_opaque_and_distinct() {
        let a = value("/chat", "127.0.0.1:9001");
        assert_eq!(a, value("/chat", "127.0.0.1:9001"));
        assert_ne!(a, value("/chat", "127.0.0.1:9002"));
        assert_ne!(a, value("/game", "127.0.0.1:9001"));
        assert!(!a.contains("9001") && a.len() == 32);
    }

    #[test]
    fn the_cookie_is_found_and_stripped_alone() {
        let mut h = http::HeaderMap::new();
        h.insert("cookie", "a=1; wsgate_sticky=abc; io=x".parse().unwrap());
        assert_eq!(from_request(&h, "wsgate_sticky"), Some("abc"));
        strip(&mut h, "wsgate_sticky");
        assert_eq!(h["cookie"], "a=1; io=x");
        let mut only = http::HeaderMap::new();
        only.insert("cookie", "wsgate_sticky=abc".parse().unwrap());
        strip(&mut only, "wsgate_sticky");
        assert!(only.get("cookie").is_none());
    }

    #[test]
    fn other_cookie_headers_stay_untouched_even_when_not_utf8() {
        let mut h = http::HeaderMap::new();
        h.append(
            "cookie",
            http::HeaderValue::from_bytes(b"pref=caf\xe9").unwrap(),
        );
        h.append("cookie", "wsgate_sticky=abc; sid=7".parse().unwrap());
        h.append("cookie", "theme=dark".parse().unwrap());
        strip(&mut h, "wsgate_sticky");
        let left: Vec<&[u8]> = h.get_all("cookie").iter().map(|v| v.as_bytes()).collect();
        assert_eq!(left, vec![&b"pref=caf\xe9"[..], b"sid=7", b"theme=dark"]);
        let mut none = http::HeaderMap::new();
        none.append("cookie", "a=1".parse().unwrap());
        none.append("cookie", "b=2".parse().unwrap());
        strip(&mut none, "wsgate_sticky");
        assert_eq!(
            none.get_all("cookie").iter().count(),
            2,
            "nothing to strip: nothing merged"
        );
    }
}
