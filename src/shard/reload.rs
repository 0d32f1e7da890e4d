//! Live registry reload (`POST /v1/registry/reload`, SIGHUP): a new registry and TLS setup
//! swapped in while every connection stays up.
//!
//! Owns: the order of a reload. Never: the shards' state (they swap it themselves, at a turn
//! boundary, see [`ShardCore`](super::core::ShardCore)'s `swap`).
//!
//! ```text
//!   API thread / signal loop                       shard k (its own thread, its own loop)
//!   ─────────────────────────                      ────────────────────────────────────────
//!   1 read + validate every source (off the
//!     shards; same code as `ringlink check`);
//!     any error: answer them all, change nothing
//!   2 carry ids over (registry::carry_over)
//!   3 grow Owners and Shadows to the new ids
//!     (chunks appended, nothing moves)
//!   4 publish for the API and forwarders (Env)
//!   5 ShardMsg::Reload into every inbox ──────────▶ between two events of its loop:
//!                                                   sessions get the new context, new accepts
//!                                                   the new TLS config, removed devices it
//!                                                   owns go offline (offline record)
//!   6 wait for every shard's answer ◀───────────── Answer(success)
//!   7 answer {added, removed, changed}
//! ```
//!
//! Steps 1 and 2 run on a thread of their own at nice 10 (`ringlink-reload`): on a machine
//! with no idle core they take CPU from the shards as little as the scheduler allows.
//!
//! There is no global stop: each shard swaps on its own within one turn of its loop, and the
//! swap costs it one pointer copy per connection plus one ownership lookup per removed device.
//! Between steps 4 and 6, shards that have not swapped yet still serve the previous registry;
//! device ids mean the same device in both (see [`crate::registry`]), so a message handled
//! against either is handled correctly for that moment, and once step 6 is done every
//! connection uses the new one. Only one reload runs at a time.
//!
//! What a reload re-reads: the configuration as at start (file, environment, flags), of which
//! it applies the `[registry]` sources (thing models, device lists) and the TLS certificate and
//! key. Other settings, and turning TLS on or off, need a restart.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::registry::Registry;
use crate::session::Context;
use crate::shard::core::{Live, ShardMsg, Swap};
use crate::shard::Shared;

/// What a reload reads: a fresh registry and TLS setup, or every error with its place.
pub struct Reloaded {
    pub registry: Registry,
    /// Must be present exactly when the server started with TLS.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

type SourceFn = dyn Fn() -> Result<Reloaded, Vec<String>> + Send + Sync;

/// Reads and validates the registry sources and TLS files again; runs off the shard threads.
#[derive(Clone)]
pub struct ReloadSource(Arc<SourceFn>);

impl ReloadSource {
    pub fn new(read: impl Fn() -> Result<Reloaded, Vec<String>> + Send + Sync + 'static) -> Self {
        Self(Arc::new(read))
    }
}

impl fmt::Debug for ReloadSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReloadSource")
    }
}

/// What a reload did: counts of devices (see [`crate::registry::Changes`]).
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReloadReport {
    pub added: usize,
    pub removed: usize,
    /// Kept devices whose clientIp or thing model changed.
    pub changed: usize,
    /// Devices registered now.
    pub devices: usize,
    /// productKeys whose thing model changed.
    pub models_changed: Vec<String>,
    /// From the request to every shard swapped.
    pub took_ms: u64,
}

