//! The `storage` folder: the account (`account.json`) and, per name, its certificate chain
//! (`NAME.crt.pem`) and key (`NAME.key.pem`). The folder is kept 0700 and every file 0600,
//! written whole to a temporary name and renamed, so a crash never leaves half a key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate wsgate can serve, with the dates renewal is planned from.
#[derive(Clone)]
pub(crate) struct Loaded {
    pub(crate) key: Arc<CertifiedKey>,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// The ARI identifier (RFC 9773) when the certificate has an authority key identifier.
    pub(crate) ari_id: Option<instant_acme::CertificateIdentifier<'static>>,
}

/// Creates the folder (0700) when missing.
pub(crate) fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Writes `bytes` to `path` with mode 0600, atomically.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crt.pem"))
}

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key.pem"))
}

/// Stores a certificate chain and its key for `name`.
pub(crate) fn save(dir: &Path, name: &str, chain_pem: &str, key_pem: &str) -> std::io::Result<()> {
    ensure_dir(dir)?;
    // Key first: a chain on disk always has its key beside it.
    write_private(&key_path(dir, name), key_pem.as_bytes())?;
    write_private(&cert_path(dir, name), chain_pem.as_bytes())
}

/// The stored certificate for `name`, when there is one that covers the name, matches its
/// key and has not expired. `Err` says why a stored one is not used.
pub(crate) fn load(dir: &Path, name: &str) -> Result<Option<Loaded>, String> {
    let cp = cert_path(dir, name);
    if !cp.exists() {
        return Ok(None);
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cp)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e:?}", cp.display()))?;
    let kp = key_path(dir, name);
    let key = PrivateKeyDer::from_pem_file(&kp).map_err(|e| format!("{}: {e:?}", kp.display()))?;
    let loaded = certified(chain, key)?;
    if loaded.not_after <= SystemTime::now() {
        return Err(format!("{}: expired", cp.display()));
    }
    let leaf = loaded.key.cert.first().ok_or("empty chain")?;
    if !names_of(leaf).iter().any(|n| n == name) {
        return Err(format!("{}: does not name {name}", cp.display()));
    }
    Ok(Some(loaded))
}

/// A chain and key as rustls serves them, with the leaf's dates.
pub(crate) fn certified(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Loaded, String> {
    let leaf = chain.first().ok_or("no certificate in the chain")?.clone();
    let (not_before, not_after, ari_id) = dates(&leaf)?;
    let key = CertifiedKey::from_der(chain, key, &crate::tls::provider())
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Loaded {
        key: Arc::new(key),
        not_before,
        not_after,
        ari_id,
    })
}

type Dates = (
    SystemTime,
    SystemTime,
    Option<instant_acme::CertificateIdentifier<'static>>,
);

fn dates(leaf: &CertificateDer<'_>) -> Result<Dates, String> {
    let (_, x) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let v = x.validity();
    let ari_id = instant_acme::CertificateIdentifier::try_from(leaf)
        .ok()
        .map(|i| i.into_owned());
    Ok((
        at(v.not_before.timestamp()),
        at(v.not_after.timestamp()),
        ari_id,
    ))
}

/// The `notAfter` of a certificate, as Unix seconds.
pub(crate) fn not_after_unix(leaf: &[u8]) -> Option<i64> {
    let (_, x) = x509_parser::parse_x509_certificate(leaf).ok()?;
    Some(x.validity().not_after.timestamp())
}

/// The DNS names a certificate is for: its subjectAltName DNS entries, or its common name
/// when it has none.
pub(crate) fn names_of(leaf: &[u8]) -> Vec<String> {
    let Ok((_, x)) = x509_parser::parse_x509_certificate(leaf) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if let Ok(Some(san)) = x.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                out.push(d.to_ascii_lowercase());
            }
        }
    }
    if out.is_empty() {
        for cn in x.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                out.push(s.to_ascii_lowercase());
            }
        }
    }
    out
}
