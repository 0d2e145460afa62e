use std::sync::{Arc, RwLock};

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{load::CertError, PemIdentity};

/// A rustls certificate resolver whose certificate can be replaced at run time; new
/// handshakes use the new certificate, established connections keep theirs.
#[derive(Debug)]
pub struct ReloadableResolver {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadableResolver {
    /// A resolver serving `identity`.
    pub fn new(identity: &PemIdentity) -> Result<Arc<Self>, CertError> {
        Ok(Arc::new(Self {
            current: RwLock::new(certified(identity)?),
        }))
    }

    /// Swaps in a new certificate atomically.
    pub fn replace(&self, identity: &PemIdentity) -> Result<(), CertError> {
        let key = certified(identity)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = key;
        Ok(())
    }

    /// The leaf certificate currently served, DER.
    pub fn leaf_der(&self) -> Vec<u8> {
        let current = self.current.read().unwrap_or_else(|e| e.into_inner());
        current.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadableResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }
}

fn certified(identity: &PemIdentity) -> Result<Arc<CertifiedKey>, CertError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = provider
        .key_provider
        .load_private_key(identity.key.clone_key())
        .map_err(|e| CertError::Key(e.to_string()))?;
    Ok(Arc::new(CertifiedKey::new(identity.chain.clone(), key)))
}
