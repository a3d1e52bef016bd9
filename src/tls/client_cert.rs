//! The identity a verified client certificate gives a connection: the value of
//! `X-Forwarded-Client-Cert` in Envoy's format (`Hash=<hex SHA-256 of the leaf's
//! DER>;Subject="<RFC 4514 subject>";URI=<each URI SAN>;DNS=<each DNS SAN>`), computed once
//! per connection, and the subject's common name for the control plane. The certificate was
//! verified by rustls already; this only reads it (with `x509-parser`).

use std::fmt::Write as _;

use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Who connected, by certificate.
#[derive(Debug)]
pub(crate) struct ClientCert {
    /// The `X-Forwarded-Client-Cert` value.
    pub(crate) xfcc: http::HeaderValue,
    /// The subject's first common name.
    pub(crate) common_name: Option<String>,
}

impl ClientCert {
    /// Reads the leaf certificate `der`; `None` when it does not parse (it verified, so this
    /// does not happen with any CA that issues sane certificates).
    pub(crate) fn from_der(der: &[u8]) -> Option<ClientCert> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let hash = ring::digest::digest(&ring::digest::SHA256, der);
        let mut v = String::with_capacity(160);
        v.push_str("Hash=");
        for b in hash.as_ref() {
            let _ = write!(v, "{b:02x}");
        }
        v.push_str(";Subject=\"");
        for c in rfc4514(&cert).chars() {
            // Inside the quotes only `"` and `\` need escaping.
            if c == '"' || c == '\\' {
                v.push('\\');
            }
            v.push(c);
        }
        v.push('"');
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for kind in ["URI", "DNS"] {
                for name in &san.value.general_names {
                    match (kind, name) {
                        ("URI", GeneralName::URI(u)) | ("DNS", GeneralName::DNSName(u)) => {
                            let _ = write!(v, ";{kind}={}", header_safe(u));
                        }
                        _ => {}
                    }
                }
            }
        }
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        Some(ClientCert {
            xfcc: http::HeaderValue::from_str(&v).ok()?,
            common_name,
        })
    }
}

/// The subject as RFC 4514 writes it: the most specific RDN first, `,` between RDNs, `+`
/// inside one, special characters escaped with `\`.
fn rfc4514(cert: &X509Certificate<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let mut rdns: Vec<String> = Vec::new();
    for rdn in cert.subject().iter_rdn() {
        let mut parts = Vec::new();
        for atv in rdn.iter() {
            let ty = x509_parser::objects::oid2abbrev(atv.attr_type(), registry)
                .map(str::to_string)
                .unwrap_or_else(|_| atv.attr_type().to_id_string());
            let value = match atv.as_str() {
                Ok(s) => escape_value(s),
                // Not a string type: `#` and the DER of the value, as RFC 4514 says.
                Err(_) => {
                    let mut h = String::from("#");
                    for b in atv.attr_value().as_bytes() {
                        let _ = write!(h, "{b:02x}");
                    }
                    h
                }
            };
            parts.push(format!("{ty}={value}"));
        }
        rdns.push(parts.join("+"));
    }
    rdns.reverse();
    rdns.join(",")
}

/// RFC 4514 section 2.4 escaping of an attribute value.
fn escape_value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let last = s.chars().count().saturating_sub(1);
    for (i, c) in s.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if c.is_control() {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "\\{b:02x}");
            }
            continue;
        }
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A SAN as it may appear in a header value: control characters and `;`/`,` (the
/// separators) percent-encoded.
fn header_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() || c == ';' || c == ',' || c == '"' {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                let _ = write!(out, "%{b:02X}");
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped_as_rfc_4514_says() {
        assert_eq!(escape_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_value(" lead#"), "\\ lead#");
        assert_eq!(escape_value("#x "), "\\#x\\ ");
        assert_eq!(escape_value("q\"\\"), "q\\\"\\\\");
    }

    #[test]
    fn an_rcgen_certificate_gives_subject_sans_and_hash() {
        let mut params = rcgen::CertificateParams::new(vec!["dev-1.example".to_string()]).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "sensor 1");
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Fleet, Inc");
        params.subject_alt_names.push(rcgen::SanType::URI(
            "spiffe://fleet/sensor-1".try_into().unwrap(),
        ));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let c = ClientCert::from_der(cert.der()).unwrap();
        let v = c.xfcc.to_str().unwrap();
        let hash: String = ring::digest::digest(&ring::digest::SHA256, cert.der())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(
            v,
            format!(
                "Hash={hash};Subject=\"O=Fleet\\\\, Inc,CN=sensor 1\";URI=spiffe://fleet/sensor-1;DNS=dev-1.example"
            )
        );
        assert_eq!(c.common_name.as_deref(), Some("sensor 1"));
    }
}
