use std::path::{Path, PathBuf};

use rustls_pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};

/// A certificate chain and its private key, ready for rustls.
#[derive(Debug)]
pub struct PemIdentity {
    /// Leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// PKCS#8, SEC1 or PKCS#1 key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for PemIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// Why certificates could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file could not be read or parsed as PEM.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// rustls refused the key.
    #[error("unusable private key: {0}")]
    Key(#[source] rustls::Error),
    /// The private key is not the key of the (leaf) certificate.
    #[error("the private key does not match the certificate")]
    KeyMismatch,
    /// Generating a certificate failed.
    #[error("generating a certificate: {0}")]
    Generate(#[source] rcgen::Error),
    /// Writing files failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// Loads a PEM certificate chain and a PEM private key (PKCS#8, SEC1 or RSA).
pub fn load_pem(cert: &Path, key: &Path) -> Result<PemIdentity, CertError> {
    let pem_err = |path: &Path, e: rustls_pki_types::pem::Error| CertError::Pem {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e))?;
    if chain.is_empty() {
        return Err(CertError::NoCertificate(cert.to_owned()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e))?;
    Ok(PemIdentity { chain, key })
}