/// Why a reload changed nothing.
#[derive(Debug, Clone)]
pub enum ReloadError {
    /// The sources have errors: every one, with file and line (or JSON path).
    Invalid(Vec<String>),
    /// This server cannot reload (started without a configuration to re-read).
    Unavailable(&'static str),
}

impl Shared {
    /// Reloads the registry and TLS setup; see the module docs. Waits until every shard has
    /// swapped, so a device added is accepted everywhere once this returns.
    pub(crate) async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let Some(source) = self.reload_source.clone() else {
            return Err(ReloadError::Unavailable(
                "this server has no configuration to reload",
            ));
        };
        let _one_at_a_time = self.reload_lock.lock().await;
        let started = Instant::now();
        let result = self.reload_from(source, started).await;
        let m = &self.env.metrics;
        match &result {
            Ok(r) => {
                m.reloads_ok
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(
                    added = r.added,
                    removed = r.removed,
                    changed = r.changed,
                    devices = r.devices,
                    models_changed = ?r.models_changed,
                    took_ms = r.took_ms,
                    "registry reloaded"
                );
            }
            Err(ReloadError::Invalid(errors)) => {
                m.reloads_failed
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::warn!(
                    errors = errors.len(),
                    "registry reload refused, nothing changed: {}",
                    errors.join("; ")
                );
            }
            Err(ReloadError::Unavailable(why)) => {
                tracing::warn!("registry reload unavailable: {why}");
            }
        }
        result
    }

    async fn reload_from(
        &self,
        source: ReloadSource,
        started: Instant,
    ) -> Result<ReloadReport, ReloadError> {
        // Reading, validating and renumbering run on a thread of their own at a low priority,
        // so that on a busy machine they take CPU from the shards as little as possible.
        let running = self.env.registry();
        let (done, result) = oneshot::channel();
        std::thread::Builder::new()
            .name("ringlink-reload".into())
            .spawn(move || {
                lower_priority();
                let built = (source.0)().and_then(|loaded| {
                    let (registry, changes) =
                        running.carry_over(loaded.registry).map_err(|e| vec![e])?;
                    Ok((registry, changes, loaded.tls))
                });
                let _ = done.send(built);
            })
            .map_err(|e| ReloadError::Invalid(vec![format!("cannot start the reload: {e}")]))?;
        let (registry, changes, tls) = result
            .await
            .map_err(|_| ReloadError::Invalid(vec!["reading the sources panicked".into()]))?
            .map_err(ReloadError::Invalid)?;
        let old = self.env.live();
        if tls.is_some() != old.tls.is_some() {
            return Err(ReloadError::Invalid(vec![
                "listener.tls: a reload cannot turn TLS on or off; restart ringlink".into(),
            ]));
        }
        // Room for the new ids before anyone can see them.
        self.env.owners.grow(registry.id_bound());
        self.env.shadows.grow(registry.id_bound());
        self.env.admission.flapping.grow(registry.id_bound());
        let devices = registry.len();
        let live = Live {
            ctx: Arc::new(Context {
                registry: Arc::new(registry),
                config: old.ctx.config.clone(),
            }),
            tls,
        };
        self.env.set_live(live.clone());
        let swap = Arc::new(Swap {
            live,
            removed: changes.removed.clone(),
        });
        let mut swapped = Vec::with_capacity(self.mesh.len());
        for shard in 0..self.mesh.len() {
            let (reply, done) = oneshot::channel();
            let msg = ShardMsg::Reload {
                swap: Arc::clone(&swap),
                reply,
            };
            if self.mesh.send(shard as u8, msg) {
                swapped.push(done);
            }
        }
        for done in swapped {
            // A shard that stopped meanwhile (drain) has nothing left to swap.
            let _ = tokio::time::timeout(SWAP_WAIT, done).await;
        }
        Ok(ReloadReport {
            added: changes.added.len(),
            removed: changes.removed.len(),
            changed: changes.changed.len(),
            devices,
            models_changed: changes
                .models_changed
                .iter()
                .map(ToString::to_string)
                .collect(),
            took_ms: started.elapsed().as_millis() as u64,
        })
    }
}

/// Lowers the calling thread's scheduling priority (nice 10): on Linux the nice value is per
/// thread, and `who = 0` names the calling one. Best effort: on failure the reload just runs at
/// normal priority.
// One libc call; no safe wrapper in the dependencies offers it.
#[allow(unsafe_code)]
fn lower_priority() {
    // SAFETY: setpriority takes plain integers and touches no memory of ours.
    let _ = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// How long a reload waits for a shard to swap: one turn of its loop is far shorter; this only
/// bounds a shard that is stuck or stopping.
const SWAP_WAIT: Duration = Duration::from_secs(5);
