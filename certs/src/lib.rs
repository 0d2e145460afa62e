//! TLS certificates for the gateway: loading PEM chains and keys, generating short-lived
//! development certificates that browsers accept for WebTransport, and a certificate
//! resolver that can be swapped without a restart.
#![warn(missing_docs)]

mod dev;
mod load;
mod resolver;

pub use dev::{ensure_dev_cert, DevCert, DEV_CERT_VALIDITY};
pub use load::{load_pem, CertError, PemIdentity};
pub use resolver::ReloadableResolver;

/// Lower-case hex SHA-256 of `bytes` (the certificate hash browsers pin in
/// `serverCertificateHashes`, when given the certificate DER).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, bytes);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Base64 SHA-256 of a SubjectPublicKeyInfo (Chromium's `--ignore-certificate-errors-spki-list`).
pub fn spki_sha256_base64(spki_der: &[u8]) -> String {
    use base64::Engine;
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}
