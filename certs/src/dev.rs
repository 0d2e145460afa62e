use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use rcgen::{CertificateParams, DnType, KeyPair, PublicKeyData};
use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

use crate::{load::CertError, sha256_hex, spki_sha256_base64, PemIdentity};

/// Validity of a development certificate. Browsers accept a certificate pinned through
/// WebTransport `serverCertificateHashes` only when it is valid for at most 14 days; one
/// hour of that is spent backdating `notBefore` against clock skew.
pub const DEV_CERT_VALIDITY: Duration = Duration::from_secs(13 * 24 * 3600);

const BACKDATE: Duration = Duration::from_secs(3600);
/// A reused certificate must stay valid at least this long.
const REUSE_MARGIN: Duration = Duration::from_secs(24 * 3600);

/// A self-signed ECDSA P-256 certificate for localhost, 127.0.0.1 and ::1.
#[derive(Debug, Clone)]
pub struct DevCert {
    /// Certificate, PEM.
    pub cert_pem: String,
    /// Private key, PKCS#8 PEM.
    pub key_pem: String,
    /// Lower-case hex SHA-256 of the certificate DER (`serverCertificateHashes`).
    pub sha256: String,
    /// Base64 SHA-256 of the public key info (Chromium `--ignore-certificate-errors-spki-list`).
    pub spki_sha256: String,
    /// `notAfter`, seconds since the Unix epoch.
    pub not_after: u64,
}

impl DevCert {
    /// Generates a fresh certificate valid from an hour ago for [`DEV_CERT_VALIDITY`].
    pub fn generate() -> Result<Self, CertError> {
        let gen = CertError::Generate;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let mut params = CertificateParams::new(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ])
        .map_err(gen)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "gateway development certificate");
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = not_before + DEV_CERT_VALIDITY;
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.self_signed(&key).map_err(gen)?;
        Ok(Self {
            sha256: sha256_hex(cert.der()),
            spki_sha256: spki_sha256_base64(&key.subject_public_key_info()),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            not_after: unix(not_after),
        })
    }

    /// The certificate and key for rustls.
    pub fn identity(&self) -> Result<PemIdentity, CertError> {
        let pem = |e: rustls_pki_types::pem::Error| CertError::Pem {
            path: PathBuf::from("<dev certificate>"),
            message: e.to_string(),
        };
        Ok(PemIdentity {
            chain: vec![CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).map_err(pem)?],
            key: PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).map_err(pem)?,
        })
    }

    /// Writes `cert.pem`, `key.pem` and `cert.expires` (Unix seconds) into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), CertError> {
        let io = |path: PathBuf| move |source| CertError::Io { path, source };
        fs::create_dir_all(dir).map_err(io(dir.to_owned()))?;
        let files = [
            ("cert.pem", self.cert_pem.clone()),
            ("key.pem", self.key_pem.clone()),
            ("cert.expires", self.not_after.to_string()),
        ];
        for (name, content) in files {
            let path = dir.join(name);
            fs::write(&path, content).map_err(io(path))?;
        }
        Ok(())
    }

    /// Reads a certificate written by [`write`](Self::write), if it is there and readable.
    fn read(dir: &Path) -> Option<Self> {
        let cert_pem = fs::read_to_string(dir.join("cert.pem")).ok()?;
        let key_pem = fs::read_to_string(dir.join("key.pem")).ok()?;
        let not_after = fs::read_to_string(dir.join("cert.expires"))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
        let key = KeyPair::from_pem(&key_pem).ok()?;
        Some(Self {
            sha256: sha256_hex(&der),
            spki_sha256: spki_sha256_base64(&key.subject_public_key_info()),
            cert_pem,
            key_pem,
            not_after,
        })
    }
}

/// The development certificate in `dir`: reused while it stays valid for at least another
/// day, otherwise generated anew and written there. Returns it and whether it is new.
pub fn ensure_dev_cert(dir: &Path) -> Result<(DevCert, bool), CertError> {
    let now = unix(SystemTime::now());
    if let Some(existing) = DevCert::read(dir) {
        if existing.not_after > now + REUSE_MARGIN.as_secs() {
            return Ok((existing, false));
        }
    }
    let fresh = DevCert::generate()?;
    fresh.write(dir)?;
    Ok((fresh, true))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_cert_is_reused_while_valid_and_loads_into_rustls_shapes() {
        let dir = std::env::temp_dir().join(format!("devcert-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let (first, new) = ensure_dev_cert(&dir).unwrap();
        assert!(new);
        assert_eq!(first.sha256.len(), 64);
        let (again, new) = ensure_dev_cert(&dir).unwrap();
        assert!(!new);
        assert_eq!(again.sha256, first.sha256);
        assert_eq!(again.spki_sha256, first.spki_sha256);
        let loaded = crate::load_pem(&dir.join("cert.pem"), &dir.join("key.pem")).unwrap();
        assert_eq!(loaded.chain.len(), 1);
        assert_eq!(sha256_hex(&loaded.chain[0]), first.sha256);
        // An expiring certificate is replaced.
        fs::write(dir.join("cert.expires"), "0").unwrap();
        let (replaced, new) = ensure_dev_cert(&dir).unwrap();
        assert!(new);
        assert_ne!(replaced.sha256, first.sha256);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn validity_is_within_fourteen_days() {
        let cert = DevCert::generate().unwrap();
        let now = unix(SystemTime::now());
        assert!(cert.not_after <= now + 14 * 24 * 3600);
        assert!(BACKDATE + DEV_CERT_VALIDITY <= Duration::from_secs(14 * 24 * 3600));
    }
}
