//! The policy in force, reloaded from its file without a restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;

use crate::{PolicyEngine, PolicyError};

/// A callback run after each successful change of policy.
type OnChange = Arc<dyn Fn(&Arc<PolicyEngine>) + Send + Sync>;

/// Holds the policy in force and replaces it when its file changes.
///
/// Operators change policy by editing a file (or a ConfigMap); the gateway must pick it up
/// without a restart, and a broken edit must never leave the gateway without a policy or
/// with half of one. So [`PolicyStore::reload`] compiles the whole new file first and swaps
/// it in only if it compiled; otherwise the error (with its line) is returned and the old
/// engine stays in force. Readers take an `Arc` snapshot with [`PolicyStore::current`]: a
/// session opened under one version keeps a consistent view even if a reload happens
/// meanwhile.
pub struct PolicyStore {
    path: PathBuf,
    current: RwLock<Arc<PolicyEngine>>,
    /// The file's modification time and length when last read, so the watcher only re-reads
    /// a file that changed. Its lock also serializes reloads.
    stamp: Mutex<Option<(SystemTime, u64)>>,
    versions: watch::Sender<String>,
    on_change: RwLock<Option<OnChange>>,
}

impl PolicyStore {
    /// Loads the policy file at `path`; a broken file is an error here (there is no old
    /// policy to keep), so a gateway refuses to start on it.
    pub fn open(path: &Path) -> Result<Self, PolicyError> {
        let stamp = file_stamp(path);
        let engine = PolicyEngine::load(path)?;
        let (versions, _) = watch::channel(engine.version().to_owned());
        Ok(PolicyStore {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(engine)),
            stamp: Mutex::new(stamp),
            versions,
            on_change: RwLock::new(None),
        })
    }

    /// The file this store reloads from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The policy in force now. Cheap (an `Arc` clone); hold it for as long as one decision
    /// or one session needs a consistent policy.
    pub fn current(&self) -> Arc<PolicyEngine> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Re-reads the file. `Ok(true)` if a new policy is now in force, `Ok(false)` if the text
    /// is the same as the policy in force; an error (with line and reason) if the file cannot
    /// be read or compiled, in which case the old policy stays in force.
    pub fn reload(&self) -> Result<bool, PolicyError> {
        // One reload at a time, from reading the file to the swap: two concurrent reloads
        // (the watcher and an operator's) must not let an older read win over a newer one.
        let engine = {
            let mut stamp = match self.stamp.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            *stamp = file_stamp(&self.path);
            let engine = PolicyEngine::load(&self.path)?;
            if engine.version() == self.current().version() {
                return Ok(false);
            }
            let engine = Arc::new(engine);
            match self.current.write() {
                Ok(mut guard) => *guard = Arc::clone(&engine),
                Err(poisoned) => *poisoned.into_inner() = Arc::clone(&engine),
            }
            self.versions.send_replace(engine.version().to_owned());
            engine
        };
        let callback = match self.on_change.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        };
        if let Some(callback) = callback {
            callback(&engine);
        }
        Ok(true)
    }

    /// Sets a callback run after every successful change, by [`PolicyStore::reload`] or the
    /// watcher (authz uses it to emit a `POLICY_CHANGED` grant event and an audit record).
    /// Replaces any earlier callback.
    pub fn on_change(&self, callback: impl Fn(&Arc<PolicyEngine>) + Send + Sync + 'static) {
        let callback: OnChange = Arc::new(callback);
        match self.on_change.write() {
            Ok(mut guard) => *guard = Some(callback),
            Err(poisoned) => *poisoned.into_inner() = Some(callback),
        }
    }

    /// The version in force now and every later one, for tasks that react to changes.
    pub fn subscribe(&self) -> watch::Receiver<String> {
        self.versions.subscribe()
    }

    /// Polls the file every `interval` and reloads it when its modification time or length
    /// changed (the reload then compares content hashes, so a touch without a change is not
    /// a new version). A broken file is logged once, with its line and reason, and not again
    /// until it changes. The task ends when the store is dropped.
    ///
    /// Polling rather than inotify: it works the same on every filesystem, including the
    /// symlink swap Kubernetes does when a mounted ConfigMap changes, and a policy change
    /// taking a second to apply is fine.
    pub fn spawn_watcher(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                let Some(store) = weak.upgrade() else {
                    return;
                };
                // A reload in progress holds the lock: look again next tick rather than block
                // this async task.
                let Ok(seen) = store.stamp.try_lock().map(|g| *g) else {
                    continue;
                };
                if file_stamp(&store.path) == seen {
                    continue;
                }
                let task_store = Arc::clone(&store);
                drop(store);
                match tokio::task::spawn_blocking(move || {
                    let result = task_store.reload();
                    (result, task_store.current())
                })
                .await
                {
                    Ok((Ok(true), engine)) => tracing::info!(
                        version = engine.version(),
                        policies = engine.policy_count(),
                        source = engine.source_name(),
                        "policy reloaded"
                    ),
                    Ok((Ok(false), _)) => {}
                    Ok((Err(error), engine)) => tracing::error!(
                        %error,
                        version_in_force = engine.version(),
                        "policy file refused; the previous policy stays in force"
                    ),
                    Err(error) => tracing::error!(%error, "policy reload task failed"),
                }
            }
        })
    }
}

impl std::fmt::Debug for PolicyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicyStore")
            .field("path", &self.path)
            .field("current", &self.current())
            .finish_non_exhaustive()
    }
}

fn file_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let meta = std::fs::metadata(path).ok()?;
    Some((meta.modified().ok()?, meta.len()))
}
