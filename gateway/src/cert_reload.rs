//! Reloading the `[tls]` certificate and key without a restart.
//!
//! It happens on request (SIGHUP, or
//! [`Server::reload_certificate`](crate::Server::reload_certificate)) and when the files
//! change on disk. The new pair goes into the resolver both listeners share, so new TCP and
//! QUIC handshakes use it; established connections keep theirs. A pair that cannot be used
//! is refused with one warning, and the current certificate stays.
//!
//! Changes are found by polling the files' metadata (size, modification time, inode)
//! rather than by file-system events: it costs two `stat` calls per poll, and it sees
//! certificates replaced through symlink swaps (certbot's `live/`, Kubernetes secret
//! volumes) that events on the original paths miss.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use gateway_certs::{load_pem, sha256_hex, CertError, ReloadableResolver};
use tracing::{info, warn};

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertReload {
    /// The pair was loaded; new handshakes serve this certificate.
    Replaced {
        /// Lower-case hex SHA-256 of the new leaf certificate (DER).
        sha256: String,
    },
    /// The gateway serves a development certificate: there is nothing to reload.
    DevCertificate,
}

/// A refused reload: the current certificate stays.
#[derive(Debug, thiserror::Error)]
#[error("certificate reload from {} and {} refused, the current certificate stays: {source}", cert.display(), key.display())]
pub struct ReloadError {
    /// The certificate file.
    pub cert: PathBuf,
    /// The key file.
    pub key: PathBuf,
    /// Why.
    #[source]
    pub source: CertError,
}

/// What made a reload happen (logged with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// SIGHUP.
    Signal,
    /// The files changed on disk.
    FilesChanged,
    /// A call of the reload API.
    Request,
}

impl Trigger {
    fn as_str(self) -> &'static str {
        match self {
            Self::Signal => "SIGHUP",
            Self::FilesChanged => "files changed",
            Self::Request => "request",
        }
    }
}

/// Reloads one certificate and key pair into a resolver.
#[derive(Debug)]
pub struct CertReloader {
    cert: PathBuf,
    key: PathBuf,
    resolver: Arc<ReloadableResolver>,
    /// The files' stamps when they were last loaded (or refused).
    ///
    /// A poll that sees these again has nothing to do.
    seen: Mutex<Stamps>,
}

/// The metadata of both files that tells a change; `None` for a file that is missing.
pub type Stamps = (Option<FileStamp>, Option<FileStamp>);

/// One file's size, modification time and inode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    /// The inode (and device).
    ///
    /// A file renamed over the path, or a symlink pointed elsewhere, changes it even when
    /// size and time happen to match.
    inode: (u64, u64),
}

impl FileStamp {
    fn of(path: &Path) -> Option<Self> {
        // Follows symlinks: a swapped link target is a change.
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = {
            use std::os::unix::fs::MetadataExt;
            (meta.dev(), meta.ino())
        };
        #[cfg(not(unix))]
        let inode = (0, 0);
        Some(Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
        })
    }
}

impl CertReloader {
    /// A reloader of `cert` and `key` into `resolver`, which serves them as of now.
    pub fn new(cert: PathBuf, key: PathBuf, resolver: Arc<ReloadableResolver>) -> Arc<Self> {
        let seen = Mutex::new((FileStamp::of(&cert), FileStamp::of(&key)));
        Arc::new(Self {
            cert,
            key,
            resolver,
            seen,
        })
    }

    fn stamps(&self) -> Stamps {
        (FileStamp::of(&self.cert), FileStamp::of(&self.key))
    }

    /// Loads the files now and swaps them in, or refuses them (keeping the current pair).
    ///
    /// Either outcome is logged once.
    pub fn reload(&self, trigger: Trigger) -> Result<CertReload, ReloadError> {
        // Held for the whole reload, so a signal and the watcher cannot interleave (the
        // slower storing older files last). Stamps are taken before reading: a write after
        // this is a change the next poll sees.
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        *seen = self.stamps();
        let loaded = load_pem(&self.cert, &self.key).and_then(|identity| {
            self.resolver.replace(&identity)?;
            Ok(sha256_hex(&identity.chain[0]))
        });
        drop(seen);
        match loaded {
            Ok(sha256) => {
                info!(trigger = trigger.as_str(), cert = %self.cert.display(),
                    key = %self.key.display(), %sha256, "certificate reloaded");
                Ok(CertReload::Replaced { sha256 })
            }
            Err(source) => {
                let e = ReloadError {
                    cert: self.cert.clone(),
                    key: self.key.clone(),
                    source,
                };
                warn!(trigger = trigger.as_str(), "{e}");
                Err(e)
            }
        }
    }

