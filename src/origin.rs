//! The `Origin` allowlist that guards WebSocket upgrades: origins compared as scheme, host and
//! port (host case-insensitive, default ports normalised), `*.` wildcards for subdomains,
//! `"*"` for any origin, and the literal `null` only when listed.

use http::HeaderValue;

/// One entry of `allowed_origins`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum OriginRule {
    /// `"*"`: every Origin value, `null` included.
    Any,
    /// `"null"`: the opaque origin browsers send from sandboxed frames and files.
    Null,
    /// `scheme://host[:port]`.
    Exact(Origin),
    /// `scheme://*.suffix[:port]`: strict subdomains of `suffix` at any depth.
    Subdomains(Origin),
}

/// A parsed, normalised serialized origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    scheme: String,
    host: String,
    port: Option<u16>,
}

/// Why an Origin was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OriginDenied {
    /// No Origin header and `allow_missing_origin = false`.
    Missing,
    /// An Origin not on the list (or not an origin at all).
    NotAllowed,
}

/// A route's Origin policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OriginPolicy {
    rules: Vec<OriginRule>,
    allow_missing: bool,
}

impl OriginPolicy {
    /// A policy from parsed rules and the `allow_missing_origin` flag.
    pub(crate) fn new(rules: Vec<OriginRule>, allow_missing: bool) -> Self {
        OriginPolicy {
            rules,
            allow_missing,
        }
    }

    /// Checks the request's Origin header values (all of them: two Origin headers are refused).
    pub(crate) fn check<'a>(
        &self,
        mut values: impl Iterator<Item = &'a HeaderValue>,
    ) -> Result<(), OriginDenied> {
        let Some(first) = values.next() else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginDenied::Missing)
            };
        };
        if values.next().is_some() {
            return Err(OriginDenied::NotAllowed);
        }
        if self.rules.contains(&OriginRule::Any) {
            return Ok(());
        }
        let Ok(text) = first.to_str() else {
            return Err(OriginDenied::NotAllowed);
        };
        let text = text.trim();
        if text.eq_ignore_ascii_case("null") {
            return if self.rules.contains(&OriginRule::Null) {
                Ok(())
            } else {
                Err(OriginDenied::NotAllowed)
            };
        }
        let Ok(origin) = Origin::parse(text) else {
            return Err(OriginDenied::NotAllowed);
        };
        let allowed = self.rules.iter().any(|rule| match rule {
            OriginRule::Exact(o) => *o == origin,
            OriginRule::Subdomains(o) => {
                o.scheme == origin.scheme
                    && o.port == origin.port
                    && origin.host.len() > o.host.len() + 1
                    && origin.host.ends_with(&o.host)
                    && origin.host.as_bytes()[origin.host.len() - o.host.len() - 1] == b'.'
            }
            OriginRule::Any | OriginRule::Null => false,
        });
        if allowed {
            Ok(())
        } else {
            Err(OriginDenied::NotAllowed)
        }
    }
}

impl OriginRule {
    /// Parses one `allowed_origins` entry; the error says what is wrong with it.
    pub(crate) fn parse(s: &str) -> Result<OriginRule, String> {
        let t = s.trim();
        if t == "*" {
            return Ok(OriginRule::Any);
        }
        if t.eq_ignore_ascii_case("null") {
            return Ok(OriginRule::Null);
        }
        let o = Origin::parse(t).map_err(|e| format!("\"{t}\" is not an origin: {e}"))?;
        if let Some(rest) = o.host.strip_prefix("*.") {
            if rest.is_empty() || rest.contains('*') {
                return Err(format!("\"{t}\": a wildcard needs a domain after \"*.\""));
            }
            return Ok(OriginRule::Subdomains(Origin {
                host: rest.to_string(),
                ..o
            }));
        }
        if o.host.contains('*') {
            return Err(format!(
                "\"{t}\": \"*\" is only allowed as a leading \"*.\" label"
            ));
        }
        Ok(OriginRule::Exact(o))
    }
}

impl Origin {
    /// Parses `scheme://host[:port]`, lower-casing scheme and host and dropping default ports.
    pub(crate) fn parse(s: &str) -> Result<Origin, &'static str> {
        let (scheme, rest) = s.split_once("://").ok_or("no scheme://")?;
        if scheme.is_empty()
            || !scheme
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        {
            return Err("bad scheme");
        }
        if rest.contains(['/', '?', '#', '@', ' ']) {
            return Err("an origin has no path, query or user part");
        }
        let scheme = scheme.to_ascii_lowercase();
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or("unclosed [")?;
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or("junk after ]")?),
            };
            (format!("[{}]", h.to_ascii_lowercase()), port)
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h.to_ascii_lowercase(), Some(p)),
                None => (rest.to_ascii_lowercase(), None),
            }
        };
        if host.is_empty() {
            return Err("no host");
        }
        let port = match port {
            None => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| "bad port")?),
        };
        let default = match scheme.as_str() {
            "http" | "ws" => Some(80),
            "https" | "wss" => Some(443),
            _ => None,
        };
        let port = if port == default { None } else { port };
        Ok(Origin { scheme, host, port })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(list: &[&str], missing: bool) -> OriginPolicy {
        OriginPolicy::new(
            list.iter().map(|s| OriginRule::parse(s).unwrap()).collect(),
            missing,
        )
    }

    fn check(p: &OriginPolicy, o: Option<&str>) -> Result<(), OriginDenied> {
        let v = o.map(|s| HeaderValue::from_str(s).unwrap());
        p.check(v.iter())
    }

    #[test]
    fn exact_origin_matches_case_insensitively_with_default_port() {
        let p = policy(&["https://Example.com"], false);
        assert_eq!(check(&p, Some("https://example.com")), Ok(()));
        assert_eq!(check(&p, Some("https://EXAMPLE.com:443")), Ok(()));
        assert!(check(&p, Some("http://example.com")).is_err());
        assert!(check(&p, Some("https://example.com:8443")).is_err());
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let p = policy(&["https://*.example.com"], false);
        assert_eq!(check(&p, Some("https://a.example.com")), Ok(()));
        assert_eq!(check(&p, Some("https://a.b.example.com")), Ok(()));
        assert!(check(&p, Some("https://example.com")).is_err());
        assert!(check(&p, Some("https://example.com.attacker.net")).is_err());
        assert!(check(&p, Some("https://badexample.com")).is_err());
        assert!(check(&p, Some("http://a.example.com")).is_err());
    }

    #[test]
    fn null_and_missing_follow_their_own_rules() {
        let p = policy(&["https://example.com"], false);
        assert!(check(&p, Some("null")).is_err());
        assert_eq!(check(&p, None), Err(OriginDenied::Missing));
        let p = policy(&["null"], true);
        assert_eq!(check(&p, Some("null")), Ok(()));
        assert_eq!(check(&p, None), Ok(()));
        let any = policy(&["*"], false);
        assert_eq!(check(&any, Some("null")), Ok(()));
        assert_eq!(check(&any, Some("https://x.y")), Ok(()));
        assert_eq!(check(&any, None), Err(OriginDenied::Missing));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(OriginRule::parse("example.com").is_err());
        assert!(OriginRule::parse("https://example.com/app").is_err());
        assert!(OriginRule::parse("https://a.*.com").is_err());
    }
}
