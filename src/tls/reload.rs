//! Certificate rotation without restarts. A [`Reloading`] holds the current TLS material and
//! re-reads the files on a short poll: when their contents change and the new material is valid,
//! it is swapped in for new handshakes; when it is unreadable or invalid, the old material stays,
//! and the failure is logged and shown by the `…_update_error` gauge. Polling the paths follows
//! Kubernetes' `..data` symlink swaps without any special case.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;

use super::{TlsError, TlsFiles, certs, roots};
use crate::metrics::TlsGauges;

pub use super::verify::Side;

/// Turns the files into usable material (a rustls or tonic configuration).
type Build<T> = Box<dyn Fn(&TlsFiles) -> Result<T, TlsError> + Send + Sync>;

/// TLS material that follows its files.
pub struct Reloading<T> {
    files: TlsFiles,
    side: Side,
    build: Build<T>,
    current: ArcSwap<T>,
    contents: Mutex<Vec<u8>>,
    generation: AtomicU64,
    gauges: TlsGauges,
}

fn read_all(files: &TlsFiles) -> Result<Vec<u8>, TlsError> {
    let mut all = Vec::new();
    for path in [&files.cert, &files.key, &files.ca] {
        let bytes = std::fs::read(path)
            .map_err(|e| TlsError::File { path: path.display().to_string(), message: e.to_string() })?;
        all.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        all.extend(bytes);
    }
    Ok(all)
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Loads the material now (failing start-up if it is invalid) with `build`.
    pub fn load(
        files: &TlsFiles,
        side: Side,
        gauges: TlsGauges,
        build: impl Fn(&TlsFiles) -> Result<T, TlsError> + Send + Sync + 'static,
    ) -> Result<Arc<Self>, TlsError> {
        let contents = read_all(files)?;
        let material = build(files)?;
        let reloading = Reloading {
            files: files.clone(),
            side,
            build: Box::new(build),
            current: ArcSwap::from_pointee(material),
            contents: Mutex::new(contents),
            generation: AtomicU64::new(0),
            gauges,
        };
        reloading.observe();
        Ok(Arc::new(reloading))
    }

    /// The material to use for the next handshake.
    pub fn current(&self) -> Arc<T> {
        self.current.load_full()
    }

    /// Bumped on every successful reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Re-reads the files; swaps in new material if they changed and are valid. Returns whether
    /// a swap happened.
    pub fn check(&self) -> bool {
        let mut last = self.contents.lock().unwrap_or_else(PoisonError::into_inner);
        let fresh = match read_all(&self.files) {
            Ok(fresh) if fresh == *last => {
                // Readable again and what is in use: whatever failed before is over (a reload
                // that failed while the files were briefly unreadable must not stay reported).
                self.gauges.update_error.set(0);
                return false;
            }
            Ok(fresh) => fresh,
            Err(error) => return self.failed(&error),
        };
        match (self.build)(&self.files) {
            Ok(material) => {
                self.current.store(Arc::new(material));
                *last = fresh;
                self.generation.fetch_add(1, Ordering::SeqCst);
                self.gauges.update_error.set(0);
                self.observe();
                tracing::info!(cert = %self.files.cert.display(), side = ?self.side, "TLS material reloaded");
                true
            }
            Err(error) => self.failed(&error),
        }
    }

    fn failed(&self, error: &TlsError) -> bool {
        if self.gauges.update_error.set(1) == 0 {
            tracing::error!(%error, side = ?self.side, "TLS reload failed; keeping the previous certificate");
        }
        false
    }

    /// Sets the expiry and verification gauges from the files as loaded.
    fn observe(&self) {
        let Ok(chain) = certs(&self.files.cert) else { return };
        let Some(leaf) = chain.first() else { return };
        if let Some(expiry) = super::x509::not_after(leaf) {
            self.gauges.expiry_seconds.set(super::x509::epoch_seconds(expiry));
        }
        let verified = match roots(&self.files.ca) {
            Ok(roots) => verify(self.side, leaf, &chain[1..], &roots).map_err(|e| format!("{e:?}")),
            Err(error) => Err(error.to_string()),
        };
        self.gauges.verify_error.set(i64::from(verified.is_err()));
        if let Err(reason) = verified {
            tracing::warn!(
                cert = %self.files.cert.display(),
                ca = %self.files.ca.display(),
                side = ?self.side,
                reason,
                "certificate does not verify against the CA bundle"
            );
        }
    }

    /// Checks the files every `every` until `shutdown`.
    pub fn spawn_watch(self: &Arc<Self>, every: Duration, shutdown: CancellationToken) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let this = Arc::clone(&this);
                // File reads off the runtime's workers.
                let _ = tokio::task::spawn_blocking(move || this.check()).await;
            }
        });
    }
}

/// Whether `leaf` chains to `roots` with the key usage its side needs (kiam's rule, as the
/// peers check it: [`super::verify`]); the reason when it does not.
fn verify(
    side: Side,
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    roots: &RootCertStore,
) -> Result<(), webpki::Error> {
    let now = UnixTime::since_unix_epoch(
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default(),
    );
    super::verify::chain(side, roots, leaf, intermediates, now)
}
