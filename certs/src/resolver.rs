use std::sync::Arc;

use arc_swap::ArcSwap;

use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use crate::{load::CertError, PemIdentity};

/// A rustls certificate resolver whose certificate can be replaced at run time; new
/// handshakes use the new certificate, established connections keep theirs. Handshakes
/// read it without a lock (arc-swap).
#[derive(Debug)]
pub struct ReloadableResolver {
    current: ArcSwap<CertifiedKey>,
}

impl ReloadableResolver {
    /// A resolver serving `identity`.
    pub fn new(identity: &PemIdentity) -> Result<Arc<Self>, CertError> {
        Ok(Arc::new(Self {
            current: ArcSwap::new(certified(identity)?),
        }))
    }

    /// Swaps in a new certificate atomically.
    pub fn replace(&self, identity: &PemIdentity) -> Result<(), CertError> {
        self.current.store(certified(identity)?);
        Ok(())
    }

    /// The leaf certificate currently served, DER.
    pub fn leaf_der(&self) -> Vec<u8> {
        let current = self.current.load();
        current.cert.first().map(|c| c.to_vec()).unwrap_or_default()
    }
}

impl ResolvesServerCert for ReloadableResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// The identity as rustls serves it: a key rustls can sign with, whose public key is the
/// leaf certificate's.
fn certified(identity: &PemIdentity) -> Result<Arc<CertifiedKey>, CertError> {
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(identity.chain.clone(), identity.key.clone_key(), &provider)
        .map(Arc::new)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                CertError::KeyMismatch
            }
            e => CertError::Key(e),
        })
}

#[cfg(test)]
mod tests {
    use rustls_pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::ReloadableResolver;
    use crate::{CertError, DevCert, PemIdentity};

    #[test]
    fn a_replaced_certificate_is_served_and_an_unusable_one_keeps_the_old() {
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let resolver = ReloadableResolver::new(&a.identity().unwrap()).unwrap();
        let der = |c: &DevCert| c.identity().unwrap().chain[0].to_vec();
        let served = |r: &ReloadableResolver| r.current.load().cert[0].to_vec();
        assert_eq!(served(&resolver), der(&a));
        resolver.replace(&b.identity().unwrap()).unwrap();
        assert_eq!(served(&resolver), der(&b));
        let broken = PemIdentity {
            chain: a.identity().unwrap().chain,
            key: PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(vec![0u8; 16])),
        };
        let refused = resolver.replace(&broken).unwrap_err();
        // The error keeps rustls's own as its source.
        assert!(std::error::Error::source(&refused).is_some(), "{refused}");
        assert_eq!(served(&resolver), der(&b));
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let resolver = ReloadableResolver::new(&a.identity().unwrap()).unwrap();
        let mismatched = PemIdentity {
            chain: b.identity().unwrap().chain,
            key: a.identity().unwrap().key,
        };
        assert!(matches!(
            ReloadableResolver::new(&mismatched),
            Err(CertError::KeyMismatch)
        ));
        assert!(matches!(
            resolver.replace(&mismatched),
            Err(CertError::KeyMismatch)
        ));
        assert_eq!(
            resolver.current.load().cert[0].to_vec(),
            a.identity().unwrap().chain[0].to_vec()
        );
    }
}