    /// Polls the files every `every` (see [`poll`](Self::poll)).
    pub async fn watch(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut changed = None;
        loop {
            tick.tick().await;
            self.poll(&mut changed);
        }
    }

    /// One look at the files.
    ///
    /// A change is reloaded once it has held still for one poll (a certificate and key
    /// written one after the other are read together). A pair refused once is not tried
    /// again until the files change again. `changed` carries the change seen by the
    /// previous poll.
    pub fn poll(&self, changed: &mut Option<Stamps>) -> Option<Result<CertReload, ReloadError>> {
        let now = self.stamps();
        if now == *self.seen.lock().expect("stamps lock") {
            *changed = None;
            None
        } else if *changed == Some(now) {
            *changed = None;
            Some(self.reload(Trigger::FilesChanged))
        } else {
            *changed = Some(now);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use gateway_certs::DevCert;

    use super::*;

    fn write(dir: &Path, cert: &DevCert) {
        std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
        std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    }

    fn reloader(dir: &Path, first: &DevCert) -> (Arc<CertReloader>, Arc<ReloadableResolver>) {
        write(dir, first);
        let resolver = ReloadableResolver::new(&first.identity().unwrap()).unwrap();
        let reloader =
            CertReloader::new(dir.join("cert.pem"), dir.join("key.pem"), resolver.clone());
        (reloader, resolver)
    }

    /// Lets the file clock move on, so a rewrite right after a load is told apart from it.
    ///
    /// Modification times have a granularity of a few milliseconds.
    fn settle() {
        std::thread::sleep(Duration::from_millis(30));
    }

    fn unique_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gw-reload-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn reload_swaps_a_good_pair_and_refuses_a_bad_one() {
        let dir = unique_dir("swap");
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let (reloader, resolver) = reloader(&dir, &a);
        settle();
        write(&dir, &b);
        assert_eq!(
            reloader.reload(Trigger::Request).unwrap(),
            CertReload::Replaced {
                sha256: b.sha256.clone()
            }
        );
        assert_eq!(sha256_hex(&resolver.leaf_der()), b.sha256);
        // A's key with B's certificate.
        std::fs::write(dir.join("key.pem"), &a.key_pem).unwrap();
        let e = reloader.reload(Trigger::Request).unwrap_err();
        assert!(matches!(e.source, CertError::KeyMismatch), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("cert.pem") && text.contains("key.pem"),
            "{text}"
        );
        // Garbage.
        std::fs::write(dir.join("cert.pem"), "not a certificate").unwrap();
        let e = reloader.reload(Trigger::Request).unwrap_err();
        assert!(matches!(e.source, CertError::NoCertificate(_)), "{e}");
        assert_eq!(sha256_hex(&resolver.leaf_der()), b.sha256);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_change_is_loaded_once_it_holds_still() {
        let dir = unique_dir("watch");
        let (a, b) = (DevCert::generate().unwrap(), DevCert::generate().unwrap());
        let (reloader, resolver) = reloader(&dir, &a);
        let mut changed = None;
        assert!(reloader.poll(&mut changed).is_none(), "nothing changed");
        // Only the certificate (it does not match the key): not loaded while it changes.
        settle();
        std::fs::write(dir.join("cert.pem"), &b.cert_pem).unwrap();
        assert!(reloader.poll(&mut changed).is_none(), "just changed");
        settle();
        std::fs::write(dir.join("key.pem"), &b.key_pem).unwrap();
        assert!(reloader.poll(&mut changed).is_none(), "still changing");
        assert_eq!(sha256_hex(&resolver.leaf_der()), a.sha256);
        let reloaded = reloader.poll(&mut changed).expect("held still").unwrap();
        assert_eq!(
            reloaded,
            CertReload::Replaced {
                sha256: b.sha256.clone()
            }
        );
        assert_eq!(sha256_hex(&resolver.leaf_der()), b.sha256);
        assert!(reloader.poll(&mut changed).is_none(), "loaded once");
        // A refused pair is tried once, not at every poll.
        settle();
        std::fs::write(dir.join("key.pem"), &a.key_pem).unwrap();
        assert!(reloader.poll(&mut changed).is_none());
        assert!(matches!(reloader.poll(&mut changed), Some(Err(_))));
        assert!(reloader.poll(&mut changed).is_none(), "refused once");
        assert_eq!(sha256_hex(&resolver.leaf_der()), b.sha256);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
