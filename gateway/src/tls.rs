//! rustls server configurations for the TCP and QUIC listeners.
//!
//! The TCP listener serves HTTP/1.1 + WebSocket, the QUIC one HTTP/3; they share one
//! certificate resolver.

use std::sync::Arc;

use gateway_certs::ReloadableResolver;
use rustls::ServerConfig;

/// Installs the ring crypto provider as the process default (idempotent).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn base(
    resolver: Arc<ReloadableResolver>,
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> ServerConfig {
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(versions)
            .expect("ring supports TLS 1.2 and 1.3")
            .with_no_client_auth()
            .with_cert_resolver(resolver);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config
}

/// TLS 1.2/1.3 over TCP, ALPN `http/1.1` (WebSocket upgrades need HTTP/1.1).
pub fn tcp_config(resolver: Arc<ReloadableResolver>) -> Arc<ServerConfig> {
    Arc::new(base(resolver, &[b"http/1.1"], rustls::DEFAULT_VERSIONS))
}

/// TLS 1.3 for QUIC, ALPN `h3`.
pub fn quic_config(resolver: Arc<ReloadableResolver>) -> ServerConfig {
    let mut config = base(resolver, &[b"h3"], &[&rustls::version::TLS13]);
    config.max_early_data_size = 0;
    config
}
