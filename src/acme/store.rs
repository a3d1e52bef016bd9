//! The `storage` folder: the account (`account.json`) and, per name, one `NAME.pem` holding
//! the directory that issued it, the key and the chain (the first release's
//! `NAME.crt.pem`/`NAME.key.pem` pair is still read). The folder is kept 0700 and every file
//! 0600, written whole to a unique temporary name and renamed, so a crash never leaves half
//! a key and a key never sits beside another order's chain.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
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

/// Writes `bytes` to `path` with mode 0600, atomically. The temporary name is unique to
/// this process and call, so two writers (a `--check` and the daemon, or two orders) never
/// rename each other's half-written file.
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.{seq}.tmp", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// One file per name: a header line naming the ACME directory that issued it, the key, then
/// the chain. One file renamed into place means the key and chain can never be from two
/// different orders.
fn combined_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.pem"))
}

/// The layout of the first release, still read so an upgrade does not re-order everything.
fn legacy_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.crt.pem")),
        dir.join(format!("{name}.key.pem")),
    )
}

const DIRECTORY_HEADER: &str = "# wsgate acme directory=";

/// Stores a certificate chain and its key for `name`, recording the directory that issued it.
pub(crate) fn save(
    dir: &Path,
    name: &str,
    directory: &str,
    chain_pem: &str,
    key_pem: &str,
) -> std::io::Result<()> {
    ensure_dir(dir)?;
    let mut text = String::with_capacity(chain_pem.len() + key_pem.len() + 128);
    text.push_str(DIRECTORY_HEADER);
    text.push_str(directory);
    text.push('\n');
    text.push_str(key_pem.trim_end());
    text.push('\n');
    text.push_str(chain_pem.trim_end());
    text.push('\n');
    write_private(&combined_path(dir, name), text.as_bytes())?;
    // The old pair would only confuse an operator reading the folder.
    let (c, k) = legacy_paths(dir, name);
    let _ = std::fs::remove_file(c);
    let _ = std::fs::remove_file(k);
    Ok(())
}

/// The stored certificate for `name`, when there is one that was issued by `directory`,
/// covers the name, matches its key and has not expired. `Err` says why a stored one is not
/// used.
pub(crate) fn load(dir: &Path, name: &str, directory: &str) -> Result<Option<Loaded>, String> {
    let cp = combined_path(dir, name);
    let (chain, key, shown) = if cp.exists() {
        let text = std::fs::read_to_string(&cp).map_err(|e| format!("{}: {e}", cp.display()))?;
        let issuer = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix(DIRECTORY_HEADER))
            .map(str::trim);
        if issuer != Some(directory) {
            return Err(format!(
                "{}: issued by {}, not by the configured directory {directory}",
                cp.display(),
                issuer.unwrap_or("an unknown directory"),
            ));
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(text.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{}: {e:?}", cp.display()))?;
        let key = PrivateKeyDer::from_pem_slice(text.as_bytes())
            .map_err(|e| format!("{}: {e:?}", cp.display()))?;
        (chain, key, cp)
    } else {
        let (cp, kp) = legacy_paths(dir, name);
        if !cp.exists() {
            return Ok(None);
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cp)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| format!("{}: {e:?}", cp.display()))?;
        let key =
            PrivateKeyDer::from_pem_file(&kp).map_err(|e| format!("{}: {e:?}", kp.display()))?;
        (chain, key, cp)
    };
    let loaded = certified(chain, key).map_err(|e| format!("{}: {e}", shown.display()))?;
    if loaded.not_after <= SystemTime::now() {
        return Err(format!("{}: expired", shown.display()));
    }
    let leaf = loaded.key.cert.first().ok_or("empty chain")?;
    if !names_of(leaf).iter().any(|n| n == name) {
        return Err(format!("{}: does not name {name}", shown.display()));
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

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn a_certificate_is_served_only_for_the_directory_that_issued_it() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = issued("a.example");
        save(dir.path(), "a.example", "https://one/dir", &chain, &key).unwrap();
        assert!(
            load(dir.path(), "a.example", "https://one/dir")
                .unwrap()
                .is_some()
        );
        let other = load(dir.path(), "a.example", "https://two/dir")
            .err()
            .unwrap();
        assert!(other.contains("issued by https://one/dir"), "{other}");
        assert!(
            load(dir.path(), "b.example", "https://one/dir")
                .unwrap()
                .is_none()
        );
        let mode = std::fs::metadata(dir.path().join("a.example.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Nothing but the file itself is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn the_first_release_layout_is_still_read_and_replaced_on_the_next_save() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, key) = issued("a.example");
        std::fs::write(dir.path().join("a.example.crt.pem"), &chain).unwrap();
        std::fs::write(dir.path().join("a.example.key.pem"), &key).unwrap();
        assert!(
            load(dir.path(), "a.example", "https://one/dir")
                .unwrap()
                .is_some()
        );
        save(dir.path(), "a.example", "https://one/dir", &chain, &key).unwrap();
        assert!(!dir.path().join("a.example.crt.pem").exists());
        assert!(!dir.path().join("a.example.key.pem").exists());
        assert!(
            load(dir.path(), "a.example", "https://one/dir")
                .unwrap()
                .is_some()
        );
    }

    #[test]
    fn a_key_that_is_not_the_chain_s_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (chain, _) = issued("a.example");
        let (_, other_key) = issued("a.example");
        save(
            dir.path(),
            "a.example",
            "https://one/dir",
            &chain,
            &other_key,
        )
        .unwrap();
        assert!(load(dir.path(), "a.example", "https://one/dir").is_err());
    }
}
