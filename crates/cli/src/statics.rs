//! The daemon's side of `[static]`: index a built release's static files
//! (`nonstop_proxy::StaticIndex`, persisted inside the release), and keep
//! the proxy serving the files of exactly the live releases the engine
//! names (`nonstop_engine::LiveStatics`). Loading reads files, so it runs
//! on tokio's blocking pool; publications of one app are applied in order
//! and a stale one (overtaken by a newer) is dropped.

use nonstop_core::process::StaticMount;
use nonstop_core::AppName;
use nonstop_engine::LiveStatics;
use nonstop_proxy::{Proxy, StaticIndex, StaticRelease};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

#[derive(Clone)]
pub(crate) struct StaticPublisher {
    proxy: Proxy,
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    /// The newest publication asked for, per app.
    latest: HashMap<AppName, u64>,
    next: u64,
    /// Loaded releases, by app, release directory and mounts.
    loaded: HashMap<(AppName, PathBuf), (Vec<StaticMount>, Arc<StaticRelease>)>,
}

impl StaticPublisher {
    pub fn new(proxy: Proxy) -> Self {
        Self { proxy, state: Arc::new(Mutex::new(State::default())) }
    }

    /// Index `release`'s static files (blocking). The error names a missing
    /// directory and the fix.
    pub fn index(release: &Path, mounts: &[StaticMount]) -> Result<(), String> {
        let index = StaticIndex::load_or_build(release, mounts).map_err(|e| e.to_string())?;
        let files: usize = index.mounts.iter().map(|m| m.files.len()).sum();
        tracing::info!(release = %release.display(), files, "static files indexed");
        Ok(())
    }

    /// Serve the static files of `live` (and no other release of `app`), in
    /// its order: the first release that has a path wins. Loading runs on
    /// the blocking pool; this returns at once.
    pub fn publish(&self, app: &AppName, live: Vec<LiveStatics>) {
        let generation = self.next_generation(app);
        let (state, proxy, app) = (Arc::clone(&self.state), self.proxy.clone(), app.clone());
        let work = move || apply(&state, &proxy, &app, live, generation);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn_blocking(work);
            }
            Err(_) => work(),
        }
    }

    /// [`StaticPublisher::publish`], returning once the files are served: a
    /// starting daemon does this before its proxy accepts, so that no
    /// request for a static file reaches the app meanwhile.
    pub async fn publish_now(&self, app: &AppName, live: Vec<LiveStatics>) {
        let generation = self.next_generation(app);
        let (state, proxy, app) = (Arc::clone(&self.state), self.proxy.clone(), app.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || apply(&state, &proxy, &app, live, generation)).await {
            tracing::warn!("loading the static files failed: {e}");
        }
    }

    fn next_generation(&self, app: &AppName) -> u64 {
        let mut state = lock(&self.state);
        state.next += 1;
        let g = state.next;
        state.latest.insert(app.clone(), g);
        g
    }
}

/// Load what is not loaded yet of `live` and serve it, unless a newer
/// publication than `generation` follows.
fn apply(state: &Mutex<State>, proxy: &Proxy, app: &AppName, live: Vec<LiveStatics>, generation: u64) {
    let mut state = lock(state);
    if state.latest.get(app) != Some(&generation) {
        return; // a newer publication follows
    }
    let mut releases = Vec::new();
    let mut keep = Vec::new();
    for l in live {
        let key = (app.clone(), l.dir.clone());
        let cached = state.loaded.get(&key).filter(|(m, _)| *m == l.mounts).map(|(_, r)| Arc::clone(r));
        let release = match cached {
            Some(r) => r,
            None => match StaticIndex::load_or_build(&l.dir, &l.mounts) {
                Ok(index) => {
                    let r = Arc::new(StaticRelease::load(l.release.0, &l.dir, &index));
                    tracing::info!(release = %l.release, files = r.files(), cached_bytes = r.cached_bytes(), "static files loaded");
                    state.loaded.insert(key.clone(), (l.mounts.clone(), Arc::clone(&r)));
                    r
                }
                Err(e) => {
                    tracing::warn!(release = %l.release, "static files of this release are not served: {e}");
                    continue;
                }
            },
        };
        keep.push(key);
        releases.push(release);
    }
    state.loaded.retain(|k, _| &k.0 != app || keep.contains(k));
    proxy.set_static_releases(app.as_str(), releases);
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}
